"""Windows (``io/window.py``): a part of a file mapped on its own, zero-copy views of it, and the
mapping gone once every view is dropped, checked against ``/proc/self/maps``."""

from __future__ import annotations

import contextlib
import errno
import gc
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from weightlift.errors import ReadError
from weightlift.io import base as io_base
from weightlift.io.window import PAGE, PMD, Windows

SIZE = 64 * PAGE + 123


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = os.urandom(SIZE)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def mapped_bytes(path: Path) -> int:
    """Bytes of ``path`` mapped into this process now, from ``/proc/self/maps``."""
    total = 0
    inode = os.stat(path).st_ino
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and int(fields[4]) == inode and fields[5] == str(path):
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                total += hi - lo
    return total


@contextlib.contextmanager
def steady_sampler(measure: Callable[[], object]) -> Iterator[Callable[[], object | None]]:
    """A ``sample()`` for a thread that samples ``/proc/self/maps`` while a load runs: it returns
    ``measure()``, or None where a mapping was made while it read.

    The kernel hands ``/proc/self/maps`` out a page at a time, each page from the mappings of that
    moment: a window unmapped after its line was read and another mapped after the read went past
    its address are then both counted, though never mapped at once (CI once saw a 16 MiB budget
    "exceeded" by a 520 KiB window). Every mapping weightlift makes goes through
    ``window.map_file``, counted here on entry and exit; a read that no ``map_file`` call overlapped
    can only undercount, which an upper bound may ignore."""
    import weightlift.io.mapped as mapped_module
    import weightlift.io.window as window_module

    lock = threading.Lock()
    ticks = {"started": 0, "finished": 0}
    original = window_module.map_file

    def counted(*args: object) -> object:
        with lock:
            ticks["started"] += 1
        try:
            return original(*args)
        finally:
            with lock:
                ticks["finished"] += 1

    def sample() -> object | None:
        with lock:
            before = dict(ticks)
        if before["started"] != before["finished"]:
            return None
        value = measure()
        with lock:
            return value if ticks["started"] == before["started"] else None

    window_module.map_file = mapped_module.map_file = counted  # type: ignore[assignment]
    try:
        yield sample
    finally:
        window_module.map_file = mapped_module.map_file = original


def open_window(windows: Windows, path: Path, start: int, end: int):  # type: ignore[no-untyped-def]
    fd = os.open(path, os.O_RDONLY)
    try:
        return windows.map(fd, start, end, path=str(path))
    finally:
        os.close(fd)  # the window holds no descriptor


@pytest.mark.parametrize(("start", "end"), [(0, SIZE), (PAGE + 7, 9 * PAGE - 3),
                                            (5 * PAGE, 6 * PAGE), (SIZE - 100, SIZE)])
def test_views_are_the_files_bytes(data_file: tuple[Path, bytes], start: int, end: int) -> None:
    path, data = data_file
    window = open_window(Windows(), path, start, end)
    window.populate()
    view = window.view(start, end)
    assert bytes(view.numpy()) == data[start:end]
    inner = window.view(start + 1, end - 1)
    assert bytes(inner.numpy()) == data[start + 1:end - 1]


