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
import weakref
from collections.abc import Sequence

import torch

from ..errors import ReadError
from ..probes import LIBC
from ..sources.records import PLAIN, Shard
from . import base
from .base import PAGE, Strategy
from .window import MADV_POPULATE_READ, fault_in, map_file, touch

__all__ = ["MADV_POPULATE_READ", "Mapping", "MmapStrategy"]


class Mapping:
    """A private (copy-on-write) mapping of a whole file that holds no file descriptor.

    Python's ``mmap`` keeps a duplicate descriptor for the mapping's lifetime, so every live
    zero-copy tensor would keep its file open. Here the memory is unmapped when the last tensor
    viewing it (and this object) is gone, and the descriptor is the shard's, closed with it.
    """

    def __init__(self, fd: int, size: int) -> None:
        addr = map_file(fd, 0, size)
        self.addr, self.size = addr, size
        self.memory = (ctypes.c_ubyte * size).from_address(addr)
        weakref.finalize(self.memory, LIBC.munmap, addr, size)

    def madvise(self, advice: int, start: int, length: int) -> None:
        base.madvise(self.addr + start, length, advice)


class MmapStrategy(Strategy):
    name = "mmap"
    zero_copy = True
    in_flight = 2
    read_size = 16 << 20

    def __init__(self, release: bool = False) -> None:
        super().__init__()
        #: Drop mapped pages and page cache once a range is consumed (device targets).
        self.release = release
        self.maps: list[Mapping] = []
        self.populate_ok = True

    def prepare(self, shards: Sequence[Shard]) -> None:
        super().prepare(shards)
        for shard in shards:
            try:
                with shard.opened(PLAIN) as fd:  # the mapping holds the file, not the descriptor
                    self.maps.append(Mapping(fd, shard.header.file_size))
            except (OSError, ValueError) as exc:
                shard.check_unchanged()  # a file that shrank since its header was read: say so
                raise ReadError(f"cannot map the file: {exc}", path=shard.path) from exc

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
        """Fault ``[start, end)`` in ahead of use; from worker threads, in parallel
        (``window.fault_in``: signals are ridden out, an unreadable page raises ``ReadError``)."""
        lo = start // PAGE * PAGE
        if end <= lo:
            return
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
