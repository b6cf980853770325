"""The one interface every strategy implements; strategies differ only in how bytes arrive.

A strategy is prepared for a list of open shards, then asked, from worker threads, to fill host
memory with file ranges (``read``). It may also hand out zero-copy views: of a whole mapped file
(``view``, mmap only), or of a window mapped over a range that is in the page cache (``window``,
direct and stream when the load copies or streams), and is told when a range has been consumed
(``consumed``) so it can drop what it cached.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, ClassVar

import torch

from ..errors import ReadError
from ..sources.records import PLAIN, Shard
from . import retry
from .uring import Read

if TYPE_CHECKING:
    from .window import Window, Windows

PAGE = mmap.PAGESIZE
#: Provides ``n`` bytes of host memory as a uint8 tensor.
Allocator = Callable[[int], torch.Tensor]


class Unavailable(Exception):
    """The strategy cannot work here (e.g. the file system refuses O_DIRECT); carries the reason."""


class Strategy(ABC):
    """How bytes get from the checkpoint's files into host memory."""

    name: ClassVar[str]
    #: Reads issued at once (worker threads).
    in_flight: int = 4
    #: Size of one read, a multiple of the page size.
    read_size: int = 8 << 20
    #: A zero-copy strategy hands out views of the file instead of reading into buffers.
    zero_copy: ClassVar[bool] = False
    #: The windows this strategy maps over cached ranges (``window``); None: it maps none.
    windows: Windows | None = None

    def __init__(self) -> None:
        self.shards: Sequence[Shard] = ()
        #: Set before ``prepare`` by a load whose reads land in page-locked ring slots for this
        #: device, so a strategy that can fail there (O_DIRECT) probes with such memory.
        self.pin_device: torch.device | None = None
        #: Why reads into page-locked memory fail here (None: they work); the ring is then
        #: pageable and host→device copies no longer overlap the reads.
        self.pin_refused: str | None = None
        #: Bytes of the checkpoint handed out as views of mapped memory (``view``, ``window``)
        #: rather than read into buffers; counted by the read loop, for ``LoadReport``.
        self.viewed = 0

    def prepare(self, shards: Sequence[Shard]) -> None:
        """Set up per-file state; raise ``Unavailable`` if this strategy cannot read these files."""
        self.shards = shards

    def alloc(self, nbytes: int, file_offset: int, raw: Allocator | None = None
              ) -> torch.Tensor:
        """A uint8 host buffer of ``nbytes`` that ``read`` can fill with ``[file_offset, +nbytes)``;
        ``raw(n)`` (default ``host_buffer``) provides the memory, e.g. from a pool of reused ones."""
        return (raw or host_buffer)(nbytes)

    @abstractmethod
    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        """Fill ``dest`` (uint8, from ``alloc`` or a ring slot) with bytes from ``start`` on."""

    def describe(self, shard: int, start: int, dest: torch.Tensor) -> Read:
        """``read(shard, start, dest)`` as a description an engine (io_uring) carries out; only
        strategies that read with plain positional reads implement it."""
        raise NotImplementedError(f"{self.name} cannot describe its reads")

    def undescribable(self) -> str | None:
        """Why this prepared strategy's reads cannot go to an engine as descriptions now (None:
        they can). By default: unless the strategy implements ``describe``."""
        if type(self).describe is Strategy.describe:
            return "it does not read with positional reads"
        return None

    def view(self, shard: int, start: int, end: int) -> torch.Tensor:
        """A zero-copy uint8 view of ``[start, end)`` (only for ``zero_copy`` strategies)."""
        raise NotImplementedError(f"{self.name} does not hand out views")

    def populate(self, shard: int, start: int, end: int) -> None:
        """Bring ``[start, end)`` into memory ahead of ``view`` (``zero_copy`` strategies)."""

    def mappable(self, shard: int, start: int, end: int) -> bool:
        """Whether ``window`` would map ``[start, end)`` (it was all in the page cache when the
        load started and this strategy maps such ranges); plans group tensors by it."""
        return False

    def fully_cached(self, shard: int, start: int, end: int) -> bool:
        """Whether every page of ``[start, end)`` was in the page cache when the load began
        (this strategy's residency map says so): a window of it is read without I/O."""
        return False

    def window(self, shard: int, start: int, end: int) -> Window | None:
        """A window mapped over ``[start, end)`` for the read loop to hand out views of, when
        this strategy maps ranges that are in the page cache; None: ``read`` them. The loop hands it
        out in the consumer's thread (populated there only if some of its pages were not cached:
        ``read._populating``) and drops it once consumed."""
        return None

    def mapped_peak(self) -> int:
        """The most bytes of the checkpoint's files this strategy had mapped at once."""
        return 0 if self.windows is None else self.windows.peak

    def consumed(self, shard: int, start: int, end: int) -> None:
        """``[start, end)`` has been copied to its destination; release what holds it."""

    def kinds(self, shard: int) -> tuple[str, ...]:
        """The kinds of descriptor (``sources.records.KINDS``) ``read``/``describe`` of ``shard``
        use: a load pins them around every read it submits (``Shard.pin``)."""
        return (PLAIN,)

    def close(self) -> None:
        """Release per-file state; the shards' descriptors belong to the caller."""


