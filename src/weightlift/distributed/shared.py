"""Ranks on one host share a checkpoint through the page cache, within the budget.

Ranks that run on one kernel share its page cache, so they need not send each other weight
bytes: each byte is read from storage once into the cache, and every rank maps it from there.
The checkpoint (the tensors some rank of the group needs) is walked in *windows* of consecutive
tensors of one file, a quarter of the budget each, the same sequence on every rank:

1. each rank *warms* its share of the window's pages (a contiguous part, split by page count):
   the pages mincore shows uncached are asked for with ``POSIX_FADV_WILLNEED`` in steps of
   ``STEP`` (the kernel submits the reads and returns; the pages land in the page cache);
2. the ranks agree (one small all_reduce): every share of the window is asked for, every rank
   is past the window before, no rank failed;
3. every rank maps the window, ``MADV_POPULATE_READ`` waits for its pages (and turns an I/O error
   or a truncated file into a ``ReadError`` instead of a SIGBUS later), and it hands out
   zero-copy views of the tensors; meanwhile a background thread warms its share of the next;
4. two windows later, when every rank is past the window and has let go of its views, each rank
   drops (``POSIX_FADV_DONTNEED``) the pages it warmed: the load leaves the page cache as it
   found it (pages that were cached before stay).

Only windows with a page missing from the page cache go through those steps. Before the first,
each rank counts the uncached pages of its share of every window (``cachestat``) and one
``all_reduce`` adds the counts up (``_missing``), so every rank knows which windows those are;
where every rank already told the others it found every file wholly cached (``wholly_cached``,
sent with what the ranks exchange to start, ``cached=True``), none is, and nothing is counted.
A window wholly cached needs nothing read or dropped, so no rank waits for another there: each
maps it as its consumer comes to it and hands out views without populating them (a
tensor-parallel rank's copies fault in only the pages of its part). A warm restart agrees once,
at the end; a checkpoint with a few pages evicted agrees at the windows that hold them.

At any moment the page cache holds, of what the load read, the window being handed out, the next
one to read (warming) and the one before (waiting for every rank to pass it): three windows; a rank maps the
window it hands out and, while its consumer still holds their tensors, one or two before it:
within the budget. A tensor larger than a window is a window of its own (mapped whole: the bound
is then that tensor plus what the consumer holds). Only control messages go over the group.

    for entry, view in shared(peers, layout, entries, budget, local=[0, 1]):
        ...   # view: zero-copy, read-only in spirit (writes stay private to this rank)
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import ReadError
from ..io import base, retry
from ..io.base import PAGE
from ..io.window import Window as FileWindow
from ..place import as_tensor
from ..probes import LIBC, cached_pages
from ..sources.records import PLAIN, RANDOM, Entry, Layout, Shard
from .sync import Peers

#: Windows in the budget. Cached by the load at once: the window handed out, the next (being
#: warmed) and the one before (its pages wait until every rank is past it). Mapped at once: the
#: window handed out and the one or two before while the consumer still holds a tensor of them
#: (a ``for`` loop's variable holds the last one while it asks for the next; vLLM's grouping of
#: weights holds one more).
WINDOWS_IN_BUDGET = 4
#: ``POSIX_FADV_WILLNEED`` reads at most the device's read-ahead size per call: ask in steps.
STEP = 4 << 20
#: mincore looks at the page cache through mappings of at most this many bytes at a time.
PROBE = 1 << 20
#: A window whose uncached pages, over every rank's share, come to at most this much (a warm
#: restart with a few pages evicted) is warmed by reading those pages at once (``fetch``), each
#: rank its share, and handed out unpopulated like a cached one: its pages are all in the cache
#: once the ranks agree. Populating it would cost the page-table work of the whole window
#: (~2 ms per 128 MiB window) for a few pages.
FEW = 1 << 20

_MAP_FAILED = ctypes.c_void_p(-1).value
#: A range of file offsets ``[start, end)``.
Run = tuple[int, int]


@dataclass(frozen=True)
class Window:
    """Consecutive tensors of one file, handed out together.

    ``lo``/``hi``: the pages this window owns (page-aligned byte offsets), which it warms and
    drops; the windows of a file own disjoint pages (a page two windows' tensors share belongs
    to the first), so no window drops a page the next still needs."""

    shard: int
    entries: tuple[Entry, ...]
    lo: int
    hi: int

    @property
    def start(self) -> int:
        return self.entries[0].info.start

    @property
    def end(self) -> int:
        return self.entries[-1].info.end

    def share(self, index: int, count: int) -> Run:
        """Part ``index`` of ``count`` of the window's pages (contiguous, by page count)."""
        pages = (self.hi - self.lo) // PAGE
        return (self.lo + pages * index // count * PAGE,
                self.lo + pages * (index + 1) // count * PAGE)


def plan_windows(entries: Sequence[Entry], size: int) -> list[Window]:
    """Group ``entries`` (file order) into windows of one file spanning at most ``size`` bytes
    (a larger tensor alone)."""
    groups: list[list[Entry]] = []
    for entry in entries:
        if groups and groups[-1][0].shard == entry.shard and \
                entry.info.end - groups[-1][0].info.start <= size:
            groups[-1].append(entry)
        else:
            groups.append([entry])
    windows: list[Window] = []
    for group in groups:
        lo = group[0].info.start // PAGE * PAGE
        hi = -(-group[-1].info.end // PAGE) * PAGE
        if windows and windows[-1].shard == group[0].shard:
            lo = max(lo, windows[-1].hi)
        windows.append(Window(group[0].shard, tuple(group), lo, max(lo, hi)))
    return windows


def advise(fd: int, start: int, length: int, advice: int) -> None:
    """``posix_fadvise``: the one call that asks storage for bytes (``WILLNEED``) or gives
    pages back (``DONTNEED``); looked up at call time so tests can count it."""
    os.posix_fadvise(fd, start, length, advice)


def uncached(fd: int, start: int, end: int) -> list[Run]:
    """The runs of ``[start, end)`` (page-aligned) that are not in the page cache now."""
    runs: list[Run] = []
    for lo in range(start, end, PROBE):
        hi = min(end, lo + PROBE)
        flags = _resident(fd, lo, hi)
        edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
        bounds = [0, *edges.tolist(), flags.size]
        for a, b in zip(bounds, bounds[1:]):
            if flags[a]:
                continue
            run = (lo + a * PAGE, lo + b * PAGE)
            if runs and runs[-1][1] == run[0]:
                run = (runs.pop()[0], run[1])
            runs.append(run)
    return runs


def _resident(fd: int, start: int, end: int) -> np.ndarray:
    """Per page of ``[start, end)``: in the page cache? (mincore over a mapping that faults
    nothing in.)"""
    length = end - start
    addr = LIBC.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    try:
        vec = np.zeros(-(-length // PAGE), dtype=np.uint8)
        if LIBC.mincore(addr, length, vec.ctypes.data) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore failed: {os.strerror(err)}")
    finally:
        LIBC.munmap(addr, length)
    return (vec & 1).astype(bool)


def warm(shard: Shard, start: int, end: int) -> list[Run]:
    """Ask for the pages of ``[start, end)`` that are not cached; return those runs (the pages
    this rank brought in, and drops later)."""
    if end <= start:
        return []
    with shard.opened(PLAIN) as fd:
        try:
            runs = uncached(fd, start, end)
            for lo, hi in runs:
                for offset in range(lo, hi, STEP):
                    advise(fd, offset, min(STEP, hi - offset), os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            raise ReadError(f"cannot bring bytes {start}..{end} into the page cache: "
                            f"{exc.strerror or exc}", path=shard.path) from exc
    return runs


def fetch(shard: Shard, start: int, end: int) -> list[Run]:
    """Read the pages of ``[start, end)`` that are not cached (a few: ``FEW``) into the page
    cache now, with no read-ahead; return those runs. An I/O error raises ``ReadError``."""
    if end <= start:
        return []
    with shard.opened(RANDOM) as fd:
        try:
            runs = uncached(fd, start, end)
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise ReadError(f"cannot bring bytes {start}..{end} into the page cache: "
                            f"{exc.strerror or exc}", path=shard.path) from exc
        for lo, hi in runs:
            if min(hi, size) > lo:
                base.pread_into(fd, memoryview(bytearray(min(hi, size) - lo)), lo, shard.path)
    return runs


def drop(shard: Shard, runs: Sequence[Run]) -> None:
    """Give the pages of ``runs`` back (those no process maps any more). After the load (the
    shard closed) through a descriptor of its own: advice only, harmless on any file."""
    if not runs:
        return
    try:
        if shard.closed:
            fd = os.open(shard.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                _advise_all(fd, runs, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            return
        with shard.opened(PLAIN) as fd:
            _advise_all(fd, runs, os.POSIX_FADV_DONTNEED)
    except (OSError, ReadError):
        pass  # advice only: the pages stay cached until the kernel needs the room


def _advise_all(fd: int, runs: Sequence[Run], advice: int) -> None:
    for lo, hi in runs:
        advise(fd, lo, hi - lo, advice)


def map_window(shard: Shard, start: int, end: int,
               unmapped: Callable[[], None] | None = None, populate: bool = True
               ) -> torch.Tensor:
    """Bytes ``[start, end)`` of the file as a uint8 tensor over a private ``io.window.Window``,
    every page faulted in (``populate``; else the consumer's first touch maps each page);
    unmapped (then ``unmapped()`` called) when the last tensor viewing it is gone.
    Copy-on-write: a consumer that writes into a view changes only its own copy."""
    if end == start:
        return torch.empty(0, dtype=torch.uint8)
    try:
        with shard.opened(PLAIN) as fd:
            window = FileWindow(fd, start, end, path=shard.path,
                                on_unmap=None if unmapped is None else lambda size: unmapped())
    except (OSError, ValueError) as exc:
        raise ReadError(f"cannot map bytes [{start}, {end}) of the file: {exc}",
                        path=shard.path) from exc
    if not populate:
        return window.view(start, end)
    # No read-ahead from faults here: every page was asked for by its warmer, and a fault on a
    # page an earlier buffered read marked (the header's) would read the next window's pages
    # ahead of their warmer, who would then take them for cached before the load.
    base.madvise(window.address, window.size, mmap.MADV_RANDOM)
    try:
        window.populate()  # waits for the reads in flight; an I/O error raises, not SIGBUS
    except ReadError:
        shard.check_unchanged()  # a file that shrank: say so
        raise
    return window.view(start, end)


@dataclass
class Shared:
    """What this rank did in ``shared``: the windows, the bytes it asked storage for."""

    windows: int = 0
    bytes_read: int = 0
    #: Every page was cached when the ranks looked: handed out with no agreement per window.
    cached: bool = False
    #: Runs this rank warmed, by window index, until they are dropped.
    warmed: dict[int, list[Run]] = field(default_factory=dict)


def shared(peers: Peers, layout: Layout, entries: Sequence[Entry], budget: int,
           local: Sequence[int], stats: Shared | None = None, *, cached: bool = False
           ) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Every entry of ``entries`` (file order, the same on every rank of ``peers``) as a zero-copy
    view, each byte read from storage once, by one of the ``local`` ranks (the group ranks on
    this host: all of the group).

    A generator that takes part in the group's agreements: if its consumer raises or closes it
    early, it still posts the failure at the next agreement, so the other ranks raise
    ``RankFailed`` at once instead of waiting for the group's timeout.
    """
    stats = stats if stats is not None else Shared()
    windows = plan_windows(entries, max(PAGE, budget // WINDOWS_IN_BUDGET))
    stats.windows = len(windows)
    me, count = list(local).index(peers.rank), len(local)
    shards = layout.shards
    used = sorted({window.shard for window in windows})
    finished = False

    def warm_share(k: int) -> list[Run]:
        window = windows[k]
        bring = fetch if few[k] else warm
        return bring(shards[window.shard], *window.share(me, count))

    def drop_last(shard: Shard, runs: list[Run]) -> Callable[[], None]:
        # The consumer may hold the last tensors past the end (its loop variable): their pages
        # go once the last view is gone, if every rank got that far.
        return lambda: drop(shard, runs) if finished else None

    # Windows some rank found a page of uncached: only they are warmed, agreed on and populated.
    # ``cached``: every rank found every file wholly cached (``wholly_cached``), and all of them
    # know it: none is, with no exchange to count them.
    pages = [0] * len(windows) if cached else _missing(peers, shards, windows, me, count)
    missing = [n > 0 for n in pages]
    few = [0 < n * PAGE <= FEW for n in pages]
    stats.cached = not any(missing)
    ahead = [k for k, uncached_k in enumerate(missing) if uncached_k]  # in order, warmed next
    pool = ThreadPoolExecutor(1, thread_name_prefix="weightlift-warm",
                              initializer=retry.leave_interrupts_to_the_main_thread)
    warming = ahead.pop(0) if ahead else None
    future: Future[list[Run]] | None = pool.submit(warm_share, warming) \
        if warming is not None else None
    try:
        error: Exception | None = None
        for k in range(len(windows) + 1):
            if k == len(windows) or missing[k]:
                try:
                    if future is not None and warming == k:
                        stats.warmed[k] = future.result()
                        stats.bytes_read += sum(hi - lo for lo, hi in stats.warmed[k])
                        future = None
                    if k == len(windows):
                        for index in used:  # nothing handed out was read across a change
                            shards[index].check_unchanged()
                except Exception as exc:  # noqa: BLE001 - agreed on below
                    error = error or exc
                    future = None
                # Every share of window k is asked for; every rank is past window k - 1.
                peers.agree(error)
                for j in [j for j in stats.warmed if j <= k - 2]:
                    _drop_window(stats, windows, shards, j)
            elif error is not None:
                continue  # posted at the next agreement; nothing more is handed out
            if k == len(windows):
                break
            window = windows[k]
            try:
                if missing[k] and ahead:
                    warming = ahead.pop(0)
                    future = pool.submit(warm_share, warming)
                after = None
                if k == len(windows) - 1 and stats.warmed.get(k):
                    after = drop_last(shards[window.shard], stats.warmed[k])
                # A window of cached pages is not populated: each rank's copies map only the
                # pages they touch (a tensor-parallel rank copies its part of each tensor). Nor
                # is one whose few missing pages its warmers read (``fetch``) before agreeing.
                views = _views(shards[window.shard], window, after,
                               populate=missing[k] and not few[k])
            except Exception as exc:  # noqa: BLE001 - posted at the next agreement
                error = exc
                continue
            yield from _hand_out(peers, views, future)
        finished = True
        _drop_window(stats, windows, shards, len(windows) - 1)
    finally:
        interrupted = retry.stop_pool(pool)  # not shutdown(wait=True): see ``stop_pool``
        for k in list(stats.warmed):
            _drop_window(stats, windows, shards, k)  # a failed load leaves no page behind either
        if interrupted is not None:
            raise interrupted


def _hand_out(peers: Peers, views: list[tuple[Entry, torch.Tensor]],
              warming: Future[list[Run]] | None = None) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Yield ``views`` (each let go of once handed out). If the consumer raises or closes us,
    the others are waiting in the next agreement: post it there (``warming`` cancelled first)."""
    try:
        while views:
            yield views.pop(0)
    except BaseException as exc:
        if warming is not None:
            warming.cancel()
        peers.leave(exc)
        raise


def _views(shard: Shard, window: Window, unmapped: Callable[[], None] | None = None,
           populate: bool = True) -> list[tuple[Entry, torch.Tensor]]:
    """The tensors of ``window`` as zero-copy views of one mapping of it (``map_window``)."""
    data = map_window(shard, window.start, window.end, unmapped, populate)
    return [(entry, as_tensor(data[entry.info.start - window.start:
                                   entry.info.end - window.start], entry.info))
            for entry in window.entries]


def _drop_window(stats: Shared, windows: Sequence[Window], shards: Sequence[Shard], k: int
                 ) -> None:
    """Drop the pages this rank warmed for window ``k`` (once: they are forgotten)."""
    runs = stats.warmed.pop(k, None)
    if runs:
        drop(shards[windows[k].shard], runs)


def wholly_cached(layout: Layout, part: int = 0, parts: int = 1) -> bool:
    """Is every file of ``layout`` local and its ``part``-th of ``parts`` (in pages) wholly in
    the page cache (``cachestat``: one call a file)? False where the kernel cannot say. Ranks
    on one host each ask of their own part, and together of every page."""
    for shard in layout.shards:
        if shard.remote:
            return False
        try:
            with shard.opened(PLAIN) as fd:
                pages = -(-os.fstat(fd).st_size // PAGE)
                first, last = pages * part // parts, pages * (part + 1) // parts
                if last <= first:
                    continue
                cached = cached_pages(fd, first * PAGE, (last - first) * PAGE)
                if cached is None or cached < last - first:
                    return False
        except (OSError, ReadError):
            return False
    return True


def _missing(peers: Peers, shards: Sequence[Shard], windows: Sequence[Window], me: int,
             count: int) -> list[int]:
    """Per window: how many of its pages were not in the page cache? Each rank counts its share of
    each window (``cachestat``, else mincore) and one ``all_reduce`` adds the counts up, so
    every rank gets the same answer. A rank that cannot tell counts its shares as missing (the
    load proper meets the failure again, and every rank hears of it)."""
    counts = [0] * len(windows)
    try:
        for k, window in enumerate(windows):
            start, end = window.share(me, count)
            if end <= start:
                continue
            with shards[window.shard].opened(PLAIN) as fd:
                pages = cached_pages(fd, start, end - start)
                if pages is None:
                    counts[k] = sum(hi - lo for lo, hi in uncached(fd, start, end)) // PAGE
                else:
                    counts[k] = (end - start) // PAGE - pages
    except (OSError, ReadError):
        counts = [1] * len(windows)
    return peers.sum(counts) if windows else []
