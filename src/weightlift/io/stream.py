"""``stream``: buffered positional reads with the page cache dropped behind the reader.

Needs neither mmap nor O_DIRECT nor pinned memory, so it works on every file system. The kernel's
read-ahead still helps; ``POSIX_FADV_DONTNEED`` on each consumed range keeps the page cache from
growing with the checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..checkpoint import Shard
from .base import PAGE, Strategy, host_view, pread_into


class StreamStrategy(Strategy):
    name = "stream"
    in_flight = 4
    read_size = 8 << 20

    def __init__(self, evict: bool = True) -> None:
        super().__init__()
        self.evict = evict

    def prepare(self, shards: Sequence[Shard]) -> None:
        super().prepare(shards)
        for shard in shards:
            _fadvise(shard.fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        s = self.shards[shard]
        pread_into(s.fd, host_view(dest), start, s.path)
        if self.evict:
            # Read bytes are in their destination now; pages wholly inside the range can go.
            self._drop(s.fd, start, start + dest.numel(), inward=True)

    def consumed(self, shard: int, start: int, end: int) -> None:
        if self.evict:
            self._drop(self.shards[shard].fd, start, end, inward=False)

    def close(self) -> None:
        if self.evict:
            for shard in self.shards:
                if shard.fd >= 0:
                    _fadvise(shard.fd, 0, 0, os.POSIX_FADV_DONTNEED)

    @staticmethod
    def _drop(fd: int, start: int, end: int, inward: bool) -> None:
        if inward:
            lo, hi = -(-start // PAGE) * PAGE, end // PAGE * PAGE
        else:
            lo, hi = start // PAGE * PAGE, -(-end // PAGE) * PAGE
        if hi > lo:
            _fadvise(fd, lo, hi - lo, os.POSIX_FADV_DONTNEED)


def _fadvise(fd: int, offset: int, length: int, advice: int) -> None:
    try:
        os.posix_fadvise(fd, offset, length, advice)
    except OSError:
        pass  # advice only: a file system that ignores it still reads correctly
