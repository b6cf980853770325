"""Descriptor limits: how many files a checkpoint may hold open, and what to say when it cannot.

Llama-3.1-405B ships 191 shards and DeepSeek-V3 163; a container or a multi-process server may
leave a process a soft limit (``ulimit -n``) of 1024 or less. When a checkpoint is resolved
(``reserve``), the soft limit is raised toward the hard one if it leaves too few descriptors
free for every shard to be open, as Go's runtime and vLLM do at start; where even the hard
limit is too low, the shards share a bounded set of descriptors (``POOL``, a ``Pool``). A load that
cannot run at all, and any open that fails with EMFILE or ENFILE, raises an error that names the
limit and how to raise it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CheckpointError, WeightliftError

log = logging.getLogger("weightlift")

#: Descriptors one shard may want open during a load: its buffered one, an O_DIRECT one and,
#: for a partly cached file read with O_DIRECT, a buffered one that starts no read-ahead.
PER_SHARD = 3
#: Fewest descriptors a load can work with: one shard's, and one to spare.
MIN_CAPACITY = PER_SHARD + 1
#: Descriptors left to the rest of the program (its sockets, logs, imports) at least.
MIN_HEADROOM = 4
#: The bound where the soft limit is unlimited (the kernel's own cap, ``fs.nr_open``, by default).
UNBOUNDED = 1 << 20
#: ``(errno, ...)`` of an open refused for want of descriptors: the process's or the system's.
LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)
#: How long an open refused for want of descriptors waits, with none of ours idle to close, for
#: one to be unpinned or for the rest of the program (a sampling thread reading /proc, a log
#: file) to close its own, before the refusal is final: (seconds per wait, waits).
LIMIT_WAIT = (0.02, 100)


def open_count() -> int:
    """Descriptors this process has open now."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own descriptor
    except OSError as exc:
        if exc.errno in LIMIT_ERRNOS:
            return resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # every one is taken
        return 0  # no /proc: nothing known, the limit alone decides


