"""The io_uring engine: many reads in flight through one ring, submitted and reaped in batches.

Pure Python over the raw system calls (ctypes; the rings are mapped with ``mmap``), so nothing is
compiled at install time. Single-threaded by design: reads are submitted by ``read()`` and reaped
by whoever waits (``Ticket.result()``), so the ring's head and tail are touched only right before
and after ``io_uring_enter``, whose system-call boundary orders memory on every architecture.

    ring = UringEngine(depth=64)
    ticket = ring.submit(Read(fd, address, offset=0, length=1 << 20, need=1 << 20, block=1,
                              path="model.safetensors", direct=False))
    ticket.result()     # raises ReadError on failure
    ring.close()        # cancels and reaps every read still in flight before the ring goes away

Every kernel answer passes through two module functions, the seams fault-injection tests stand in
for: ``enter`` (the ``io_uring_enter`` system call: EINTR, EAGAIN) and ``completed`` (each
completion's result: EIO, ECANCELED, EAGAIN, short reads, early end of file).

A completion that read nothing and says so (``retry.TRANSIENT``: EINTR, EAGAIN, and ECANCELED,
which io-wq answers for every read waiting on it when it cannot start its first worker thread,
e.g. while a signal is pending on the submitting task of a busy machine) is resubmitted, a
bounded number of times in a row (``retry.ATTEMPTS``); after ECANCELED without ``IOSQE_ASYNC``,
so the kernel tries the read inline before it hands it to io-wq again. Reads the load itself
stopped (``Ticket.cancel``, ``close``) are never resubmitted.

Interrupts: an exception may surface at any point of the engine's own code (``KeyboardInterrupt``,
a ``SystemExit`` raised by a SIGTERM handler). The bookkeeping is ordered so that none is lost: a
read is recorded as in flight before the kernel can see it, and each completion is taken off the
completion queue before it is handled. An exception that escapes a call on the engine leaves it
marked busy; the next call (``cancel``, ``result``, ``close``) then stops it: reads not yet
submitted are taken back, every read the kernel holds is cancelled (``IORING_OP_ASYNC_CANCEL``)
and reaped, counted by the kernel's own ring heads rather than by the bookkeeping. That takes at
most ``retry.SETTLE`` seconds; a read the kernel still holds after that keeps its memory alive for
the rest of the process (``retry.keep``), with a warning, rather than let it land in freed memory.
An interrupt that arrives while the engine stops is raised once it has stopped.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct
import select
import time
import warnings
from collections import deque
from collections.abc import Callable
from concurrent.futures import TimeoutError as WaitTimeout
from dataclasses import dataclass, field

from ..errors import ReadError
from . import retry

#: System call numbers (the same on x86-64 and arm64, the generic table).
SYSCALLS = {"x86_64": (425, 426, 427), "aarch64": (425, 426, 427), "arm64": (425, 426, 427)}

IORING_OFF_SQ_RING = 0
IORING_OFF_CQ_RING = 0x8000000
IORING_OFF_SQES = 0x10000000
IORING_ENTER_GETEVENTS = 1
IORING_OP_ASYNC_CANCEL = 14
IORING_OP_READ = 22
#: ``user_data`` of cancel requests: their own completions answer no read (reads count from 1).
CANCEL = 0
#: Issue the request from the kernel's io-wq workers instead of inline in ``io_uring_enter``.
IOSQE_ASYNC = 1 << 4
#: Largest single read request; longer reads are submitted in pieces (the kernel caps at ~2 GiB).
MAX_REQUEST = 1 << 30
#: What ``depth`` means when nobody says: the queue depth the fastest peers use.
DEPTH = 64

_SQE = struct.Struct("<BBHiQQIIQHHiQQ")   # struct io_uring_sqe, 64 bytes
_CQE = struct.Struct("<QiI")              # struct io_uring_cqe, 16 bytes
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_SQE_ADDR, _SQE_USER = 16, 32             # offsets of addr and user_data in an SQE
_MASK = 0xFFFFFFFF


class _SqOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("head", "tail", "ring_mask", "ring_entries", "flags", "dropped", "array",
                 "resv1")] + [("user_addr", ctypes.c_uint64)]


class _CqOffsets(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in
                ("head", "tail", "ring_mask", "ring_entries", "overflow", "cqes", "flags",
                 "resv1")] + [("user_addr", ctypes.c_uint64)]


class _Params(ctypes.Structure):
    """struct io_uring_params (120 bytes)."""

    _fields_ = [(name, ctypes.c_uint32) for name in
                ("sq_entries", "cq_entries", "flags", "sq_thread_cpu", "sq_thread_idle",
                 "features", "wq_fd")] + [("resv", ctypes.c_uint32 * 3),
                                          ("sq_off", _SqOffsets), ("cq_off", _CqOffsets)]


assert ctypes.sizeof(_Params) == 120 and _SQE.size == 64

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _numbers() -> tuple[int, int, int]:
    machine = platform.machine()
    if machine not in SYSCALLS:
        raise OSError(errno.ENOSYS, f"io_uring system call numbers unknown on {machine}")
    return SYSCALLS[machine]


def _check(result: int) -> int:
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def setup(entries: int, params: _Params) -> int:
    """``io_uring_setup``: a new ring's descriptor. Raises OSError (ENOSYS, EPERM, ...)."""
    number = _numbers()[0]
    return _check(_syscall(ctypes.c_long(number), ctypes.c_long(entries), ctypes.byref(params)))


