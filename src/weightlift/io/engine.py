"""Engines: how a strategy's reads are submitted and reaped. Strategies decide which bytes go where.

* ``threads``: a pool of worker threads, each running the strategy's blocking ``read`` (preadv).
* ``uring``: the strategy describes each read (``Strategy.describe``) and one io_uring keeps up to
  64 of them in flight from the loading thread (``io/uring.py``).

``auto`` takes io_uring for the strategies in ``AUTO_URING`` where the kernel allows a ring, and
the thread pool otherwise; ``make_engine`` says which it took and, when it fell back, why.

    engine, fallback = make_engine("auto", strategy)
    pending = engine.read(strategy, shard=0, start=4096, dest=buffer)
    pending.result()
    engine.close()
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as WaitTimeout
from typing import Any, Protocol

import torch

from . import retry
from .retry import interrupt_of
from .base import Strategy
from .uring import DEPTH, EngineUnavailable, UringEngine

#: What ``engine=`` accepts.
ENGINES = ("auto", "uring", "threads")
#: Strategies ``engine="auto"`` reads through io_uring. On this project's VM, side by side in one
#: run each (6 GB, 3 interleaved reps, docs/benchmarks.md), ``direct`` on io_uring was ahead of the
#: thread pool in 4 of 5 scenario/cache cells (e.g. to_cpu cold 1.65 against 1.45 GB/s median,
#: device cold 1.75 against 1.36); buffered ``stream`` was behind in every cell (0.73-1.36 against
#: 1.07-1.53), so it keeps the threads.
AUTO_URING: frozenset[str] = frozenset({"direct"})


class Pending(Protocol):
    """A submitted read: ``concurrent.futures.Future`` or an io_uring ``Ticket``."""

    def result(self, timeout: float | None = None) -> Any: ...

    def cancel(self) -> bool: ...

    def done(self) -> bool: ...


class Engine(Protocol):
    name: str
    #: Reads the engine keeps in flight at once.
    depth: int
    #: Reads a pipeline submits ahead of the one it waits for (a thread pool wants a queue of
    #: its own behind its workers; a ring keeps its whole depth in the kernel).
    ahead: int

    def read(self, strategy: Strategy, shard: int, start: int, dest: torch.Tensor) -> Pending:
        """Fill ``dest`` with ``shard``'s bytes from ``start`` on (as ``Strategy.read`` does)."""
        ...

    def call(self, fn: Callable[..., None], *args: Any) -> Pending:
        """Run another blocking step (e.g. mmap's ``populate``) alongside the reads."""
        ...

    def close(self) -> None:
        """Wait for (or withdraw) everything submitted; nothing runs after this returns."""
        ...


def unwedge(future: Future[Any]) -> None:
    """Give back a future's lock that this thread still owns after an interrupt.

    CPython runs a signal's Python handler between bytecodes, also between a ``with
    future._condition:``'s acquire and the block that would release it (``Future.result``,
    ``cancel``, ``add_done_callback``): the Ctrl-C (or a SIGTERM handler's ``SystemExit``)
    propagates and the loading thread keeps the future's (reentrant) lock. The loading thread
    itself goes on unhindered, but the worker thread that next takes that lock waits forever,
    and so does whoever joins it (seen: 1 in ~30 real signals on a busy machine, a load hung in
    ``ThreadPoolExecutor.shutdown``). Only the owning thread can tell; this is called from it."""
    condition = future._condition  # noqa: SLF001 - the lock an interrupt can leave taken
    while condition._is_owned():  # noqa: SLF001
        condition.release()


#: How often a thread waiting for a worker's read looks up (``Call.result``).
WAKE = 0.1