def headroom(soft: int) -> int:
    """Descriptors left free for the rest of the program under a soft limit of ``soft``."""
    return max(MIN_HEADROOM, soft // 8)


def _shown(limit: int) -> str:
    return "unlimited" if limit == resource.RLIM_INFINITY else str(limit)


def advice(wanted: int) -> str:
    """How to give a process ``wanted`` descriptors, in the places people set it."""
    return (f"raise the limit to at least {wanted}: `ulimit -n {wanted}` in the shell that starts "
            f"it, LimitNOFILE={wanted} in a systemd unit, or `docker run --ulimit "
            f"nofile={wanted}:{wanted}`")


@dataclass(frozen=True)
class Room:
    """What ``reserve`` found and did for a checkpoint of ``files`` local files."""

    files: int
    #: Descriptors the shards may hold open at once.
    capacity: int
    #: Why shards will be re-opened during loads, or the soft limit was raised (None: neither).
    note: str | None = None


def wanted_limit(files: int, held: int, others: int) -> int:
    """The soft limit under which ``files`` shards (with ``held`` descriptors of other
    checkpoints' shards, ``others`` of the rest of the program) all stay open: ``reserve`` raises
    a lower one toward it."""
    need = PER_SHARD * files + held
    return others + need + max(MIN_HEADROOM, (others + need) // 4)


def reserve(files: int, held: int, root: str) -> Room:
    """Make room at resolve for ``files`` shards (``held``: descriptors shards of other open
    checkpoints hold now): raise the soft limit where it leaves too few free and the hard one
    allows it, then size the bounded set of descriptors. ``CheckpointError`` where not even one
    shard's descriptors fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    others = max(0, open_count() - held)  # the program's own descriptors, not our shards'
    wanted = wanted_limit(files, held, others)
    note = None
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = _raise_soft_limit(wanted, soft, hard)
        if raised > soft:
            note = (f"the soft descriptor limit ({soft}) left too few free for the {files} files "
                    f"of the checkpoint; raised it to {raised} (hard limit {_shown(hard)})")
            log.debug("%s: %s", root, note)
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return Room(files, UNBOUNDED, note)
    capacity = soft - others - headroom(soft)
    if capacity < MIN_CAPACITY:
        raise CheckpointError(f"the descriptor limit is too low to load it: soft {soft}, hard "
                              f"{_shown(hard)}, with {others} already open, leaves fewer than "
                              f"{MIN_CAPACITY} for its {files} file{'s' if files != 1 else ''}; "
                              f"{advice(wanted)}", path=root)
    if capacity < PER_SHARD * files:
        bounded = (f"the descriptor limit (soft {soft}, hard {_shown(hard)}) leaves room for "
                   f"{capacity} open files, fewer than the {files} files of the checkpoint may "
                   "want: files are closed and re-opened during the load, each checked to be "
                   f"the file whose header was read; to keep them open, {advice(wanted)}")
        note = bounded if note is None else f"{note}; {bounded}"
    return Room(files, max(capacity, MIN_CAPACITY), note)


def _raise_soft_limit(wanted: int, soft: int, hard: int) -> int:
    """Raise the soft limit toward ``wanted`` (at most the hard limit); the soft limit now."""
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    try:
        with open("/proc/sys/fs/nr_open") as f:  # above it setrlimit fails even unlimited
            target = min(target, int(f.read()))
    except (OSError, ValueError):
        pass
    if target <= soft:
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft
    return target


def limit_error(error: type[WeightliftError], path: str, exc: OSError) -> WeightliftError:
    """The error for an open that failed with EMFILE/ENFILE: which limit and how to raise it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if exc.errno == errno.ENFILE:
        return error("cannot open: the system's limit on open files is reached (ENFILE); "
                     "close files elsewhere or raise fs.file-max (sysctl)", path=path)
    wanted = max(2 * soft, 1024) if soft != resource.RLIM_INFINITY else 1024
    return error(f"cannot open: too many open files (the descriptor limit is soft {soft}, hard "
                 f"{_shown(hard)}, and {open_count()} are open); {advice(wanted)}", path=path)


def is_limit(exc: OSError) -> bool:
    return exc.errno in LIMIT_ERRNOS


class Pool:
    """The descriptors shards hold, at most ``capacity`` of them open at once.

    A descriptor is *pinned* while anything uses it (a read in flight, on a worker thread or in
    the kernel through io_uring, or a step such as ``fadvise``) and is never closed while it is:
    the kernel gives a closed number to the next file opened, and a read still aimed at it would
    then read another file. Unpinned descriptors stay open, least recently used first to close
    when room is needed, so a checkpoint within the limit keeps every file open as before.
    Pins may exceed ``capacity`` (a load pins what its reads in flight need); loads ask ``room``
    before pinning more than one shard ahead.

        fd = POOL.pin(shard, "plain", opener)   # opened (or kept open) and held:
                                                # opener(kind, opened) appends what it opens
        ...                                     # reads on fd
        POOL.unpin(shard, "plain")              # may close it now, or later when room is needed

    A pin may carry a ``token`` (any object): pinning or unpinning with the same token again
    changes nothing, so a load that records its tokens before pinning can release them all once
    in a ``finally``, whatever point an interrupt came at.
    """

    def __init__(self, capacity: int | None = None) -> None:
        self._lock = threading.Lock()
        #: Notified whenever a descriptor is unpinned or closed (room may have appeared).
        self._freed = threading.Condition(self._lock)
        self._open: dict[tuple[int, str], _Held] = {}
        #: id(owner) → kinds it has open, so closing a shard looks only at its own.
        self._kinds: dict[int, set[str]] = {}
        #: Unpinned descriptors, least recently used first. Only these are ever closed to make
        #: room; every other open one counts as pinned. An interrupt inside ``pin`` or ``unpin``
        #: (Python has no atomic section) can leave one unpinned but not here: it stays open,
        #: counted pinned, until its shard closes or it is pinned and unpinned again — never
        #: the reverse, a pinned descriptor here, which could be closed under a read.
        self._idle: OrderedDict[tuple[int, str], _Held] = OrderedDict()
        self.capacity = capacity
        #: Descriptors opened since the process started (re-opens included).
        self.opens = 0

    @property
    def held(self) -> int:
        """Descriptors open now."""
        return len(self._open)

    def _limit(self) -> int:
        if self.capacity is None:  # no checkpoint resolved yet: what the limit leaves now
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            if soft == resource.RLIM_INFINITY:
                self.capacity = UNBOUNDED
            else:
                self.capacity = max(MIN_CAPACITY, soft - open_count() - headroom(soft))
        return self.capacity

    def pin(self, owner: object, kind: str, opener: Callable[[str, list[int]], int],
            token: object = None) -> int:
        """``owner``'s descriptor of ``kind``, held until ``unpin``; ``opener(kind, opened)``
        opens it when it is not open, appending the descriptor to ``opened`` as ``open`` returns
        it (from C: ``opened.extend(map(os.open, ...))``), and returns it (an ``OSError`` it
        raises propagates, EMFILE after idle descriptors were closed to make room). An interrupt
        (a signal's handler raising) anywhere before the pool lists it finds it in ``opened`` and
        closes it. ``token``: see the class docstring."""
        key = (id(owner), kind)
        opened: list[int] = []
        with self._lock:
            try:
                held = self._open.get(key)
                if held is not None and held.fd < 0:  # a close an interrupt cut short: finish it
                    self._close(key)
                    held = None
                if held is None:
                    self._shrink(self._limit() - 1)
                    # Not opened if, while the open waited out EMFILE, another thread opened it.
                    self._opening(lambda: _recorded(opener, kind, opened),
                                  lambda: key not in self._open)
                    held = self._open.get(key)
                    if held is None:
                        held = self._keep(key, owner, opened[0])
                self._idle.pop(key, None)  # before the pin: never pinned and idle
                if token is None:
                    held.count += 1
                else:
                    held.tokens.add(token)
                return held.fd
            except BaseException:
                if opened and all(held.fd != opened[0] for held in self._open.values()):
                    close_all(opened)
                raise

    def adopt(self, owner: object, kind: str, fd: int) -> None:
        """Keep ``fd`` (opened by the caller, unpinned) as ``owner``'s descriptor of ``kind``."""
        key = (id(owner), kind)
        with self._lock:
            if key in self._open:
                raise AssertionError(f"{kind} descriptor adopted twice")
            self._shrink(self._limit() - 1)
            self._keep(key, owner, fd, idle=True)

    def _keep(self, key: tuple[int, str], owner: object, fd: int, idle: bool = False) -> _Held:
        """Under the lock: list ``fd`` as ``owner``'s. Its three records are written with no
        call between them (after a call is where a signal's handler can raise): an interrupt
        leaves either all or none, so ``holds(fd)`` tells the opener whether to close it."""
        held = _Held(owner, fd)
        kinds = self._kinds.setdefault(key[0], set())
        kinds |= {key[1]}
        self._open[key] = held
        if idle:
            self._idle[key] = held
        return held

    def holds(self, fd: int) -> bool:
        """Whether ``fd`` is one of the pool's descriptors."""
        with self._lock:
            return any(held.fd == fd for held in self._open.values())

    def opening(self, opener: Callable[[], int]) -> int:
        """``opener()`` (a caller's own open), retried after closing an idle descriptor when it
        fails with EMFILE/ENFILE while some are idle."""
        with self._lock:
            self._shrink(self._limit() - 1)
            return self._opening(opener)

    def _opening(self, opener: Callable[[], int],
                 needed: Callable[[], bool] = lambda: True) -> int:
        """``opener()`` under the lock. Refused for want of descriptors, it closes an idle one
        and tries again; with none idle, the refusal is transient as long as descriptors are
        pinned by reads in flight or held for a moment by the rest of the program, so it waits
        (the lock released) for one to be freed, a bounded time, before the error is final.
        After a wait, nothing is opened (-1) if ``needed()`` says no more."""
        pause, waits = LIMIT_WAIT
        while True:
            if not needed():
                return -1
            try:
                fd = opener()
            except OSError as exc:
                if exc.errno not in LIMIT_ERRNOS:
                    raise
                if self._idle:
                    self._close(next(iter(self._idle)))
                    continue
                if waits <= 0:
                    raise
                waits -= 1
                self._freed.wait(pause)
                continue
            self.opens += 1
            return fd

    def unpin(self, owner: object, kind: str, token: object = None) -> None:
        """Undo a ``pin``; with a ``token`` it no longer holds, nothing happens."""
        key = (id(owner), kind)
        with self._lock:
            held = self._open.get(key)
            if token is not None:
                if held is None or token not in held.tokens:
                    return
                held.tokens.discard(token)
            elif held is None or held.count <= 0:
                raise AssertionError(f"{kind} descriptor unpinned more often than pinned")
            else:
                held.count -= 1
            if held.pins:
                return
            self._idle[key] = held
            self._freed.notify_all()
            if held.released:
                self._close(key)
            else:
                self._shrink(self._limit())

    def descriptor(self, owner: object, kind: str) -> int:
        """The pinned descriptor of ``kind``; only valid between ``pin`` and ``unpin``."""
        held = self._open.get((id(owner), kind))
        if held is None or held.pins <= 0:
            raise AssertionError(f"{kind} descriptor used without being pinned")
        return held.fd

    def room(self, wanted: int) -> bool:
        """Whether ``wanted`` more descriptors can be pinned within ``capacity``."""
        return len(self._open) - len(self._idle) + wanted <= self._limit()

    def is_pinned(self, owner: object, kind: str) -> bool:
        held = self._open.get((id(owner), kind))
        return held is not None and held.pins > 0

    def release(self, owner: object, kinds: tuple[str, ...] | None = None) -> None:
        """Close ``owner``'s descriptors (of ``kinds``, default all); pinned ones close when
        their last pin goes."""
        with self._lock:
            present = self._kinds.get(id(owner), set())
            for kind in list(present if kinds is None else present.intersection(kinds)):
                held = self._open[(id(owner), kind)]
                if held.pins:
                    held.released = True
                else:
                    self._close((id(owner), kind))

    def has_open(self, owner: object) -> bool:
        with self._lock:
            return bool(self._kinds.get(id(owner)))

    def _shrink(self, size: int) -> None:
        while len(self._open) > size and self._idle:
            self._close(next(iter(self._idle)))

    def _close(self, key: tuple[int, str]) -> None:
        # A signal's handler can raise only after a call returns: the descriptor is marked
        # closed before ``os.close`` and forgotten after it with no call, so an interrupt there
        # leaves it listed as closed, and closing it again (``Layout.close`` does) forgets it
        # without closing a number the kernel may have given to another file since.
        held = self._open[key]
        fd, held.fd = held.fd, -1
        if fd >= 0:
            os.close(fd)
        del self._open[key]
        if key in self._idle:
            del self._idle[key]
        kinds = self._kinds[key[0]]
        kinds -= {key[1]}
        if not kinds:
            del self._kinds[key[0]]


@dataclass(eq=False)
class _Held:
    owner: object  # keeps ``id(owner)`` from being reused while its descriptor is open
    fd: int
    #: Pins without a token, and the tokens of the others.
    count: int = 0
    tokens: set[object] = field(default_factory=set)
    released: bool = False

    @property
    def pins(self) -> int:
        return self.count + len(self.tokens)


#: The descriptors every local shard of this process holds.
POOL = Pool()



def _recorded(opener: Callable[[str, list[int]], int], kind: str, opened: list[int]) -> int:
    """``opener(kind, opened)``; the descriptor recorded in ``opened`` if the opener did not
    record it itself."""
    fd = opener(kind, opened)
    if not opened:
        opened.append(fd)
    return fd


def close_all(opened: list[int]) -> None:
    """Close every descriptor in ``opened`` and empty it, with no Python code between the closes
    and the emptying (where a signal's handler could raise): the slice assignment runs the
    closes in C while it builds its (empty) value. Neither lost nor closed twice."""
    opened[:] = filter(None, map(os.close, opened))

__all__ = ["POOL", "Pool", "MIN_CAPACITY", "PER_SHARD", "Room", "advice", "is_limit",
           "limit_error", "open_count", "reserve"]