def test_a_window_maps_only_the_pages_around_its_range(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    windows = Windows()
    window = open_window(windows, path, 3 * PAGE + 5, 7 * PAGE + 1)
    assert window.size == 5 * PAGE and window.offset == 3 * PAGE
    assert mapped_bytes(path) == 5 * PAGE
    assert windows.live == windows.peak == windows.total == 5 * PAGE


def test_unmapped_once_the_window_and_every_view_are_dropped(
        data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    windows = Windows()
    window = open_window(windows, path, 0, 16 * PAGE)
    first = window.view(0, PAGE).view(torch.int32)
    second = window.view(PAGE, 16 * PAGE)
    del window
    assert mapped_bytes(path) == 16 * PAGE and windows.live == 16 * PAGE
    del second
    assert mapped_bytes(path) == 16 * PAGE  # ``first`` still views it
    assert bytes(first.view(torch.uint8).numpy()) == data[:PAGE]
    del first
    gc.collect()
    assert mapped_bytes(path) == 0
    assert windows.live == 0 and windows.total == 16 * PAGE


def test_a_kept_view_outlives_later_windows(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    windows = Windows()
    kept = open_window(windows, path, 0, 8 * PAGE).view(0, 8 * PAGE)
    for start in range(8 * PAGE, 64 * PAGE, 8 * PAGE):
        window = open_window(windows, path, start, start + 8 * PAGE)
        window.populate()
        assert bytes(window.view(start, start + 8 * PAGE).numpy()) == data[start:start + 8 * PAGE]
        del window
    assert windows.live == 8 * PAGE and mapped_bytes(path) == 8 * PAGE
    assert bytes(kept.numpy()) == data[:8 * PAGE]


def test_writing_a_view_never_changes_the_file(data_file: tuple[Path, bytes]) -> None:
    path, data = data_file
    window = open_window(Windows(), path, 0, 2 * PAGE)
    view = window.view(0, 2 * PAGE)
    view.fill_(0)
    assert not view.any()
    assert path.read_bytes() == data
    again = open_window(Windows(), path, 0, 2 * PAGE)
    assert bytes(again.view(0, 2 * PAGE).numpy()) == data[:2 * PAGE]


def test_a_view_outside_the_window_is_refused(data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    window = open_window(Windows(), path, PAGE, 2 * PAGE)
    with pytest.raises(ValueError, match="outside the window"):
        window.view(0, PAGE)


def test_a_page_the_file_no_longer_has_raises_instead_of_sigbus(
        data_file: tuple[Path, bytes]) -> None:
    path, _ = data_file
    window = open_window(Windows(), path, 32 * PAGE, SIZE)
    os.truncate(path, PAGE)
    with pytest.raises(ReadError, match=r"data\.bin.*offset \d+ \(mapped\) failed"):
        window.populate()


def test_populate_asks_again_after_a_signal(data_file: tuple[Path, bytes],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = data_file
    madvise = io_base.madvise
    calls: list[int] = []

    def interrupted_twice(address: int, length: int, advice: int) -> None:
        calls.append(length)
        if len(calls) <= 2:
            raise OSError(errno.EINTR, os.strerror(errno.EINTR))
        madvise(address, length, advice)

    monkeypatch.setattr(io_base, "madvise", interrupted_twice)
    window = open_window(Windows(), path, 0, SIZE)
    window.populate()
    assert len(calls) >= 3
    assert bytes(window.view(0, SIZE).numpy()) == data


def test_a_kernel_without_populate_read_has_its_pages_touched(
        data_file: tuple[Path, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = data_file

    def unsupported(address: int, length: int, advice: int) -> None:
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(io_base, "madvise", unsupported)
    window = open_window(Windows(), path, PAGE + 1, 20 * PAGE)
    window.populate()
    window.willneed()  # advice only: a refusal is ignored
    assert bytes(window.view(PAGE + 1, 20 * PAGE).numpy()) == data[PAGE + 1:20 * PAGE]


@pytest.mark.parametrize("offset", [0, 3 * PAGE, PMD + 5 * PAGE])
def test_a_large_mapping_agrees_with_its_file_offset_modulo_2_mib(tmp_path: Path,
                                                                  offset: int) -> None:
    """As the kernel places the file mappings it chooses the address of: the page cache's large
    folios can then be mapped 2 MiB per fault. Bytes still the file's; unmapped with the view."""
    data = os.urandom(2 * PMD + 3 * PMD // 2)
    path = tmp_path / "large.bin"
    path.write_bytes(data)
    window = open_window(Windows(), path, offset, len(data))
    view = window.view(offset, len(data))
    assert (window.address - window.offset) % PMD == 0
    assert bytes(view.numpy()) == data[offset:]
    assert mapped_bytes(path) == -(-(len(data) - offset + offset % PAGE) // PAGE) * PAGE
    del window, view
    gc.collect()
    assert mapped_bytes(path) == 0
