"""``direct``: O_DIRECT reads of aligned extents straight into host memory, bypassing the page cache.

O_DIRECT needs the file offset, the length and the memory address aligned (to 4096 here, which
covers every common logical block size). Tensors start anywhere, so each read covers the aligned
extent around its range and writes the few extra bytes into slack that ``aligned_buffer`` owns.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from ..checkpoint import Shard
from ..errors import ReadError
from . import base
from .base import Allocator, Strategy, Unavailable, aligned_buffer, raw_memory
from .uring import Read

ALIGN = 4096


class DirectStrategy(Strategy):
    name = "direct"
    in_flight = 16
    read_size = 8 << 20

    def __init__(self) -> None:
        super().__init__()
        self.fds: list[int] = []

    def prepare(self, shards: Sequence[Shard]) -> None:
        super().prepare(shards)
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            raise Unavailable("this platform has no O_DIRECT")
        try:
            for shard in shards:
                try:
                    fd = os.open(f"/proc/self/fd/{shard.fd}", os.O_RDONLY | flag | os.O_CLOEXEC)
                except OSError as exc:
                    raise Unavailable(f"{shard.path}: the file system refuses O_DIRECT "
                                      f"({exc.strerror})") from None
                self.fds.append(fd)
                if os.fstat(fd).st_ino != shard.stamp.inode:
                    raise Unavailable(f"{shard.path}: reopening for O_DIRECT reached another file")
                self._probe(fd, shard)
        except BaseException:
            self.close()
            raise

    def _probe(self, fd: int, shard: Shard) -> None:
        """Some file systems accept O_DIRECT at open() and refuse it at read(); find out now."""
        probe = aligned_buffer(ALIGN, 0, ALIGN)
        try:
            os.preadv(fd, [raw_memory(probe.data_ptr(), ALIGN)], 0)
        except OSError as exc:
            raise Unavailable(f"{shard.path}: O_DIRECT reads fail here ({exc.strerror})") from None

    def alloc(self, nbytes: int, file_offset: int, raw: Allocator | None = None
              ) -> torch.Tensor:
        return aligned_buffer(nbytes, file_offset, ALIGN, raw=raw)

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        end = start + dest.numel()
        if end == start:
            return
        lo = start - start % ALIGN
        hi = -(-end // ALIGN) * ALIGN
        if (dest.data_ptr() - start) % ALIGN:
            raise AssertionError("direct reads need buffers from alloc() or an aligned slot")
        memory = raw_memory(dest.data_ptr() - (start - lo), hi - lo)
        fd, path = self.fds[shard], self.shards[shard].path
        done = 0
        need = end - lo  # past `end` the extent may run beyond the end of the file
        while done < need:
            try:
                n = base.preadv(fd, [memory[done:]], lo + done)
            except InterruptedError:
                continue  # a signal arrived before any byte was read: ask again
            except OSError as exc:
                raise ReadError(f"O_DIRECT read of {hi - lo - done} bytes at offset {lo + done} "
                                f"failed: {exc.strerror or exc}", path=path) from exc
            # The next read must start on a block boundary again: keep whole blocks only. Less
            # than a whole block past an aligned offset can only mean the file ended there.
            kept = (done + n) // ALIGN * ALIGN
            if done + n < need and kept <= done:
                raise ReadError(f"file ended at offset {lo + done + n} while reading up to {end}; "
                                "it was truncated during the load", path=path)
            done = done + n if done + n >= need else kept

    def describe(self, shard: int, start: int, dest: torch.Tensor) -> Read:
        end = start + dest.numel()
        fd, path = self.fds[shard], self.shards[shard].path
        if end == start:
            return Read(fd, 0, start, 0, need=0, block=ALIGN, path=path, direct=True)
        lo = start - start % ALIGN
        hi = -(-end // ALIGN) * ALIGN
        if (dest.data_ptr() - start) % ALIGN:
            raise AssertionError("direct reads need buffers from alloc() or an aligned slot")
        return Read(fd, dest.data_ptr() - (start - lo), lo, hi - lo, need=end - lo, block=ALIGN,
                    path=path, direct=True)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []
