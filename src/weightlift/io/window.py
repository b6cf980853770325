"""Windows: a page-aligned part of a file mapped on its own, handed out as zero-copy tensors and
unmapped once the last tensor viewing it is gone.

Where a range of a checkpoint is already in the page cache, reading it copies cache → buffer and
the consumer copies again (buffer → parameters); a ``Window`` lets the consumer copy straight out
of the cache, and maps only the part of the file in use, not the whole file, so a load that
copies and drops keeps at most its budget mapped. ``Windows`` counts what a load has mapped:
its read-ahead waits for windows the consumer still holds (``live``).

    windows = Windows()
    with shard.opened(PLAIN) as fd:
        window = windows.map(fd, start, end, path=shard.path)   # the descriptor may close after
    window.populate()                   # MADV_POPULATE_READ: pages mapped, missing ones read
                                        # (a read loop skips it where ``window.cached``)
    tensor = window.view(start, end)    # uint8, zero-copy, writable (copy-on-write: the file is
    del window                          # never changed); unmapped once ``tensor`` is dropped too

The mapping is private (copy-on-write), like ``io/mapped.py``'s whole-file ``Mapping``, and holds
no descriptor: the shard's descriptor can be closed while tensors still view the window.

Unmapping runs no Python code (``map_file``): the mapping is owned by an ``mmap.mmap``, whose C
deallocator unmaps it when the last view dies. A signal whose Python handler raises (Ctrl-C, a
SIGTERM handler raising ``SystemExit``) then runs in the code that dropped the view, and reaches
it, instead of inside a finalizer where Python prints and drops it.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import time
import weakref
from collections.abc import Callable

import torch

from ..errors import ReadError
from ..probes import LIBC
from . import base, retry
from .base import PAGE

MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)
MAP_FIXED = getattr(mmap, "MAP_FIXED", 0x10)
_MAP_FAILED = ctypes.c_void_p(-1).value
#: After a signal stopped ``MADV_POPULATE_READ``, the rest is asked for in steps this large.
STEP = 1 << 20


#: The size of a page-table entry that maps a huge page or large folio (x86-64, arm64 4K).
PMD = 2 << 20


def map_file(fd: int, offset: int, length: int) -> tuple[mmap.mmap, ctypes.Array]:
    """``mmap`` ``length`` bytes of ``fd`` from ``offset`` (page-aligned) private and writable:
    (``owner``, ``memory``), ``memory`` a ``ctypes`` array over the mapping that tensors view
    (``torch.frombuffer``). Raises OSError.

    The mapping is made over an anonymous ``mmap.mmap`` of the same size (``MAP_FIXED``), which
    owns the address range: ``memory`` keeps it alive, and when the last view is gone its C
    deallocator unmaps it, with no Python code in between. Nothing can leak either: an
    interrupt raised right after any step here drops an object that unmaps what it holds. A
    signal's handler therefore never runs inside a finalizer (where Python prints and drops the
    exception it raises) but in the code that dropped the view, which it reaches."""
    # Placed where its address and the file offset agree modulo 2 MiB, as the kernel places a
    # file mapping it chooses the address of: the page cache's large folios are then mapped 2 MiB
    # per fault (PMD) instead of 16 pages (a warm 2 GB pass: ~1,500 faults instead of ~31,000).
    slack = PMD if length >= PMD else 0
    owner = mmap.mmap(-1, length + slack, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.addressof(ctypes.c_ubyte.from_buffer(owner))
    skip = (offset - start) % PMD if slack else 0
    memory = (ctypes.c_ubyte * length).from_buffer(owner, skip)
    addr = LIBC.mmap(start + skip, length, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | MAP_FIXED, fd, offset)
    if addr is None or addr == _MAP_FAILED:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return owner, memory


def fault_in(address: int, length: int, *, offset: int, path: str) -> bool:
    """Map the pages of ``length`` bytes of a file mapping at ``address`` (file offset ``offset``,
    for messages) with ``MADV_POPULATE_READ``: cached pages are mapped, others read in.

    A signal may stop it midway (EINTR; EAGAIN when the kernel is short of something): the pages
    faulted in so far stay, and the rest is asked for again in steps of ``STEP``, each with a
    bounded number of attempts. An I/O error (EFAULT/EIO, or a file that shrank) raises
    ``ReadError`` where touching the page would kill the process with SIGBUS. Returns False on a
    kernel without ``MADV_POPULATE_READ`` (before 5.14): the caller touches the pages instead.
    """
    if length <= 0:
        return True
    done, step = 0, length
    attempts = retry.Attempts()
    while done < length:
        size = min(step, length - done)
        try:
            base.madvise(address + done, size, MADV_POPULATE_READ)
        except OSError as exc:
            if retry.transient(exc.errno):
                time.sleep(attempts.failed(exc.errno, "mapped read", size, offset + done, path))
                step = min(step, STEP)
                continue
            if exc.errno == errno.EINVAL:
                return False
            why = ("a page could not be read: I/O error, or the file shrank"
                   if exc.errno == errno.EFAULT else exc.strerror or str(exc))
            raise ReadError(f"read of {size} bytes at offset {offset + done} (mapped) failed: "
                            f"{why}", path=path) from exc
        attempts.progressed()
        done += size
    return True


def touch(address: int, length: int) -> None:
    """Read one byte of every page of ``length`` bytes at ``address`` (page-aligned)."""
    for page in range(address, address + length, PAGE):
        ctypes.c_ubyte.from_address(page).value  # noqa: B018 - the read faults the page in


class Window:
    """``[start, end)`` of a file, mapped from the page boundaries around it; no descriptor held.

    Unmapped when this object and every tensor from ``view`` are gone (``map_file``: from C,
    when the memory the tensors keep alive through the buffer protocol dies). ``on_unmap(size)``,
    if given, is called after that from a finalizer: Python code, where an interrupt is sent
    again (``retry.guarded``) unless it lands in ``weakref.finalize``'s own call.
    """

    def __init__(self, fd: int, start: int, end: int, *, path: str,
                 on_unmap: Callable[[int], None] | None = None) -> None:
        self.start, self.end, self.path = start, end, path
        #: Every page was in the page cache when the load looked (``populate`` then only maps
        #: them: page-table work, no read); False: some may have to be read.
        self.cached = False
        self.offset = start // PAGE * PAGE
        self.size = max(PAGE, -(-end // PAGE) * PAGE - self.offset)
        owner, memory = map_file(fd, self.offset, self.size)
        #: What tensors keep alive: ``view`` exports it, and its death unmaps the window.
        self.memory = memory
        self.address = ctypes.addressof(memory)
        #: Dead once the window is unmapped.
        self.ref = weakref.ref(owner)
        if on_unmap is not None:  # on the owner: called once it has unmapped
            weakref.finalize(owner, retry.guarded, on_unmap, self.size)

    @property
    def mapped(self) -> bool:
        return self.ref() is not None

    def view(self, start: int, end: int) -> torch.Tensor:
        """A zero-copy uint8 tensor of the file's bytes ``[start, end)`` (inside the window)."""
        if not self.start <= start <= end <= self.end:
            raise ValueError(f"[{start}, {end}) is outside the window [{self.start}, {self.end})")
        if end == start:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self.memory, dtype=torch.uint8, count=end - start,
                                offset=start - self.offset)

    def populate(self, start: int | None = None, end: int | None = None) -> None:
        """Map the pages of ``[start, end)`` (default: the whole window) ahead of use: a
        consumer then copies without a page fault per page. Raises ``ReadError`` for a page
        that cannot be read."""
        lo, hi = self._pages(start, end)
        address = self.address + lo - self.offset
        if not fault_in(address, hi - lo, offset=lo, path=self.path):
            touch(address, hi - lo)

    def willneed(self, start: int | None = None, end: int | None = None) -> None:
        """Ask the kernel to start reading the uncached pages of ``[start, end)`` (default: the
        whole window) with ``MADV_WILLNEED``, without waiting; advice only."""
        lo, hi = self._pages(start, end)
        try:
            base.madvise(self.address + lo - self.offset, hi - lo, mmap.MADV_WILLNEED)
        except OSError:
            pass

    def _pages(self, start: int | None, end: int | None) -> tuple[int, int]:
        """The file offsets of the pages around ``[start, end)``, within the window."""
        start = self.start if start is None else start
        end = self.end if end is None else end
        return (max(start // PAGE * PAGE, self.offset),
                min(-(-end // PAGE) * PAGE, self.offset + self.size))


class Windows:
    """The windows of one load: how many bytes are mapped now (``live``), at most (``peak``)
    and in all (``total``). Thread-safe: windows are unmapped on whichever thread drops the
    last tensor viewing one.

        windows = Windows()
        window = windows.map(fd, 0, 8 << 20, path="model.safetensors")
        windows.live   # 8 MiB until the window and its tensors are gone
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: (weak reference to a window's owner, its size) of windows that may still be mapped.
        self._mapped: list[tuple[weakref.ref, int]] = []
        self.peak = 0
        self.total = 0
        #: Bytes of the file handed out as views (``count``), for the load's report.
        self.viewed = 0

    @property
    def live(self) -> int:
        """Bytes mapped now: windows whose memory a tensor (or the window) still holds. Asked
        of the weak references rather than counted by a callback, which would be Python code
        running where the last view dies."""
        with self._lock:
            return self._prune()

    def _prune(self) -> int:
        self._mapped = [(ref, size) for ref, size in self._mapped if ref() is not None]
        return sum(size for _, size in self._mapped)

    def map(self, fd: int, start: int, end: int, *, path: str) -> Window:
        """A window of ``[start, end)`` of the open file ``fd``; raises ``ReadError``."""
        try:
            window = Window(fd, start, end, path=path)
        except (OSError, ValueError) as exc:
            raise ReadError(f"cannot map bytes [{start}, {end}) of the file: {exc}",
                            path=path) from exc
        with self._lock:
            self._mapped.append((window.ref, window.size))
            self.total += window.size
            self.peak = max(self.peak, self._prune())
        return window

    def count(self, nbytes: int) -> None:
        """``nbytes`` of the checkpoint were handed out as views of a window."""
        with self._lock:
            self.viewed += nbytes
