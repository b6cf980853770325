"""Verified loads: SHA-256 of each file, hashed from the bytes as they are read.

The Hugging Face cache is built in the test as huggingface_hub lays it out (blobs named by their
SHA-256, symlinked snapshots); the digests are computed here with hashlib and the tensors compared
with the safetensors package's own load_file.
"""

from __future__ import annotations

import errno
import hashlib
import re
import json
import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift
from conftest import assert_same
from test_hub import add_snapshot
from weightlift.cli import main
from weightlift.errors import CheckpointError, IntegrityError

REPO = "tiny-org/verified"
COMMIT = "c" * 40
STRATEGIES = ["mmap", "direct", "stream"]


def write_checkpoint(directory: Path) -> Path:
    """Two shards and an index; large tensors (several blocks) and small ones (shared blocks)."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(11)
    shards = {
        "model-00001-of-00002.safetensors": {
            "embed.weight": torch.randn(512, 1024, generator=gen),        # 2 MiB
            "norm.weight": torch.randn(1024, generator=gen),
            "bias": torch.randn(7, generator=gen).to(torch.bfloat16),
        },
        "model-00002-of-00002.safetensors": {
            "head.weight": torch.randn(384, 1024, generator=gen).to(torch.float16),
            "ids": torch.arange(100, dtype=torch.int64),
        },
    }
    weight_map = {}
    for name, tensors in shards.items():
        save_file(tensors, directory / name, metadata={"format": "pt"})
        weight_map.update({tensor: name for tensor in tensors})
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    return directory


def reference(directory: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("verify") / "files")


@pytest.fixture
def hub(tmp_path: Path, files: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, files, COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def blob_of(hub: Path, name: str) -> Path:
    return (hub / f"models--{REPO.replace('/', '--')}" / "snapshots" / COMMIT / name).resolve()


def flip_data_byte(blob: Path) -> None:
    data = bytearray(blob.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01
    blob.write_bytes(bytes(data))


def truncate_then_pad(blob: Path) -> None:
    """A half-downloaded file padded back to its size: the header still parses."""
    size = blob.stat().st_size
    data = blob.read_bytes()[:size // 2]
    blob.write_bytes(data + b"\0" * (size - len(data)))


def change_header_metadata(blob: Path) -> None:
    """A change inside the header ("pt" → "pu" in its metadata): still valid, another file."""
    data = blob.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = data[8:8 + length]
    assert header.count(b'"pt"') == 1
    blob.write_bytes(data[:8] + header.replace(b'"pt"', b'"pu"') + data[8 + length:])


CORRUPTIONS: dict[str, Callable[[Path], None]] = {
    "flipped byte": flip_data_byte, "truncated then padded": truncate_then_pad,
    "header byte": change_header_metadata}

LOADS: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "cpu": lambda src, **kw: weightlift.load(src, **kw),
    "dtype": lambda src, **kw: weightlift.load(src, dtype=torch.float32, **kw),
    "stream": lambda src, **kw: {k: v.clone() for k, v in weightlift.stream(
        src, max_host_memory="4MiB", **kw)},
    "stream-dtype": lambda src, **kw: {k: v.clone() for k, v in weightlift.stream(
        src, dtype=torch.float32, max_host_memory="4MiB", **kw)},
}


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("how", sorted(LOADS))
def test_a_good_cache_loads_verified(hub: Path, files: Path, strategy: str, how: str) -> None:
    got = LOADS[how](f"hf://{REPO}", strategy=strategy, verify=True)
    expected = reference(files)
    if "dtype" in how:
        expected = {k: v.float() if v.is_floating_point() else v for k, v in expected.items()}
    assert_same(got, expected)


CORRUPTED = ([("flipped byte", how, strategy) for how in sorted(LOADS) for strategy in STRATEGIES]
             + [(corruption, how, strategy) for corruption in ("header byte", "truncated then padded")
                for how, strategy in zip(sorted(LOADS), STRATEGIES + ["mmap"])])


@pytest.mark.parametrize("corruption, how, strategy", CORRUPTED)
def test_a_corrupted_blob_is_an_integrity_error(hub: Path, files: Path, strategy: str, how: str,
                                                corruption: str) -> None:
    shard = "model-00002-of-00002.safetensors"
    blob = blob_of(hub, shard)
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    CORRUPTIONS[corruption](blob)
    bad = hashlib.sha256(blob.read_bytes()).hexdigest()
    with pytest.raises(IntegrityError) as info:
        LOADS[how](f"hf://{REPO}", strategy=strategy, verify=True)
    error = info.value
    assert shard in str(error) and good in str(error) and bad in str(error)
    assert (error.expected, error.actual) == (good, bad)
    assert not [t for t in threading.enumerate() if t.name == "weightlift-verify"]


def test_without_verify_the_corruption_goes_unnoticed(hub: Path) -> None:
    flip_data_byte(blob_of(hub, "model-00001-of-00002.safetensors"))
    weightlift.load(f"hf://{REPO}")  # what verify=True is for


def test_stream_raises_before_the_last_tensor_of_a_bad_file(hub: Path, files: Path) -> None:
    with weightlift.open(files) as ckpt:
        order = ckpt.keys()  # file order: the bad second shard's tensors come last
    flip_data_byte(blob_of(hub, "model-00002-of-00002.safetensors"))
    seen = []
    with pytest.raises(IntegrityError):
        for name, _ in weightlift.stream(f"hf://{REPO}", verify=True, strategy="stream"):
            seen.append(name)
    assert order[-1] not in seen
    assert {"embed.weight", "norm.weight", "bias"} <= set(seen)  # the good file came through


@pytest.mark.parametrize("corrupt", [False, True])
def test_open_verifies_every_file_first(hub: Path, files: Path, corrupt: bool) -> None:
    if corrupt:
        flip_data_byte(blob_of(hub, "model-00001-of-00002.safetensors"))
        with pytest.raises(IntegrityError, match="model-00001-of-00002"):
            weightlift.open(f"hf://{REPO}", verify=True)
        return
    with weightlift.open(f"hf://{REPO}", verify=True) as ckpt:
        assert torch.equal(ckpt.get_tensor("ids"), reference(files)["ids"])


def test_digests_given_by_the_user(files: Path, tmp_path: Path) -> None:
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files.glob("*.safetensors")}
    assert_same(weightlift.load(files, verify=sums), reference(files))
    listing = tmp_path / "SHA256SUMS"
    listing.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    assert_same(weightlift.load(files, verify=str(listing)), reference(files))
    wrong = dict(sums, **{"model-00001-of-00002.safetensors": "0" * 64})
    with pytest.raises(IntegrityError, match="0{64}"):
        weightlift.load(files, verify=wrong)


def test_verify_outside_a_cache_asks_for_digests(files: Path) -> None:
    with pytest.raises(CheckpointError, match="not a file of a Hugging Face cache.*verify="):
        weightlift.load(files, verify=True)
    with pytest.raises(CheckpointError, match="has no digest in the ones given"):
        weightlift.load(files, verify={"model-00001-of-00002.safetensors": "0" * 64})
    with pytest.raises(CheckpointError, match="not 64 hex digits"):
        weightlift.load(files / "model-00002-of-00002.safetensors",
                        verify={"model-00002-of-00002.safetensors": "abc"})


def test_verifying_part_of_a_file_is_refused(hub: Path) -> None:
    with pytest.raises(CheckpointError, match="whole files.*1 of the 3 tensors"):
        weightlift.load(f"hf://{REPO}", keys=["embed.weight"], verify=True)
    # every tensor of the second shard: that file is verified whole
    got = weightlift.load(f"hf://{REPO}", keys=["head.weight", "ids"], verify=True)
    assert set(got) == {"head.weight", "ids"}


def test_cli_verify_and_load_verify(hub: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["verify", f"hf://{REPO}"]) == 0
    out = capsys.readouterr().out
    assert out.count(": OK (") == 2
    assert main(["load", "--verify", f"hf://{REPO}", "-q"]) == 0
    capsys.readouterr()
    blob = blob_of(hub, "model-00002-of-00002.safetensors")
    good = hashlib.sha256(blob.read_bytes()).hexdigest()
    flip_data_byte(blob)
    assert main(["verify", f"hf://{REPO}"]) == 1
    out = capsys.readouterr()
    assert "model-00002-of-00002.safetensors" in out.out + out.err and good in out.out + out.err
    assert main(["load", "--verify", f"hf://{REPO}", "-q"]) == 1
    assert "SHA-256 mismatch" in capsys.readouterr().err


def test_the_bench_sha256_row_verifies_with_digests_computed_before(files: Path) -> None:
    from weightlift.bench.loaders import LOADERS, VERIFIED, Job, digest_file, write_digests

    shards = tuple(str(p) for p in sorted(files.glob("*.safetensors")))
    sums = write_digests(shards)
    assert sums == digest_file(shards) and sums.read_text().count("\n") == 2
    try:
        for scenario in ("to_cpu", "device"):
            job = Job(source=str(files), files=shards, scenario=scenario, device="cpu")
            got = {name: tensor.clone() for name, tensor in LOADERS[VERIFIED].run(job)}
            assert_same(got, reference(files))
        lines = sums.read_text().splitlines()
        sums.write_text("\n".join(["0" * 64 + lines[0][64:]] + lines[1:]) + "\n")
        job = Job(source=str(files), files=shards, scenario="to_cpu", device="cpu")
        with pytest.raises(IntegrityError):
            list(LOADERS[VERIFIED].run(job))
    finally:
        sums.unlink()


@pytest.mark.parametrize("verify, message", [
    ({}, "verify={} names no file, so it would check nothing"),
    ("", "verify='' names no digest file"),
])
@pytest.mark.parametrize("entry", ["load", "stream", "open"])
def test_an_empty_verify_is_refused_before_anything_is_opened(files: Path, verify: object,
                                                              message: str, entry: str) -> None:
    """An empty verify would check nothing: refused, by every entry point, before the source
    is even resolved (a missing path is not what the error is about)."""
    calls = {
        "load": lambda source: weightlift.load(source, verify=verify),
        "stream": lambda source: next(weightlift.stream(source, verify=verify)),
        "open": lambda source: weightlift.open(source, verify=verify),
    }
    for source in (files, files / "no-such-file.safetensors"):
        with pytest.raises(ValueError, match="^" + re.escape(message)):
            calls[entry](source)


def test_a_bad_verify_is_refused_before_anything_is_opened(files: Path, tmp_path: Path) -> None:
    missing = files / "no-such-file.safetensors"
    with pytest.raises(CheckpointError, match="'abc' is not 64 hex digits"):
        weightlift.load(missing, verify={"a.safetensors": "abc"})
    with pytest.raises(TypeError, match="verify maps 'a.safetensors' to 3"):
        weightlift.load(missing, verify={"a.safetensors": 3})
    with pytest.raises(CheckpointError, match="cannot read the digest file"):
        weightlift.load(missing, verify=str(tmp_path / "SHA256SUMS"))


@pytest.mark.parametrize("code", [errno.EINTR, errno.EAGAIN])
def test_the_verifiers_own_reads_ask_again_after_a_transient_error(
        files: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """Bytes no tensor covers (each header) the verifier reads itself, through the read path's
    seam: answered ``code`` twice at each offset and then only half of what is asked, it asks
    again and continues (io/retry.py), and the digests match."""
    import weightlift.io.base as io_base

    preadv = io_base.preadv
    answers: Counter[int] = Counter()

    def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
        answers[offset] += 1
        if answers[offset] <= 2:
            raise OSError(code, os.strerror(code))
        return preadv(fd, [buffers[0][:max(1, len(buffers[0]) // 2)]], offset)

    monkeypatch.setattr(io_base, "preadv", flaky)
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files.glob("*.safetensors")}
    assert_same(weightlift.load(files, verify=sums, strategy="mmap"), reference(files))
    assert answers[0] >= 3, "the headers were not read through the seam"
    assert len(answers) > 2, "no read was continued after a short one"


def test_a_whole_load_verifies_every_file_even_one_it_reads_no_tensor_from(
        tmp_path: Path) -> None:
    """A tensor stored twice loads from the last file; the first file, whose only tensor that
    is, is still verified."""
    save_file({"shared": torch.zeros(4)}, tmp_path / "a.safetensors")
    save_file({"shared": torch.ones(4), "y": torch.ones(2)}, tmp_path / "b.safetensors")
    sums = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in tmp_path.glob("*.safetensors")}
    with pytest.warns(weightlift.CheckpointWarning, match="'shared' from b.safetensors"):
        assert torch.equal(weightlift.load(tmp_path, verify=sums)["shared"], torch.ones(4))
    with pytest.warns(weightlift.CheckpointWarning), \
            pytest.raises(IntegrityError, match="a.safetensors: SHA-256 mismatch"):
        weightlift.load(tmp_path, verify=dict(sums, **{"a.safetensors": "0" * 64}))


def test_cli_verify_checks_a_file_whose_tensors_all_load_from_elsewhere(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_file({"shared": torch.zeros(4)}, tmp_path / "a.safetensors")
    save_file({"shared": torch.ones(4), "y": torch.ones(2)}, tmp_path / "b.safetensors")
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                            for p in sorted(tmp_path.glob("*.safetensors"))))
    with pytest.warns(weightlift.CheckpointWarning):
        assert main(["verify", str(tmp_path), "--sums", str(sums)]) == 0
    out = capsys.readouterr().out
    assert "a.safetensors: OK" in out and "b.safetensors: OK" in out
    data = bytearray((tmp_path / "a.safetensors").read_bytes())
    data[-1] ^= 0x01  # in the tensor's bytes
    (tmp_path / "a.safetensors").write_bytes(bytes(data))
    with pytest.warns(weightlift.CheckpointWarning):
        assert main(["verify", str(tmp_path), "--sums", str(sums)]) == 1
    out = capsys.readouterr().out
    assert "a.safetensors: FAILED" in out and "b.safetensors: OK" in out
