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

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

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

    def result(self) -> Any: ...

    def cancel(self) -> bool: ...


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


class ThreadEngine:
    """One blocking read per worker thread, ``depth`` threads."""

    name = "threads"

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.ahead = 2 * depth
        self.pool = ThreadPoolExecutor(max_workers=depth, thread_name_prefix="weightlift-read")

    def read(self, strategy: Strategy, shard: int, start: int, dest: torch.Tensor) -> Pending:
        return self.pool.submit(strategy.read, shard, start, dest)

    def call(self, fn: Callable[..., None], *args: Any) -> Pending:
        return self.pool.submit(fn, *args)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


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

    def result(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value

    def cancel(self) -> bool:
        return False


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
        return self.submit(strategy.describe(shard, start, dest))

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
