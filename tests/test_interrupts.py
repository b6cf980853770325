"""Interrupts anywhere in a load: ``KeyboardInterrupt`` (Ctrl-C) or a ``SystemExit`` raised by a
SIGTERM handler (as vLLM's workers install) reaches the caller promptly, after every read that
may still write into a buffer was cancelled and reaped (or its memory is kept for good), with no
pin, descriptor, thread or ring left behind, and the next load in the process is right.

Two kinds of test:

* Hook tests raise the interrupt at one exact point of the read path through a seam (the engine's
  ``enter``/``completed``, its bookkeeping, ``read._pin``/``_unpin``, a future's ``result``, the
  descriptor pool's open) — one test per window a review found open.
* Real signals: a child process loads a few hundred MB again and again while this process sends
  it SIGINT, or SIGTERM with a handler raising ``SystemExit``, at random moments, across strategy
  × engine × ``load``/``stream``. The child catches each interrupt, checks that it came promptly,
  loads again and compares bit for bit with safetensors, and checks that no descriptor, thread
  or io_uring is left; at the end it lets the interrupt end it. ``WEIGHTLIFT_SIGNAL_TRIALS=500``
  runs that many trials (a few a combination by default); see docs/safety.md.
"""

from __future__ import annotations

import _thread
import ctypes
import dis
import errno
import functools
import gc
import os
import random
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import CodeType, FrameType

import pytest
import torch
import pagecache
from conftest import assert_same
from safetensors.torch import load_file, save_file
from test_faults import make_tensors, no_leaks, open_fds
from test_window import mapped_bytes

import weightlift
from weightlift import read as read_module
from weightlift.errors import ReadError
from weightlift.io import STRATEGIES, retry, uring
from weightlift.io import base as io_base
from weightlift.io import engine as engine_module
from weightlift.io import window as window_module
from weightlift.io.mapped import Mapping
from weightlift.io.pool import BufferPool
from weightlift.io.window import Windows
from weightlift.sources import records
from weightlift.sources.descriptors import POOL

URING_REFUSED = uring.probe()
needs_uring = pytest.mark.skipif(URING_REFUSED is not None,
                                 reason=f"io_uring unavailable here: {URING_REFUSED}")
ENGINES = ["threads", pytest.param("uring", marks=needs_uring)]
KiB = 1 << 10
#: How long a step that must be prompt may take before the test calls it a hang (a busy machine
#: is slow; a hang is forever).
HANG = 20.0


@pytest.fixture(autouse=True)
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many reads per file, so interrupts land with reads in flight."""
    for strategy in STRATEGIES.values():
        monkeypatch.setattr(strategy, "read_size", 256 * KiB)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    save_file(make_tensors(0), path)
    return path


def finishes(action: Callable[[], object], unstick: Callable[[], None] = lambda: None,
             seconds: float = HANG) -> tuple[bool, BaseException | None]:
    """Run ``action`` on a thread: (did it end within ``seconds``, what it raised). If it did
    not, ``unstick()`` is called so a hung call (on code without the fix) can end."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    ended = not thread.is_alive()
    if not ended:
        unstick()
        thread.join(seconds)
    return ended, raised[0] if raised else None


def data_file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    path = tmp_path / "data"
    payload = os.urandom(size)
    path.write_bytes(payload)
    return path, payload


# ---------------------------------------------------------------------------------------------
# io_uring: the ring's bookkeeping survives an exception at any point


