"""``direct``: O_DIRECT reads of aligned extents straight into host memory, bypassing the page cache.

O_DIRECT needs the file offset, the length and the memory address aligned (to 4096 here, which
covers every common logical block size). Tensors start anywhere, so each read covers the aligned
extent around its range and writes the few extra bytes into slack that ``aligned_buffer`` owns.

Pages already in the page cache when the load starts are not read again from disk: each range is
split into cached and uncached runs (``residency.split_cached``) and only the uncached ones are
read with O_DIRECT; cached runs are copied out of the cache. With ``windows`` (a load that copies
its tensors away or streams them), a range (mostly) in the cache is not read at all: the read loop
hands out views of a window mapped over it (``io/window.py``), and the consumer copies once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import torch

from ..errors import ReadError
from ..sources.records import DIRECT, RANDOM, OpenRefused, Shard
from . import base, retry
from .base import Allocator, Strategy, Unavailable, aligned_buffer, host_view, raw_memory
from .residency import MAPPED_IN_FLIGHT, CachedRanges
from .uring import Read
from .window import Window, Windows

ALIGN = 4096


class DirectStrategy(Strategy):
    name = "direct"
    in_flight = 16
    read_size = 8 << 20
    #: Reads in flight when part of the checkpoint is copied out of the page cache.
    CACHED_IN_FLIGHT = 32

    def __init__(self, per_range: bool = True, windows: bool = False) -> None:
        super().__init__()
        #: Copy ranges cached when the load starts out of the page cache instead of the disk.
        self.per_range = per_range
        #: Map ranges (mostly) cached when the load starts instead of copying them (``window``).
        self.windows = Windows() if windows and per_range else None
        self.cache: CachedRanges | None = None

    def prepare(self, shards: Sequence[Shard]) -> None:
        super().prepare(shards)
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            raise Unavailable("this platform has no O_DIRECT")
        try:
            for shard in shards:
                # Opened by path and checked against the file's stamp: the file whose header
                # was read, or a ReadError. Kept open while the descriptor limit leaves room.
                # Pinned with a token (``opened``): an interrupt anywhere in the pin or the
                # probe leaves no pin behind, so the descriptor closes with the shard.
                try:
                    with shard.opened(DIRECT) as fd:
                        self._probe(fd, shard)
                except OpenRefused as exc:
                    why = exc.__cause__.strerror if isinstance(exc.__cause__, OSError) else exc
                    raise Unavailable(f"{shard.path}: the file system refuses O_DIRECT "
                                      f"({why})") from None
            if self.per_range:
                cache = CachedRanges(shards, self.windows)
                if cache.any_cached:
                    self.cache = cache
                    # Copies out of the cache take worker threads too: keep as many O_DIRECT
                    # reads in flight as a cold load would, or the disk idles between them.
                    self.in_flight = self.CACHED_IN_FLIGHT
                    if self.windows is not None and cache.mostly_cached():
                        self.in_flight = MAPPED_IN_FLIGHT  # windows: populating, few reads
        except BaseException:
            self.close()
            raise

    def _probe(self, fd: int, shard: Shard) -> None:
        """Some file systems accept O_DIRECT at open() and refuse it at read(); find out now.

        A device load reads into page-locked slots, and some stacks refuse O_DIRECT into
        page-locked memory (EFAULT, "Bad address") though they accept it into pageable memory:
        probe that kind too, and say so in ``pin_refused`` (the load then uses pageable slots).
        """
        where = _file_system(fd)
        if where is None or where not in _READS_WORK:
            try:
                _probe_read(fd, aligned_buffer(ALIGN, 0, ALIGN))
            except OSError as exc:
                raise Unavailable(f"{shard.path}: O_DIRECT reads fail here "
                                  f"({exc.strerror})") from None
            if where is not None:
                _READS_WORK.add(where)
        if self.pin_device is None or self.pin_refused is not None:
            return
        try:
            _probe_read(fd, pinned_probe_buffer(self.pin_device))
        except OSError as exc:
            self.pin_refused = (f"{shard.path}: O_DIRECT reads into page-locked memory fail here "
                                f"({exc.strerror or exc}); reading into pageable slots instead, "
                                "so host-to-device copies do not overlap the reads")

    def alloc(self, nbytes: int, file_offset: int, raw: Allocator | None = None
              ) -> torch.Tensor:
        return aligned_buffer(nbytes, file_offset, ALIGN, raw=raw)

    def kinds(self, shard: int) -> tuple[str, ...]:
        if self.cache is not None and self.cache.resident[shard] is not None:
            return (DIRECT, RANDOM)  # cached runs are copied through a buffered descriptor
        return (DIRECT,)

    def mappable(self, shard: int, start: int, end: int) -> bool:
        return self.cache is not None and self.cache.mappable(shard, start, end)

    def window(self, shard: int, start: int, end: int) -> Window | None:
        return None if self.cache is None else self.cache.window(shard, start, end)

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        end = start + dest.numel()
        if self.cache is None:
            self._read_direct(shard, start, end, dest)
            return
        for lo, hi, cached in self.cache.split(shard, start, end):
            piece = dest[lo - start:hi - start]
            if cached:
                self.cache.read(shard, lo, host_view(piece))
            else:
                self._read_direct(shard, lo, hi, piece)

    def _read_direct(self, shard: int, start: int, end: int, dest: torch.Tensor) -> None:
        """O_DIRECT read of ``[start, end)`` into ``dest``; the aligned extent around it lands
        in ``dest``'s neighbours (the same file bytes) or in slack the buffer owns."""
        if end == start:
            return
        lo = start - start % ALIGN
        hi = -(-end // ALIGN) * ALIGN
        if (dest.data_ptr() - start) % ALIGN:
            raise AssertionError("direct reads need buffers from alloc() or an aligned slot")
        memory = raw_memory(dest.data_ptr() - (start - lo), hi - lo)
        fd, path = self.shards[shard].descriptor(DIRECT), self.shards[shard].path
        done = 0
        need = end - lo  # past `end` the extent may run beyond the end of the file
        attempts = retry.Attempts()
        while done < need:
            try:
                n = base.preadv(fd, [memory[done:]], lo + done)
            except OSError as exc:
                if not retry.transient(exc.errno):
                    raise ReadError(f"O_DIRECT read of {hi - lo - done} bytes at offset "
                                    f"{lo + done} failed: {exc.strerror or exc}",
                                    path=path) from exc
                # Nothing was read (a signal, EAGAIN): ask again, a bounded number of times.
                time.sleep(attempts.failed(exc.errno, "O_DIRECT read", hi - lo - done, lo + done,
                                           path))
                continue
            # The next read must start on a block boundary again: keep whole blocks only. Less
            # than a whole block past an aligned offset means the file ended there, unless the
            # file is still long enough (then it was a hiccup: ask again).
            kept = (done + n) // ALIGN * ALIGN
            if done + n < need and kept <= done:
                size = retry.file_size(fd)
                if size < end:
                    raise ReadError(f"file ended at offset {lo + done + n} while reading up to "
                                    f"{end}; it was truncated during the load", path=path)
                time.sleep(attempts.failed(retry.NOTHING, "O_DIRECT read", hi - lo - done,
                                           lo + done, path, size))
                continue
            attempts.progressed()
            done = done + n if done + n >= need else kept

    def undescribable(self) -> str | None:
        if self.cache is not None:
            return ("part of the checkpoint is in the page cache, and cached ranges are mapped "
                    "or copied out of it by buffered reads")
        return None

    def describe(self, shard: int, start: int, dest: torch.Tensor) -> Read:
        end = start + dest.numel()
        fd, path = self.shards[shard].descriptor(DIRECT), self.shards[shard].path
        if end == start:
            return Read(fd, 0, start, 0, need=0, block=ALIGN, path=path, direct=True)
        lo = start - start % ALIGN
        hi = -(-end // ALIGN) * ALIGN
        if (dest.data_ptr() - start) % ALIGN:
            raise AssertionError("direct reads need buffers from alloc() or an aligned slot")
        return Read(fd, dest.data_ptr() - (start - lo), lo, hi - lo, need=end - lo, block=ALIGN,
                    path=path, direct=True)

    def close(self) -> None:
        for shard in self.shards:
            shard.release(DIRECT)  # as before: O_DIRECT descriptors live as long as the load
        if self.cache is not None:
            self.cache.close()
            self.cache = None


#: File systems (``_file_system``) where an O_DIRECT read into pageable memory has worked in
#: this process: later loads skip that probe (a disk read, milliseconds on a busy disk). Only
#: successes are kept (a refusal may be a moment's), and only for the mounted file system the
#: probe read from: its device number and its id (``f_fsid``) together, so a file system mounted
#: later in the place (and device number) of an unmounted one is probed anew.
_READS_WORK: set[tuple[int, int]] = set()


def _file_system(fd: int) -> tuple[int, int] | None:
    """``(st_dev, f_fsid)`` of the open file's file system, or None where unknown."""
    try:
        return os.fstat(fd).st_dev, os.fstatvfs(fd).f_fsid
    except (OSError, AttributeError):
        return None


def _probe_read(fd: int, probe: torch.Tensor) -> None:
    """One O_DIRECT block from offset 0; raises OSError if the file system refuses it."""
    for attempt in range(1, retry.ATTEMPTS + 1):
        try:
            os.preadv(fd, [raw_memory(probe.data_ptr(), ALIGN)], 0)
            return
        except OSError as exc:
            if not retry.transient(exc.errno) or attempt == retry.ATTEMPTS:
                raise
            # EAGAIN (or a signal) is no verdict on O_DIRECT: ask again before falling back.


def pinned_probe_buffer(device: torch.device) -> torch.Tensor:
    """One aligned block of page-locked memory, as ring slots for ``device`` are allocated."""
    with torch.cuda.device(device):
        return aligned_buffer(ALIGN, 0, ALIGN, pin=True)