def host_view(dest: torch.Tensor) -> memoryview:
    """A writable memoryview over a contiguous CPU uint8 tensor (pinned memory included)."""
    return memoryview(dest.numpy()).cast("B")


def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
    """The positional read every strategy's data path goes through.

    One function, looked up at call time, so fault-injection tests can stand in for the kernel
    (EIO, short reads, EINTR, EAGAIN) on the real read path.
    """
    return os.preadv(fd, buffers, offset)


def madvise(address: int, length: int, advice: int) -> None:
    """``madvise(2)``, raising OSError; every ``MADV_POPULATE_*`` call goes through it.

    The page-faulting counterpart of ``preadv``: one function, looked up at call time, so
    fault-injection tests can answer EINTR or EAGAIN as the kernel may under signals.
    """
    from ..probes import LIBC

    if LIBC.madvise(address, length, advice) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def pread_into(fd: int, buf: memoryview, offset: int, path: str) -> None:
    """Fill ``buf`` from ``offset``, continuing after short reads and asking again after answers
    that read nothing (``retry.TRANSIENT``, or no data inside the file); a file that ends early
    is an error."""
    done = 0
    total = len(buf)
    attempts = retry.Attempts()
    while done < total:
        try:
            n = preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            if not retry.transient(exc.errno):
                raise ReadError(f"read of {total - done} bytes at offset {offset + done} failed: "
                                f"{exc.strerror or exc}", path=path) from exc
            time.sleep(attempts.failed(exc.errno, "read", total - done, offset + done, path))
            continue
        if n == 0:
            size = retry.file_size(fd)
            if size < offset + total:
                raise ReadError(f"file ended at offset {offset + done} while reading {total} "
                                f"bytes at {offset}; it was truncated during the load", path=path)
            # The file is long enough: no data here is a file system's hiccup, ask again.
            time.sleep(attempts.failed(retry.NOTHING, "read", total - done, offset + done, path,
                                       size))
            continue
        attempts.progressed()
        done += n


#: Buffers at least this large get their own anonymous mapping.
OWN_MAPPING = 1 << 20


def host_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
    """A uint8 host tensor; large ones are anonymous mappings, returned to the OS when freed.

    malloc keeps freed multi-megabyte blocks on its heap once its adaptive mmap threshold has
    grown, so a stream of tensors would ratchet RSS past the budget; a mapping of our own is
    unmapped as soon as the last tensor viewing it dies.
    """
    if pin or nbytes < OWN_MAPPING:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    return torch.frombuffer(anonymous_mapping(nbytes), dtype=torch.uint8)