@needs_uring
@pytest.mark.parametrize("where", ["completed", "then"])
def test_an_interrupt_while_reaping_leaves_no_completion_untracked(
        tmp_path: Path, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C while the second of a batch of completions is handled (the ``completed`` seam, or
    a read's ``then`` callback raising ``SystemExit``): ``close()`` returns promptly, every read
    is over, and the next ring reads correctly."""
    path, payload = data_file(tmp_path, 8 * 64 * KiB)
    fd = os.open(path, os.O_RDONLY)
    buffer = torch.zeros(len(payload), dtype=torch.uint8)
    calls = [0]
    stuck = [False]
    completed, enter = uring.completed, uring.enter

    def interrupt() -> None:
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt if where == "completed" else SystemExit(143)

    def seam(fd: int, offset: int, length: int, result: int) -> int:
        if where == "completed":
            interrupt()
        return completed(fd, offset, length, result)

    def unstickable_enter(*args: int) -> int:
        if stuck[0]:  # the test gave up on a hang: let the spinning close() end
            raise ReadError("the test gave up", path=None)
        return enter(*args)

    monkeypatch.setattr(uring, "completed", seam)
    monkeypatch.setattr(uring, "enter", unstickable_enter)
    ring = uring.UringEngine(depth=8)
    try:
        piece = 64 * KiB
        tickets = [ring.submit(uring.Read(fd, buffer.data_ptr() + i * piece, i * piece, piece,
                                          piece, 1, str(path), direct=False,
                                          then=interrupt if where == "then" else None))
                   for i in range(8)]
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            tickets[-1].result()
        ended, raised = finishes(ring.close, lambda: stuck.__setitem__(0, True))
        assert ended and raised is None, f"close() hung or failed after the interrupt: {raised}"
    finally:
        stuck[0] = True
        if ring.fd >= 0:
            ring.close()
        os.close(fd)
    assert ring.fd == -1 and ring.in_flight == 0
    for ticket in tickets:
        try:
            ticket.result()
        except ReadError as exc:
            assert "withdrawn" in str(exc)
        assert ticket.done()
    monkeypatch.setattr(uring, "completed", completed)
    monkeypatch.setattr(uring, "enter", enter)
    again = torch.zeros(len(payload), dtype=torch.uint8)
    fd = os.open(path, os.O_RDONLY)
    ring = uring.UringEngine(depth=8)
    try:
        ring.submit(uring.Read(fd, again.data_ptr(), 0, len(payload), len(payload), 1,
                               str(path), direct=False)).result()
    finally:
        if ring.fd >= 0:  # (closing twice spins on code without the fix)
            ring.close()
        os.close(fd)
    assert bytes(again.numpy()) == payload


class Interrupting(dict):  # type: ignore[type-arg]
    """``UringEngine._flying`` raising KeyboardInterrupt on its ``arm``-th insertion, before or
    after storing it: an interrupt between recording a read and advancing the ring's tail."""

    def __init__(self, arm: int, after: bool) -> None:
        super().__init__()
        self.arm, self.after = arm, after

    def __setitem__(self, key: int, value: object) -> None:
        self.arm -= 1
        if self.arm == 0 and not self.after:
            raise KeyboardInterrupt
        super().__setitem__(key, value)
        if self.arm == 0:
            raise KeyboardInterrupt


@needs_uring
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_an_interrupt_while_submitting_leaves_no_read_untracked(
        tmp_path: Path, after: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    path, payload = data_file(tmp_path, 8 * 64 * KiB)
    fd = os.open(path, os.O_RDONLY)
    buffer = torch.zeros(len(payload), dtype=torch.uint8)
    stuck = [False]
    enter = uring.enter

    def unstickable_enter(*args: int) -> int:
        if stuck[0]:
            raise ReadError("the test gave up", path=None)
        return enter(*args)

    monkeypatch.setattr(uring, "enter", unstickable_enter)
    ring = uring.UringEngine(depth=8)
    ring._flying = Interrupting(3, after)
    try:
        piece = 64 * KiB
        tickets = [ring.submit(uring.Read(fd, buffer.data_ptr() + i * piece, i * piece, piece,
                                          piece, 1, str(path), direct=False))
                   for i in range(8)]
        with pytest.raises(KeyboardInterrupt):
            tickets[0].result()
        ended, raised = finishes(ring.close, lambda: stuck.__setitem__(0, True))
        assert ended and raised is None, f"close() hung or failed after the interrupt: {raised}"
    finally:
        stuck[0] = True
        if ring.fd >= 0:
            ring.close()
        os.close(fd)
    assert ring.fd == -1 and ring.in_flight == 0
    for ticket in tickets:
        ended, raised = finishes(ticket.result)
        assert ended and (raised is None or "withdrawn" in str(raised))
        assert ticket.done()


@needs_uring
def test_a_stalled_ring_still_reaps_its_reads_at_close(monkeypatch: pytest.MonkeyPatch) -> None:
    """``io_uring_enter`` answers EAGAIN until the load fails with a stall error while a read is
    in the kernel (waiting on an empty pipe): ``close()`` does not stop after one more attempt —
    it cancels the read and reaps it before the ring goes, so its buffer can be freed."""
    readable, writable = os.pipe()
    buffer = torch.zeros(4 * KiB, dtype=torch.uint8)
    enter = uring.enter
    refusals = [0]

    def stalling(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
        if refusals[0] < retry.ATTEMPTS + 2:
            refusals[0] += 1
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        return enter(fd, to_submit, min_complete, flags)

    monkeypatch.setattr(retry, "LONGEST", 0.001)
    ring = uring.UringEngine(depth=4)
    try:
        ticket = ring.submit(uring.Read(readable, buffer.data_ptr(), 0, len(buffer), len(buffer),
                                        1, "pipe", direct=False))
        ring.flush()
        assert ring.in_flight == 1
        monkeypatch.setattr(uring, "enter", stalling)
        with pytest.raises(ReadError, match="times in a row"):
            ticket.result()
        ended, raised = finishes(ring.close, lambda: os.write(writable, bytes(len(buffer))))
        assert ended and raised is None, raised
        assert ticket.finished and not ticket.lost, "close() left the read in the kernel"
    finally:
        if ring.fd >= 0:  # (closing twice spins on code without the fix)
            ring.close()
        os.close(readable)
        os.close(writable)
    assert ticket.done() and ring.in_flight == 0 and ring.fd == -1


@needs_uring
def test_a_read_the_kernel_keeps_keeps_its_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read the kernel does not give back (no cancel reaches it, ``io_uring_enter`` stalls for
    ever) ends the wait after ``retry.SETTLE`` seconds: a warning names it, its memory is kept
    for the rest of the process, and the ring is closed."""
    readable, writable = os.pipe()
    buffer = torch.zeros(4 * KiB, dtype=torch.uint8)
    monkeypatch.setattr(retry, "SETTLE", 0.3)
    monkeypatch.setattr(retry, "KEPT", [])
    monkeypatch.setattr(uring.UringEngine, "_push_cancel", lambda self, user: None)
    ring = uring.UringEngine(depth=4)
    try:
        ticket = ring.submit(uring.Read(readable, buffer.data_ptr(), 0, len(buffer), len(buffer),
                                        1, "pipe", direct=False, owner=buffer))
        ring.flush()
        assert ring.in_flight == 1
        with pytest.warns(RuntimeWarning, match="still in the kernel .* memory is kept"):
            ended, raised = finishes(ring.close)
        assert ended and raised is None, raised
    finally:
        if ring.fd >= 0:  # (closing twice spins on code without the fix)
            ring.close()
        os.close(writable)
        os.close(readable)
    assert ring.fd == -1 and ticket.lost and not ticket.done()
    assert any(kept is buffer for kept in retry.KEPT)
    with pytest.raises(ReadError, match="memory is kept"):
        ticket.result()


@needs_uring
def test_a_second_interrupt_while_the_ring_stops_is_raised_after_it_stopped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C, then Ctrl-C again twice while the ring cancels and reaps: it still reaps every
    read, closes, and only then raises the interrupt."""
    readable, writable = os.pipe()
    buffer = torch.zeros(8 * KiB, dtype=torch.uint8)
    enter = uring.enter
    interrupts = [0]

    def interrupted(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
        if interrupts[0] < 3:
            interrupts[0] += 1
            raise KeyboardInterrupt
        return enter(fd, to_submit, min_complete, flags)

    ring = uring.UringEngine(depth=4)
    try:
        tickets = [ring.submit(uring.Read(readable, buffer.data_ptr() + i * KiB, 0, KiB, KiB, 1,
                                          "pipe", direct=False)) for i in range(4)]
        ring.flush()
        assert ring.in_flight == 4
        monkeypatch.setattr(uring, "enter", interrupted)
        with pytest.raises(KeyboardInterrupt):
            tickets[0].result()
        ended, raised = finishes(ring.close, lambda: os.write(writable, bytes(len(buffer))))
        assert ended and isinstance(raised, KeyboardInterrupt), raised
        assert ring.fd == -1 and interrupts[0] == 3
        assert all(ticket.done() for ticket in tickets)
    finally:
        if ring.fd >= 0:  # (closing twice spins on code without the fix)
            os.write(writable, bytes(len(buffer)))
            ring.close()
        os.close(readable)
        os.close(writable)


# ---------------------------------------------------------------------------------------------
# The read pipeline: pins and waits under interrupts


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["load", "stream", "copy"])
@pytest.mark.parametrize("where", ["after-pin", "before-unpin", "after-unpin"])
def test_an_interrupt_next_to_a_pin_releases_it_exactly_once(
        ckpt: Path, engine: str, mode: str, where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """KeyboardInterrupt right after a block's descriptors were pinned (before the load recorded
    it), right before they are unpinned (after the block was taken off the pending queue), or
    right after: every pin is released once, every descriptor closed, the next load right."""
    pin, unpin = read_module._pin, read_module._unpin
    count = [0]

    def interrupt() -> None:
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt

    def pinning(*args: object) -> object:
        token = pin(*args)  # type: ignore[arg-type]
        if where == "after-pin":
            interrupt()
        return token

    def unpinning(*args: object) -> None:
        if where == "before-unpin":
            interrupt()
        unpin(*args)  # type: ignore[arg-type]
        if where == "after-unpin":
            interrupt()

    monkeypatch.setattr(read_module, "_pin", pinning)
    monkeypatch.setattr(read_module, "_unpin", unpinning)
    expected = load_file(ckpt)
    with no_leaks():
        with pytest.raises(KeyboardInterrupt):
            load(ckpt, mode, engine)
    assert count[0] >= 3
    monkeypatch.setattr(read_module, "_pin", pin)
    monkeypatch.setattr(read_module, "_unpin", unpin)
    with no_leaks():
        assert_same(load(ckpt, mode, engine), converted(expected, mode))


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mode", ["load", "stream", "copy"])
def test_a_second_interrupt_as_a_load_winds_down_still_releases_its_pins(
        ckpt: Path, engine: str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first interrupt stops a load with reads pending (KeyboardInterrupt at its third pin);
    a second one (SystemExit, as a SIGTERM handler raises) lands as the load's cleanup starts to
    wind down, before it stopped a read or released a pin. The real-signal test found that once
    in 200 signals, in a stream the garbage collector was closing (Python drops the exception
    there): the cleanup stopped, and its pins kept a descriptor open for good. Now the
    wind-down is carried to its end, an interrupt is raised after it, and nothing is left."""
    pin, wind_down = read_module._pin, read_module._wind_down
    pins, downs = [0], [0]

    def pinning(*args: object) -> object:
        token = pin(*args)  # type: ignore[arg-type]
        pins[0] += 1
        if pins[0] == 3:
            raise KeyboardInterrupt
        return token

    def winding_down(*args: object) -> object:
        downs[0] += 1
        if downs[0] == 1:
            raise SystemExit(143)
        return wind_down(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(read_module, "_pin", pinning)
    monkeypatch.setattr(read_module, "_wind_down", winding_down)
    expected = load_file(ckpt)
    with no_leaks():
        with pytest.raises((KeyboardInterrupt, SystemExit)):
            load(ckpt, mode, engine)
        assert pins[0] >= 3 and downs[0] == 2
        assert not any(held.pins for held in POOL._open.values()), "a pin was kept"
    monkeypatch.setattr(read_module, "_pin", pin)
    monkeypatch.setattr(read_module, "_wind_down", wind_down)
    with no_leaks():
        assert_same(load(ckpt, mode, engine), converted(expected, mode))


def load(path: Path, mode: str, engine: str) -> dict[str, torch.Tensor]:
    if mode == "stream":
        return dict(weightlift.stream(path, strategy="direct", engine=engine,
                                      max_host_memory="4MiB"))
    return weightlift.load(path, strategy="direct", engine=engine, max_host_memory="4MiB",
                           dtype=torch.float64 if mode == "copy" else None)


def converted(tensors: dict[str, torch.Tensor], mode: str) -> dict[str, torch.Tensor]:
    if mode != "copy":
        return tensors
    return {name: t.to(torch.float64) if t.is_floating_point() else t
            for name, t in tensors.items()}


class Slow:
    """A ``preadv`` seam that holds the ``nth`` read until released, recording whether its
    descriptor was still pinned when it ended, and when."""

    def __init__(self, nth: int) -> None:
        self.calls = iter(range(1, 1 << 30))
        self.nth = nth
        self.release = threading.Event()
        self.entered = threading.Event()
        self.ended: list[tuple[bool, float]] = []
        self.preadv = io_base.preadv

    def __call__(self, fd: int, buffers: list[memoryview], offset: int) -> int:
        if next(self.calls) == self.nth:
            self.entered.set()
            self.release.wait(HANG)
            n = self.preadv(fd, buffers, offset)
            pinned = any(held.fd == fd and held.pins for held in POOL._open.values())
            self.ended.append((pinned, time.monotonic()))
            return n
        return self.preadv(fd, buffers, offset)


def test_a_second_interrupt_while_a_read_is_waited_for_does_not_abandon_it(
        ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C ends a thread-engine load while a read blocks on its worker; a second Ctrl-C
    arrives while the load waits for that read. The load goes on waiting (its descriptor stays
    pinned, its buffer alive) until the read is over, then raises the interrupt."""
    slow = Slow(3)
    monkeypatch.setattr(io_base, "preadv", slow)
    submitted: list[object] = []
    read = engine_module.ThreadEngine.read

    class Interrupted:
        """A future whose first wait after the first interrupt is itself interrupted."""

        def __init__(self, future: object) -> None:
            self.future = future

        def __getattr__(self, name: str) -> object:
            return getattr(self.future, name)

        def result(self, timeout: float | None = None) -> object:
            if armed and not fired:
                fired.append(True)
                threading.Timer(0.3, slow.release.set).start()
                raise KeyboardInterrupt  # Ctrl-C while waiting for the blocked read
            return self.future.result(timeout)  # type: ignore[attr-defined]

    armed: list[bool] = []
    fired: list[bool] = []

    def reading(self: engine_module.ThreadEngine, *args: object) -> object:
        future = Interrupted(read(self, *args))  # type: ignore[arg-type]
        submitted.append(future)
        return future

    def progress(done: int, total: int) -> None:
        slow.entered.wait(HANG)
        armed.append(True)
        raise KeyboardInterrupt  # the first Ctrl-C

    monkeypatch.setattr(engine_module.ThreadEngine, "read", reading)
    with no_leaks():
        try:
            with pytest.raises(KeyboardInterrupt):
                weightlift.load(ckpt, strategy="direct", engine="threads", on_progress=progress)
            raised = time.monotonic()
        finally:
            slow.release.set()
    assert fired, "the second interrupt never came"
    assert slow.ended, "the blocked read never ended"
    pinned, ended = slow.ended[0]
    assert pinned, "the read's descriptor was unpinned while it was still reading"
    assert ended <= raised, "the interrupt reached the caller before the read ended"


def test_a_future_lock_an_interrupt_left_taken_does_not_hang_the_close() -> None:
    """A Ctrl-C between a ``with future._condition:``'s acquire and its block leaves the
    loading thread owning the future's lock (found by the real-signal test: a load hung in
    ``ThreadPoolExecutor.shutdown``, its worker waiting for that lock). ``close`` gives it back."""
    outcome: list[str] = []

    def loader() -> None:
        engine = engine_module.ThreadEngine(1)
        release = threading.Event()
        engine.call(release.wait, 30)        # occupies the one worker
        queued = engine.call(lambda: None)    # taken by the worker next
        queued.future._condition.acquire()   # what the interrupt leaves behind
        release.set()
        deadline = time.monotonic() + 30
        while engine.pool._work_queue.qsize() and time.monotonic() < deadline:
            time.sleep(0.01)                  # the worker has taken the queued call: it waits
        engine.close()
        outcome.append("closed")

    thread = threading.Thread(target=loader, daemon=True)
    thread.start()
    thread.join(60)  # a hang detector: close() returns at once once the lock is given back
    assert outcome == ["closed"], "ThreadEngine.close() hung on a future lock left taken"


def test_a_read_that_never_ends_is_left_with_its_memory_after_a_bounded_wait(
        ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read blocked on its worker thread for longer than ``retry.SETTLE``: the interrupt still
    reaches the caller (after SETTLE), a warning says so, and the read's buffer is kept."""
    monkeypatch.setattr(retry, "SETTLE", 0.3)
    monkeypatch.setattr(retry, "KEPT", [])
    slow = Slow(3)
    monkeypatch.setattr(io_base, "preadv", slow)

    def progress(done: int, total: int) -> None:
        slow.entered.wait(HANG)
        raise KeyboardInterrupt

    try:
        with pytest.warns(RuntimeWarning, match="still"):
            started = time.monotonic()
            with pytest.raises(KeyboardInterrupt):
                weightlift.load(ckpt, strategy="direct", engine="threads", on_progress=progress)
            waited = time.monotonic() - started
        assert waited < HANG
        assert retry.KEPT, "the blocked read's buffer was not kept"
    finally:
        slow.release.set()


def test_a_shard_closed_while_its_open_waits_for_a_descriptor_keeps_none(
        ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pin waits in the descriptor pool for EMFILE to pass while another thread closes the
    checkpoint: the descriptor it opens afterwards is closed again, and the pin fails."""
    layout = weightlift.open(ckpt)
    shard = layout.layout.shards[0]
    POOL.release(shard)  # its next pin opens the file again
    assert not POOL.has_open(shard)
    waiting, closed = threading.Event(), threading.Event()
    real_open = records.Shard._open

    def refused_until_closed(self: records.Shard, kind: str, opened: list[int]) -> int:
        if not closed.is_set():
            waiting.set()
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return real_open(self, kind, opened)

    monkeypatch.setattr(records.Shard, "_open", refused_until_closed)
    outcome: list[object] = []

    def pin() -> None:
        try:
            outcome.append(shard.pin(records.PLAIN))
            shard.unpin(records.PLAIN)
        except ReadError as exc:
            outcome.append(exc)

    with no_leaks():
        thread = threading.Thread(target=pin)
        thread.start()
        assert waiting.wait(HANG)
        layout.close()
        closed.set()
        thread.join(HANG)
        assert not thread.is_alive()
    assert isinstance(outcome[0], ReadError) and "closed" in str(outcome[0])
    assert not POOL.has_open(shard)


#: libc's ``kill`` typed to take a third argument it ignores: a weak reference's callback (it
#: is called with the reference) made of C alone, so a signal is sent from inside the
#: deallocation of a view's memory without any Python code running there.
_KILL = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.py_object)(
    ("kill", ctypes.CDLL(None)))


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(143)  # as vLLM's worker processes do on SIGTERM


def _last_views(kind: str, path: Path) -> tuple[torch.Tensor, object, Callable[[], bool]]:
    """A tensor that is the last view of some memory weightlift maps (a window of ``path``, the
    ``mmap`` strategy's whole-file mapping, a stream buffer from the pool), an object whose death
    the tensor's death brings about, and whether that memory is still mapped."""
    if kind == "pool":
        pool = BufferPool(limit=0)  # closed below: its buffer is unmapped with its last view
        tensor = pool.take(4 << 20)
        handle = pool._out[-1][0]()
        pool.close()
        address = tensor.data_ptr()
        return tensor, handle, lambda: _mapped_at(address)
    fd = os.open(path, os.O_RDONLY)
    try:
        if kind == "window":
            window = Windows().map(fd, 5000, 300_000, path=str(path))
            tensor, memory = window.view(5000, 300_000), window.memory
        else:
            mapping = Mapping(fd, path.stat().st_size)
            tensor, memory = torch.frombuffer(mapping.memory, dtype=torch.uint8), mapping.memory
    finally:
        os.close(fd)
    address = ctypes.addressof(memory)
    return tensor, memory, lambda: _mapped_at(address)


def _mapped_at(address: int) -> bool:
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= address < hi:
                return True
    return False


@pytest.mark.parametrize("kind", ["window", "mapping", "pool"])
def test_an_interrupt_while_the_last_view_dies_reaches_the_caller(
        ckpt: Path, kind: str) -> None:
    """SIGTERM (its handler raising ``SystemExit``, as vLLM's workers do) arrives while the last
    tensor viewing a window, a mapped file or a stream buffer is freed, sent from C inside that
    deallocation: the handler runs in the caller's code right after ``del``, where the exception
    reaches it, never inside a finalizer (where Python prints and drops it; found by the
    real-signal test). No Python function runs while the memory is let go."""
    tensor, dying, mapped = _last_views(kind, ckpt)
    assert mapped()
    calls: list[str] = []
    # Sent before anything else of the deallocation (callbacks run newest first).
    fire = weakref.ref(dying, functools.partial(_KILL, os.getpid(), signal.SIGTERM))
    del dying
    previous = signal.signal(signal.SIGTERM, _terminate)
    caught = False
    try:
        try:
            sys.setprofile(lambda frame, event, arg: calls.append(
                f"{frame.f_code.co_filename}:{frame.f_code.co_name}") if event == "call" else None)
            del tensor
            sys.setprofile(None)
        except SystemExit:
            caught = True
        sys.setprofile(None)
        try:
            time.sleep(0.2)  # (on code that sends a dropped interrupt again: it arrives here)
        except SystemExit:
            pass
    finally:
        sys.setprofile(None)
        signal.signal(signal.SIGTERM, previous)
    assert fire() is None
    assert caught, "the SIGTERM handler's SystemExit did not reach the code that dropped the view"
    assert not calls, f"Python code ran while the last view died: {calls}"
    assert not mapped(), "the memory is still mapped after its last view died"


def test_a_closed_thread_engine_is_freed_without_python_code() -> None:
    """Freeing a closed thread engine runs no Python code: its worker threads were taken out of
    the standard library's weak registries, whose callbacks (Python, run where a thread object
    dies) are where the real-signal test lost a SIGINT."""
    engine = engine_module.ThreadEngine(2)
    for _ in range(4):
        engine.call(time.sleep, 0.01).result()
    engine.close()
    gc.collect()
    calls: list[str] = []
    sys.setprofile(lambda frame, event, arg: calls.append(
        f"{frame.f_code.co_filename}:{frame.f_code.co_name}") if event == "call" else None)
    try:
        del engine
    finally:
        sys.setprofile(None)
    assert not calls, f"Python code ran while a closed engine was freed: {calls}"


def test_worker_threads_leave_interrupts_to_the_main_thread() -> None:
    """The read engine's workers block SIGINT and SIGTERM, so the kernel delivers them to the
    main thread: taken by a worker, a signal only marks the handler as due, and a main thread
    asleep in a lock (``Thread.start``, a future's result) would sleep on."""
    engine = engine_module.ThreadEngine(2)
    try:
        blocked = engine.pool.submit(signal.pthread_sigmask, signal.SIG_BLOCK, []).result()
    finally:
        engine.close()
    assert {signal.SIGINT, signal.SIGTERM} <= set(blocked), blocked
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # main: not blocked


def test_closing_a_thread_engine_ends_when_an_interrupted_join_kept_a_workers_lock() -> None:
    """CPython 3.11's ``Thread.join`` takes the thread's lock and gives it back; an interrupt
    right after the take is handled (bpo-45274), but a second one landing in that handler keeps
    the lock taken for good, and every later join of the thread waits forever: the real-signal
    test once hung so in ``ThreadPoolExecutor.shutdown``, with no worker left. That state, made
    here by taking the ended workers' locks, must not stop ``close`` from returning."""
    engine = engine_module.ThreadEngine(2)
    for _ in range(4):
        engine.call(time.sleep, 0.01).result()
    workers = list(engine.pool._threads)
    if not all(hasattr(thread, "_tstate_lock") for thread in workers):
        pytest.skip("this Python's Thread.join takes no lock of the thread (3.13+)")
    engine.pool.shutdown(wait=False)
    deadline = time.monotonic() + 30
    while set(workers) & set(threading.enumerate()):
        assert time.monotonic() < deadline, "the shut-down pool's idle workers never ended"
        time.sleep(0.01)
    taken = [lock for thread in workers if (lock := thread._tstate_lock) is not None]
    for lock in taken:
        lock.acquire()  # what the doubly interrupted join kept
    try:
        closed = threading.Event()
        closer = threading.Thread(target=lambda: (engine.close(), closed.set()), daemon=True)
        closer.start()
        assert closed.wait(30), "ThreadEngine.close waits forever for workers that have ended"
    finally:
        for lock in taken:
            lock.release()  # else the interpreter's exit waits for them (threading._shutdown)


#: The code that maps part of a file (a window) or a whole file (the ``mmap`` strategy).
MAPPING_CODE = {window_module.map_file.__code__, window_module.Window.__init__.__code__,
                window_module.Windows.map.__code__, Mapping.__init__.__code__}


def _after_calls(code: CodeType) -> set[int]:
    """Offsets of the instructions that follow a call in ``code``: where CPython runs a signal's
    Python handler (after a call returns; also at a function's start and a loop's jump back)."""
    offsets, previous = set(), None
    for instruction in dis.get_instructions(code):
        if previous is not None and previous.opname.startswith("CALL"):
            offsets.add(instruction.offset)
        previous = instruction
    return offsets


def _stream_interrupted_at(path: Path, strategy: str, point: int,
                           code: set[CodeType] = MAPPING_CODE) -> int:
    """Stream ``path``, raising KeyboardInterrupt at the ``point``-th place in ``code`` (by
    default, the code that maps files) where a signal's handler could raise it: right after a
    call returned. How many such places the stream ran through."""
    places = {each: _after_calls(each) for each in code}
    count = [0]

    def local(frame: FrameType, event: str, arg: object) -> object:
        if event == "opcode" and frame.f_lasti in places[frame.f_code]:
            count[0] += 1
            if count[0] == point:
                raise KeyboardInterrupt
        return local

    def calls(frame: FrameType, event: str, arg: object) -> object:
        if frame.f_code not in places:
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(calls)
    try:
        for _ in weightlift.stream(path, strategy=strategy, engine="threads",
                                   max_host_memory="4MiB"):
            pass
    except KeyboardInterrupt:
        assert count[0] == point
    finally:
        sys.settrace(None)
    return count[0]


@pytest.mark.parametrize("strategy", ["stream", "direct", "mmap"])
def test_an_interrupt_while_a_file_is_mapped_leaves_no_mapping(
        ckpt: Path, strategy: str) -> None:
    """KeyboardInterrupt at each place a signal's handler can raise it while mapping a window of a cached file in a stream (``stream``
    and ``direct``), or the whole file (``mmap``): once the interrupt is handled and dropped,
    nothing of the checkpoint is mapped. The real-signal test found mappings left after an
    interrupt in ``stream()``: one landing between ``mmap`` and the finalizer that was to unmap
    it left the mapping for the rest of the process."""
    lines = _stream_interrupted_at(ckpt, strategy, 0)  # a whole stream: how many places
    gc.collect()
    assert lines > 0, "nothing was mapped: the test checks nothing"
    assert mapped_bytes(ckpt) == 0
    with no_leaks():
        for line in range(1, min(lines, 30) + 1):  # every line of the first two windows
            _stream_interrupted_at(ckpt, strategy, line)
            if mapped_bytes(ckpt):
                gc.collect()  # (slow on a busy machine: only when something is left)
            assert mapped_bytes(ckpt) == 0, f"a mapping was left by an interrupt at line {line}"
    assert_same(dict(weightlift.stream(ckpt, strategy=strategy, engine="threads",
                                       max_host_memory="4MiB")), load_file(ckpt))


def test_an_interrupt_inside_the_descriptor_pool_leaves_it_usable(ckpt: Path) -> None:
    """KeyboardInterrupt at each place a signal's handler can raise it while pinning and unpinning a descriptor (``Pool.pin``,
    ``unpin``, ``release``, ``_close``) during a stream: the caller gets the interrupt — before,
    a pin cut short between its bookkeeping steps made the next one raise ``KeyError`` — no
    descriptor is left open, and the next load is exact."""
    code = {POOL.pin.__code__, POOL.unpin.__code__, POOL.release.__code__, POOL._close.__code__}
    lines = _stream_interrupted_at(ckpt, "stream", 0, code)
    assert lines > 0
    with no_leaks():
        for line in range(1, min(lines, 60) + 1):
            _stream_interrupted_at(ckpt, "stream", line, code)
    assert_same(weightlift.load(ckpt, strategy="stream", engine="threads"), load_file(ckpt))


class _Trip:
    """``TRIP[signum]`` asks for a signal's handler the way a signal does (``interrupt_main``),
    from C code after which no Python runs until the traced code goes on: CPython then runs the
    handler exactly where a real signal arriving there would be handled."""

    __getitem__ = _thread.interrupt_main  # a builtin: called as ``interrupt_main(signum)``


TRIP = _Trip()
#: Where the last ``_signalled_at`` sent its signal.
where: list[str] = []
#: Where a checkpoint's descriptors are opened, kept and closed, and the load that closes them.
DESCRIPTOR_CODE = (str(Path(records.__file__).parent), records.__file__.replace(
    os.sep + "sources" + os.sep, os.sep + "formats" + os.sep))


def _signalled_at(path: Path, engine: str, point: int, strategy: str = "stream"
                  ) -> tuple[int, bool]:
    """Stream ``path`` (``strategy``) with SIGINT arriving just before the ``point``-th
    call (or loop's jump back) run by the code in ``DESCRIPTOR_CODE``: CPython handles it where
    it handles a real one, once that call returned (or at the next function's start). How many
    such places the stream ran through, and whether the interrupt reached the caller."""
    count = [0]
    places: dict[CodeType, set[int]] = {}
    where.clear()

    def local(frame: FrameType, event: str, arg: object) -> object:
        if event == "opcode" and frame.f_lasti in places[frame.f_code]:
            count[0] += 1
            if count[0] == point:
                where.append(f"{frame.f_code.co_name} (line {frame.f_lineno})")
                sys.settrace(None)  # no more Python before the traced code's next instruction
                TRIP[signal.SIGINT]
        return local

    def calls(frame: FrameType, event: str, arg: object) -> object:
        code = frame.f_code
        if not code.co_filename.startswith(DESCRIPTOR_CODE):
            return None
        if code not in places:
            places[code] = {i.offset for i in dis.get_instructions(code)
                            if i.opname in ("CALL", "JUMP_BACKWARD")}
        frame.f_trace_opcodes = True
        return local

    if strategy == "direct":
        pagecache.evict(path)  # else its cached ranges are windows, and no O_DIRECT file opens
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.settrace(calls)
    try:
        for _ in weightlift.stream(path, strategy=strategy, engine=engine,
                                   max_host_memory="4MiB"):
            pass
    except KeyboardInterrupt as exc:
        exc.__traceback__ = None  # its frames hold the load's objects
        return count[0], True
    finally:
        sys.settrace(None)
        signal.signal(signal.SIGINT, previous)
    return count[0], False


def _descriptors_of(path: Path) -> list[int]:
    return sorted(fd for fd, target in open_fds().items() if target == str(path))


@pytest.mark.parametrize("strategy", ["stream", "direct"])
@pytest.mark.parametrize("engine", ENGINES)
def test_a_signal_at_any_call_of_a_stream_leaves_no_descriptor_of_the_checkpoint(
        ckpt: Path, engine: str, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGINT handled at each place CPython can run a signal's handler in the code that opens,
    keeps and closes a checkpoint's descriptors, during a ``stream()`` with the ``stream``
    strategy: the interrupt reaches the caller and, once dropped, the descriptor pool holds
    nothing of the checkpoint and no descriptor to it is open. The real-signal test found one
    left in about 1 of 200 signals: one landing right after ``open`` returned, or as the pool's
    lock was let go with the number on its way to the pool (resolving), or inside the close of
    the layout at the end of a load (the shards after it were never closed, or a descriptor was
    forgotten before it was closed). ``direct`` opens the file a second time, with O_DIRECT,
    when its first read is pinned (``Shard._open`` through the pool's ``pin``): the path a shard
    takes when it is re-opened under a low descriptor limit."""
    monkeypatch.setattr(STRATEGIES[strategy], "read_size", 4 << 20)  # a few reads: a few pins
    places, _ = _signalled_at(ckpt, engine, 0, strategy)
    assert places > 20, "the sweep traced nothing"
    gc.collect()
    assert _descriptors_of(ckpt) == []
    left = []
    for point in range(1, places + 1):
        ran, caught = _signalled_at(ckpt, engine, point, strategy)
        assert caught or ran < point, f"place {point}: the interrupt was lost"
        kept = fds = [0]
        for _ in range(2):
            kept = [key for key, held in list(POOL._open.items())
                    if getattr(held.owner, "path", None) == str(ckpt)]
            fds = _descriptors_of(ckpt)
            if not (kept or fds):
                break
            gc.collect()  # (slow: only when something is left) a cycle may hold the load
        if kept or fds:
            left.append(f"place {point} ({where}): pool {kept}, descriptors {fds}")
            for key in kept:  # so that the next places are judged on their own
                POOL.release(POOL._open[key].owner)
            for fd in _descriptors_of(ckpt):
                os.close(fd)
    assert not left, "\n".join(left)
    assert_same(dict(weightlift.stream(ckpt, strategy=strategy, engine=engine,
                                       max_host_memory="4MiB")), load_file(ckpt))


# ---------------------------------------------------------------------------------------------
# Real signals at random moments, in a child process

CHILD = Path(__file__).resolve().parent / "interrupt_child.py"
#: Signals sent, each at a load of a random engine × strategy × ``load``/``stream`` (every one of
#: them once a pass in random order); the environment asks for more (hundreds: docs/safety.md).
TRIALS = int(os.environ.get("WEIGHTLIFT_SIGNAL_TRIALS", "6"))
#: Where the real-signal runs write their log (one line a trial), if set.
SIGNAL_LOG = os.environ.get("WEIGHTLIFT_SIGNAL_LOG")
#: Seconds the child may take to start: torch's import and the reference load, on a busy machine.
START = 180.0


@pytest.fixture(scope="session")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """130 MB of random bits in tensors from 4 KiB to 17 MiB, written by safetensors."""
    path = tmp_path_factory.mktemp("signals") / "model.safetensors"
    g = torch.Generator().manual_seed(26)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(24):
        rows = [1, 97, 1024, 4096][i % 4]
        tensors[f"layer{i:02d}.weight"] = torch.randint(-2**31, 2**31 - 1, (rows, 1024 + i),
                                                        generator=g, dtype=torch.int32
                                                        ).view(torch.float32)
        tensors[f"layer{i:02d}.norm"] = torch.randint(0, 255, (4096 + 3 * i,), generator=g,
                                                      dtype=torch.uint8)
    save_file(tensors, path)
    yield path
    path.unlink()


class Child:
    """The child process and its lines, read by a thread so every wait is bounded."""

    def __init__(self, checkpoint: Path, engines: str, trials: int, seed: int) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        # Started with SIGINT ignored, whatever this process has: a program a shell without job
        # control started in the background (as CI runners may start the suite) inherits it
        # ignored, and Python then leaves it so; the child sets its own handler, as a program
        # that must react to Ctrl-C everywhere does. The same test in every environment.
        argv = [sys.executable, str(CHILD), str(checkpoint), engines, str(trials), str(seed)]
        ignoring = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                    "os.execv(sys.argv[1], sys.argv[1:])")
        self.process = subprocess.Popen([sys.executable, "-c", ignoring, *argv],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True, env=env)
        self.lines: list[str] = []
        self.seen = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.seen:
                self.lines.append(line.strip())
                self.seen.notify_all()
        with self.seen:
            self.lines.append("")  # end of output
            self.seen.notify_all()

    def expect(self, word: str, seconds: float) -> list[str]:
        """The child's next line, which must start with ``word``, within ``seconds``."""
        with self.seen:
            if not self.seen.wait_for(lambda: self.lines, seconds):
                self.fail(f"no {word!r} line within {seconds:.0f} s")
            line = self.lines.pop(0)
        if not line.startswith(word):
            self.fail(f"expected {word!r}, got {line!r}")
        return line.split()

    def line(self, seconds: float) -> str | None:
        """The child's next line within ``seconds``, or None (nothing is killed)."""
        with self.seen:
            if not self.seen.wait_for(lambda: self.lines, seconds):
                return None
            return self.lines.pop(0)

    def answer(self, seconds: float) -> tuple[str | None, float]:
        """The child's next line within ``seconds``, waiting longer (up to ``IO_STALL``) while
        the kernel holds the child's main thread in uninterruptible sleep (state ``D``: a read
        waiting for the disk), where no signal reaches it. Also how long it was seen so."""
        line = self.line(seconds)
        stalled = 0.0
        while line is None and stalled < IO_STALL and main_thread_in_d_state(self.process.pid):
            line = self.line(1.0)
            stalled += 1.0
        return line, stalled

    def fail(self, why: str) -> None:
        kernel = ""
        if self.process.poll() is None:
            kernel = kernel_state(self.process.pid)  # before the dump's signal changes it
            self.process.send_signal(signal.SIGUSR1)  # every thread's stack to stderr
            time.sleep(1)
            self.process.kill()
        _, err = self.process.communicate(timeout=HANG)
        shown = err if len(err) < 12000 else f"{err[:6000]}\n[...]\n{err[-6000:]}"
        raise AssertionError(f"{why}; the child's threads in the kernel:\n{kernel}\n"
                             f"the child's stderr:\n{shown}")


#: Longest the test waits on a child whose main thread the kernel holds in uninterruptible sleep.
IO_STALL = 120.0


def main_thread_in_d_state(pid: int) -> bool:
    """Is the main thread of ``pid`` (which runs Python's signal handlers) in state ``D``?"""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "D"
    except (OSError, IndexError):
        return False


def kernel_state(pid: int) -> str:
    """Each thread of ``pid``: its state, where it waits in the kernel, its pending and blocked
    signals (``/proc``; the kernel stack where root may read it): what a hang was stuck in."""
    out = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            status = dict(line.split(":", 1) for line in (task / "status").read_text().splitlines()
                          if ":" in line)
            wchan = (task / "wchan").read_text().strip()
            try:
                stack = (task / "stack").read_text().strip().replace("\n", " | ")
            except OSError:
                stack = "(kernel stack not readable)"
        except OSError:
            continue  # the thread ended meanwhile
        out.append(f"{task.name} {status.get('Name', '').strip()} "
                   f"{status.get('State', '').strip()} wchan={wchan} "
                   f"SigPnd={status.get('SigPnd', '').strip()} "
                   f"ShdPnd={status.get('ShdPnd', '').strip()} "
                   f"SigBlk={status.get('SigBlk', '').strip()} stack: {stack}")
    return "\n".join(out)


def run_signals(checkpoint: Path, engines: str, trials: int, seed: int) -> list[str]:
    """``trials`` signals to one child at random moments of its loads; one report line each."""
    rng = random.Random(seed)
    child = Child(checkpoint, engines, trials, seed)
    report: list[str] = []
    leaks: list[str] = []
    try:
        seconds = float(child.expect("ready", START)[1])
        for trial in range(trials):
            _, _, engine, strategy, mode = child.expect("go", HANG)
            kind = rng.choice([signal.SIGINT, signal.SIGTERM])
            twice = rng.random() < 0.25  # a second Ctrl-C while the first one is cleaned up
            time.sleep(rng.uniform(0, 1.5 * seconds))
            sent = time.monotonic()
            child.process.send_signal(kind)
            if twice:
                time.sleep(rng.uniform(0, 0.02))
                child.process.send_signal(kind)
            first, stalled = child.answer(HANG)
            lost = f" (after {stalled:.0f} s of the kernel's I/O wait)" if stalled else ""
            resent = False
            while first is not None and first.startswith("swallowed"):
                # The handler ran and a load still ended normally: where it ran says what
                # caught the interrupt. Counted and bounded below; sent again unless a second
                # signal already reached the caller.
                leaks.append(f"signal {trial}: {kind.name} swallowed, raised at "
                             f"{first.split('|', 1)[-1].strip()}")
                lost += " (swallowed)"
                first = child.line(1.0)
                if first is None and not resent:
                    resent = True
                    child.process.send_signal(kind)
                    first, stalled = child.answer(HANG)
            if first is None and not resent:
                # Python drops an exception raised inside a finalizer or a weak reference's
                # callback (weightlift's unmapping runs none; the standard library's
                # ``ThreadPoolExecutor`` has one): a signal whose handler runs there is lost, as
                # for any program (docs/safety.md, "What is not promised"). Counted, bounded
                # below; the user's second Ctrl-C must then work.
                leaks.append(f"signal {trial}: {kind.name} lost")
                lost += " (lost, sent again)"
                child.process.send_signal(kind)
                first, stalled = child.answer(HANG)
            if first is None or not first.startswith("caught"):
                child.fail(f"expected 'caught', got {first!r}")
            caught = first.split()[-1]
            took = time.monotonic() - sent
            want = "KeyboardInterrupt" if kind == signal.SIGINT else "SystemExit"
            if caught != want:
                child.fail(f"{kind.name} raised {caught}")
            left = child.expect("ok", 3 * HANG)[-1]
            if "mapping" in left:  # none in 421 signals since issue 26's second pass
                child.fail(f"signal {trial}: the checkpoint is still mapped after the interrupt "
                           f"({left})")
            if left != "clean":
                leaks.append(f"signal {trial}: {left}")
            report.append(f"{engine} {strategy} {mode} {kind.name}{' twice' if twice else ''}: "
                          f"caught after {took:.3f} s{lost}, second load exact, "
                          f"{'nothing left' if left == 'clean' else 'left ' + left}")
            if SIGNAL_LOG:  # as it goes: a failed run still shows how far it came
                with open(SIGNAL_LOG, "a") as log:
                    log.write(f"{trial} {report[-1]}\n")
        code = child.process.wait(HANG)
        if leaks and SIGNAL_LOG:  # where Python dropped an interrupt ("Exception ignored in")
            assert child.process.stderr is not None
            with open(SIGNAL_LOG, "a") as log:
                log.write(f"# the child's stderr:\n{child.process.stderr.read()[-20000:]}\n")
    except subprocess.TimeoutExpired:
        child.fail("the child did not exit after its last trial")
    finally:
        if child.process.poll() is None:
            child.process.kill()
            child.process.wait()
    assert code == (-signal.SIGINT if kind == signal.SIGINT else 143), code
    # A hang, wrong bytes, a mapping or thread left or a buffer kept fail at once above. An
    # interrupt lost inside Python code that drops it (none of weightlift's is left that we
    # know of), or a descriptor left by one inside the few bytecodes Python cannot make atomic,
    # is not a danger to memory: bounded here to 1 in 50 signals (at least 1).
    assert len(leaks) <= max(1, trials // 50), leaks
    return report


def test_real_signals_at_random_moments_end_loads_promptly_and_cleanly(
        big_checkpoint: Path) -> None:
    seed = int(os.environ.get("WEIGHTLIFT_SIGNAL_SEED", random.randrange(1 << 30)))
    engines = "threads" if URING_REFUSED is not None else "uring,threads"
    if SIGNAL_LOG:
        with open(SIGNAL_LOG, "a") as log:
            log.write(f"# seed {seed}, load average {open('/proc/loadavg').read().strip()}\n")
    report = run_signals(big_checkpoint, engines, TRIALS, seed)
    assert len(report) == TRIALS
