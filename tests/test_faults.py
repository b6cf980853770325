"""I/O faults and changed files: every failure is a ``ReadError`` naming the file (and the offset of
the failed read), for every strategy and entry point; nothing half-loaded is returned, no
descriptor or thread is left behind, and the next load in the same process works.

Two injection points, both on the real read path:

* the ``weightlift.io.base.preadv`` seam, through which ``stream`` and ``direct`` issue every data
  read on the thread engine, the ``weightlift.io.uring`` seams (``enter``, ``completed``) of the
  io_uring engine, and ``weightlift.io.base.madvise`` (``MADV_POPULATE_*``): EIO, short reads,
  EINTR, EAGAIN, ECANCELED exactly where the kernel would report them;
* ``faultfs``, a FUSE file system failing reads at chosen offsets, so the kernel's page cache,
  readahead and ``mmap`` page faults see the error too (skipped where FUSE cannot be mounted).

Files changed under a load (truncated, rewritten, replaced, deleted) are changed for real from the
``on_progress`` callback, which runs between blocks.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift
import weightlift.sources.local
from conftest import bytes_of, random_tensor
from faultfs import Fault, FaultFS
import pagecache
from weightlift.errors import CheckpointError, ReadError, WeightliftError
from weightlift.io import STRATEGIES
from weightlift.io import base as io_base
from weightlift.io import retry, uring
from weightlift.io.mapped import MADV_POPULATE_READ

STRATEGY_NAMES = ["mmap", "direct", "stream", "auto"]
#: Strategies whose data reads go through the preadv seam (mmap faults pages in instead).
SEAM_STRATEGIES = ["direct", "stream", "auto"]
#: Small reads, so a few-MiB checkpoint spans many blocks and a fault can land mid-load.
READ_SIZE = 256 << 10


# ---------------------------------------------------------------------------------------------
# Resources: what a failed or abandoned load must give back


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory listing's own descriptor, closed already
    return fds


@contextmanager
def no_leaks() -> Iterator[None]:
    """Assert that the block leaves no descriptor open and no thread running."""
    fds, threads = open_fds(), set(threading.enumerate())
    yield
    gc.collect()  # a caught error's traceback may hold frames in a cycle until collected
    leaked = {fd: target for fd, target in open_fds().items() if fds.get(fd) != target}
    assert not leaked, f"descriptors left open: {leaked}"
    extra = set(threading.enumerate()) - threads
    assert not extra, f"threads left running: {[t.name for t in extra]}"


@dataclass(frozen=True)
class Failure:
    """What a caller learns from an error, kept without the error itself: its traceback holds
    the failed call's frames (and their buffers) for as long as it lives."""

    kind: type[WeightliftError]
    path: str | None
    message: str


def failure(action: Callable[[], object]) -> Failure:
    """Run ``action``, which must raise a WeightliftError, and handle it."""
    try:
        action()
    except WeightliftError as exc:
        return Failure(type(exc), exc.path, str(exc))
    raise AssertionError("expected a WeightliftError, the load succeeded")


def failed_read(error: Failure) -> tuple[int, int]:
    """(offset, length) of the failed read the message names."""
    found = re.search(r"read of (\d+) bytes at offset (\d+)", error.message)
    assert found, f"no offset in {error.message}"
    return int(found.group(2)), int(found.group(1))


# ---------------------------------------------------------------------------------------------
# Checkpoints and ways to load them


@pytest.fixture(autouse=True)
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    for strategy in STRATEGIES.values():
        monkeypatch.setattr(strategy, "read_size", READ_SIZE)


