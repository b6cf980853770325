"""Per-range choice for partly cached checkpoints: cached ranges from the page cache, the rest
from disk.

A checkpoint a previous load left half cached should not be read again from disk where its pages
are still in memory, nor lose O_DIRECT speed where they are not. ``split_cached`` is the pure
decision (a byte range and a page-residency map → runs marked cached or not), usable by any read
engine; ``CachedRanges`` holds one residency map per shard, taken once when a load starts, and
copies cached runs with buffered reads that start no read-ahead. Given ``Windows``, it maps a
range that is (mostly, ``MAPPED``) cached instead (``window``): a load that copies out of it copies once,
straight from the page cache, where a read would copy cache → buffer first.

    ranges = CachedRanges(shards, Windows())  # mincore per shard; nothing kept for cold files
    window = ranges.window(0, start, end)     # cached: a mapped window to view; else None
    for lo, hi, cached in ranges.split(0, start, end):
        ...                                   # cached: ranges.read(0, lo, view); else O_DIRECT

``read`` goes through the shard's ``RANDOM`` descriptor, which the caller pins around it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .. import probes
from ..errors import ReadError
from ..sources.records import PLAIN, RANDOM, OpenRefused, Shard
from .base import PAGE, pread_into
from .window import Window, Windows

#: One run of a range: ``(start, end, cached)`` in absolute file offsets.
Run = tuple[int, int, bool]


def split_cached(start: int, end: int, resident: np.ndarray | None, page: int = PAGE
                 ) -> list[Run]:
    """Cut ``[start, end)`` into maximal runs of cached and uncached pages.

        split_cached(0, 3 * 4096, np.array([True, False, False]))
        == [(0, 4096, True), (4096, 12288, False)]

    ``resident[i]`` tells whether page ``i`` (bytes ``[i * page, (i + 1) * page)``) is cached;
    pages past the end of ``resident`` count as uncached, and ``None`` means nothing is cached.
    Runs meet at page boundaries, so each uncached run is block-aligned for O_DIRECT except
    where the range itself starts or ends.
    """
    if end <= start:
        return []
    if resident is None:
        return [(start, end, False)]
    first, last = start // page, (end - 1) // page + 1
    flags = np.zeros(last - first, dtype=bool)
    known = resident[first:last]
    flags[:known.size] = known
    # Indices (relative to ``first``) where the flag changes: the run boundaries.
    edges = np.flatnonzero(flags[1:] != flags[:-1]) + 1
    runs: list[Run] = []
    lo = start
    for edge in edges.tolist():
        hi = (first + edge) * page
        runs.append((lo, hi, bool(flags[edge - 1])))
        lo = hi
    runs.append((lo, end, bool(flags[-1])))
    return runs


#: A range at least this much in the page cache is mapped (``mostly_cached``): a warm
#: checkpoint on a busy machine has scattered holes (reclaim takes a page here and there: 2-7 %
#: of a 2 GB checkpoint here, in pairs of pages), and the mapping's page faults read the few
#: missing pages in, where reading the whole range would copy it all twice.
MAPPED = 0.9
#: Threads a load keeps when nearly everything is mapped: populating cached pages is page-table
#: work, a few threads stay ahead of a consumer copying, and each thread started costs a
#: scheduler slice (32 took ~0.5 s to start in a vLLM worker pinned to one busy core).
MAPPED_IN_FLIGHT = 4


def mostly_cached(start: int, end: int, resident: np.ndarray | None, page: int = PAGE) -> bool:
    """Whether at least ``MAPPED`` of the pages of ``[start, end)`` are cached by ``resident``
    (pages past its end are not): ``mostly_cached(0, 2 * 4096, np.array([True, True, False]))``."""
    if resident is None or end <= start:
        return False
    first, last = start // page, (end - 1) // page + 1
    if last > resident.size:
        return False
    return int(np.count_nonzero(resident[first:last])) >= MAPPED * (last - first)


def map_cached(windows: Windows, shard: Shard, start: int, end: int) -> Window | None:
    """A window of ``shard``'s ``[start, end)`` (a range ``mostly_cached``); None when the
    kernel refuses the mapping (the caller reads it instead)."""
    try:
        with shard.opened(PLAIN) as fd:
            return windows.map(fd, start, end, path=shard.path)
    except ReadError:
        return None  # e.g. ENOMEM at vm.max_map_count: read like any other range


class CachedRanges:
    """Residency maps of a load's shards and buffered descriptors to copy their cached runs.

    Maps are taken once, at the start of the load: a page evicted since is read again from disk
    by the buffered read (correct, just slower), and a page cached since is read with O_DIRECT
    (which the kernel keeps coherent with the cache). A file with less than ``MIN_CACHED`` in
    the cache (by a sampled estimate, a fraction of a millisecond) is treated as cold: reading
    that little again costs less than mapping a large file page by page, and cold loads (whose
    header read cached a few pages) keep their plain O_DIRECT path.
    """

    #: Below this many cached bytes (estimated) a file is read as if cold.
    MIN_CACHED = 4 << 20

    def __init__(self, shards: Sequence[Shard], windows: Windows | None = None) -> None:
        self.shards = shards
        #: Set: (mostly) cached ranges are mapped (``window``) rather than copied.
        self.windows = windows
        self.resident: list[np.ndarray | None] = []
        #: Per shard: every page counted cached (``warm_map``'s shortcut, or mincore found all):
        #: no range of it needs a look at its map.
        self.whole: list[bool] = []
        try:
            for shard in shards:
                with shard.opened(PLAIN) as fd:
                    pages = self._map(fd, shard.hint())
                if pages is not None:
                    try:  # a buffered descriptor that starts no read-ahead (see ``read``)
                        with shard.opened(RANDOM):
                            pass  # opened, and kept open while the limit leaves room
                    except OpenRefused:
                        pages = None  # read it all with O_DIRECT, as if cold
                self.resident.append(pages)
                self.whole.append(pages is not None and bool(pages.all()))
        except BaseException:
            self.close()
            raise

    def _map(self, fd: int, hint: int | None = None) -> np.ndarray | None:
        try:
            estimate = probes.sampled_resident_bytes(fd) if hint is None else hint
        except OSError:
            return None
        if estimate < self.MIN_CACHED:
            return None
        if self.windows is not None:
            return warm_map(fd, estimate)
        return cached_pages(fd)

    @property
    def any_cached(self) -> bool:
        return any(pages is not None for pages in self.resident)

    def mostly_cached(self) -> bool:
        """Whether every shard is at least ``MAPPED`` cached (windows then serve nearly all)."""
        return all(pages is not None and np.count_nonzero(pages) >= MAPPED * pages.size
                   for pages in self.resident)

    def cached_bytes(self, shard: int) -> int:
        pages = self.resident[shard]
        return 0 if pages is None else int(np.count_nonzero(pages)) * PAGE

    def split(self, shard: int, start: int, end: int) -> list[Run]:
        """``split_cached`` with this shard's residency map."""
        return split_cached(start, end, self.resident[shard])

    def mappable(self, shard: int, start: int, end: int) -> bool:
        """Whether windows are on and ``[start, end)`` was (mostly) cached when the load started."""
        if self.windows is None:
            return False
        if self.whole[shard]:
            return end <= self.resident[shard].size * PAGE  # type: ignore[union-attr]
        return mostly_cached(start, end, self.resident[shard])

    def all_cached(self, shard: int, start: int, end: int) -> bool:
        """Whether every page of ``[start, end)`` was cached when the load started."""
        pages = self.resident[shard]
        if pages is None or end <= start:
            return pages is not None
        first, last = start // PAGE, (end - 1) // PAGE + 1
        return self.whole[shard] or (last <= pages.size and bool(pages[first:last].all()))

    def window(self, shard: int, start: int, end: int) -> Window | None:
        """A mapped window of ``[start, end)`` if it is ``mappable``; None: read it
        (``split``/``read``). ``Window.cached`` says whether all its pages were cached."""
        if self.windows is None or not self.mappable(shard, start, end):
            return None
        window = map_cached(self.windows, self.shards[shard], start, end)
        if window is not None:
            window.cached = self.all_cached(shard, start, end)
        return window

    def read(self, shard: int, start: int, dest: memoryview) -> None:
        """Copy ``[start, start + len(dest))`` (a cached run) out of the page cache, through a
        buffered descriptor that starts no read-ahead: reading a cached run must not pull the
        uncached pages after it into the cache (O_DIRECT reads those)."""
        if self.resident[shard] is None:
            raise AssertionError("read() of a run split_cached did not mark cached")
        s = self.shards[shard]
        pread_into(s.descriptor(RANDOM), dest, start, s.path)

    def close(self) -> None:
        for shard in self.shards:
            shard.release(RANDOM)
        self.resident = []
        self.whole = []