def enter(fd: int, to_submit: int, min_complete: int, flags: int) -> int:
    """``io_uring_enter``: submit ``to_submit`` queued reads, wait for ``min_complete``."""
    number = _numbers()[1]
    return _check(_syscall(ctypes.c_long(number), ctypes.c_long(fd), ctypes.c_long(to_submit),
                           ctypes.c_long(min_complete), ctypes.c_long(flags),
                           ctypes.c_void_p(None), ctypes.c_long(0)))


def completed(fd: int, offset: int, length: int, result: int) -> int:
    """One completion's result (bytes read or -errno) for a read of ``length`` at ``offset``."""
    return result


def disabled_reason() -> str | None:
    """Why the kernel setting ``kernel.io_uring_disabled`` forbids rings here, if it does."""
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            value = f.read().strip()
    except OSError:
        return None
    if value == "2":
        return "kernel.io_uring_disabled=2 (io_uring is off for everyone)"
    if value == "1":
        return "kernel.io_uring_disabled=1 (only members of kernel.io_uring_group may use it)"
    return None


def probe() -> str | None:
    """None when a ring can be set up here, else why not (what ``doctor`` prints)."""
    try:
        UringEngine(depth=2).close()
    except EngineUnavailable as exc:
        return str(exc)
    return None


class EngineUnavailable(Exception):
    """io_uring cannot be used here; carries the reason (the load falls back to threads)."""


@dataclass(eq=False)
class Read:
    """One read a strategy asks for: ``length`` bytes of ``fd`` from ``offset`` to ``address``.

    ``need`` bytes must arrive (an O_DIRECT extent may run past the end of the file); a short
    completion is resubmitted from the last multiple of ``block`` (4096 for O_DIRECT, whose reads
    must start on a block boundary; 1 for buffered reads). ``then`` runs once all bytes arrived.
    """

    fd: int
    address: int
    offset: int
    length: int
    need: int
    block: int
    path: str
    direct: bool
    then: Callable[[], None] | None = None
    #: The memory ``address`` points into (e.g. the destination tensor): held while the kernel
    #: may write there, and kept for good (``retry.keep``) if a read never comes back.
    owner: object = field(default=None, repr=False)


