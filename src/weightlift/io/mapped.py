"""``mmap``: map the files; CPU loads get zero-copy tensors backed by the page cache.

The mapping is private (copy-on-write), so tensors are writable and the file is never modified.
For copies to a device, the ranges already copied are unmapped (``MADV_DONTNEED``) and dropped from
the page cache so residency stays bounded; for zero-copy CPU tensors the page cache *is* the
result, which is why ``auto`` picks this only when the checkpoint is already cached.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Sequence

import numpy as np
import torch

from .. import probes
from ..errors import ReadError
from ..sources.records import PLAIN, Shard
from . import base
from .base import PAGE, Strategy
from .window import MADV_POPULATE_READ, fault_in, map_file, touch

__all__ = ["MADV_POPULATE_READ", "Mapping", "MmapStrategy"]

#: mincore's byte per page → its lowest bit (resident), the others being undefined.
_RESIDENT_BIT = bytes(value & 1 for value in range(256))


class Mapping:
    """A private (copy-on-write) mapping of a whole file that holds no file descriptor.

    Python's ``mmap`` keeps a duplicate descriptor for the mapping's lifetime, so every live
    zero-copy tensor would keep its file open. Here the memory is unmapped when the last tensor
    viewing it (and this object) is gone (from C, with no Python code: ``window.map_file``), and
    the descriptor is the shard's, closed with it.
    """

    def __init__(self, fd: int, size: int) -> None:
        _, self.memory = map_file(fd, 0, size)
        self.addr, self.size = ctypes.addressof(self.memory), size

    def madvise(self, advice: int, start: int, length: int) -> None:
        base.madvise(self.addr + start, length, advice)

    def uncached_runs(self, lo: int, end: int) -> list[tuple[int, int]]:
        """``[start, stop)`` runs of ``[lo, end)`` (``lo`` page-aligned) whose pages mincore
        shows not in the page cache; all of it where mincore cannot say. ~20 ns a page."""
        pages = -(-(end - lo) // PAGE)
        flags = np.empty(pages, dtype=np.uint8)
        try:
            probes.mincore(self.addr + lo, end - lo, flags.ctypes.data)
        except OSError:
            return [(lo, end)]
        missing = np.concatenate(([0], (flags & 1) ^ 1, [0])).astype(np.int8)
        edges = np.flatnonzero(np.diff(missing))
        return [(lo + int(a) * PAGE, min(end, lo + int(b) * PAGE))
                for a, b in zip(edges[0::2], edges[1::2])]

    def wholly_cached(self, fd: int | None = None, samples: int = 1024, window: int = 16
                      ) -> bool:
        """Whether every page of the file is in the page cache: counted by ``cachestat`` on
        ``fd`` (the mapped file's descriptor, ``probes.cached_sample``: every page up to 16 MiB,
        else 32 runs of 32) where the kernel has it, else every page of a file
        up to ``samples`` pages (4 MiB), or every page of ``samples // window`` evenly spaced
        runs of ``window`` pages (as ``probes.sampled_resident_bytes``; 64 mincore calls, ~0.3
        ms here). mincore on this mapping: no second one to make."""
        pages = -(-self.size // PAGE)
        if fd is not None:
            counted = probes.cached_sample(fd, self.size)
            if counted is not None:
                return counted[0] >= counted[1]
        if pages <= samples:
            spans = [(0, pages)]
        else:
            runs = samples // window
            spans = [(i * (pages - window) // (runs - 1), window) for i in range(runs)]
        flags = (ctypes.c_ubyte * min(pages, samples))()
        at = 0
        for first, count in spans:
            try:
                probes.mincore(self.addr + first * PAGE, count * PAGE,
                               ctypes.addressof(flags) + at)
            except OSError:
                return False  # unknown counts as not cached: populating is always correct
            at += count
        return b"\x00" not in bytes(flags)[:at].translate(_RESIDENT_BIT)


class MmapStrategy(Strategy):
    name = "mmap"
    zero_copy = True
    in_flight = 2
    read_size = 16 << 20

    def __init__(self, release: bool = False, skip_cached: bool = False,
                 known_cached: bool = False) -> None:
        super().__init__()
        #: With ``skip_cached``: map the cached pages of wholly cached files anyway, on the
        #: engine's threads ahead of a consumer that will touch them (``stream()``), except up to
        #: ``lazy_until`` = (shard, offset), the first tensor, handed out at once.
        self.map_ahead = False
        self.lazy_until: tuple[int, int] | None = None
        #: Shards ``expect`` asked the kernel to read: populated whole.
        self.reading: set[int] = set()
        #: ``skip_cached`` with every file already found wholly cached by the caller (``auto``'s
        #: sample): not sampled again.
        self.known_cached = known_cached
        #: Drop mapped pages and page cache once a range is consumed (device targets).
        self.release = release
        #: Leave files found wholly in the page cache at ``prepare`` unpopulated (``cached``).
        self.skip_cached = skip_cached
        self.maps: list[Mapping] = []
        #: Per shard: every page (every sampled page of a file over 4 MiB) was in the page cache
        #: at ``prepare``; only measured with ``skip_cached``.
        self.cached: list[bool] = []
        self.populate_ok = True

    def prepare(self, shards: Sequence[Shard]) -> None:
        super().prepare(shards)
        for shard in shards:
            try:
                with shard.opened(PLAIN) as fd:  # the mapping holds the file, not the descriptor
                    self.maps.append(Mapping(fd, shard.header.file_size))
                    if self.skip_cached:
                        if shard.read_ahead:  # pages in flight look cached: populate it all
                            self.reading.add(len(self.maps) - 1)
                        self.cached.append(not shard.read_ahead and (
                            self.known_cached or self.maps[-1].wholly_cached(fd)))
            except (OSError, ValueError) as exc:
                shard.check_unchanged()  # a file that shrank since its header was read: say so
                raise ReadError(f"cannot map the file: {exc}", path=shard.path) from exc

    def expect(self, shard: int, start: int, end: int) -> None:
        """The load will want ``[start, end)`` of ``shard``: unless the file is cached, ask the
        kernel to read it now, all of it in flight at once (``POSIX_FADV_WILLNEED``), so the
        populates that follow find pages arriving instead of waiting for read-ahead one window
        at a time (64 MB cold: 36 ms against 42 ms, docs/benchmarks.md). Advice only."""
        if self.cached and self.cached[shard]:
            return
        self.reading.add(shard)
        with self.shards[shard].opened(PLAIN) as fd:
            try:
                os.posix_fadvise(fd, start, end - start, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # the populates read it, as fast as read-ahead allows

    def cover(self, shard: int, start: int, end: int) -> None:
        """Make ``[start, end)`` of ``shard`` safe to read through the mapping now: nothing
        where ``cachestat`` counts every page of it cached, else read ahead at once
        (``POSIX_FADV_WILLNEED``) and mapped in (``MADV_POPULATE_READ``: an unreadable page is a
        ``ReadError``). For a mapping kept across calls (``Checkpoint.get_tensor``), where what
        ``prepare`` found cached may since have been evicted. Raises ``ReadError``."""
        lo = start // PAGE * PAGE
        if end <= lo:
            return
        with self.shards[shard].opened(PLAIN) as fd:
            counted = probes.cached_pages(fd, lo, end - lo)
            if counted is not None and counted >= -(-(end - lo) // PAGE):
                return
            try:
                os.posix_fadvise(fd, lo, end - lo, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # advice only
        self._populate(shard, lo, end)

    def kinds(self, shard: int) -> tuple[str, ...]:
        return ()  # pages are faulted in through the mapping

    def mapped_peak(self) -> int:
        return sum(shard.header.file_size for shard in self.shards)

    def view(self, shard: int, start: int, end: int) -> torch.Tensor:
        if end == start:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.maps[shard].memory, dtype=torch.uint8, count=end - start,
                                offset=start)

    def populate(self, shard: int, start: int, end: int) -> None:
        """Fault ``[start, end)`` in ahead of use; from worker threads, in parallel.

        With ``skip_cached``, pages in the page cache are left to the consumer's first touch,
        as safetensors leaves every page (they cannot fail to read; a page evicted before that
        touch is read then, where an I/O error is SIGBUS, as for any mapped tensor after its
        load): nothing for a file found wholly cached, else only the runs mincore shows missing.
        """
        lo = start // PAGE * PAGE
        if end <= lo:
            return
        if not self.skip_cached:
            self._populate(shard, lo, end)
            return
        if shard in self.reading:
            # Read ahead as a whole (``expect``): pages still in flight look cached to mincore
            # and would be left to a first touch, where a read error is SIGBUS. Populate it all.
            self._populate(shard, lo, end)
            return
        if self.cached and self.cached[shard]:
            head = self.lazy_until
            if self.map_ahead and not (head is not None and (shard, end) <= head):
                self._populate(shard, lo, end)  # page-table work only: every page is cached
            return
        runs = self.maps[shard].uncached_runs(lo, end)
        if not runs:
            return
        # One populate from the first missing page to the last, its reads in flight at once:
        # a run at a time, scattered evicted pages became thousands of small synchronous reads
        # (a 95 % cached 3 GB load took seconds). Cached pages in between cost page-table work.
        first, last = runs[0][0], runs[-1][1]
        with self.shards[shard].opened(PLAIN) as fd:
            try:
                os.posix_fadvise(fd, first, last - first, os.POSIX_FADV_WILLNEED)
            except OSError:
                pass  # advice only
        self._populate(shard, first, last)

    def _populate(self, shard: int, lo: int, end: int) -> None:
        """Map ``[lo, end)`` (``lo`` page-aligned) in (``window.fault_in``: signals are ridden
        out, an unreadable page raises ``ReadError``); touched page by page before Linux 5.14."""
        mapping = self.maps[shard]
        if self.populate_ok and fault_in(mapping.addr + lo, end - lo, offset=lo,
                                         path=self.shards[shard].path):
            return
        self.populate_ok = False  # kernel older than 5.14: touch the pages instead
        touch(mapping.addr + lo, end - lo)

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        self.populate(shard, start, start + dest.numel())  # an I/O error raises, not SIGBUS
        dest.copy_(self.view(shard, start, start + dest.numel()))

    def consumed(self, shard: int, start: int, end: int) -> None:
        if not self.release:
            return
        lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
        if hi > lo:
            self.maps[shard].madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            with self.shards[shard].opened(PLAIN) as fd:
                try:
                    os.posix_fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
                except OSError:
                    pass

    def close(self) -> None:
        # Zero-copy tensors keep their mapping alive through the buffer protocol; just let go.
        self.maps = []
