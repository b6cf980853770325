"""Page-cache states for tests, reached deterministically.

A buffered read starts read-ahead that may still be in flight when it returns, and mincore only
counts a page once its read has completed: measuring right after a warming read races the kernel.
These helpers warm without read-ahead (``POSIX_FADV_RANDOM``: the kernel reads exactly the pages
asked for, synchronously) and wait until mincore shows the state they set before returning.

    warm(path, 0, size // 2)
    evict_every_other(path, 8 << 20)       # returns the page-residency map it waited for
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from weightlift import probes

PAGE = probes.PAGE_SIZE
#: Longest wait for the page cache to reach a state; far above what the kernel needs.
TIMEOUT = 30.0


def sync(path: Path) -> None:
    """Write back dirty pages (they cannot be evicted)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def pages(path: Path) -> np.ndarray:
    """Per page of ``path``: is it in the page cache now?"""
    fd = os.open(path, os.O_RDONLY)
    try:
        return probes.resident_pages(fd)
    finally:
        os.close(fd)


def wait_for(path: Path, ok: Callable[[np.ndarray], bool], what: str) -> np.ndarray:
    """Poll mincore until ``ok(pages)``; fail the test (with ``what``) after ``TIMEOUT``."""
    deadline = time.monotonic() + TIMEOUT
    while True:
        now = pages(path)
        if ok(now):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: the page cache never reached {what} "
                                 f"({int(now.sum())} of {now.size} pages cached)")
        time.sleep(0.01)


def settled(path: Path) -> np.ndarray:
    """The residency map once it stops changing (read-ahead in flight has landed)."""
    previous = pages(path)
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now = pages(path)
        if np.array_equal(now, previous):
            return now
        previous = now
    raise AssertionError(f"{path}: page-cache residency kept changing for {TIMEOUT} s")


def settled_bytes(path: Path) -> int:
    return min(int(settled(path).sum()) * PAGE, path.stat().st_size)


def evict(path: Path) -> None:
    """Drop the whole file from the page cache and wait until none of it is cached."""
    sync(path)
    probes.evict(path)
    wait_for(path, lambda now: not now.any(), "no page cached")


def warm(path: Path, start: int, end: int) -> None:
    """Read ``[start, end)`` into the page cache with no read-ahead beyond it, until mincore
    shows every page of it cached (memory pressure may reclaim a page in between: read again)."""
    lo, hi = start // PAGE, -(-end // PAGE)
    deadline = time.monotonic() + TIMEOUT
    while True:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            offset = start
            while offset < end:
                n = len(os.pread(fd, min(8 << 20, end - offset), offset))
                if n == 0:
                    break
                offset += n
        finally:
            os.close(fd)
        now = pages(path)
        if now[lo:hi].all():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: pages {lo}..{hi} never all cached "
                                 f"({int(now[lo:hi].sum())} of {hi - lo})")
        time.sleep(0.01)


def evict_every_other(path: Path, step: int) -> np.ndarray:
    """Cache the whole file, then evict every other ``step`` bytes (the 2nd, 4th, ... run);
    returns the residency map once mincore shows exactly that.

    The page cache holds files in folios of up to 2 MiB and evicts only whole folios, so
    ``step`` must be a multiple of 2 MiB for the state to be reachable. Memory pressure from
    other processes may reclaim a page of the cached runs meanwhile: then the runs are read
    and evicted again, until the state holds.
    """
    size = path.stat().st_size
    expected = np.zeros(-(-size // PAGE), dtype=bool)
    for offset in range(0, size, 2 * step):
        expected[offset // PAGE:-(-min(offset + step, size) // PAGE)] = True
    sync(path)
    deadline = time.monotonic() + TIMEOUT
    while True:
        for offset in range(0, size, 2 * step):
            warm(path, offset, min(offset + step, size))
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset in range(step, size, 2 * step):
                os.posix_fadvise(fd, offset, step, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        now = pages(path)
        if np.array_equal(now, expected):
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: the page cache never reached every other {step} "
                                 f"bytes cached ({int(now.sum())} of {now.size} pages cached, "
                                 f"{int(expected.sum())} expected)")
        time.sleep(0.05)


def file_mappings(path: Path) -> list[tuple[int, int, int, int]]:
    """This process's mappings of ``path`` now, from ``/proc/self/smaps``: ``(start, end, rss,
    anonymous)`` each, in bytes (``anonymous``: pages copied on write, no longer the file's)."""
    inode, found, current = os.stat(path).st_ino, [], None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if not fields[0].endswith(":"):  # a mapping's header line
                current = None
                if len(fields) >= 6 and int(fields[4]) == inode and fields[5] == str(path):
                    lo, hi = (int(x, 16) for x in fields[0].split("-"))
                    current = [lo, hi, 0, 0]
                    found.append(current)
            elif current is not None and fields[0] in ("Rss:", "Anonymous:"):
                current[2 if fields[0] == "Rss:" else 3] = int(fields[1]) * 1024
    return [(lo, hi, rss, anonymous) for lo, hi, rss, anonymous in found]