def anonymous_mapping(nbytes: int) -> mmap.mmap:
    """Fresh zero-filled memory of our own (each page is faulted in and zeroed on first touch).

    Private, like malloc's: a shared anonymous mapping is shmem, whose faults also insert every
    page into a page-cache mapping (~25 % more system time for a 6 GB load here). No
    ``MADV_HUGEPAGE``: where the guest hands freed memory back to its host (virtio-balloon free
    page reporting, as on this project's VM) or memory is fragmented (direct compaction), 2 MiB
    faults made a cold 6 GB ``direct`` load 2.4× slower (0.8 vs 2.0 GB/s, docs/benchmarks.md).
    """
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


#: ``madvise`` advice: fault a range in writable without touching it (Linux 5.14).
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)


class Prefaulter:
    """Fresh host buffers faulted in by a thread of its own, ahead of the code that fills them.

    Zeroing fresh pages is a large part of a CPU load that converts or dequantizes (the result
    is new memory, written once); done on a second core while the first one computes, a 500 MB
    Q4_K_M file dequantized to bf16 in a fresh process took 2.0-2.3 s instead of 3.3-3.8 s here.
    ``MADV_POPULATE_WRITE`` faults pages in without writing them, so racing the filling code is
    harmless. ``close()`` waits for the thread: nothing runs on a buffer after a load ended.

        prefault = Prefaulter()
        out = prefault.buffer(nbytes)   # uint8, being faulted in
        ...; prefault.close()
    """

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._works = True

    def buffer(self, nbytes: int) -> torch.Tensor:
        buf = host_buffer(nbytes)
        if self._works and nbytes >= OWN_MAPPING:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    1, thread_name_prefix="weightlift-prefault",
                    initializer=retry.leave_interrupts_to_the_main_thread)
            self._pool.submit(self._populate, buf.data_ptr(), nbytes)
        return buf

    def _populate(self, address: int, nbytes: int) -> None:
        for _ in range(retry.ATTEMPTS):
            if not self._works:
                return
            try:
                madvise(address, nbytes, MADV_POPULATE_WRITE)
                return
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    self._works = False  # a kernel before 5.14: the filling code faults pages in
                    return
                if not retry.transient(exc.errno):
                    return  # e.g. ENOMEM: this buffer's pages fault in as it is filled
                # A signal (EINTR) or EAGAIN: the pages faulted in so far stay; ask again. A
                # buffer still refused after that is faulted in by the code that fills it.

    def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            # Every buffer asked for is faulted in before close returns (not shutdown(wait=True):
            # see ``stop_pool``).
            interrupted = retry.stop_pool(pool, cancel=False)
            if interrupted is not None:
                raise interrupted


def aligned_buffer(nbytes: int, file_offset: int, align: int, pin: bool = False,
                   raw: Allocator | None = None) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` whose address ≡ ``file_offset`` (mod ``align``), with at least
    ``align`` bytes of owned slack on each side, so aligned reads around it stay inside memory we
    own. ``raw(n)`` provides the memory (default: a fresh ``host_buffer``)."""
    memory = raw(nbytes + 3 * align) if raw is not None else host_buffer(nbytes + 3 * align,
                                                                          pin=pin)
    return aligned_window(memory, nbytes, file_offset, align)


def aligned_window(raw: torch.Tensor, nbytes: int, file_offset: int, align: int) -> torch.Tensor:
    """``nbytes`` of ``raw`` (at least ``nbytes + 3 * align`` long) at an address ≡
    ``file_offset`` (mod ``align``), leaving at least ``align`` bytes of ``raw`` on each side."""
    shift = (file_offset - raw.data_ptr()) % align + align
    return raw[shift:shift + nbytes]


def raw_memory(address: int, nbytes: int) -> memoryview:
    """A writable view of memory we own at ``address`` (slack around an ``aligned_buffer``)."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")