@dataclass(eq=False)
class Ticket:
    """A submitted ``Read``: ``result()`` waits for it (driving the ring), ``cancel()`` withdraws
    it (True if the kernel had not got it yet). The calls of ``concurrent.futures.Future``."""

    engine: UringEngine
    read: Read
    arrived: int = 0            # bytes arrived so far
    finished: bool = False
    cancelled: bool = False
    error: BaseException | None = None
    in_kernel: bool = field(default=False, repr=False)
    #: ``cancel()`` was asked while the kernel had it: if it comes back unread, it stays so.
    withdrawn: bool = field(default=False, repr=False)
    #: Tries in a row that read nothing (ECANCELED, EAGAIN, ...).
    attempts: retry.Attempts = field(default_factory=retry.Attempts, repr=False)
    #: Submit without ``IOSQE_ASYNC`` (after io-wq cancelled it for want of a worker).
    inline: bool = field(default=False, repr=False)
    #: ``user_data`` of its latest submission.
    user: int = field(default=0, repr=False)
    #: The kernel still held it when the engine gave up waiting: its memory is kept for good.
    lost: bool = field(default=False, repr=False)

    def result(self, timeout: float | None = None) -> None:
        """Wait for the read (at most ``timeout`` s, then ``TimeoutError``); raise its error."""
        self.engine.wait(self, timeout)
        if self.error is not None:
            raise self.error

    def cancel(self) -> bool:
        return self.engine.withdraw(self)

    def done(self) -> bool:
        """The read is over: nothing lands in its memory any more."""
        return self.finished and not self.lost


