"""``mmap``: map the files; CPU loads get zero-copy tensors backed by the page cache.

The mapping is private (copy-on-write), so tensors are writable and the file is never modified.
For copies to a device, the ranges already copied are unmapped (``MADV_DONTNEED``) and dropped from
the page cache so residency stays bounded; for zero-copy CPU tensors the page cache *is* the
result, which is why ``auto`` picks this only when the checkpoint is already cached.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Sequence

import torch

from ..checkpoint import Shard
from ..errors import ReadError
from .base import PAGE, Strategy

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)


class MmapStrategy(Strategy):
    name = "mmap"
    zero_copy = True
    in_flight = 2
    read_size = 16 << 20

    def __init__(self, release: bool = False) -> None:
        super().__init__()
        #: Drop mapped pages and page cache once a range is consumed (device targets).
        self.release = release
        self.maps: list[mmap.mmap] = []
        self.populate_ok = True

    def prepare(self, shards: Sequence[Shard]) -> None:
        super().prepare(shards)
        for shard in shards:
            try:
                self.maps.append(mmap.mmap(shard.fd, shard.header.file_size,
                                           access=mmap.ACCESS_COPY))
            except (OSError, ValueError) as exc:
                shard.check_unchanged()  # a file that shrank since its header was read: say so
                raise ReadError(f"cannot map the file: {exc}", path=shard.path) from exc

    def view(self, shard: int, start: int, end: int) -> torch.Tensor:
        if end == start:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.maps[shard], dtype=torch.uint8, count=end - start,
                                offset=start)

    def populate(self, shard: int, start: int, end: int) -> None:
        """Fault ``[start, end)`` in ahead of use; from worker threads, in parallel."""
        lo = start // PAGE * PAGE
        if end <= lo:
            return
        while self.populate_ok:
            try:
                self.maps[shard].madvise(MADV_POPULATE_READ, lo, end - lo)
                return
            except InterruptedError:
                continue  # a signal arrived: the pages faulted in so far stay, ask again
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    # EFAULT/EIO: a page could not be read (I/O error, file truncated). Touching
                    # it would raise SIGBUS and kill the process; report it instead.
                    why = ("a page could not be read: I/O error, or the file shrank"
                           if exc.errno == errno.EFAULT else exc.strerror or str(exc))
                    raise ReadError(f"read of {end - lo} bytes at offset {lo} (mapped) failed: "
                                    f"{why}", path=self.shards[shard].path) from exc
                self.populate_ok = False  # kernel older than 5.14: touch the pages instead
        mm = self.maps[shard]
        for offset in range(lo, end, PAGE):
            mm[offset]

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        self.populate(shard, start, start + dest.numel())  # an I/O error raises, not SIGBUS
        dest.copy_(self.view(shard, start, start + dest.numel()))

    def consumed(self, shard: int, start: int, end: int) -> None:
        if not self.release:
            return
        lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
        if hi > lo:
            self.maps[shard].madvise(mmap.MADV_DONTNEED, lo, hi - lo)
            try:
                os.posix_fadvise(self.shards[shard].fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass

    def close(self) -> None:
        # Zero-copy tensors keep their mapping alive through the buffer protocol; just let go.
        self.maps = []
