"""Measurement probes: page-cache residency, RSS, /proc/meminfo and memory cgroups.

Shared by ``LoadReport`` and the benchmark. Pure stdlib and Linux-only by nature; every probe
degrades to ``None`` / ``0`` / ``(False, reason)`` rather than raising where the machine can't
answer, because a measurement must never break a load.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import itertools
import os
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np

from .errors import ReadError

PAGE_SIZE = os.sysconf("SC_PAGESIZE")

# Kernel limits at or above this mean "no limit" (v1 reports PAGE_COUNTER_MAX * page size).
_UNLIMITED = 1 << 62

_PROT_READ = 0x1
_MAP_SHARED = 0x01
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mincore.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()
#: mincore's byte per page → its lowest bit (resident); the other bits are undefined.
_RESIDENT_BIT = bytes(value & 1 for value in range(256))
#: libc with mmap/munmap/mincore/madvise typed, for modules that map files themselves.
LIBC = _LIBC


# ---------------------------------------------------------------------------------------------
# Page cache and process memory


def resident_pages(fd: int) -> np.ndarray:
    """Per page of the open file ``fd``: is it in the page cache? (mincore on a fresh mapping.)

    Mapping the file does not fault any page in, so the probe does not disturb what it measures.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return np.zeros(0, dtype=bool)
    addr = _LIBC.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    try:
        vec = np.zeros((size + PAGE_SIZE - 1) // PAGE_SIZE, dtype=np.uint8)
        _residency(addr, 0, size, vec.ctypes.data)
    finally:
        _LIBC.munmap(addr, size)
    return (vec & 1).astype(bool)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("offset", ctypes.c_uint64), ("length", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


#: ``cachestat(2)``'s number, the same on every architecture (Linux 6.5).
_SYS_CACHESTAT = 451
_LIBC.syscall.restype = ctypes.c_long
#: False once the kernel said it has no ``cachestat`` (before 6.5): not asked again.
_cachestat_works = True


def cached_pages(fd: int, offset: int = 0, length: int = 0) -> int | None:
    """Pages of ``[offset, offset + length)`` of the open file ``fd`` (``length`` 0: to its
    end) in the page cache, counted by the kernel in one ``cachestat(2)`` call: exact, and
    cheaper than any mincore sample here (8 MiB: 7 µs, 64 MiB: 17-40 µs, 3 GB: 0.25 ms, against
    ~5 µs per mincore call). None where the kernel cannot say (before Linux 6.5, or refused
    for this file): the caller samples with mincore.

        cached_pages(fd) * PAGE_SIZE >= os.fstat(fd).st_size   # wholly cached
    """
    global _cachestat_works
    if not _cachestat_works:
        return None
    span, stat = _CachestatRange(offset, length), _Cachestat()
    if _LIBC.syscall(_SYS_CACHESTAT, ctypes.c_uint(fd), ctypes.byref(span), ctypes.byref(stat),
                     ctypes.c_uint(0)) != 0:
        if ctypes.get_errno() == errno.ENOSYS:
            _cachestat_works = False
        return None
    return int(stat.cache)


#: Up to this many pages a file's cached pages are counted whole by ``cachestat``; beyond,
#: in ``CACHESTAT_RUNS`` evenly spaced runs of ``CACHESTAT_RUN`` pages. Its cost is per page
#: cache entry: ~17 ns a 4 KiB page (a 64 MiB file read back from disk: 0.29 ms), far less
#: where the file sits in large folios, plus ~2 µs a call.
CACHESTAT_WHOLE = 4096
CACHESTAT_RUNS = 32
CACHESTAT_RUN = 32


def cached_sample(fd: int, size: int) -> tuple[int, int] | None:
    """(pages cached, pages asked about) of the open file ``fd`` of ``size`` bytes, from
    ``cachestat``: every page up to ``CACHESTAT_WHOLE`` pages, else evenly spaced runs (~0.1 ms
    at any size). None where the kernel cannot say."""
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    if pages <= CACHESTAT_WHOLE:
        counted = cached_pages(fd)
        return None if counted is None else (min(counted, pages), pages)
    hits = 0
    for i in range(CACHESTAT_RUNS):
        page = i * (pages - CACHESTAT_RUN) // (CACHESTAT_RUNS - 1)
        counted = cached_pages(fd, page * PAGE_SIZE, CACHESTAT_RUN * PAGE_SIZE)
        if counted is None:
            return None
        hits += counted
    return hits, CACHESTAT_RUNS * CACHESTAT_RUN


def sampled_resident_bytes(fd: int, samples: int = 1024, window: int = 16) -> int:
    """Page-cache residency of ``fd``: counted by ``cachestat`` where the kernel has it
    (``cached_sample``), else estimated from ``samples`` pages in evenly spaced windows of
    ``window`` consecutive pages (mincore).

    A decision needs the fraction, not every page: mincore over a whole file costs ~5 ms per GB,
    half a second for a 100 GB checkpoint, where this costs a few hundred microseconds at any
    size. Cached and evicted ranges come in runs of many pages, so a window of 16 pages tells
    as much as 16 scattered ones for a sixteenth of the calls.
    """
    size = os.fstat(fd).st_size
    counted = cached_sample(fd, size)
    if counted is not None:
        hits, asked = counted
        return size if hits >= asked else size * hits // max(1, asked)
    pages = (size + PAGE_SIZE - 1) // PAGE_SIZE
    if pages <= samples:
        return min(int(np.count_nonzero(resident_pages(fd))) * PAGE_SIZE, size)
    addr = _LIBC.mmap(None, size, _PROT_READ, _MAP_SHARED, fd, 0)
    if addr is None or addr == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    windows = max(1, samples // window)
    flags = (ctypes.c_ubyte * window)()
    vector = ctypes.addressof(flags)
    hits = 0
    try:
        for i in range(windows):
            page = i * (pages - window) // max(1, windows - 1)
            _residency(addr, page * PAGE_SIZE, window * PAGE_SIZE, vector)
            hits += bytes(flags).translate(_RESIDENT_BIT).count(1)
    finally:
        _LIBC.munmap(addr, size)
    return size * hits // (windows * window)


def mincore(address: int, length: int, vector: int) -> None:
    """``mincore(2)``, raising OSError; every residency probe goes through it, looked up at call
    time, so tests can answer EAGAIN or EINTR as the kernel may."""
    if _LIBC.mincore(address, length, vector) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"mincore failed: {os.strerror(code)}")


def _residency(mapping: int, offset: int, length: int, vector: int) -> None:
    """``mincore`` of ``[offset, offset + length)`` of a mapping, asked again as a read is
    (``io/retry.py``) while the kernel answers EAGAIN (short of memory for the moment) or
    EINTR; any other error, or ``retry.ATTEMPTS`` such answers in a row, raises OSError (and
    the caller counts the file as not cached)."""
    from .io import retry  # at call time: the io package imports this module

    attempts = retry.Attempts()
    while True:
        try:
            return mincore(mapping + offset, length, vector)
        except OSError as exc:
            if not retry.transient(exc.errno):
                raise
            try:
                time.sleep(attempts.failed(exc.errno, "mincore", length, offset, None))
            except ReadError as gave_up:
                raise OSError(exc.errno, str(gave_up)) from None


def resident_bytes(path: str | os.PathLike[str]) -> int:
    """Bytes of ``path`` currently in the page cache: counted by ``cachestat`` (one call, no
    page-per-byte vector written: a 6 GB check no longer flushes the CPU's caches), else
    mincore."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        counted = cached_pages(fd)
        if counted is not None:
            return min(counted * PAGE_SIZE, size)
        return min(int(np.count_nonzero(resident_pages(fd))) * PAGE_SIZE, size)
    finally:
        os.close(fd)


def evict(path: str | os.PathLike[str]) -> None:
    """Drop ``path``'s clean pages from the page cache (posix_fadvise DONTNEED; no root needed).

    Dirty pages survive until written back, so fsync a freshly written file before evicting it.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def rss_bytes() -> int:
    """This process's resident set size now (from /proc/self/statm)."""
    with open("/proc/self/statm", encoding="ascii") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (``MemTotal``, ``Cached``, ``MemAvailable``, ...)."""
    info: dict[str, int] = {}
    with open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            key, _, rest = line.partition(":")
            fields = rest.split()
            if not fields:
                continue
            value = int(fields[0])
            info[key.strip()] = value * 1024 if fields[1:] == ["kB"] else value
    return info


def mem_available() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (0 where unknown): one field, without parsing
    the other fifty (``meminfo``), as every default budget reads it."""
    try:
        with open("/proc/meminfo", "rb") as f:
            text = f.read()
    except OSError:
        return 0
    at = text.find(b"MemAvailable:")
    if at < 0:
        return 0
    fields = text[at + 13:text.find(b"\n", at)].split()
    return int(fields[0]) * (1024 if fields[1:] == [b"kB"] else 1) if fields else 0


def file_system(path: str) -> str | None:
    """``device (type)`` of the mount holding ``path``: the storage the numbers describe."""
    best: tuple[int, str] | None = None
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and (best is None or len(mount) > best[0]):
                    best = (len(mount), f"{device} ({fstype}) at {mount}")
    except OSError:
        return None
    return best[1] if best else None


# ---------------------------------------------------------------------------------------------
# Memory cgroups (v1 "memory" controller or the v2 unified hierarchy)


@dataclass(frozen=True)
class _Hierarchy:
    version: int           # 1 or 2
    mount: Path            # where the hierarchy is mounted
    root: str              # the mount's root inside the hierarchy (not "/" inside containers)


@functools.lru_cache(maxsize=1)
def _hierarchies() -> tuple[_Hierarchy, ...]:
    """Mounted memory hierarchies: v1 ``memory`` controllers and v2 mounts offering ``memory``.

    Read once per process: cgroup hierarchies are mounted at boot, and parsing mountinfo on every
    load was a millisecond of a warm stream's time to first tensor."""
    found: list[_Hierarchy] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype, options = tail[0], tail[2].split(",")
        mount = Path(fields[4].replace("\\040", " "))
        if fstype == "cgroup" and "memory" in options:
            found.append(_Hierarchy(1, mount, fields[3]))
        elif fstype == "cgroup2" and "memory" in (_read(mount / "cgroup.controllers") or "").split():
            found.append(_Hierarchy(2, mount, fields[3]))
    return tuple(found)


def _read(path: Path, default: str | None = None) -> str | None:
    try:
        return path.read_text(encoding="ascii").strip()
    except OSError:
        return default


def _read_int(path: Path) -> int | None:
    text = _read(path)
    if text is None or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _own_group(h: _Hierarchy) -> Path | None:
    """The directory of this process's group in ``h``, or None if it is the hierarchy's root."""
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, group = line.split(":", 2)
        wanted = (h.version == 2 and controllers == "") or (
            h.version == 1 and "memory" in controllers.split(","))
        if not wanted:
            continue
        relative = group
        if h.root != "/" and (group == h.root or group.startswith(h.root + "/")):
            relative = group[len(h.root):]
        relative = relative.strip("/")
        if not relative:
            return None
        path = h.mount / relative
        return path if path.is_dir() else None
    return None


def _own_hierarchy() -> _Hierarchy | None:
    """The hierarchy whose memory accounting applies to this process (v2 wins if it has memory)."""
    found = _hierarchies()
    for version in (2, 1):
        for h in found:
            if h.version == version:
                return h
    return None


#: Seconds a measured cgroup limit is reused: limits are set by whoever starts the process and
#: rarely change while it runs; one changed is seen by loads starting this long after.
LIMIT_TTL = 1.0
_limit_cache: tuple[float, int | None] | None = None


def cgroup_memory_limit() -> int | None:
    """The tightest memory limit applying to this process (its group or an ancestor), or None.

    Remembered for ``LIMIT_TTL`` seconds (walking the hierarchy reads a file per level and
    /proc/self/cgroup: ~0.2 ms, a tenth of a small load): a limit changed, or the process moved
    to another group, is seen by loads starting up to that long after."""
    global _limit_cache
    now = time.monotonic()
    cached = _limit_cache
    if cached is not None and now - cached[0] < LIMIT_TTL:
        return cached[1]
    limit = _measure_memory_limit()
    _limit_cache = (now, limit)
    return limit


def _measure_memory_limit() -> int | None:
    h = _own_hierarchy()
    if h is None:
        return None
    group = _own_group(h)
    name = "memory.limit_in_bytes" if h.version == 1 else "memory.max"
    limits: list[int] = []
    path = group if group is not None else h.mount
    while True:
        value = _read_int(path / name)
        if value is not None and value < _UNLIMITED:
            limits.append(value)
        if path == h.mount or h.mount not in path.parents:
            break
        path = path.parent
    return min(limits) if limits else None


def _own_group_value(v1: str, v2: str) -> int | None:
    """An integer file of this process's own memory group (``v1`` or ``v2`` name), or None."""
    h = _own_hierarchy()
    group = _own_group(h) if h is not None else None
    if h is None or group is None:
        return None
    return _read_int(group / (v1 if h.version == 1 else v2))


def cgroup_usage() -> int | None:
    """Current memory charged to this process's own group (page cache included), or None."""
    return _own_group_value("memory.usage_in_bytes", "memory.current")


def cgroup_peak() -> int | None:
    """Peak memory charged to this process's own group (page cache included); None at the root."""
    return _own_group_value("memory.max_usage_in_bytes", "memory.peak")


_counter = itertools.count()


class MemoryGroup:
    """A fresh memory cgroup for one measured child process, removed on exit.

    Peak usage here counts page cache faulted in by the child, which RSS does not. ``command``
    wraps an argv so the child joins the group before it execs (a shell ``echo $$ > cgroup.procs``
    then ``exec``): nothing the child allocates escapes, and unlike ``preexec_fn`` no Python runs
    between fork and exec, which is unsafe while other threads (rich's refresh thread) hold locks.

        with MemoryGroup(limit=1536 << 20) as group:
            proc = subprocess.Popen(group.command([sys.executable, "-c", "..."]))
            proc.wait()
            print(group.peak(), group.oom_kills())
    """

    def __init__(self, limit: int | None = None) -> None:
        self.limit = limit
        self.path: Path | None = None
        self._version = 0

    @staticmethod
    def _writable() -> tuple[_Hierarchy | None, str]:
        found = _hierarchies()
        if not found:
            return None, "no memory cgroup hierarchy is mounted (neither v1 'memory' nor v2)"
        reasons = []
        for h in sorted(found, key=lambda h: -h.version):
            if h.version == 2 and "memory" not in (_read(h.mount / "cgroup.subtree_control", "")
                                                   or "").split():
                reasons.append(f"{h.mount}: the v2 memory controller is not enabled for children")
                continue
            if not os.access(h.mount, os.W_OK):
                reasons.append(f"{h.mount}: not writable by uid {os.getuid()}")
                continue
            return h, f"cgroup v{h.version} at {h.mount}"
        return None, "; ".join(reasons)

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether a group can be created here, and the hierarchy used or why not."""
        h, reason = MemoryGroup._writable()
        return h is not None, reason

    def __enter__(self) -> MemoryGroup:
        h, reason = self._writable()
        if h is None:
            raise OSError(f"cannot create a memory cgroup: {reason}")
        self._version = h.version
        self.path = h.mount / f"weightlift-{os.getpid()}-{next(_counter)}"
        self.path.mkdir()
        try:
            if self.limit is not None:
                if h.version == 1:
                    (self.path / "memory.limit_in_bytes").write_text(str(self.limit))
                else:
                    (self.path / "memory.max").write_text(str(self.limit))
                    swap = self.path / "memory.swap.max"
                    if swap.exists():
                        swap.write_text("0")
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.remove()

    def _file(self, v1: str, v2: str) -> Path:
        if self.path is None:
            raise RuntimeError("MemoryGroup is not entered")
        return self.path / (v1 if self._version == 1 else v2)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` prefixed so the process joins this group before exec'ing it."""
        procs = self._file("cgroup.procs", "cgroup.procs")
        script = f'echo $$ > {shlex.quote(str(procs))} && exec "$@"'
        return ["/bin/sh", "-c", script, "weightlift-memory-group", *argv]

    def add(self, pid: int) -> None:
        """Move an already running process into the group (its earlier charges stay behind)."""
        self._file("cgroup.procs", "cgroup.procs").write_text(str(pid))

    def usage(self) -> int:
        """Memory charged to the group now (page cache included)."""
        return _read_int(self._file("memory.usage_in_bytes", "memory.current")) or 0

    def peak(self) -> int | None:
        """Peak memory charged to the group (page cache included); None if the kernel can't say."""
        return _read_int(self._file("memory.max_usage_in_bytes", "memory.peak"))

    def oom_kills(self) -> int:
        """Processes the OOM killer killed in this group (v1 without the counter: limit hits>0)."""
        if self._version == 1:
            control = _read(self._file("memory.oom_control", "")) or ""
            for line in control.splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
            failcnt = _read_int(self._file("memory.failcnt", "")) or 0
            return 1 if failcnt and "under_oom 1" in control else 0
        events = _read(self._file("", "memory.events")) or ""
        for line in events.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self) -> None:
        """Remove the group once its processes are gone (charges move to the parent)."""
        if self.path is None:
            return
        path, self.path = self.path, None
        for _ in range(50):
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.02)  # a just-killed child may still be leaving the group
        path.rmdir()


def peak_rss() -> int | None:
    """The process's RSS high-water mark (VmHWM), or None where /proc does not say."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, own process, no privileges needed)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False