class UringEngine:
    """Reads through one io_uring of ``depth`` entries; at most ``depth`` in the kernel at once,
    the rest queued here in submission order."""

    name = "uring"

    def __init__(self, depth: int = DEPTH) -> None:
        self.depth = depth
        params = _Params()
        try:
            self.fd = setup(depth, params)
        except OSError as exc:
            why = disabled_reason() if exc.errno in (errno.EPERM, errno.ENOSYS) else None
            raise EngineUnavailable(f"io_uring_setup failed: {exc.strerror or exc}"
                                    + (f"; {why}" if why else "")) from None
        self._maps: list[mmap.mmap] = []
        self._flying: dict[int, Ticket] = {}
        try:
            sq, cq = params.sq_off, params.cq_off
            self._sq = self._map(sq.array + params.sq_entries * 4, IORING_OFF_SQ_RING)
            self._cq = self._map(cq.cqes + params.cq_entries * _CQE.size, IORING_OFF_CQ_RING)
            self._sqes = self._map(params.sq_entries * _SQE.size, IORING_OFF_SQES)
        except BaseException:
            self._release()
            raise
        self._sq_head, self._sq_tail = sq.head, sq.tail
        self._sq_mask = _U32.unpack_from(self._sq, sq.ring_mask)[0]
        self._cq_head, self._cq_tail = cq.head, cq.tail
        self._cq_mask = _U32.unpack_from(self._cq, cq.ring_mask)[0]
        self._cqes = cq.cqes
        self._capacity = min(params.sq_entries, params.cq_entries)
        self._sq_entries = params.sq_entries
        for index in range(params.sq_entries):  # SQE slot i is always ring position i
            _U32.pack_into(self._sq, sq.array + 4 * index, index)
        self._tail = _U32.unpack_from(self._sq, self._sq_tail)[0]
        self._queued: deque[Ticket] = deque()
        self._next_id = 1
        self._closing = False
        #: Seconds to wait before the next submission: reads were just answered "try again".
        self._pause = 0.0
        #: ``io_uring_enter`` calls in a row answered EAGAIN/EBUSY with nothing reaped.
        self._stalls = 0
        #: Reads (``user_data``) to cancel with the next submission.
        self._cancels: list[int] = []
        #: An operation is under way; still set after it, an exception escaped it.
        self._busy = False
        #: Stopped for good (``_stop``): every read reaped, or kept; nothing more is submitted.
        self._settled = False
        #: When ``_stop`` gives up waiting for the kernel (set when it starts).
        self._deadline: float | None = None
        #: Reads a cancel request was submitted for while stopping.
        self._asked: set[int] = set()
        self._poller: select.poll | None = None

    def _map(self, size: int, offset: int) -> mmap.mmap:
        try:
            mapping = mmap.mmap(self.fd, size, mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                                mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        except OSError as exc:
            raise EngineUnavailable(f"mapping the io_uring rings failed: {exc.strerror}") from None
        self._maps.append(mapping)
        return mapping

    # -- submission ----------------------------------------------------------------------------

    def submit(self, read: Read) -> Ticket:
        """Queue ``read``; it reaches the kernel with the next batch, when a ticket is waited for
        (one ``io_uring_enter`` submits everything queued and reaps what completed)."""
        ticket = Ticket(self, read)
        if read.need <= 0:
            ticket.finished = True
            return ticket
        if self._settled or self._busy:  # stopped (or being stopped): nothing more goes in
            self._stopped(ticket, "O_DIRECT read" if read.direct else "read", force=True)
            return ticket
        self._queued.append(ticket)
        return ticket

    def withdraw(self, ticket: Ticket) -> bool:
        """Take ``ticket`` back if it has not reached the kernel (True). A read the kernel holds
        is cancelled (``IORING_OP_ASYNC_CANCEL``, with the next submission) and comes back read
        or unread (False); if unread, it is not submitted again."""
        if self._settled or self._busy:
            self._stop()  # an exception left the ring mid-operation: stop every read
            return False
        if ticket.finished:
            return False
        self._busy = True
        taken = not ticket.in_kernel
        if taken:
            self._queued.remove(ticket)
            ticket.cancelled = ticket.finished = True
        else:
            ticket.withdrawn = True
            self._cancels.append(ticket.user)
        self._busy = False
        return taken

    def flush(self) -> None:
        """Hand what is queued to the kernel now (as much as the ring takes), without waiting."""
        if self._settled or self._busy:
            return
        if (self._queued and len(self._flying) < self._capacity) or self._cancels:
            self._busy = True
            self._pump(wait=False)
            self._busy = False

    def wait(self, ticket: Ticket, timeout: float | None = None) -> None:
        """Drive the ring until ``ticket`` is finished; ``TimeoutError`` after ``timeout`` s."""
        if self._settled or self._busy:
            self._stop()  # then every ticket is finished, or lost
            self._stopped(ticket, "read", force=True)
            if ticket.lost and timeout is not None:
                raise WaitTimeout(f"the kernel still holds a read of {ticket.read.path}")
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        self.flush()  # submit the batch even when this ticket is already done
        self._busy = True
        while not ticket.finished:
            if not (self._flying or self._queued):
                raise AssertionError("a ticket neither queued nor in the kernel")
            self._pump(wait=True, deadline=deadline)
        self._busy = False

    def _push(self, ticket: Ticket) -> None:
        read = ticket.read
        length = min(read.length - ticket.arrived, MAX_REQUEST)
        user = self._next_id
        self._next_id += 1
        slot = self._tail & self._sq_mask
        # O_DIRECT reads go to io-wq workers: inline, the submitting thread would fault in and
        # zero every fresh destination page and wait for the device queue, one read after
        # another; the workers do that on every core (to_cpu 1.3-1.7 → 1.8-2.2 GB/s here,
        # docs/benchmarks.md). Buffered reads stay inline, where a cached page costs no thread.
        # After io-wq cancelled it (no worker thread could be started), the kernel tries the
        # read inline first: an O_DIRECT read then needs no worker at all on most devices.
        flags = IOSQE_ASYNC if read.direct and not ticket.inline else 0
        _SQE.pack_into(self._sqes, slot * _SQE.size, IORING_OP_READ, flags, 0, read.fd,
                       read.offset + ticket.arrived, read.address + ticket.arrived, length, 0,
                       user, 0, 0, 0, 0, 0)
        # In flight before the kernel can see it: whatever interrupts us, no read the kernel
        # holds is missing from ``_flying``.
        ticket.user = user
        self._flying[user] = ticket
        ticket.in_kernel = True
        self._tail = (self._tail + 1) & _MASK

    def _push_cancel(self, user: int) -> None:
        """Queue a request to cancel the read submitted as ``user``."""
        slot = self._tail & self._sq_mask
        _SQE.pack_into(self._sqes, slot * _SQE.size, IORING_OP_ASYNC_CANCEL, 0, 0, -1, 0, user,
                       0, 0, CANCEL, 0, 0, 0, 0, 0)
        self._tail = (self._tail + 1) & _MASK

    def _sq_free(self) -> int:
        return self._sq_entries - ((self._tail - _U32.unpack_from(self._sq, self._sq_head)[0])
                                   & _MASK)

    def _pump(self, wait: bool, deadline: float | None = None) -> None:
        """Hand queued reads to the kernel (as many as fit), optionally wait for one completion
        (until ``deadline``, then ``TimeoutError``), then reap everything that completed."""
        if self._pause:
            pause = self._pause
            if deadline is not None:
                pause = max(0.0, min(pause, deadline - time.monotonic()))
            time.sleep(pause)  # reads in the kernel go on meanwhile
            self._pause = 0.0
        while self._cancels and self._sq_free() > 0:
            self._push_cancel(self._cancels.pop())
        while self._queued and len(self._flying) < self._capacity:
            self._push(self._queued.popleft())
        _U32.pack_into(self._sq, self._sq_tail, self._tail)
        unsubmitted = (self._tail - _U32.unpack_from(self._sq, self._sq_head)[0]) & _MASK
        wait = wait and bool(self._flying)
        # With a deadline, nothing blocks in the kernel: the ring's descriptor is polled below.
        block = wait and deadline is None
        if unsubmitted or wait:
            try:
                enter(self.fd, unsubmitted, 1 if block else 0,
                      IORING_ENTER_GETEVENTS if wait else 0)
                self._stalls = 0
            except InterruptedError:
                pass  # a signal: whatever completed is reaped below, the caller asks again
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                    raise ReadError(f"io_uring_enter failed: {exc.strerror or exc}",
                                    path=None) from exc
                # The kernel is short of resources: reap to make room, the caller asks again
                # (after a pause, and only so many times in a row if nothing completes).
                if self._reap() > 0:
                    self._stalls = 0  # completions made room
                    return
                self._stalls += 1
                if self._stalls >= retry.ATTEMPTS:
                    raise ReadError(f"io_uring_enter failed: {exc.strerror or exc} "
                                    f"({retry.name(exc.errno)}) {self._stalls} times in a row "
                                    f"with nothing completing ({unsubmitted} reads to submit, "
                                    f"{len(self._flying)} in flight); if this persists, load "
                                    "with engine='threads'", path=None) from exc
                self._pause = max(self._pause, retry.pause(self._stalls))
                return
        if self._reap() == 0 and wait and not block:
            self._poll(deadline)  # type: ignore[arg-type]

    def _poll(self, deadline: float) -> None:
        """Sleep until a completion may be posted, at most until ``deadline`` (then
        ``TimeoutError``); the next ``io_uring_enter`` collects it."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise WaitTimeout("io_uring reads did not complete in time")
        if self._poller is None:
            self._poller = select.poll()
            self._poller.register(self.fd, select.POLLIN)
        self._poller.poll(max(1, int(min(left, 0.05) * 1000)))

    # -- completion ----------------------------------------------------------------------------

    def _reap(self) -> int:
        """Handle every completion posted; returns how many there were."""
        head = _U32.unpack_from(self._cq, self._cq_head)[0]
        tail = _U32.unpack_from(self._cq, self._cq_tail)[0]
        count = (tail - head) & _MASK
        while head != tail:
            user, result, _ = _CQE.unpack_from(self._cq, self._cqes
                                               + (head & self._cq_mask) * _CQE.size)
            head = (head + 1) & _MASK
            # Taken off the queue before it is handled: an exception below cannot make the
            # next reap handle it again.
            _U32.pack_into(self._cq, self._cq_head, head)
            ticket = self._flying.pop(user, None)
            if ticket is None:
                continue  # a cancel request's own answer
            ticket.in_kernel = False
            self._complete(ticket, result)
        return count

    def _complete(self, ticket: Ticket, result: int) -> None:
        read = ticket.read
        offset = read.offset + ticket.arrived
        length = min(read.length - ticket.arrived, MAX_REQUEST)
        result = completed(read.fd, offset, length, result)
        kind = "O_DIRECT read" if read.direct else "read"
        if result < 0 and retry.transient(-result):
            return self._again(ticket, -result, kind, length, offset)  # nothing was read
        if result < 0:
            return self._fail(ticket, ReadError(
                f"{kind} of {length} bytes at offset {offset} failed: {os.strerror(-result)}",
                path=read.path))
        reached = ticket.arrived + result
        if reached >= read.need:
            ticket.arrived = reached
            ticket.finished = True
            if read.then is not None:
                read.then()
            return
        # The next piece must start on a block boundary again: keep whole blocks only. Nothing
        # more than a partial block past an aligned offset means the file ended there.
        kept = reached // read.block * read.block
        if kept <= ticket.arrived:
            size = retry.file_size(read.fd)
            if size >= read.offset + read.need:  # long enough: a hiccup, not the end
                return self._again(ticket, retry.NOTHING, kind, length, offset, size)
            return self._fail(ticket, ReadError(
                f"file ended at offset {read.offset + reached} while reading up to "
                f"{read.offset + read.need}; it was truncated during the load", path=read.path))
        ticket.arrived = kept
        ticket.attempts.progressed()
        if not self._stopped(ticket, kind):
            self._queued.appendleft(ticket)  # the rest, from where it stopped

    def _stopped(self, ticket: Ticket, kind: str, force: bool = False) -> bool:
        """Did the load stop ``ticket`` (``cancel()``, ``close()``; ``force``: it is being
        stopped now)? Then what is left of it stays unread: it is never submitted again,
        whatever the kernel answered."""
        if ticket.finished:
            return True
        if not (self._closing or ticket.withdrawn or force):
            return False
        ticket.in_kernel = False
        read = ticket.read
        ticket.cancelled = True
        self._fail(ticket, ReadError(
            f"{kind} of {read.length - ticket.arrived} bytes at offset "
            f"{read.offset + ticket.arrived} "
            "was withdrawn: the load stopped", path=read.path))
        return True

    def _again(self, ticket: Ticket, code: int, kind: str, length: int, offset: int,
               size: int | None = None) -> None:
        """``ticket``'s read came back with nothing read (``code``): submit it again, after a
        pause once it happened twice in a row, up to ``retry.ATTEMPTS`` times in a row."""
        read = ticket.read
        if self._stopped(ticket, kind):
            return
        try:
            pause = ticket.attempts.failed(code, kind, length, offset, read.path, size)
        except ReadError as exc:
            return self._fail(ticket, exc)
        if code == errno.ECANCELED:
            ticket.inline = True
        self._pause = max(self._pause, pause)
        self._queued.appendleft(ticket)

    @staticmethod
    def _fail(ticket: Ticket, error: ReadError) -> None:
        ticket.error = error
        ticket.finished = True

    # -- teardown ------------------------------------------------------------------------------

    def close(self) -> None:
        """Withdraw queued reads, cancel and reap every read in the kernel, then unmap and close
        the ring. Nothing lands in memory after this returns that is not kept alive for good
        (``retry.keep``, after ``retry.SETTLE`` seconds), even if interrupted meanwhile."""
        try:
            self._stop()
        finally:
            self._release()

    def _stop(self) -> None:
        """Stop every read for good, whatever state an interrupt left the bookkeeping in (see
        the module's docstring); an interrupt that arrives meanwhile is raised afterwards."""
        if self._deadline is None:
            self._deadline = time.monotonic() + retry.SETTLE
        self._closing = True  # reads coming back unread are not submitted again
        interrupted: BaseException | None = None
        while not self._settled:
            try:
                self._stop_round()
            except BaseException as exc:  # e.g. a second Ctrl-C: finish reaping first
                interrupted = interrupted or exc
        self._busy = False
        if interrupted is not None:
            raise interrupted

    def _stop_round(self) -> None:
        """One round of ``_stop``: it ends at the deadline whatever the rounds before raised."""
        if time.monotonic() >= self._deadline:  # type: ignore[operator]
            return self._give_up(f"still in the kernel {retry.SETTLE:g} s after it was cancelled")
        while self._queued:
            self._stopped(self._queued.popleft(), "read", force=True)
        self._cancels.clear()
        self._take_back()
        self._reap()
        if self._in_kernel() == 0:
            for ticket in list(self._flying.values()):  # reaped while an exception was raised
                self._stopped(ticket, "read", force=True)
            self._flying.clear()
            self._settled = True
            return
        for user in list(self._flying):
            if user not in self._asked and self._sq_free() > 0:
                self._push_cancel(user)
                self._asked.add(user)
        _U32.pack_into(self._sq, self._sq_tail, self._tail)
        unsubmitted = (self._tail - _U32.unpack_from(self._sq, self._sq_head)[0]) & _MASK
        try:
            enter(self.fd, unsubmitted, 0, IORING_ENTER_GETEVENTS)
        except InterruptedError:
            return
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EBUSY):
                return self._give_up(f"io_uring_enter failed: {exc.strerror or exc}")
            time.sleep(retry.LONGEST)  # the kernel is short of resources: ask again
            return
        if self._reap() == 0 and self._in_kernel():
            try:
                self._poll(self._deadline)  # type: ignore[arg-type]
            except WaitTimeout:
                pass  # the next round gives up

    def _in_kernel(self) -> int:
        """Requests the kernel holds, by its own count: each one it took from the submission
        queue posts exactly one completion."""
        return (_U32.unpack_from(self._sq, self._sq_head)[0]
                - _U32.unpack_from(self._cq, self._cq_tail)[0]) & _MASK

    def _take_back(self) -> None:
        """Withdraw the requests queued in the ring that the kernel has not taken yet."""
        head = _U32.unpack_from(self._sq, self._sq_head)[0]
        position = head
        while position != self._tail:
            at = (position & self._sq_mask) * _SQE.size
            if self._sqes[at] == IORING_OP_ASYNC_CANCEL:
                self._asked.discard(_U64.unpack_from(self._sqes, at + _SQE_ADDR)[0])
            else:
                ticket = self._flying.pop(_U64.unpack_from(self._sqes, at + _SQE_USER)[0], None)
                if ticket is not None:
                    self._stopped(ticket, "read", force=True)
            position = (position + 1) & _MASK
        self._tail = head
        _U32.pack_into(self._sq, self._sq_tail, self._tail)

    def _give_up(self, why: str) -> None:
        """Stop waiting for the reads the kernel still holds: keep their memory for good."""
        self._settled = True
        lost = list(self._flying.values())
        for ticket in lost:
            retry.keep(ticket.read.owner)
            ticket.lost = ticket.finished = True
            ticket.error = ReadError(
                f"read of {ticket.read.length} bytes at offset {ticket.read.offset}: {why}; "
                "its memory is kept for the rest of the process", path=ticket.read.path)
        self._flying.clear()
        if lost:
            warnings.warn(f"{len(lost)} io_uring read(s) {why} ({lost[0].read.path}); their "
                          "memory is kept for the rest of the process", RuntimeWarning,
                          stacklevel=2)

    def _release(self) -> None:
        for ticket in self._flying.values():  # only if stopping was cut short: keep it all
            retry.keep(ticket.read.owner)
        self._poller = None
        for mapping in self._maps:
            mapping.close()
        self._maps = []
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    @property
    def in_flight(self) -> int:
        """Reads the kernel holds right now."""
        return len(self._flying)