def make_tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(7,), (256, 300), (1000, 513), (3, 5, 7), (64, 1024), (513, 1001), (11,),
              (700, 700), (2,)]
    return {f"layer{i}.weight": random_tensor(shape, torch.float32, g)
            for i, shape in enumerate(shapes)}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """~5 MiB of float32 tensors with random bits, written by safetensors."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    path = directory / "model.safetensors"
    save_file(make_tensors(0), path)
    return path


def load_all(path: Path, strategy: str, mode: str,
             on_progress: Callable[[int, int], None] | None = None,
             engine: str = "auto") -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` through one entry point: ``load``, ``stream``, a copying load
    (dtype conversion: the ring of reused slots) or ``open().get_tensor``."""
    if mode == "load":
        return weightlift.load(path, strategy=strategy, on_progress=on_progress, engine=engine)
    if mode == "stream":
        return dict(weightlift.stream(path, strategy=strategy, max_host_memory="4MiB",
                                      on_progress=on_progress, engine=engine))
    if mode == "copy":
        return weightlift.load(path, strategy=strategy, dtype=torch.float64,
                               max_host_memory="4MiB", on_progress=on_progress, engine=engine)
    if mode == "open":
        with weightlift.open(path) as checkpoint:
            return {name: checkpoint.get_tensor(name, strategy=strategy, engine=engine)
                    for name in checkpoint.keys()}
    raise ValueError(mode)


#: Both read engines: a pool of blocking preadv calls and one io_uring.
ENGINES = ["threads", "uring"]



@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    if request.param == "uring" and uring.probe() is not None:
        pytest.skip(f"io_uring unavailable here: {uring.probe()}")
    return str(request.param)


MODES = ["load", "stream", "copy", "open"]


def assert_loads_correctly(path: Path, strategy: str, mode: str, engine: str = "auto") -> None:
    actual = load_all(path, strategy, mode, engine=engine)  # first: the oracle warms the cache
    expected = load_file(path)
    if mode == "copy":
        expected = {k: v.to(torch.float64) for k, v in expected.items()}
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert bytes_of(actual[name]) == bytes_of(tensor), name


def data_offset(path: Path, fraction: float) -> int:
    """An absolute file offset ``fraction`` of the way through the data section."""
    with weightlift.open(path) as checkpoint:
        header = checkpoint.layout.shards[0].header
    return header.data_start + int((header.file_size - header.data_start) * fraction)


# ---------------------------------------------------------------------------------------------
# The preadv seam


