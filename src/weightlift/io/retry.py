"""Answers from the kernel that mean "nothing was done, ask again", and how often to ask; and
how a load stops what it started when an interrupt lands (``SETTLE``, ``guarded``, ``stop_pool``).

A read the kernel gave up on before reading anything is not an I/O error. Programs that use
interval timers, profilers or child processes deliver signals all the time, and a busy machine
stretches every window in which one can land, so each engine and strategy resubmits such a read,
from where it stopped, up to ``ATTEMPTS`` times in a row with a short pause that doubles each time;
only then does a ``ReadError`` say what happened (file, offset, length, errno name, attempts).

    attempts = Attempts()
    while done < len(buf):
        try:
            n = os.preadv(fd, [buf[done:]], offset + done)
        except OSError as exc:
            if not transient(exc.errno):
                raise
            # Raises ReadError once ATTEMPTS tries in a row did nothing.
            time.sleep(attempts.failed(exc.errno, "read", len(buf) - done, offset + done, path))
            continue
        attempts.progressed()
        done += n
"""

from __future__ import annotations

import errno
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import thread as executor_threads

from ..errors import ReadError

#: errno → (name, what it means here). The ``ERESTART*`` values are the kernel's own and should
#: never reach user space; they are here in case a kernel lets one through in a completion.
TRANSIENT: dict[int, tuple[str, str]] = {
    errno.EINTR: ("EINTR", "a signal arrived before any byte was read"),
    errno.EAGAIN: ("EAGAIN", "the kernel was short of a resource for the moment"),
    errno.ECANCELED: ("ECANCELED", "io_uring could not start a kernel worker thread for the "
                      "read (it cannot while a signal is pending on a busy machine, or at the "
                      "RLIMIT_NPROC process limit) and cancelled it"),
    512: ("ERESTARTSYS", "a signal interrupted the read inside the kernel"),
    513: ("ERESTARTNOINTR", "a signal interrupted the read inside the kernel"),
    514: ("ERESTARTNOHAND", "a signal interrupted the read inside the kernel"),
    516: ("ERESTART_RESTARTBLOCK", "a signal interrupted the read inside the kernel"),
}
#: A read that returned no byte before the end of the file (``0``, or less than one O_DIRECT
#: block) although the file is long enough: asked again like the errors above.
NOTHING = 0
#: Tries in a row that did nothing before giving up (progress starts the count again).
ATTEMPTS = 12
#: The second try goes at once; the pause before the third, doubling before each one after that,
#: up to ``LONGEST`` (12 tries wait ~0.26 s in all).
FIRST_PAUSE = 0.001
LONGEST = 0.05
#: Seconds a read the load stopped (interrupted, failed, abandoned) may take to come back: a
#: cancelled io_uring read, a blocking preadv on a worker thread. Beyond it the load gives up
#: waiting and keeps the read's memory for good (``keep``) instead of freeing it under the kernel.
SETTLE = 10.0
#: Memory of reads that never came back within ``SETTLE``: never freed while the process lives.
KEPT: list[object] = []


def keep(memory: object) -> None:
    """Keep ``memory`` (a buffer a read may still write into) alive for the rest of the process."""
    if memory is not None:
        KEPT.append(memory)


def guarded(fn: Callable[..., object], *args: object) -> None:
    """``fn(*args)`` as a finalizer (``weakref.finalize(obj, guarded, fn, ...)``).

    Python prints and drops an exception raised in a finalizer, so a Ctrl-C whose handler runs
    while one does (unmapping a large buffer takes a while) would be lost, and so would the
    ``SystemExit`` of a SIGTERM handler. Such an interrupt is sent to the main thread again (the
    signal whose Python handler raises it) once the finalizer is over."""
    try:
        fn(*args)
    except (KeyboardInterrupt, SystemExit) as exc:
        again = signal.SIGINT if isinstance(exc, KeyboardInterrupt) else signal.SIGTERM
        if callable(signal.getsignal(again)):
            # From another thread, a moment later: a handler run right now would run inside
            # this finalizer again.
            timer = threading.Timer(0.05, signal.pthread_kill,
                                    (threading.main_thread().ident, again))
            timer.daemon = True
            timer.start()


def transient(code: int | None) -> bool:
    """Does ``errno`` ``code`` mean that nothing was done and asking again may work?"""
    return code in TRANSIENT


def name(code: int) -> str:
    """``ECANCELED`` for 125: the errno's symbolic name (the kernel's own for ``ERESTART*``)."""
    if code in TRANSIENT:
        return TRANSIENT[code][0]
    return errno.errorcode.get(code, str(code))


def file_size(fd: int) -> int:
    """The size of ``fd``'s file now (0 when it cannot be told)."""
    try:
        return os.fstat(fd).st_size
    except OSError:
        return 0


def pause(failures: int) -> float:
    """Seconds to wait after ``failures`` tries in a row did nothing: none after the first."""
    if failures <= 1:
        return 0.0
    return min(FIRST_PAUSE * 2 ** (failures - 2), LONGEST)


class Attempts:
    """Tries in a row at one read that did nothing.

    ``failed`` counts one and returns how long to wait before the next (0 before the second);
    once ``ATTEMPTS`` have failed it raises a ``ReadError`` saying what happened instead.
    ``progressed`` starts the count again (a short read that brought bytes is progress).
    """

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    def failed(self, code: int, kind: str, length: int, offset: int, path: str | None,
               size: int | None = None) -> float:
        """``code``: the errno, or ``NOTHING`` (then ``size`` is the file's size); ``kind``,
        ``length``, ``offset``: the read that did nothing (``"O_DIRECT read"``, 4096, 0)."""
        self.count += 1
        if self.count >= ATTEMPTS:
            raise ReadError(gave_up(code, kind, length, offset, self.count, size), path=path)
        return pause(self.count)

    def progressed(self) -> None:
        self.count = 0