#: A file estimated at least this much cached counts as wholly cached for windows: no
#: page-by-page map is taken (mincore over every page cost ~70 ms per 700 MB shard on this busy
#: VM, where the estimate costs ~5 ms), and the windows' page faults read the few missing pages.
NEARLY = 0.98


def warm_map(fd: int, estimate: int) -> np.ndarray | None:
    """The residency map a load that maps cached ranges in windows goes by: every page cached
    when ``estimate`` (``probes.sampled_resident_bytes``) says the file nearly is, else the
    file's real map (``cached_pages``)."""
    size = os.fstat(fd).st_size
    if estimate >= NEARLY * size:
        return _all_cached(-(-size // PAGE))
    return cached_pages(fd)


#: Read-only map of ``True`` that ``_all_cached`` hands out slices of.
_ONES = np.ones(0, dtype=bool)


def _all_cached(pages: int) -> np.ndarray:
    """A read-only map of ``pages`` cached pages: a slice of one kept array, made anew only to
    grow. A fresh one per file cost ~0.1 ms a GB here (its pages' first touch), several files'
    worth before the first tensor of a warm stream."""
    global _ONES
    if _ONES.size < pages:
        ones = np.ones(max(pages, 2 * _ONES.size), dtype=bool)
        ones.setflags(write=False)
        _ONES = ones
    return _ONES[:pages]


def cached_pages(fd: int) -> np.ndarray | None:
    """The file's page-residency map, or None when no page is cached (the common cold case) or
    mincore cannot say."""
    try:
        pages = probes.resident_pages(fd)
    except OSError:
        return None
    return pages if pages.any() else None