class Kernel:
    """Stands in for ``os.preadv`` and for the io_uring engine's kernel answers (``enter``,
    ``completed``): counts reads and misbehaves where told."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        self.eio_at: int | None = None
        self.short = False
        self.eof_at: int | None = None
        self.eintr_seen: set[int] = set()
        self.eintr = False
        #: Answer ``flaky`` (an errno: nothing read) ``flaky_times`` times in a row at every
        #: offset, or only at the offset ``flaky_at`` (then for ever).
        self.flaky: int | None = None
        self.flaky_times = 0
        self.flaky_at: int | None = None
        self.flaky_answers: Counter[int] = Counter()
        #: Answer 0 bytes (end of file) once at every offset though the file is long enough.
        self.hiccup = False
        self.hiccup_seen: set[int] = set()
        self.enters = 0
        self._enter = uring.enter
        monkeypatch.setattr(io_base, "preadv", self)
        monkeypatch.setattr(uring, "completed", self.completed)
        monkeypatch.setattr(uring, "enter", self.enter)

    def enter(self, fd: int, to_submit: int, min_complete: int, flags: int) -> int:
        self.enters += 1
        if self.eintr and self.enters % 2:
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        return self._enter(fd, to_submit, min_complete, flags)

    def nothing_read(self, offset: int, length: int) -> int | None:
        """The errno this read is answered with before any byte is read, if any."""
        if self.flaky is None:
            return None
        if self.flaky_at is not None:
            hit = offset <= self.flaky_at < offset + length
        else:
            hit = self.flaky_answers[offset] < self.flaky_times
        if not hit:
            return None
        self.flaky_answers[offset] += 1
        return self.flaky

    def empty(self, offset: int) -> bool:
        """Answer this read with no data (though the file goes on)?"""
        if self.hiccup and offset not in self.hiccup_seen:
            self.hiccup_seen.add(offset)
            return True
        return False

    def completed(self, fd: int, offset: int, length: int, result: int) -> int:
        """What a completion reports: the same faults, at the same offsets, as ``__call__``."""
        self.calls += 1
        if self.eintr and offset not in self.eintr_seen:
            self.eintr_seen.add(offset)
            return -errno.EINTR
        code = self.nothing_read(offset, length)
        if code is not None:
            return -code
        if self.empty(offset):
            return 0
        if self.eio_at is not None and offset <= self.eio_at < offset + length:
            return -errno.EIO
        if self.eof_at is not None and offset <= self.eof_at < offset + length:
            return 0
        if self.short and result > 1:
            direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
            keep = result // 2 // 4096 * 4096 if direct else result // 2
            if keep:
                return keep  # the rest was read too, but the engine must ask for it again
        return result

    def __call__(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        self.calls += 1
        size = sum(len(b) for b in buffers)
        if self.eintr and offset not in self.eintr_seen:
            self.eintr_seen.add(offset)
            raise InterruptedError(errno.EINTR, "Interrupted system call")
        code = self.nothing_read(offset, size)
        if code is not None:
            raise OSError(code, os.strerror(code))  # InterruptedError, BlockingIOError, ...
        if self.empty(offset):
            return 0
        if self.eio_at is not None and offset <= self.eio_at < offset + size:
            raise OSError(errno.EIO, "Input/output error")
        if self.eof_at is not None and offset <= self.eof_at < offset + size:
            return 0
        if self.short and size > 1:
            direct = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
            # What the kernel may do: any prefix for buffered reads, whole blocks for O_DIRECT.
            keep = size // 2 // 4096 * 4096 if direct else size // 2
            if keep:
                buffers = [memoryview(buffers[0]).cast("B")[:keep]]
        return os.preadv(fd, buffers, offset)


def cold(path: Path, strategy: str) -> None:
    """``auto`` on a cached file picks mmap, and a stream or a copying load maps cached ranges
    (windows): the seam sees neither, so make it cold."""
    evict(path)


def evict(path: Path) -> None:
    """Drop ``path`` from the page cache and wait until mincore shows none of it cached: a
    busy machine may still be writing it back or reading it ahead when the advice is given."""
    gc.collect()  # a mapping held by an earlier load's tensors in a cycle would pin its pages
    pagecache.evict(path)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", SEAM_STRATEGIES)
def test_eio_is_a_read_error_naming_file_and_offset(ckpt: Path, strategy: str, mode: str,
                                                    engine: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Kernel(monkeypatch)
    kernel.eio_at = data_offset(ckpt, 0.6)
    cold(ckpt, strategy)
    with no_leaks():
        error = failure(lambda: load_all(ckpt, strategy, mode, engine=engine))
    assert kernel.calls > 0
    assert issubclass(error.kind, ReadError)
    assert error.path == str(ckpt)
    offset, length = failed_read(error)
    assert offset <= kernel.eio_at < offset + length
    assert "Input/output error" in error.message
    kernel.eio_at = None
    assert_loads_correctly(ckpt, strategy, mode, engine)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("strategy", SEAM_STRATEGIES)
@pytest.mark.parametrize("quirk", ["short", "eintr"])
def test_short_reads_and_eintr_are_retried(ckpt: Path, strategy: str, mode: str, quirk: str,
                                           engine: str, monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Kernel(monkeypatch)
    setattr(kernel, quirk, True)
    cold(ckpt, strategy)
    with no_leaks():
        assert_loads_correctly(ckpt, strategy, mode, engine)
    assert kernel.calls > 0
    assert quirk == "short" or kernel.eintr_seen


@pytest.mark.parametrize("mode", ["load", "copy"])
@pytest.mark.parametrize("strategy", SEAM_STRATEGIES)
@pytest.mark.parametrize("code", [errno.ECANCELED, errno.EAGAIN, errno.EINTR])
def test_reads_answered_with_nothing_read_are_resubmitted(ckpt: Path, strategy: str, mode: str,
                                                         code: int, engine: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """io-wq cancels reads it cannot start a worker for (ECANCELED); a signal or a short resource
    answers EINTR or EAGAIN. Each read is answered so twice in a row at every offset, and only
    half of it arrives after that: the rest is asked for from where it stopped, and is answered
    so twice again. Progress starts the count of attempts anew, or this would exhaust it."""
    kernel = Kernel(monkeypatch)
    kernel.flaky, kernel.flaky_times = code, 2
    kernel.short = True
    cold(ckpt, strategy)
    with no_leaks():
        assert_loads_correctly(ckpt, strategy, mode, engine)
    assert kernel.flaky_answers and set(kernel.flaky_answers.values()) == {2}
    assert len(kernel.flaky_answers) > retry.ATTEMPTS  # more than one read's worth of attempts


@pytest.mark.parametrize("strategy", SEAM_STRATEGIES)
def test_no_data_inside_the_file_is_asked_again(ckpt: Path, strategy: str, engine: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """A read answered with 0 bytes (end of file) where the file goes on: not the end."""
    kernel = Kernel(monkeypatch)
    kernel.hiccup = True
    cold(ckpt, strategy)
    with no_leaks():
        assert_loads_correctly(ckpt, strategy, "load", engine)
    assert kernel.hiccup_seen


@pytest.mark.parametrize("strategy", ["direct", "stream"])
@pytest.mark.parametrize("code", [errno.ECANCELED, errno.EAGAIN])
def test_a_read_that_never_goes_through_is_an_error_after_bounded_attempts(
        ckpt: Path, strategy: str, code: int, engine: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Kernel(monkeypatch)
    kernel.flaky, kernel.flaky_at = code, data_offset(ckpt, 0.5)
    with no_leaks():
        error = failure(lambda: weightlift.load(ckpt, strategy=strategy, engine=engine))
    assert issubclass(error.kind, ReadError) and error.path == str(ckpt)
    offset, length = failed_read(error)
    assert offset <= kernel.flaky_at < offset + length
    # Said what happened and how often; tried exactly that often, no more.
    assert f"({retry.name(code)}: " in error.message and os.strerror(code) in error.message
    assert f"gave up after {retry.ATTEMPTS} attempts" in error.message
    assert kernel.flaky_answers == {offset: retry.ATTEMPTS}
    kernel.flaky = None
    assert_loads_correctly(ckpt, strategy, "load", engine)


def test_io_uring_enter_refusing_for_ever_is_an_error(ckpt: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """EAGAIN from ``io_uring_enter`` is asked again after a pause, but not for ever."""
    if uring.probe() is not None:
        pytest.skip(f"io_uring unavailable here: {uring.probe()}")
    calls = 0

    def refuse(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
        nonlocal calls
        calls += 1
        raise BlockingIOError(errno.EAGAIN, os.strerror(errno.EAGAIN))

    monkeypatch.setattr(uring, "enter", refuse)
    evict(ckpt)  # cached ranges would be copied by the thread engine
    with no_leaks():
        error = failure(lambda: weightlift.load(ckpt, strategy="direct", engine="uring"))
    assert issubclass(error.kind, ReadError)
    assert "io_uring_enter failed" in error.message and "(EAGAIN)" in error.message
    assert f"{retry.ATTEMPTS} times in a row" in error.message
    # Then each read still waited for while the load cleans up (at most the ring's depth) and
    # close() ask once more and give up at once.
    assert retry.ATTEMPTS <= calls <= retry.ATTEMPTS + uring.DEPTH + 1


@pytest.mark.parametrize("strategy", SEAM_STRATEGIES)
def test_a_read_that_hits_end_of_file_early_is_an_error(ckpt: Path, strategy: str, engine: str,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = Kernel(monkeypatch)
    kernel.eof_at = data_offset(ckpt, 0.3)
    cold(ckpt, strategy)
    with no_leaks():
        error = failure(lambda: weightlift.load(ckpt, strategy=strategy, engine=engine))
    assert issubclass(error.kind, ReadError) and error.path == str(ckpt)
    assert "file ended at offset" in error.message


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_loads_are_correct_under_a_storm_of_signals(ckpt: Path, strategy: str,
                                                    engine: str) -> None:
    """Real signals interrupting real system calls (reads, MADV_POPULATE_READ) in every thread."""
    delivered = 0

    def count(signum: int, frame: object) -> None:
        nonlocal delivered
        delivered += 1

    previous = signal.signal(signal.SIGALRM, count)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        for mode in ("load", "copy"):
            evict(ckpt)
            assert_loads_correctly(ckpt, strategy, mode, engine)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert delivered > 0


class Populate:
    """Stands in for ``madvise`` (``MADV_POPULATE_READ``/``WRITE``): answers ``code`` (nothing
    faulted in) ``times`` times in a row to every call, then lets the kernel do it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int, times: int) -> None:
        self.code, self.times = code, times
        self.refused = 0
        self.populated = 0
        self._in_a_row = 0
        self._madvise = io_base.madvise
        monkeypatch.setattr(io_base, "madvise", self)

    def __call__(self, address: int, length: int, advice: int) -> None:
        if advice == MADV_POPULATE_READ or advice == io_base.MADV_POPULATE_WRITE:
            if self._in_a_row < self.times:
                self._in_a_row += 1
                self.refused += 1
                raise OSError(self.code, os.strerror(self.code))
            self._in_a_row = 0
            self.populated += 1
        self._madvise(address, length, advice)


