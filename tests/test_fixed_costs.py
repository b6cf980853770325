"""Probes whose answer cannot change within a process are measured once, with a rule that
measures again when it could have changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightlift import probes
from weightlift.io import direct
from weightlift.io.base import Unavailable
from weightlift.sources import resolve


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    return path


def test_the_o_direct_probe_runs_once_per_file_system(small_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[int] = []
    real = direct._probe_read

    def counted(fd: int, buf: torch.Tensor) -> None:
        probed.append(fd)
        real(fd, buf)

    monkeypatch.setattr(direct, "_probe_read", counted)
    monkeypatch.setattr(direct, "_READS_WORK", set())
    with resolve(small_file) as layout:
        for _ in range(3):
            strategy = direct.DirectStrategy(per_range=False)
            try:
                strategy.prepare(layout.shards)
            except Unavailable:
                pytest.skip("this file system refuses O_DIRECT")
            finally:
                strategy.close()
        assert len(probed) == 1
        # Another file system (or one mounted in an unmounted one's place) is probed anew.
        monkeypatch.setattr(direct, "_file_system", lambda fd: (-1, -1))
        strategy = direct.DirectStrategy(per_range=False)
        strategy.prepare(layout.shards)
        strategy.close()
        assert len(probed) == 2


def test_a_refused_probe_is_not_remembered(small_file: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "_READS_WORK", set())
    monkeypatch.setattr(direct, "_probe_read", lambda fd, buf: (_ for _ in ()).throw(
        OSError(22, "Invalid argument")))
    with resolve(small_file) as layout:
        strategy = direct.DirectStrategy(per_range=False)
        with pytest.raises(Unavailable, match="O_DIRECT"):
            strategy.prepare(layout.shards)
        strategy.close()
    assert direct._READS_WORK == set()


def test_the_cgroup_limit_is_measured_again_after_its_ttl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[int] = []

    def measure() -> int:
        measured.append(1)
        return 123 << 20

    clock = [1000.0]
    monkeypatch.setattr(probes, "_measure_memory_limit", measure)
    monkeypatch.setattr(probes, "_limit_cache", None)
    monkeypatch.setattr(probes.time, "monotonic", lambda: clock[0])
    assert probes.cgroup_memory_limit() == 123 << 20
    clock[0] += probes.LIMIT_TTL / 2
    assert probes.cgroup_memory_limit() == 123 << 20
    assert len(measured) == 1
    clock[0] += probes.LIMIT_TTL
    probes.cgroup_memory_limit()
    assert len(measured) == 2


def test_views_made_in_bulk_are_those_made_one_by_one() -> None:
    """``as_tensors`` (one typed view and one split per run of a dtype) gives each tensor
    ``as_tensor`` gives, over the same bytes: mixed dtypes, a scalar, an empty tensor, and an
    odd offset a dtype cannot be viewed at (copied, as ``as_tensor`` copies it)."""
    from weightlift.formats.records import DTYPES, TensorInfo
    from weightlift.place import as_tensor, as_tensors
    from weightlift.sources.records import Entry

    layout = [("a", "BF16", (3, 4)), ("b", "BF16", (5,)), ("c", "BF16", ()),
              ("d", "F32", (2, 2)), ("e", "F32", (0, 3)), ("f", "F32", (4,)),
              ("g", "U8", (3,)), ("h", "F16", (2, 3)), ("i", "F16", (7,))]
    raw = torch.arange(512, dtype=torch.int16).view(torch.uint8)
    base, at, entries = 8, 8, []
    for name, dtype, shape in layout:
        nbytes = DTYPES[dtype].itemsize * int(torch.tensor(shape).prod()) if shape else 2
        entries.append(Entry(0, TensorInfo(name, DTYPES[dtype], shape, at, at + nbytes)))
        at += nbytes
    bulk = as_tensors(raw[base:], base, entries)
    assert len(bulk) == len(entries)
    for entry, tensor in zip(entries, bulk):
        lo, hi = entry.info.start, entry.info.end
        one = as_tensor(raw[lo:hi], entry.info)
        assert tensor.dtype == one.dtype and tensor.shape == one.shape, entry.name
        assert torch.equal(tensor.reshape(-1).view(torch.uint8),
                           one.reshape(-1).view(torch.uint8)), entry.name
    # Zero-copy where the offset allows it: the first run shares the caller's bytes.
    assert bulk[0].untyped_storage().data_ptr() == raw.untyped_storage().data_ptr()


def test_a_header_is_validated_once_and_its_copies_are_the_callers(tmp_path: Path) -> None:
    """A header seen before (same bytes, same file size) is not validated again, gives equal
    records under the new path, and a metadata dict the caller changes is not the next one's;
    a refused header is refused every time."""
    from weightlift.errors import FormatError
    from weightlift.formats import safetensors as fmt

    raw = (b'{"__metadata__":{"k":"v"},"w":{"dtype":"F32","shape":[2],'
           b'"data_offsets":[0,8]}}')
    calls: list[int] = []
    real = fmt._parse_header

    def counted(raw: bytes, *, file_size: int, path: str) -> object:
        calls.append(file_size)
        return real(raw, file_size=file_size, path=path)

    size = 8 + len(raw) + 8
    fmt._MEMO.clear()
    try:
        original = fmt._parse_header
        fmt._parse_header = counted  # type: ignore[assignment]
        first = fmt.parse_header(raw, file_size=size, path="a.safetensors")
        first.metadata["k"] = "changed"  # type: ignore[index]
        again = fmt.parse_header(raw, file_size=size, path="b.safetensors")
        assert calls == [size]
        assert again.path == "b.safetensors" and again.tensors == first.tensors
        assert again.metadata == {"k": "v"}
        with pytest.raises(FormatError, match="belong to no tensor"):  # the same, 4 bytes longer
            fmt.parse_header(raw, file_size=size + 4, path="c.safetensors")
        assert len(calls) == 2
        bad = raw.replace(b"[0,8]", b"[0,9]")
        for _ in range(2):
            with pytest.raises(FormatError, match="hold 9 bytes"):
                fmt.parse_header(bad, file_size=size + 1, path="d.safetensors")
        assert len(calls) == 4
    finally:
        fmt._parse_header = original  # type: ignore[assignment]
        fmt._MEMO.clear()


def test_a_stream_estimates_each_files_residency_once_and_keeps_no_estimate(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The decision's estimate of each file's page cache serves the strategy it prepares next:
    one estimate a file per load, none left on the shards for a later load of an ``open()``
    checkpoint; a warm file's map is the one read-only map of ones, not a fresh array."""
    import numpy as np

    import weightlift
    from weightlift.io import residency

    tensors = {f"t{i}": torch.full((1 << 20,), float(i)) for i in range(3)}  # 4 MiB each
    for i, name in enumerate(tensors):
        save_file({name: tensors[name]}, tmp_path / f"model-0000{i + 1}-of-00003.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {' + ", ".join(f'"t{i}": "model-0000{i + 1}-of-00003.safetensors"'
                                       for i in range(3)) + "}}")
    for path in tmp_path.glob("*.safetensors"):
        path.read_bytes()  # cached (written just now as well)
    calls: list[int] = []
    real = probes.sampled_resident_bytes
    monkeypatch.setattr(probes, "sampled_resident_bytes",
                        lambda fd, *a: calls.append(fd) or real(fd, *a))
    maps: list[np.ndarray] = []
    real_map = residency.warm_map
    monkeypatch.setattr(residency, "warm_map", lambda fd, e: maps.append(real_map(fd, e)) or maps[-1])
    for _ in range(2):
        calls.clear()
        got = dict(weightlift.stream(tmp_path, strategy="auto", max_host_memory="8MiB"))
        assert {k: torch.equal(v, tensors[k]) for k, v in got.items()} == dict.fromkeys(
            tensors, True)
        assert len(calls) == 3, calls
    with weightlift.open(tmp_path) as checkpoint:
        for name, tensor in tensors.items():
            assert torch.equal(checkpoint.get_tensor(name, device="cpu",
                                                     dtype=torch.float16), tensor.half())
        assert all(shard.resident_hint is None for shard in checkpoint.layout.shards)
        stale = checkpoint.layout.shards[0]
        stale.resident_hint = (0.0, 0)  # a past load's, long ago: not taken
        assert stale.hint() is None
    assert all(shard_map is None or not shard_map.flags.writeable for shard_map in maps)