def gave_up(code: int, kind: str, length: int, offset: int, attempts: int,
            size: int | None = None) -> str:
    """The message of the ``ReadError`` once ``attempts`` tries of a read did nothing."""
    what = f"{kind} of {length} bytes at offset {offset}"
    if code == NOTHING:
        return (f"{what}: the file ended at offset {offset} {attempts} times in a row, though it "
                f"is {size} bytes long; gave up after {attempts} attempts (the file system "
                "keeps answering a read inside the file with no data)")
    label, meaning = TRANSIENT.get(code, (name(code), os.strerror(code)))
    advice = ("; if this persists, load with engine='threads'" if code == errno.ECANCELED
              else "")
    return (f"{what} failed: {os.strerror(code)} ({label}: {meaning}) {attempts} times in a row; "
            f"gave up after {attempts} attempts{advice}")


#: The signals whose Python handlers interrupt a load (Ctrl-C; a SIGTERM handler raising).
INTERRUPTS = {signal.SIGINT, signal.SIGTERM}


def leave_interrupts_to_the_main_thread() -> None:
    """A worker thread's initializer: block ``INTERRUPTS`` in this thread, so that the kernel
    gives them to the main thread, the one whose Python handler raises. A process-directed
    signal goes to any thread that does not block it; taken by a worker, it only marks the
    handler as due, and a main thread asleep in a lock (``Thread.start`` waiting for a new
    worker, a future's result) sleeps on: the real-signal test saw such a main thread wait in
    ``Thread.start`` for good, the signal taken, none pending. Delivered to the main thread, it
    ends that sleep (EINTR) and the handler runs."""
    try:
        signal.pthread_sigmask(signal.SIG_BLOCK, INTERRUPTS)
    except (AttributeError, OSError, ValueError):
        pass  # a platform without per-thread masks: the old behaviour


def interrupt_of(exc: BaseException) -> BaseException:
    """The interrupt behind ``exc``, else ``exc``. A Ctrl-C (or a SIGTERM handler's
    ``SystemExit``) that lands while a ``threading.Condition`` takes its lock back after a wait
    (``Future.result``, ``Thread.start``) surfaces in CPython as ``RuntimeError: release unlocked
    lock``, with the interrupt as its context: the caller must see the interrupt."""
    context = exc.__context__
    if isinstance(exc, RuntimeError) and context is not None and not isinstance(context,
                                                                                Exception):
        return context
    return exc


def forget_threads(pool: ThreadPoolExecutor) -> None:
    """Take the joined worker threads of ``pool`` out of the standard library's weak registries
    (``threading._dangling``, ``concurrent.futures.thread._threads_queues``), whose callbacks
    are Python code run wherever a thread object dies: an interrupt whose handler ran there
    would be printed and dropped (found by the real-signal test: a lost SIGINT on the thread
    engine). Taken out here, in ordinary code, nothing runs when the engine is freed."""
    queues = getattr(executor_threads, "_threads_queues", None)
    dangling = getattr(threading, "_dangling", None)
    for thread in list(getattr(pool, "_threads", ())):
        if queues is not None:
            queues.pop(thread, None)
        if dangling is not None:
            dangling.discard(thread)


def shut_down(pool: ThreadPoolExecutor, cancel: bool = True) -> BaseException | None:
    """``pool.shutdown(wait=False, cancel_futures=cancel)``, done even if an interrupt lands in
    it (after the queue is drained, before the wake-up its idle workers wait for, they would
    wait for good); the interrupt is returned. Asking again is harmless."""
    interrupted: BaseException | None = None
    for _ in range(100):
        try:
            pool.shutdown(wait=False, cancel_futures=cancel)
            return interrupted
        except BaseException as exc:
            interrupted = interrupted or interrupt_of(exc)
    return interrupted


#: How long one ``Thread.join`` in ``join_workers`` waits before it looks again.
JOIN_STEP = 0.05


def join_workers(pool: ThreadPoolExecutor, seconds: float) -> BaseException | None:
    """Wait, at most ``seconds``, for the workers of ``pool`` (shut down, idle) to end; return
    an interrupt that came meanwhile (the caller raises it once they have).

    Not ``pool.shutdown(wait=True)`` alone: CPython 3.11's ``Thread.join`` takes the thread's
    lock and gives it back; an interrupt raised right after the take is handled (bpo-45274), but
    a second one (a second Ctrl-C) landing in that handler leaves the lock taken for good, and
    every later join of that thread waits forever (the real-signal test, 25 % of its signals
    sent twice, once hung so in ``ThreadPoolExecutor.shutdown`` with no worker left). So each
    join is short, and a thread ``threading.enumerate()`` no longer lists, having run its last
    Python code, counts as ended."""
    interrupted: BaseException | None = None
    deadline = time.monotonic() + seconds
    for thread in list(getattr(pool, "_threads", ())):
        while True:
            try:
                thread.join(JOIN_STEP)
                if (not thread.is_alive() or thread not in threading.enumerate()
                        or time.monotonic() > deadline):
                    break
            except BaseException as exc:
                interrupted = interrupted or interrupt_of(exc)
    return interrupted


def stop_pool(pool: ThreadPoolExecutor, seconds: float = SETTLE, cancel: bool = True
              ) -> BaseException | None:
    """Shut ``pool`` down (``cancel``: withdrawing what is queued), wait (at most ``seconds``)
    for its workers to finish what they run and end, and take them out of the standard
    library's registries; an interrupt meanwhile is returned once that is done
    (``shutdown(wait=True)``, safe against interrupts)."""
    stopped = shut_down(pool, cancel)
    late = join_workers(pool, seconds)
    forget_threads(pool)
    return stopped or late