@pytest.mark.parametrize("mode", ["load", "copy", "open"])
@pytest.mark.parametrize("code", [errno.EINTR, errno.EAGAIN])
def test_populate_stopped_by_a_signal_is_asked_again(ckpt: Path, code: int, mode: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """MADV_POPULATE_READ may stop midway under signals (EINTR) or a short resource (EAGAIN)."""
    populate = Populate(monkeypatch, code, times=3)
    evict(ckpt)
    with no_leaks():
        assert_loads_correctly(ckpt, "mmap", mode)
    assert populate.refused >= 3 and populate.populated > 0


def test_populate_that_never_goes_through_is_an_error(ckpt: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    populate = Populate(monkeypatch, errno.EAGAIN, times=1 << 30)
    with no_leaks():
        error = failure(lambda: weightlift.load(ckpt, strategy="mmap"))
    assert issubclass(error.kind, ReadError) and error.path == str(ckpt)
    offset, length = failed_read(error)
    assert 0 <= offset < offset + length <= ckpt.stat().st_size
    assert "(EAGAIN: " in error.message
    assert f"gave up after {retry.ATTEMPTS} attempts" in error.message
    # Every populate call that started (at most the reads submitted ahead of the one waited
    # for: twice the reader threads) tried exactly ``ATTEMPTS`` times, then gave up.
    ahead = 2 * STRATEGIES["mmap"].in_flight
    assert populate.refused % retry.ATTEMPTS == 0
    assert retry.ATTEMPTS <= populate.refused <= ahead * retry.ATTEMPTS
    populate.times = 0
    assert_loads_correctly(ckpt, "mmap", "load")


# ---------------------------------------------------------------------------------------------
# Files that change while they are read


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def rewrite(path: Path) -> None:
    """Same size, different bytes: only the modification time tells."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size - 4096)
        f.write(os.urandom(4096))
    stamp = path.stat()
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 1_000_000))


def replace(path: Path) -> None:
    other = path.with_name("other.safetensors")
    save_file(make_tensors(1), other)
    os.replace(other, path)


def delete(path: Path) -> None:
    path.unlink()


CHANGES = {"truncated": truncate, "rewritten": rewrite, "replaced": replace, "deleted": delete}


@pytest.mark.parametrize("mode", ["load", "stream", "copy"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("change", CHANGES)
def test_a_file_changed_during_the_load_is_an_error(ckpt: Path, strategy: str, mode: str,
                                                    change: str) -> None:
    original = ckpt.read_bytes()
    changed = False

    def change_once(done: int, total: int) -> None:
        nonlocal changed
        if not changed:
            changed = True
            CHANGES[change](ckpt)

    with no_leaks():
        error = failure(lambda: load_all(ckpt, strategy, mode, on_progress=change_once))
    assert changed
    assert issubclass(error.kind, ReadError), error.message
    assert error.path == str(ckpt)
    # The next load works, on the file as it is now.
    if change in ("truncated", "deleted"):
        ckpt.write_bytes(original)
    assert_loads_correctly(ckpt, strategy, mode)


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
@pytest.mark.parametrize("change", CHANGES)
def test_an_open_checkpoint_changed_before_reading_is_an_error(ckpt: Path, strategy: str,
                                                               change: str) -> None:
    with no_leaks():
        with weightlift.open(ckpt) as checkpoint:
            CHANGES[change](ckpt)
            name = checkpoint.keys()[-1]
            error = failure(lambda: checkpoint.get_tensor(name, strategy=strategy))
    assert issubclass(error.kind, ReadError) and error.path == str(ckpt)
    assert "during the load" in error.message


def test_a_file_that_vanishes_between_listing_and_opening(ckpt: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    other = ckpt.with_name("b.safetensors")
    save_file(make_tensors(1), other)
    ckpt.rename(ckpt.with_name("a.safetensors"))  # a directory of two loose shards
    open_shard = weightlift.sources.local._open_shard

    def vanish_then_open(path: Path) -> object:
        if Path(path).name == "b.safetensors":
            Path(path).unlink()
        return open_shard(path)

    monkeypatch.setattr(weightlift.sources.local, "_open_shard", vanish_then_open)
    with no_leaks():
        error = failure(lambda: weightlift.load(ckpt.parent))
    assert issubclass(error.kind, CheckpointError)
    assert error.path == str(other)


@pytest.mark.parametrize("strategy", ["stream", "direct"])
def test_stream_hands_out_only_tensors_read_before_the_fault(ckpt: Path, strategy: str,
                                                            engine: str,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    kernel = Kernel(monkeypatch)
    kernel.eio_at = data_offset(ckpt, 0.9)
    expected = {name: tensor.clone() for name, tensor in load_file(ckpt).items()}
    evict(ckpt)  # cached ranges would be mapped, not read through the seam
    received: list[str] = []
    tensors = weightlift.stream(ckpt, strategy=strategy, max_host_memory="4MiB", engine=engine)
    with no_leaks():
        with pytest.raises(ReadError):
            for name, tensor in tensors:
                assert bytes_of(tensor) == bytes_of(expected[name]), name
                received.append(name)
        with pytest.raises(StopIteration):
            next(tensors)  # a failed stream is over
    assert 0 < len(received) < len(expected)


# ---------------------------------------------------------------------------------------------
# FUSE: faults the page cache and mmap see


needs_fuse = pytest.mark.skipif(FaultFS.unavailable() is not None,
                                reason=f"FUSE unavailable: {FaultFS.unavailable()}")


@needs_fuse
@pytest.mark.parametrize("mode", ["load", "copy"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_eio_from_the_file_system(ckpt: Path, strategy: str, mode: str, engine: str,
                                  tmp_path: Path) -> None:
    where = data_offset(ckpt, 0.6)
    with FaultFS(ckpt.parent, tmp_path / "mnt", [Fault("eio", where, where + 1)]) as mnt:
        path = mnt / ckpt.name
        with no_leaks():
            error = failure(lambda: load_all(path, strategy, mode, engine=engine))
        assert issubclass(error.kind, ReadError), error.message
        assert error.path == str(path)
        offset, length = failed_read(error)
        assert offset <= where < offset + length
    with FaultFS(ckpt.parent, tmp_path / "mnt", []) as mnt:
        assert_loads_correctly(mnt / ckpt.name, strategy, mode, engine)


# A short read from a FUSE server means end of file to the kernel, which zero-fills the rest of
# the page and believes the data once a later GETATTR reports the full size again: a lying file
# system can hand out zeros that no loader can tell from data without a checksum. Short reads
# are therefore tested at the seam (retried, correct data) and as real truncation above.