class Call:
    """A worker thread's read: a ``concurrent.futures.Future`` whose waits raise the interrupt
    itself (``interrupt_of``)."""

    __slots__ = ("future",)

    def __init__(self, future: Future[None]) -> None:
        self.future = future

    def result(self, timeout: float | None = None) -> None:
        """Wait for the read, looking up every ``WAKE`` seconds: a SIGINT or SIGTERM another
        thread of the program took (one that does not block them: torch's own) only marks the
        Python handler as due, and a main thread asleep in the future's lock would sleep on; it
        runs the handler when it looks up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = WAKE if deadline is None else max(0.0, min(WAKE, deadline - time.monotonic()))
            try:
                self.future.result(step)
                return
            except WaitTimeout:
                if self.future.done():
                    self.future.result(0)  # its own error (a TimeoutError too), or nothing
                    return
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            except RuntimeError as exc:
                raise interrupt_of(exc)  # noqa: B904 - the interrupt, with its own context

    def cancel(self) -> bool:
        return self.future.cancel()

    def done(self) -> bool:
        return self.future.done()


def settle(futures: Iterable[Pending], seconds: float | None = None
           ) -> tuple[list[Pending], BaseException | None]:
    """Cancel ``futures`` and wait for those already running, at most ``seconds`` in all
    (default ``retry.SETTLE``), whatever interrupts the wait: (those still running then, whose
    memory must be kept; the first exception that interrupted the waiting, for the caller to
    raise once it has released what the finished reads held). The futures' own errors are
    left to whoever wanted their results.

        running, interrupted = settle(pending)
    """
    interrupted: BaseException | None = None
    started: list[Pending] = []
    for future in futures:
        if isinstance(future, Call):
            unwedge(future.future)
        try:
            if not future.cancel():
                started.append(future)
        except BaseException as exc:  # e.g. an interrupt raised once a ring has stopped
            interrupted = interrupted or exc
            started.append(future)
    deadline = time.monotonic() + (retry.SETTLE if seconds is None else seconds)
    running: list[Pending] = []
    for future in started:
        while not future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                running.append(future)
                break
            try:
                future.result(timeout=left)
            except WaitTimeout:
                if not future.done():  # (a future's own error may be a TimeoutError)
                    running.append(future)
                    break
            except BaseException as exc:
                interrupt = interrupt_of(exc)
                # Not the future's own error (an Exception, once it is done): Ctrl-C while
                # waiting, wait on. A KeyboardInterrupt or SystemExit is never a read's own
                # error, also when the read finished just as it was raised (it was dropped
                # then, silently: a signal lost in the real-signal test with no trace).
                if not future.done() or not isinstance(interrupt, Exception):
                    interrupted = interrupted or interrupt
    return running, interrupted


class ThreadEngine:
    """One blocking read per worker thread, ``depth`` threads."""

    name = "threads"

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.ahead = 2 * depth
        self.pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="weightlift-read",
                                       initializer=retry.leave_interrupts_to_the_main_thread)
        #: Submitted and not finished yet.
        self._running: set[Future[None]] = set()
        #: Submitted futures not known to be finished: ``close`` gives back any of their locks
        #: an interrupt left with this thread (``unwedge``). A plain list pruned now and then:
        #: a ``WeakSet``'s callbacks are one more place where Python drops an interrupt.
        self._submitted: list[Future[None]] = []

    def read(self, strategy: Strategy, shard: int, start: int, dest: torch.Tensor) -> Pending:
        return self.call(strategy.read, shard, start, dest)

    def call(self, fn: Callable[..., None], *args: Any) -> Pending:
        try:
            future = self.pool.submit(fn, *args)
        except RuntimeError as exc:  # e.g. Ctrl-C while a new worker thread starts
            raise interrupt_of(exc)  # noqa: B904 - the interrupt, with its own context
        self._submitted.append(future)
        if len(self._submitted) > 4 * self.depth + 64:
            # A finished future's lock is no worker's concern any more.
            self._submitted = [f for f in self._submitted if not f.done()]
        self._running.add(future)
        future.add_done_callback(self._running.discard)
        return Call(future)

    def close(self) -> None:
        """Withdraw queued calls and wait for running ones, at most ``retry.SETTLE`` seconds (a
        read still blocked then is left to its thread, which holds its buffer); an interrupt
        meanwhile is raised once they are over."""
        for future in self._submitted:
            unwedge(future)
        self._submitted = []
        stopped = retry.shut_down(self.pool)  # before any wait: idle workers see it and end
        running, interrupted = settle([Call(future) for future in list(self._running)])
        interrupted = stopped or interrupted
        if running:
            warnings.warn(f"{len(running)} read(s) still blocked in the kernel {retry.SETTLE:g} s "
                          "after the load stopped; their threads and buffers are left to them",
                          RuntimeWarning, stacklevel=2)
        else:  # the workers are idle: they end as soon as they see the pool shut down
            late = retry.join_workers(self.pool, retry.SETTLE)
            interrupted = interrupted or late
            retry.forget_threads(self.pool)
        if interrupted is not None:
            raise interrupted


class InlineEngine:
    """Each step runs in the calling thread as it is submitted; nothing is ever in flight.

    For loads whose work is a few page mappings (the small-file path, ``io/auto.small``):
    starting and joining a worker thread costs ~0.15 ms here, more than mapping a cached
    megabyte. Not one of ``ENGINES``: a load takes it only where it chose that path.
    """

    name = "inline"
    depth = 1
    ahead = 1

    def read(self, strategy: Strategy, shard: int, start: int, dest: torch.Tensor) -> Pending:
        return _done(strategy.read, shard, start, dest)

    def call(self, fn: Callable[..., None], *args: Any) -> Pending:
        return _done(fn, *args)

    def close(self) -> None:
        """Nothing runs after a step returned."""


class Done:
    """A step that has already run: ``result()`` returns its value or raises its error, as a
    worker's future would; ``cancel()`` is too late. (A ``Future`` with its lock and condition
    cost more than mapping a small block.)"""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: Exception | None = None) -> None:
        self.value, self.error = value, error

    def result(self, timeout: float | None = None) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self) -> bool:
        return False

    def done(self) -> bool:
        return True


class Deferred:
    """A step run by whoever first waits for it (``result()``), in that thread; ``cancel()``
    before that withdraws it. For work too small to hand to a worker thread: populating a
    window of cached pages is page-table work (~25 ms/GB here), less than the hand-offs and
    wake-ups of a thread doing it, which on a busy or pinned core cost a scheduler slice each.

        pending = Deferred(window.populate, start, end)
        pending.result()   # runs it now (once); its error raised here
    """

    __slots__ = ("fn", "args", "outcome")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn, self.args = fn, args
        self.outcome: Done | None = None

    def result(self, timeout: float | None = None) -> Any:
        if self.outcome is None:
            fn, args = self.fn, self.args
            self.fn, self.args = _nothing, ()
            self.outcome = _done(fn, *args)
        return self.outcome.result()

    def cancel(self) -> bool:
        if self.outcome is not None:
            return False
        self.outcome = Done()  # withdrawn: never runs
        self.fn, self.args = _nothing, ()
        return True

    def done(self) -> bool:
        return self.outcome is not None


def _nothing(*_: Any) -> None:
    return None


def _done(fn: Callable[..., Any], *args: Any) -> Done:
    """``fn(*args)`` run now (its error raised by ``result()``, as a worker's would be); an
    interrupt propagates at once."""
    try:
        return Done(fn(*args))
    except Exception as exc:  # noqa: BLE001 - handed to result(), as from a worker thread
        return Done(error=exc)


class RingEngine(UringEngine):
    """``UringEngine`` behind the ``Engine`` interface: strategies describe, the ring reads."""

    @property
    def ahead(self) -> int:
        return self.depth

    def read(self, strategy: Strategy, shard: int, start: int, dest: torch.Tensor) -> Pending:
        read = strategy.describe(shard, start, dest)
        read.owner = dest  # its memory lives while the kernel may write into it
        return self.submit(read)

    def call(self, fn: Callable[..., None], *args: Any) -> Pending:
        raise NotImplementedError("the io_uring engine only reads; use threads for populate")


def make_engine(name: str, strategy: Strategy, depth: int = DEPTH) -> tuple[Engine, str | None]:
    """The engine for a prepared ``strategy`` and, if io_uring was wanted and threads were taken
    instead, why (for ``LoadReport.fallbacks``). ``name`` is one of ``ENGINES``."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    if name == "threads" or (name == "auto" and strategy.name not in AUTO_URING):
        return ThreadEngine(strategy.in_flight), None
    why = strategy.undescribable()
    if why is not None and name == "auto":
        return ThreadEngine(strategy.in_flight), None  # nothing was asked of io_uring: no fallback
    if why is not None:
        # mmap faults pages in rather than reading; a partly cached direct load copies cached
        # ranges with buffered reads: there is nothing (or not only reads) for a ring to submit.
        return ThreadEngine(strategy.in_flight), (
            f"io_uring does not apply to {strategy.name} ({why}); using the thread engine")
    try:
        return RingEngine(depth), None
    except EngineUnavailable as exc:
        return ThreadEngine(strategy.in_flight), (
            f"io_uring is unavailable ({exc}); falling back to the thread engine")
