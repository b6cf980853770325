"""Descriptor limits: a checkpoint of hundreds of shards loads under a low ``RLIMIT_NOFILE``.

A checkpoint of 300 tiny shards (written by safetensors, with an index as transformers writes
it) is loaded in a child process whose soft and hard limits are lowered, under every strategy,
both engines, ``stream()`` and ``open()``/``get_tensor``; every tensor is compared bit for bit
with what safetensors loads. Where the hard limit allows, the soft one is raised; where it does
not, descriptors are re-opened and checked against the file whose header was read, so a shard
replaced on disk before its re-open fails the load. A limit too low for any load names the limit
and how to raise it. No load leaves a descriptor open.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift
from conftest import bytes_of
from weightlift.errors import CheckpointError, ReadError
from weightlift.sources import resolve
from weightlift.sources.descriptors import POOL, Pool
from weightlift.sources.records import PLAIN

SHARDS = 300
STRATEGIES = ["mmap", "direct", "stream", "auto"]
ENGINES = ["threads", "uring"]
SRC = str(Path(weightlift.__file__).resolve().parent.parent)


def write_checkpoint(directory: Path, shards: int = SHARDS) -> Path:
    """``shards`` safetensors files of three small tensors each and their index."""
    directory.mkdir()
    gen = torch.Generator().manual_seed(20)
    weight_map, total = {}, 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {
            f"model.layers.{i}.weight": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
            f"model.layers.{i}.bias": torch.randn(7, generator=gen),
            f"model.layers.{i}.index": torch.randint(-1000, 1000, (4,), generator=gen,
                                                     dtype=torch.int32),
        }
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return directory


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("fd-limits") / "ckpt")


def safetensors_load(ckpt: Path) -> dict[str, torch.Tensor]:
    """What safetensors loads, one file at a time."""
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


@pytest.fixture(scope="module")
def reference(ckpt: Path) -> dict[str, torch.Tensor]:
    return safetensors_load(ckpt)


#: Runs in a child process under lowered limits: every load of ``MODES`` (or the one named),
#: each tensor's dtype, shape and bytes, and what the process held before and after.
CHILD = textwrap.dedent('''
    import json, os, resource, sys, torch
    import weightlift
    from weightlift.errors import WeightliftError
    from weightlift.sources.descriptors import POOL

    ckpt, modes = sys.argv[1], json.loads(sys.argv[2])

    def fds():
        return sorted(os.listdir("/proc/self/fd"))

    def encoded(tensors):
        return {name: [str(t.dtype), list(t.shape),
                       t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes().hex()]
                for name, t in tensors}

    def run(mode, strategy, engine, hook):
        reports = []
        if mode == "load":
            return weightlift.load(ckpt, strategy=strategy, engine=engine,
                                   on_report=reports.append, on_progress=hook).items(), reports
        if mode == "copy":  # dtype conversion: the copying pipeline, through ring slots
            return weightlift.load(ckpt, strategy=strategy, engine=engine, dtype=torch.float32,
                                   on_report=reports.append, on_progress=hook).items(), reports
        if mode == "stream":
            return list(weightlift.stream(ckpt, strategy=strategy, engine=engine,
                                          max_host_memory="4MiB", on_report=reports.append,
                                          on_progress=hook)), reports
        with weightlift.open(ckpt) as checkpoint:  # "open": every 29th tensor, one by one
            names = checkpoint.keys()[::29]
            return [(n, checkpoint.get_tensor(n, strategy=strategy, engine=engine))
                    for n in names], reports

    # Per mode, in order: a shard to replace by another file of the same bytes, or none.
    replacing = json.loads(sys.argv[3]) if len(sys.argv) > 3 else []
    replace = None

    def hook(done, total):  # replaces one shard, once, after the first block was read
        global replace
        if replace is not None:
            other, target = replace
            os.replace(other, target)
            replace = None

    out = {"limit_before": resource.getrlimit(resource.RLIMIT_NOFILE)}
    before, opens = fds(), POOL.opens
    for mode, strategy, engine in modes:
        key = f"{mode}-{strategy}-{engine}"
        replace = replacing.pop(0) if replacing else None
        try:
            tensors, reports = run(mode, strategy, engine, hook)
            out[key] = {"tensors": encoded(tensors),
                        "fallbacks": reports[0].fallbacks if reports else [],
                        "strategy": reports[0].strategy if reports else None}
        except WeightliftError as exc:
            out[key] = {"error": type(exc).__name__, "message": str(exc), "path": exc.path}
    out["limit_after"] = resource.getrlimit(resource.RLIMIT_NOFILE)
    out["leaked"] = sorted(set(fds()) - set(before))
    out["opens"] = POOL.opens - opens
    print(json.dumps(out))
''')


def in_child(ckpt: Path, modes: list[tuple[str, str, str]], soft: int, hard: int,
             replace: list[tuple[Path, Path]] | None = None) -> dict[str, Any]:
    """Run ``CHILD`` with ``RLIMIT_NOFILE`` set to ``(soft, hard)``; its JSON output. The n-th
    pair of ``replace`` (other, target) replaces target by other during the n-th load."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    args = [sys.executable, "-c", CHILD, str(ckpt), json.dumps(modes)]
    if replace is not None:
        args.append(json.dumps([[str(p) for p in pair] for pair in replace]))
    env = {**os.environ, "PYTHONPATH": SRC}
    done = subprocess.run(args, capture_output=True, text=True, env=env, preexec_fn=limit,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def assert_bit_for_bit(result: dict[str, Any], reference: dict[str, torch.Tensor],
                       names: list[str] | None = None, dtype: torch.dtype | None = None) -> None:
    assert "error" not in result, result
    got = result["tensors"]
    expected = names if names is not None else sorted(reference)
    assert sorted(got) == sorted(expected)
    for name in expected:
        want = reference[name]
        if dtype is not None and want.is_floating_point():
            want = want.to(dtype)
        assert got[name][:2] == [str(want.dtype), list(want.shape)], name
        assert bytes.fromhex(got[name][2]) == bytes_of(want), name


ALL_MODES = ([("load", s, e) for s in STRATEGIES for e in ENGINES]
             + [("copy", s, e) for s in STRATEGIES for e in ENGINES]
             + [("stream", "auto", e) for e in ENGINES] + [("stream", "direct", "uring")]
             + [("open", "auto", "threads"), ("open", "direct", "uring")])


@pytest.fixture(scope="module")
def under_128(ckpt: Path) -> dict[str, Any]:
    """Every mode, once, under ``ulimit -n 128`` (soft and hard): far fewer than 300 files
    × (buffered + O_DIRECT) descriptors."""
    return in_child(ckpt, ALL_MODES, 128, 128)


@pytest.mark.parametrize("mode", ALL_MODES, ids="-".join)
def test_hundreds_of_shards_load_under_a_hard_limit_below_their_count(
        under_128: dict[str, Any], reference: dict[str, torch.Tensor], ckpt: Path,
        mode: tuple[str, str, str]) -> None:
    result = under_128["-".join(mode)]
    names = None
    if mode[0] == "open":
        with weightlift.open(ckpt) as checkpoint:
            names = checkpoint.keys()[::29]
    assert_bit_for_bit(result, reference, names,
                       dtype=torch.float32 if mode[0] == "copy" else None)
    if mode[0] != "open":
        assert any("re-opened" in note and "ulimit -n" in note for note in result["fallbacks"]), \
            result["fallbacks"]


def test_the_loads_under_the_limit_reopen_files_and_leak_none(under_128: dict[str, Any]
                                                             ) -> None:
    assert under_128["limit_after"] == [128, 128], "the hard limit cannot be raised"
    assert under_128["leaked"] == [], "descriptors left open after the loads"
    # Files were closed to make room and opened again: more opens than loads × files.
    assert under_128["opens"] > 2 * SHARDS * len(ALL_MODES)


def test_the_soft_limit_is_raised_where_the_hard_one_allows(ckpt: Path,
                                                           reference: dict[str, torch.Tensor]
                                                           ) -> None:
    result = in_child(ckpt, [("load", "direct", "uring"), ("load", "stream", "threads")],
                      64, 4096)
    assert result["limit_before"] == [64, 4096]
    soft, hard = result["limit_after"]
    assert hard == 4096 and soft >= 3 * SHARDS, result["limit_after"]
    for key in ("load-direct-uring", "load-stream-threads"):
        assert_bit_for_bit(result[key], reference)
    first = result["load-direct-uring"]["fallbacks"]
    assert any("raised it to" in note and "(64)" in note for note in first), first
    assert not any("re-opened" in note for note in first), first
    # Every file stays open from resolve to the end: opened once to resolve, once for O_DIRECT.
    assert result["opens"] <= 2 * SHARDS + 2 * SHARDS
    assert result["leaked"] == []


def test_a_limit_of_16_still_loads(ckpt: Path, reference: dict[str, torch.Tensor]) -> None:
    modes = [("load", s, "uring") for s in STRATEGIES] + [("copy", "direct", "threads")]
    result = in_child(ckpt, modes, 16, 16)
    for mode in modes:
        assert_bit_for_bit(result["-".join(mode)], reference,
                           dtype=torch.float32 if mode[0] == "copy" else None)
    assert result["leaked"] == []


def test_a_limit_too_low_for_any_load_names_it_and_how_to_raise_it(ckpt: Path) -> None:
    result = in_child(ckpt, [("load", "auto", "auto")], 9, 9)
    error = result["load-auto-auto"]
    assert error.get("error") == "CheckpointError", error
    message = error["message"]
    for part in ("descriptor limit", "soft 9", "hard 9", f"{SHARDS} files", "ulimit -n",
                 "LimitNOFILE=", "--ulimit nofile="):
        assert part in message, message
    assert "Too many open files" not in message


REPLACED = ["direct", "stream", "mmap"]


@pytest.fixture(scope="module")
def replaced(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """One load per strategy in one child under ``ulimit -n 32``, each replacing the same
    shard by a file of the same bytes after its first block (each load resolves the checkpoint
    anew, so each sees the file the one before it left, and its own replacement)."""
    directory = tmp_path_factory.mktemp("replaced")
    ckpt = write_checkpoint(directory / "ckpt", shards=60)
    target = sorted(ckpt.glob("*.safetensors"))[40]  # closed at resolve, re-opened to read
    pairs = []
    for strategy in REPLACED:
        other = directory / f"other-{strategy}.safetensors"
        save_file(load_file(str(target)), str(other), metadata={"format": "pt"})  # same bytes
        pairs.append((other, target))
    modes = [("load", strategy, "threads") for strategy in REPLACED]
    return target, in_child(ckpt, modes, 32, 32, replace=pairs)


@pytest.mark.parametrize("strategy", REPLACED)
def test_a_shard_replaced_before_it_is_reopened_fails_the_load(
        replaced: tuple[Path, dict[str, Any]], strategy: str) -> None:
    target, result = replaced
    error = result[f"load-{strategy}-threads"]
    assert error.get("error") == "ReadError", error
    assert error["path"] == str(target)
    assert "replaced by another during the load" in error["message"], error["message"]
    assert result["leaked"] == []


# --- in process: the pool itself -----------------------------------------------------------------

@pytest.fixture
def small_pool(monkeypatch: pytest.MonkeyPatch) -> Pool:
    """The process's pool, bounded to 4 descriptors for the test (resolve sizes it again)."""
    monkeypatch.setattr(POOL, "capacity", 4)
    monkeypatch.setattr("weightlift.sources.local.reserve", _fixed_room)
    return POOL


def _fixed_room(files: int, held: int, root: str) -> Any:
    from weightlift.sources.descriptors import Room

    return Room(files, 4, None)


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_reopened_shard_is_checked_against_its_stamp(tmp_path: Path, small_pool: Pool) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", shards=12)
    paths = sorted(ckpt.glob("*.safetensors"))
    before = open_fds()
    with resolve(ckpt) as layout:
        assert small_pool.held <= 4
        first, second = layout.shards[0], layout.shards[1]
        # Replaced by a file of the same bytes: still another file, refused on re-open.
        copy = tmp_path / "copy.safetensors"
        copy.write_bytes(paths[0].read_bytes())
        os.replace(copy, paths[0])
        with pytest.raises(ReadError, match="replaced by another during the load") as info:
            first.pin(PLAIN)
        assert info.value.path == str(paths[0])
        # Changed in place (appended to): refused as changed.
        with open(paths[1], "ab") as f:
            f.write(b"\0" * 8)
        with pytest.raises(ReadError, match="file changed during the load"):
            second.pin(PLAIN)
        # An unchanged shard re-opens.
        third = layout.shards[2]
        with third.opened(PLAIN) as fd:
            assert os.fstat(fd).st_ino == third.stamp.inode
    assert open_fds() <= before


def test_a_pinned_descriptor_is_never_closed_to_make_room(tmp_path: Path,
                                                          small_pool: Pool) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", shards=10)
    # Descriptors the process's pool holds already: a read an earlier test left in flight for
    # good keeps its descriptor pinned (tests/test_interrupts.py, the kept read), by design.
    before = small_pool.held
    with resolve(ckpt) as layout:
        fds = [shard.pin(PLAIN) for shard in layout.shards]  # more pins than the bound
        assert small_pool.held == before + 10
        for shard, fd in zip(layout.shards, fds):
            assert os.fstat(fd).st_ino == shard.stamp.inode, "a pinned descriptor was reused"
            assert shard.descriptor(PLAIN) == fd
        for shard in layout.shards:
            shard.unpin(PLAIN)
        assert small_pool.held <= 4, "unpinned descriptors beyond the bound stay open"
        with pytest.raises(AssertionError, match="without being pinned"):
            layout.shards[0].descriptor(PLAIN)


def test_closing_a_checkpoint_while_a_read_holds_a_descriptor_waits_for_it(
        tmp_path: Path, small_pool: Pool) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", shards=2)
    layout = resolve(ckpt)
    shard = layout.shards[0]
    fd = shard.pin(PLAIN)
    layout.close()
    assert os.fstat(fd).st_ino == shard.stamp.inode, "closed under a pinned read"
    shard.unpin(PLAIN)
    with pytest.raises(OSError):
        os.fstat(fd)  # closed with its last pin (the number is not reused in between)
    with pytest.raises(ReadError, match="closed"):
        shard.pin(PLAIN)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_loads_with_a_small_pool_are_exact_and_leak_nothing(
        tmp_path: Path, small_pool: Pool, strategy: str, engine: str) -> None:
    ckpt = write_checkpoint(tmp_path / "ckpt", shards=24)
    expected = safetensors_load(ckpt)
    before, held, opens = open_fds(), small_pool.held, small_pool.opens
    state = weightlift.load(ckpt, strategy=strategy, engine=engine)
    streamed = dict(weightlift.stream(ckpt, strategy=strategy, engine=engine,
                                      max_host_memory="4MiB"))
    assert open_fds() <= before, "a load left a descriptor open"
    assert small_pool.held == held
    assert small_pool.opens - opens > 2 * 24, "the bound of 4 forced no re-open"
    for name, want in expected.items():
        assert bytes_of(state[name]) == bytes_of(want), name
        assert bytes_of(streamed[name]) == bytes_of(want), name


@pytest.mark.parametrize("when", ["resolve", "load"])
def test_emfile_while_opening_a_shard_names_the_limit(tmp_path: Path, when: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's EMFILE (a real ``OSError`` from ``os.open``, for this checkpoint's files:
    at resolve, or for the O_DIRECT descriptors of a load) becomes an actionable error."""
    ckpt = write_checkpoint(tmp_path / "ckpt", shards=3)
    real_open = os.open

    def open_or_emfile(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        refused = str(path).startswith(str(ckpt)) and str(path).endswith(".safetensors") and (
            when == "resolve" or flags & getattr(os, "O_DIRECT", 0))
        if refused:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_or_emfile)
    before = open_fds()
    kind = CheckpointError if when == "resolve" else ReadError
    with pytest.raises(kind) as info:
        weightlift.load(ckpt, strategy="direct")
    message = str(info.value)
    assert "too many open files (the descriptor limit is soft" in message, message
    assert "ulimit -n" in message and "LimitNOFILE=" in message, message
    assert info.value.path is not None and info.value.path.endswith(".safetensors")
    assert open_fds() <= before


def pinned_descriptors() -> set[int]:
    """The descriptors the pool holds pinned now (its private table, read under its lock)."""
    with POOL._lock:
        return {held.fd for held in POOL._open.values() if held.pins > 0}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("strategy", ["direct", "stream"])
def test_every_read_completes_on_a_descriptor_still_pinned(tmp_path: Path, small_pool: Pool,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           strategy: str, engine: str) -> None:
    """With 40 shards and room for 4 descriptors, files are closed and re-opened all through the
    load; every read, seen where the kernel answers it (``preadv`` on a worker thread, or the
    io_uring completion), ran on a descriptor that was pinned, so not closed and not reused."""
    from weightlift.io import base as io_base
    from weightlift.io import uring

    ckpt = write_checkpoint(tmp_path / "ckpt", shards=40)
    expected = safetensors_load(ckpt)
    unpinned: list[int] = []
    reads = 0

    def note(fd: int) -> None:
        nonlocal reads
        reads += 1
        if fd not in pinned_descriptors():
            unpinned.append(fd)

    if engine == "uring":
        real_completed = uring.completed

        def completed(fd: int, offset: int, length: int, result: int) -> int:
            note(fd)
            return real_completed(fd, offset, length, result)

        monkeypatch.setattr(uring, "completed", completed)
    else:
        real_preadv = io_base.preadv

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            done = real_preadv(fd, buffers, offset)
            note(fd)
            return done

        monkeypatch.setattr(io_base, "preadv", preadv)
    before, opens = open_fds(), small_pool.opens
    state = weightlift.load(ckpt, strategy=strategy, engine=engine)
    assert reads >= 40, "the seam saw no reads"
    assert unpinned == [], f"reads on descriptors that were not pinned: {unpinned}"
    assert small_pool.opens - opens > 40, "nothing was re-opened"
    assert open_fds() <= before
    for name, want in expected.items():
        assert bytes_of(state[name]) == bytes_of(want), name


def test_threads_sharing_a_small_pool_get_exact_bytes(tmp_path: Path, small_pool: Pool) -> None:
    """Four threads load one checkpoint at once, two through their own resolve and two through
    one shared ``open()`` checkpoint (whose O_DIRECT descriptors one load closes while another
    holds them pinned): 24 shards, room for 4 descriptors."""
    from concurrent.futures import ThreadPoolExecutor

    ckpt = write_checkpoint(tmp_path / "ckpt", shards=24)
    expected = safetensors_load(ckpt)
    before = open_fds()
    with weightlift.open(ckpt) as shared:
        names = shared.keys()

        def own(strategy: str, engine: str) -> dict[str, torch.Tensor]:
            return weightlift.load(ckpt, strategy=strategy, engine=engine)

        def through_shared(strategy: str, engine: str) -> dict[str, torch.Tensor]:
            return {name: shared.get_tensor(name, strategy=strategy, engine=engine)
                    for name in names}

        jobs = [(own, "direct", "uring"), (own, "stream", "threads"),
                (through_shared, "direct", "threads"), (through_shared, "direct", "uring")]
        with ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda job: job[0](job[1], job[2]), jobs))
    assert open_fds() <= before
    for state in results:
        assert sorted(state) == sorted(expected)
        for name, want in expected.items():
            assert bytes_of(state[name]) == bytes_of(want), name


def test_an_open_refused_while_every_descriptor_is_pinned_waits_for_one_to_be_unpinned(
        tmp_path: Path) -> None:
    """EMFILE with nothing idle to close is transient while reads hold pins (or the rest of the
    program holds a descriptor for a moment): the open waits for an unpin, then succeeds."""
    pool = Pool(capacity=2)
    first, second = object(), object()
    path = tmp_path / "f"
    path.write_bytes(b"x")
    pool.pin(first, PLAIN, lambda kind, opened: os.open(path, os.O_RDONLY))
    refusals = []

    def opener(kind: str, opened: list[int]) -> int:
        if pool.is_pinned(first, PLAIN):  # the limit is reached until ``first`` is unpinned
            refusals.append(kind)
            if len(refusals) == 1:
                threading.Timer(0.05, pool.unpin, (first, PLAIN)).start()
            raise OSError(errno.EMFILE, "Too many open files")
        return os.open(path, os.O_RDONLY)

    fd = pool.pin(second, PLAIN, opener)
    assert refusals, "the opener was never refused: the test checks nothing"
    assert os.fstat(fd).st_size == 1
    pool.unpin(second, PLAIN)
    pool.release(first)
    pool.release(second)
    assert pool.held == 0


def test_an_open_refused_for_good_still_raises_after_its_bounded_wait(tmp_path: Path) -> None:
    pool = Pool(capacity=2)
    owner = object()

    def opener(kind: str, opened: list[int]) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    with pytest.raises(OSError) as caught:
        pool.pin(owner, PLAIN, opener)
    assert caught.value.errno == errno.EMFILE
    assert pool.held == 0
