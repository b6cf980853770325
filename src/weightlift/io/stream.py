"""``stream``: buffered positional reads with the page cache dropped behind the reader.

Needs neither mmap nor O_DIRECT nor pinned memory, so it works on every file system. The kernel's
read-ahead still helps; ``POSIX_FADV_DONTNEED`` on each consumed range keeps the page cache from
growing with the checkpoint. Pages that were cached before the load stay: they are someone
else's working set. With ``windows`` (a load that copies its tensors away or streams them), a
range (mostly) cached before the load is not read: the read loop hands out views of a window mapped
over it (``io/window.py``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from .. import probes
from ..errors import WeightliftError
from ..sources.records import PLAIN, Shard
from .base import PAGE, Strategy, host_view, pread_into
from .direct import DirectStrategy
from .residency import (MAPPED, MAPPED_IN_FLIGHT, CachedRanges, cached_pages, map_cached,
                        mostly_cached, warm_map)
from .uring import Read
from .window import Window, Windows


class StreamStrategy(Strategy):
    name = "stream"
    # Buffered reads do best with many small requests in flight: on this project's virtio disk
    # 16 × 2 MiB reached ~2 GB/s cold where 4 × 8 MiB stayed near 1.2 GB/s.
    in_flight = 16
    read_size = 2 << 20

    def __init__(self, evict: bool = True, windows: bool = False) -> None:
        super().__init__()
        self.evict = evict
        self.windows = Windows() if windows else None
        self.cached_before: list[np.ndarray | None] = []
        #: Per shard, the residency map windows are mapped by (None: no window).
        self.mappable_pages: list[np.ndarray | None] = []
        #: Per shard, every page of that map is cached.
        self.whole: list[bool] = []
        #: Per shard, every page was cached before the load: it brings none in to drop.
        self.none_to_drop: list[bool] = []

    def prepare(self, shards: Sequence[Shard]) -> None:
        super().prepare(shards)
        # Pages cached before the load are someone else's: only drop the ones we bring in.
        self.cached_before = []
        for shard in shards:
            # Advice on the open file: a descriptor re-opened later (under a low descriptor
            # limit) reads with the default read-ahead, as correctly.
            with shard.opened(PLAIN) as fd:
                _fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self.cached_before.append(self._cached(fd, shard.hint()))
        self.none_to_drop = [pages is not None and bool(pages.all())
                             for pages in self.cached_before]
        if self.windows is not None:
            # As ``direct`` does: a file with a few pages cached (its header) is read as if cold.
            self.mappable_pages = [
                pages if pages is not None and np.count_nonzero(pages) * PAGE
                >= CachedRanges.MIN_CACHED else None for pages in self.cached_before]
            # Files whose every page counts as cached: no per-range count for them (~2 µs a
            # tensor, planned before the first is handed out).
            self.whole = [pages is not None and bool(pages.all()) for pages in self.mappable_pages]
            if all(pages is not None and np.count_nonzero(pages) >= MAPPED * pages.size
                   for pages in self.mappable_pages):
                # Populating, not reading: a few threads, each a larger range (2 MiB per call
                # left a warm device-bound stream 1.3x slower than direct's 8 MiB here).
                self.in_flight, self.read_size = MAPPED_IN_FLIGHT, DirectStrategy.read_size

    def mappable(self, shard: int, start: int, end: int) -> bool:
        if self.windows is None:
            return False
        if self.whole[shard]:
            return start < end <= self.shards[shard].header.file_size
        return mostly_cached(start, end, self.mappable_pages[shard])

    def fully_cached(self, shard: int, start: int, end: int) -> bool:
        pages = self.mappable_pages[shard] if self.windows is not None else None
        if pages is None or end <= start:
            return False
        if self.whole[shard]:
            return end <= self.shards[shard].header.file_size
        first, last = start // PAGE, (end - 1) // PAGE + 1
        return last <= pages.size and bool(pages[first:last].all())

    def _cached(self, fd: int, hint: int | None = None) -> np.ndarray | None:
        """The file's residency map, if this load needs one (to evict only what it read, or to
        map the cached ranges); with windows, a nearly cached file counts as wholly cached.
        ``hint``: the estimate the load's decision just took (``Shard.resident_hint``)."""
        if self.windows is not None:
            try:
                estimate = probes.sampled_resident_bytes(fd) if hint is None else hint
            except OSError:
                return cached_pages(fd) if self.evict else None
            if estimate >= CachedRanges.MIN_CACHED:
                return warm_map(fd, estimate)
        return cached_pages(fd) if self.evict else None

    def window(self, shard: int, start: int, end: int) -> Window | None:
        if self.windows is None or not self.mappable(shard, start, end):
            return None
        window = map_cached(self.windows, self.shards[shard], start, end)
        if window is not None:  # not populated: the consumer's copy maps the pages it touches
            window.cached = self.fully_cached(shard, start, end)
        return window

    def undescribable(self) -> str | None:
        if any(pages is not None for pages in self.mappable_pages):
            return "ranges in the page cache are mapped, not read"
        return None

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        s = self.shards[shard]
        pread_into(s.descriptor(PLAIN), host_view(dest), start, s.path)
        if self.evict:
            # Read bytes are in their destination now; pages wholly inside the range can go.
            self._drop(shard, start, start + dest.numel(), inward=True)

    def describe(self, shard: int, start: int, dest: torch.Tensor) -> Read:
        s, end = self.shards[shard], start + dest.numel()
        then = (lambda: self._drop(shard, start, end, inward=True)) if self.evict else None
        return Read(s.descriptor(PLAIN), dest.data_ptr(), start, end - start, need=end - start, block=1,
                    path=s.path, direct=False, then=then)

    def consumed(self, shard: int, start: int, end: int) -> None:
        if self.evict:
            self._drop(shard, start, end, inward=False)

    def close(self) -> None:
        if self.evict:
            for index, shard in enumerate(self.shards):
                if shard.closed:
                    continue
                try:
                    self._drop(index, 0, shard.header.file_size, inward=False)
                except WeightliftError:
                    pass  # advice only: a file changed or gone needs none (the load said so)

    def _drop(self, shard: int, start: int, end: int, inward: bool) -> None:
        if inward:
            lo, hi = -(-start // PAGE), end // PAGE
        else:
            lo, hi = start // PAGE, -(-end // PAGE)
        if hi <= lo or (shard < len(self.none_to_drop) and self.none_to_drop[shard]):
            return  # (a warm stream's close: ~0.2 ms a GB file of map to look through)
        cached = self.cached_before[shard] if shard < len(self.cached_before) else None
        with self.shards[shard].opened(PLAIN) as fd:
            if cached is None:
                _fadvise(fd, lo * PAGE, (hi - lo) * PAGE, os.POSIX_FADV_DONTNEED)
                return
            for run_lo, run_hi in _runs_of_false(cached[lo:hi]):
                _fadvise(fd, (lo + run_lo) * PAGE, (run_hi - run_lo) * PAGE,
                         os.POSIX_FADV_DONTNEED)


def _runs_of_false(flags: np.ndarray) -> list[tuple[int, int]]:
    """``[lo, hi)`` index ranges where ``flags`` is False."""
    padded = np.concatenate(([True], flags, [True])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _fadvise(fd: int, offset: int, length: int, advice: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError:
        pass  # advice only: a file system that ignores it still reads correctly
