"""``mmap``: map the files; CPU loads get zero-copy tensors backed by the page cache.

The mapping is private (copy-on-write), so tensors are writable and the file is never modified.
For copies to a device, the ranges already copied are unmapped (``MADV_DONTNEED``) and dropped from
the page cache so residency stays bounded; for zero-copy CPU tensors the page cache *is* the
result, which is why ``auto`` picks this only when the checkpoint is already cached.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
import weakref
from collections.abc import Sequence

import torch

from ..errors import ReadError
from ..probes import LIBC
from ..sources.records import PLAIN, Shard
from . import base, retry
from .base import PAGE, Strategy

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
_MAP_FAILED = ctypes.c_void_p(-1).value


class Mapping:
    """A private (copy-on-write) mapping of a whole file that holds no file descriptor.

    Python's ``mmap`` keeps a duplicate descriptor for the mapping's lifetime, so every live
    zero-copy tensor would keep its file open. Here the memory is unmapped when the last tensor
    viewing it (and this object) is gone, and the descriptor is the shard's, closed with it.
    """

    def __init__(self, fd: int, size: int) -> None:
        addr = LIBC.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE, fd, 0)
        if addr is None or addr == _MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self.addr, self.size = addr, size
        self.memory = (ctypes.c_ubyte * size).from_address(addr)
        weakref.finalize(self.memory, retry.guarded, LIBC.munmap, addr, size)

    def madvise(self, advice: int, start: int, length: int) -> None:
        base.madvise(self.addr + start, length, advice)

    def byte(self, offset: int) -> int:
        return self.memory[offset]


class MmapStrategy(Strategy):
    name = "mmap"
    zero_copy = True
    in_flight = 2
    read_size = 16 << 20
    #: After a signal stopped ``MADV_POPULATE_READ``, the rest is asked for in steps this large.
    STEP = 1 << 20

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

    def view(self, shard: int, start: int, end: int) -> torch.Tensor:
        if end == start:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.maps[shard].memory, dtype=torch.uint8, count=end - start,
                                offset=start)

    def populate(self, shard: int, start: int, end: int) -> None:
        """Fault ``[start, end)`` in ahead of use; from worker threads, in parallel.

        A signal may stop ``MADV_POPULATE_READ`` midway (EINTR; EAGAIN when the kernel is short
        of something): the pages faulted in so far stay, and the rest is asked for again in
        steps of ``STEP``, each with a bounded number of attempts, so progress is counted.
        """
        lo = start // PAGE * PAGE
        if end <= lo:
            return
        position, step = lo, end - lo
        attempts = retry.Attempts()
        while self.populate_ok and position < end:
            length = min(step, end - position)
            try:
                self.maps[shard].madvise(MADV_POPULATE_READ, position, length)
            except OSError as exc:
                path = self.shards[shard].path
                if retry.transient(exc.errno):
                    time.sleep(attempts.failed(exc.errno, "mapped read", length, position, path))
                    step = min(step, self.STEP)
                    continue
                if exc.errno != errno.EINVAL:
                    # EFAULT/EIO: a page could not be read (I/O error, file truncated). Touching
                    # it would raise SIGBUS and kill the process; report it instead.
                    why = ("a page could not be read: I/O error, or the file shrank"
                           if exc.errno == errno.EFAULT else exc.strerror or str(exc))
                    raise ReadError(f"read of {length} bytes at offset {position} (mapped) "
                                    f"failed: {why}", path=path) from exc
                self.populate_ok = False  # kernel older than 5.14: touch the pages instead
                break
            attempts.progressed()
            position += length
        if self.populate_ok:
            return
        mapping = self.maps[shard]
        for offset in range(position, end, PAGE):
            mapping.byte(offset)

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
