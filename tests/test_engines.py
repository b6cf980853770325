"""Read engines: the thread pool and io_uring return the same bytes as safetensors, io_uring falls
back to threads where the kernel refuses it (and says so), asynchronous reads never outlive a
load, and a stream reuses the memory of tensors its consumer dropped without ever changing a
tensor the consumer still holds.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import os
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift
import pagecache
from conftest import bytes_of, random_tensor
from test_faults import no_leaks
from weightlift.errors import ReadError
from weightlift.io import base as io_base
from weightlift.io import retry, uring
from weightlift.io import engine as engine_module
from weightlift.io.direct import DirectStrategy
from weightlift.io.pool import BufferPool
from weightlift.report import LoadReport

URING_REFUSED = uring.probe()
needs_uring = pytest.mark.skipif(URING_REFUSED is not None,
                                 reason=f"io_uring unavailable here: {URING_REFUSED}")
ENGINES = ["threads", pytest.param("uring", marks=needs_uring)]
MiB = 1 << 20


# ---------------------------------------------------------------------------------------------
# Conformance: every engine, every plan, the bytes safetensors reads


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards of tensors from 0 bytes to 6 MiB (more than the 4 MiB budgets below), with
    odd-sized uint8 tensors in between so most tensors start off any 4096 boundary."""
    directory = tmp_path_factory.mktemp("engines")
    g = torch.Generator().manual_seed(11)
    first = {
        "empty": torch.empty(0, dtype=torch.float32),
        "one": random_tensor((1,), torch.uint8, g),
        "odd": random_tensor((4097,), torch.uint8, g),
        "small": random_tensor((3, 5, 7), torch.float16, g),
        "big": random_tensor((1536, 1024), torch.float32, g),       # 6 MiB
        "after_big": random_tensor((12345,), torch.uint8, g),
        "mid": random_tensor((513, 1001), torch.bfloat16, g),
    }
    second = {
        "b.odd": random_tensor((3,), torch.uint8, g),
        "b.weight": random_tensor((700, 700), torch.float32, g),
        "b.empty": torch.empty((0, 4), dtype=torch.int64),
        "b.tail": random_tensor((999,), torch.int32, g),
    }
    save_file(first, directory / "model-00001-of-00002.safetensors")
    save_file(second, directory / "model-00002-of-00002.safetensors")
    return directory


@pytest.fixture(autouse=True)
def cold(shards: Path) -> None:
    """Every test starts with the shards out of the page cache (an earlier test's mmap load
    leaves them cached), so ``direct`` reads from disk through the engine under test."""
    gc.collect()  # no mapping of an earlier test may pin pages
    for path in shards.glob("*.safetensors"):
        pagecache.evict(path)


def reference(directory: Path) -> dict[str, torch.Tensor]:
    """What safetensors reads. It reads through the page cache: the files are evicted again, so
    ``direct`` reads them from disk through the engine (a cached range would be copied out of
    the cache by the thread engine instead, see ``io/residency.py``)."""
    out: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update({name: tensor.clone() for name, tensor in load_file(path).items()})
        pagecache.evict(path)
    return out


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype and actual[name].shape == tensor.shape, name
        assert bytes_of(actual[name]) == bytes_of(tensor), name


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("strategy", ["direct", "stream"])
@pytest.mark.parametrize("mode", ["load", "stream", "copy", "open"])
def test_every_engine_reads_the_bytes_safetensors_reads(shards: Path, engine: str, strategy: str,
                                                        mode: str) -> None:
    expected = reference(shards)
    reports: list[LoadReport] = []
    with no_leaks():
        if mode == "load":
            actual = weightlift.load(shards, strategy=strategy, engine=engine,
                                     on_report=reports.append)
        elif mode == "stream":
            actual = dict(weightlift.stream(shards, strategy=strategy, engine=engine,
                                            max_host_memory="4MiB", on_report=reports.append))
        elif mode == "copy":
            actual = weightlift.load(shards, strategy=strategy, engine=engine,
                                     dtype=torch.float64, max_host_memory="4MiB",
                                     on_report=reports.append)
            expected = {k: v.to(torch.float64) if v.is_floating_point() else v
                        for k, v in expected.items()}
        else:
            with weightlift.open(shards) as checkpoint:
                actual = {name: checkpoint.get_tensor(name, strategy=strategy, engine=engine)
                          for name in checkpoint.keys()}
    assert_same(actual, expected)
    if reports:
        assert reports[0].engine == engine and reports[0].fallbacks == []


@needs_uring
@pytest.mark.parametrize("chosen", [frozenset(), frozenset({"direct"})])
def test_auto_takes_io_uring_where_it_measured_faster(shards: Path, chosen: frozenset[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "AUTO_URING", chosen)
    for path in shards.glob("*.safetensors"):
        pagecache.evict(path)  # cold: direct has no cached range to copy with buffered reads
    reports: list[LoadReport] = []
    for strategy in ("direct", "stream", "mmap"):
        weightlift.load(shards, strategy=strategy, on_report=reports.append)
    expected = ["uring" if s in chosen else "threads" for s in ("direct", "stream", "mmap")]
    assert [r.engine for r in reports] == expected
    assert all(r.fallbacks == [] for r in reports)


@needs_uring
def test_asking_io_uring_for_mmap_says_it_does_not_apply(shards: Path) -> None:
    expected = reference(shards)  # before the load: its evictions cannot drop mapped pages
    reports: list[LoadReport] = []
    actual = weightlift.load(shards, strategy="mmap", engine="uring", on_report=reports.append)
    assert_same(actual, expected)
    assert reports[0].engine == "threads"
    assert "does not apply to mmap" in reports[0].fallbacks[0]


def test_an_unknown_engine_is_refused(shards: Path) -> None:
    with pytest.raises(ValueError, match="unknown engine 'fio'.*auto, uring, threads"):
        weightlift.load(shards, engine="fio")


# ---------------------------------------------------------------------------------------------
# Fallback: a kernel or a sandbox that refuses io_uring


@pytest.mark.parametrize("code", [errno.ENOSYS, errno.EPERM])
@pytest.mark.parametrize("engine", ["auto", "uring"])
def test_a_refused_ring_falls_back_to_threads_and_says_so(shards: Path, code: int, engine: str,
                                                          monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(engine_module, "AUTO_URING", frozenset({"direct"}))
    def refuse(entries: int, params: object) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(uring, "setup", refuse)
    reports: list[LoadReport] = []
    with no_leaks():
        actual = weightlift.load(shards, strategy="direct", engine=engine,
                                 on_report=reports.append)
    assert_same(actual, reference(shards))
    assert reports[0].engine == "threads"
    [fallback] = reports[0].fallbacks
    assert "io_uring is unavailable" in fallback and os.strerror(code) in fallback
    assert uring.probe() is not None and os.strerror(code) in uring.probe()


def test_threads_asked_for_means_no_ring_at_all(shards: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def forbidden(entries: int, params: object) -> int:
        raise AssertionError("io_uring_setup called although threads were asked for")

    monkeypatch.setattr(uring, "setup", forbidden)
    reports: list[LoadReport] = []
    weightlift.load(shards, strategy="direct", engine="threads", on_report=reports.append)
    assert reports[0].engine == "threads" and reports[0].fallbacks == []


# ---------------------------------------------------------------------------------------------
# Asynchronous reads never outlive a load


class Ledger:
    """Counts reads handed to the kernel and completions reaped, for every ring."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.submitted = 0
        self.reaped = 0
        self.rings: list[uring.UringEngine] = []
        push, init = uring.UringEngine._push, uring.UringEngine.__init__
        completed = uring.completed

        def counting_push(engine: uring.UringEngine, ticket: uring.Ticket) -> None:
            self.submitted += 1
            push(engine, ticket)

        def recording_init(engine: uring.UringEngine, *args: object, **kwargs: object) -> None:
            init(engine, *args, **kwargs)  # type: ignore[arg-type]
            self.rings.append(engine)

        def counting_completed(fd: int, offset: int, length: int, result: int) -> int:
            self.reaped += 1
            return self.fault(offset, length, completed(fd, offset, length, result))

        monkeypatch.setattr(uring.UringEngine, "_push", counting_push)
        monkeypatch.setattr(uring.UringEngine, "__init__", recording_init)
        monkeypatch.setattr(uring, "completed", counting_completed)

    def fault(self, offset: int, length: int, result: int) -> int:
        return result

    def settled(self) -> None:
        """Every read submitted was reaped and every ring is closed."""
        assert self.submitted > 0 and self.reaped == self.submitted
        assert self.rings and all(r.fd == -1 and r.in_flight == 0 for r in self.rings)


@needs_uring
@pytest.mark.parametrize("mode", ["load", "stream", "copy"])
def test_a_failed_read_leaves_no_read_in_flight(shards: Path, mode: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(monkeypatch)
    fail_at = 3 * MiB  # inside "big", with many reads of the first shard around it

    def eio(offset: int, length: int, result: int) -> int:
        return -errno.EIO if offset <= fail_at < offset + length else result

    ledger.fault = eio  # type: ignore[method-assign]
    monkeypatch.setattr(DirectStrategy, "read_size", 256 << 10)
    with no_leaks():
        with pytest.raises(ReadError, match="Input/output error"):
            if mode == "stream":
                for _ in weightlift.stream(shards, strategy="direct", engine="uring",
                                           max_host_memory="4MiB"):
                    pass
            else:
                weightlift.load(shards, strategy="direct", engine="uring",
                                dtype=torch.float64 if mode == "copy" else None,
                                max_host_memory="4MiB")
    ledger.settled()
    ledger.fault = lambda offset, length, result: result  # type: ignore[method-assign]
    assert_same(weightlift.load(shards, strategy="direct", engine="uring"), reference(shards))


@needs_uring
def test_an_abandoned_stream_reaps_its_reads(shards: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(monkeypatch)
    monkeypatch.setattr(DirectStrategy, "read_size", 256 << 10)
    with no_leaks():
        tensors = weightlift.stream(shards, strategy="direct", engine="uring")
        name, first = next(tensors)
        del tensors  # abandoned mid-stream: the generator's cleanup runs now
        gc.collect()
    ledger.settled()
    assert bytes_of(first) == bytes_of(reference(shards)[name])  # still valid, still held


@needs_uring
def test_an_interrupt_mid_load_reaps_every_read(shards: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ledger = Ledger(monkeypatch)
    monkeypatch.setattr(DirectStrategy, "read_size", 256 << 10)

    def interrupt(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with no_leaks():
        with pytest.raises(KeyboardInterrupt):
            weightlift.load(shards, strategy="direct", engine="uring", on_progress=interrupt)
    ledger.settled()


@needs_uring
def test_closing_a_ring_waits_for_reads_in_the_kernel(tmp_path: Path) -> None:
    path = tmp_path / "data"
    payload = bytes(range(256)) * (4 * MiB // 256)
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY)
    buffer = torch.zeros(len(payload), dtype=torch.uint8)
    ring = uring.UringEngine(depth=8)
    try:
        for i in range(8):
            piece = len(payload) // 8
            ring.submit(uring.Read(fd, buffer.data_ptr() + i * piece, i * piece, piece, piece,
                                   1, str(path), direct=False))
        ring.flush()
        assert ring.in_flight > 0 or bytes(buffer.numpy()) == payload  # (a fast disk)
    finally:
        ring.close()  # without waiting on any ticket
        os.close(fd)
    assert ring.in_flight == 0 and ring.fd == -1
    assert bytes(buffer.numpy()) == payload  # every read landed before close returned


@needs_uring
@pytest.mark.parametrize("how", ["cancel", "close"])
def test_reads_the_load_stopped_are_never_resubmitted(tmp_path: Path, how: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A read that comes back unread (ECANCELED, as the kernel answers a cancelled request)
    after the load withdrew it (``cancel()`` while the kernel held it) or while the ring closes
    is not submitted again: only reads the load still wants are retried."""
    ledger = Ledger(monkeypatch)
    ledger.fault = lambda offset, length, result: -errno.ECANCELED  # type: ignore[method-assign]
    # Reads of an empty pipe stay in the kernel until something is written to it.
    readable, writable = os.pipe()
    piece = 1024
    # Room for every attempt a resubmitting engine would make: it fails here, it does not hang.
    fcntl.fcntl(writable, fcntl.F_SETPIPE_SZ, 8 * piece * retry.ATTEMPTS)
    buffer = torch.zeros(8 * piece, dtype=torch.uint8)
    ring = uring.UringEngine(depth=8)
    try:
        tickets = [ring.submit(uring.Read(readable, buffer.data_ptr() + i * piece, 0, piece,
                                          piece, 1, "pipe", direct=False))
                   for i in range(8)]
        ring.flush()
        assert ring.in_flight == 8
        if how == "cancel":
            assert not any(ticket.cancel() for ticket in tickets)  # too late to take back
        os.write(writable, bytes(8 * piece * retry.ATTEMPTS))  # now they come back cancelled
        if how == "cancel":
            for ticket in tickets:
                with pytest.raises(ReadError, match="withdrawn: the load stopped"):
                    ticket.result()
    finally:
        ring.close()
        os.close(readable)
        os.close(writable)
    assert ledger.submitted == ledger.reaped == 8
    assert all(ticket.finished and ticket.cancelled for ticket in tickets)


@needs_uring
def test_a_read_io_wq_cancelled_is_resubmitted_inline(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """io-wq cancels reads it cannot start a worker thread for: the retry goes without
    ``IOSQE_ASYNC``, so the kernel tries it inline before it needs a worker again."""
    flags: list[int] = []
    pack = uring._SQE.pack_into

    class Recording:
        size = uring._SQE.size

        @staticmethod
        def pack_into(buffer: object, offset: int, opcode: int, flag: int, *rest: int) -> None:
            flags.append(flag)
            pack(buffer, offset, opcode, flag, *rest)

    monkeypatch.setattr(uring, "_SQE", Recording)
    cancelled: set[int] = set()

    def cancel_once(fd: int, offset: int, length: int, result: int) -> int:
        if offset not in cancelled:
            cancelled.add(offset)
            return -errno.ECANCELED
        return result

    monkeypatch.setattr(uring, "completed", cancel_once)
    path = tmp_path / "data"
    payload = os.urandom(MiB)
    path.write_bytes(payload)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    memory = io_base.aligned_buffer(MiB, 0, 4096)
    ring = uring.UringEngine(depth=4)
    try:
        ring.submit(uring.Read(fd, memory.data_ptr(), 0, MiB, MiB, 4096, str(path),
                               direct=True)).result()
    finally:
        ring.close()
        os.close(fd)
    assert bytes(memory.numpy()) == payload
    assert flags == [uring.IOSQE_ASYNC, 0]


# ---------------------------------------------------------------------------------------------
# A stream reuses dropped tensors' memory, never a held tensor's


@pytest.fixture(scope="module")
def layers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 tensors of 2 MiB each: every one gets a block (and a mapping) of its own."""
    path = tmp_path_factory.mktemp("reuse") / "layers.safetensors"
    g = torch.Generator().manual_seed(5)
    save_file({f"layer{i:02d}": random_tensor((512, 1024), torch.float32, g) for i in range(24)},
              path)
    return path


class Fresh:
    """Counts fresh anonymous mappings (each one's pages are faulted in and zeroed)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        make = io_base.anonymous_mapping

        def counting(nbytes: int) -> object:
            self.count += 1
            return make(nbytes)

        monkeypatch.setattr(io_base, "anonymous_mapping", counting)


def stream_layers(path: Path, engine: str) -> Iterator[tuple[str, torch.Tensor]]:
    return weightlift.stream(path, strategy="direct", engine=engine, max_host_memory="8MiB")


@pytest.mark.parametrize("engine", ENGINES)
def test_tensors_a_consumer_holds_never_change(layers: Path, engine: str) -> None:
    expected = load_file(layers)
    held: dict[str, tuple[torch.Tensor, bytes]] = {}
    # Each tensor dropped is collected at once, cycles too, so its memory can be reused next.
    # Frozen, the objects from before the stream (torch's and pytest's, a full collection's
    # bulk) are not walked again by each collection; every object the stream makes still is.
    gc.freeze()
    try:
        for index, (name, tensor) in enumerate(stream_layers(layers, engine)):
            if index % 3 == 0:
                held[name] = (tensor, bytes_of(tensor))  # kept, while later blocks are read
            gc.collect()
    finally:
        gc.unfreeze()
    assert len(held) == 8
    for name, (tensor, at_arrival) in held.items():
        assert bytes_of(tensor) == at_arrival == bytes_of(expected[name]), name


@needs_uring
def test_dropped_tensors_give_their_memory_to_later_ones(layers: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fresh = Fresh(monkeypatch)
    expected = {name: tensor.clone() for name, tensor in load_file(layers).items()}
    pagecache.evict(layers)  # read, not mapped in windows as a cached file would be
    for name, tensor in stream_layers(layers, "uring"):
        assert bytes_of(tensor) == bytes_of(expected[name]), name
        del tensor  # copied away and dropped, as a device-bound consumer does
    dropping = fresh.count
    fresh.count = 0
    kept = dict(stream_layers(layers, "uring"))
    holding = fresh.count
    assert len(kept) == 24
    # Holding every tensor needs a mapping per tensor; dropping each needs only the read-ahead
    # window's worth (8 MiB / 2 MiB, plus the one being handed out).
    assert holding == 24
    assert dropping <= 8 * MiB // (2 * MiB) + 2


def test_the_pool_keeps_no_more_than_its_limit() -> None:
    pool = BufferPool(limit=8 * MiB)
    buffers = [pool.take(2 * MiB) for _ in range(6)]  # 12 MiB out: more than the limit
    assert pool.fresh == 6
    del buffers
    gc.collect()
    # Of the six returned, only what fits in the limit stays mapped for reuse.
    again = [pool.take(2 * MiB) for _ in range(6)]
    assert pool.reused == 4 and pool.fresh == 8
    a_bigger_one = pool.take(5 * MiB)  # nothing free fits: a fresh one
    assert pool.fresh == 9
    del again, a_bigger_one
    pool.close()


@pytest.mark.parametrize("engine", ENGINES)
def test_load_into_takes_an_engine(shards: Path, engine: str, tmp_path: Path) -> None:
    expected = load_file(shards / "model-00002-of-00002.safetensors")
    module = torch.nn.Module()
    module.register_buffer("weight", torch.zeros(700, 700))
    module.register_buffer("tail", torch.zeros(999, dtype=torch.int32))
    source = {"weight": "b.weight", "tail": "b.tail"}
    save_file({name: expected[key] for name, key in source.items()}, tmp_path / "m.safetensors")
    weightlift.load_into(module, tmp_path / "m.safetensors", strategy="direct", engine=engine)
    assert bytes_of(module.weight) == bytes_of(expected["b.weight"])
    assert bytes_of(module.tail) == bytes_of(expected["b.tail"])


@pytest.mark.parametrize("engine", ENGINES)
def test_the_cli_forces_an_engine_and_reports_it(shards: Path, engine: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from weightlift.cli import main

    assert main(["load", str(shards), "--strategy", "direct", "--engine", engine, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["engine"] == engine and report["fallbacks"] == []


def test_doctor_says_whether_io_uring_works(monkeypatch: pytest.MonkeyPatch) -> None:
    from weightlift.cli.doctor import collect

    assert collect()["system"]["io_uring_refused"] == URING_REFUSED

    def refuse(entries: int, params: object) -> int:
        raise OSError(errno.ENOSYS, os.strerror(errno.ENOSYS))

    monkeypatch.setattr(uring, "setup", refuse)
    assert os.strerror(errno.ENOSYS) in collect()["system"]["io_uring_refused"]


def test_a_deferred_step_runs_once_in_the_thread_that_waits_for_it() -> None:
    ran: list[int] = []
    step = engine_module.Deferred(lambda n: ran.append(n), 7)
    assert not ran and not step.done()
    step.result()
    step.result()
    assert ran == [7] and step.done() and not step.cancel()
    withdrawn = engine_module.Deferred(lambda: ran.append(0))
    assert withdrawn.cancel() and withdrawn.done()
    withdrawn.result()
    assert ran == [7]  # a withdrawn step never runs

    def fails() -> None:
        raise ReadError("read of 8 bytes at offset 0 failed", path="model.safetensors")

    failing = engine_module.Deferred(fails)
    for _ in range(2):  # raised to every waiter, run once
        with pytest.raises(ReadError, match="model.safetensors"):
            failing.result()
