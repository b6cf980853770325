"""Partly cached checkpoints: cached ranges come out of the page cache, the rest via O_DIRECT.

The checkpoint is half evicted (every other 8 MiB) and the tests wait until mincore shows exactly
that before loading. Reads are counted at the one seam every read goes through
(``weightlift.io.base.preadv``), split by whether the descriptor has O_DIRECT set.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pagecache
import weightlift
from conftest import assert_same, random_tensor
from weightlift.io import base, residency, retry
from weightlift.io.residency import split_cached

PAGE = pagecache.PAGE
STEP = 8 << 20


# ---------------------------------------------------------------------------------------------
# the pure decision


def test_nothing_cached_is_one_uncached_run() -> None:
    assert split_cached(100, 50_000, None) == [(100, 50_000, False)]
    assert split_cached(100, 50_000, np.zeros(20, dtype=bool)) == [(100, 50_000, False)]


def test_runs_meet_at_page_boundaries_and_keep_the_range_ends() -> None:
    resident = np.array([True, True, False, False, True, False])
    assert split_cached(10, 5 * PAGE + 7, resident) == [
        (10, 2 * PAGE, True), (2 * PAGE, 4 * PAGE, False), (4 * PAGE, 5 * PAGE, True),
        (5 * PAGE, 5 * PAGE + 7, False)]


def test_a_range_inside_one_page_takes_that_page_state() -> None:
    resident = np.array([False, True])
    assert split_cached(PAGE + 1, PAGE + 9, resident) == [(PAGE + 1, PAGE + 9, True)]
    assert split_cached(3, 9, resident) == [(3, 9, False)]


def test_pages_past_the_map_count_as_uncached() -> None:
    resident = np.array([True])
    assert split_cached(0, 3 * PAGE, resident) == [(0, PAGE, True), (PAGE, 3 * PAGE, False)]


def test_an_empty_range_has_no_runs() -> None:
    assert split_cached(PAGE, PAGE, np.array([True, True])) == []


@pytest.mark.parametrize("seed", range(5))
def test_runs_cover_the_range_exactly_and_alternate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    resident = rng.random(64) < 0.5
    start = int(rng.integers(0, 10 * PAGE))
    end = start + int(rng.integers(1, 50 * PAGE))
    runs = split_cached(start, end, resident)
    assert runs[0][0] == start and runs[-1][1] == end
    for (_, hi, cached), (lo, _, next_cached) in zip(runs, runs[1:]):
        assert hi == lo and hi % PAGE == 0 and cached != next_cached
    for lo, hi, cached in runs:
        pages = range(lo // PAGE, (hi - 1) // PAGE + 1)
        assert all(bool(resident[p]) == cached if p < resident.size else not cached
                   for p in pages)


# ---------------------------------------------------------------------------------------------
# a half-evicted checkpoint


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~44 MiB: tensors larger than a run of 8 MiB, and runs of small ones across run edges."""
    gen = torch.Generator().manual_seed(11)
    tensors = {"embed": random_tensor((3000, 2048), torch.bfloat16, gen),    # ~11.7 MiB
               "big": random_tensor((5000, 1024), torch.float32, gen)}       # ~19.5 MiB
    for i in range(40):
        tensors[f"layers.{i}.norm"] = random_tensor((4099,), torch.float16, gen)
        tensors[f"layers.{i}.proj"] = random_tensor((511, 601), torch.bfloat16, gen)
    path = tmp_path_factory.mktemp("partly") / "model.safetensors"
    save_file(tensors, path)
    return path


@pytest.fixture
def half_evicted(written: Path, tmp_path: Path) -> tuple[Path, np.ndarray]:
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(written, copy)
    with weightlift.sources.resolve(copy) as layout:
        if weightlift.io.auto.direct_refusal(layout.shards):
            pytest.skip("this file system refuses O_DIRECT")
    if not pagecache.evict_every_other(copy, STEP)[STEP // PAGE:].size:
        raise AssertionError("checkpoint smaller than two runs")
    return copy, pagecache.pages(copy)


class Seam:
    """Records every read as (O_DIRECT?, offset, length), and the residency map each load took."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads: list[tuple[bool, int, int]] = []
        self.maps: list[np.ndarray | None] = []
        real = base.preadv

        def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
            direct = bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)
            self.reads.append((direct, offset, sum(len(b) for b in buffers)))
            return real(fd, buffers, offset)

        monkeypatch.setattr(base, "preadv", preadv)
        real_init = residency.CachedRanges.__init__

        def init(ranges: residency.CachedRanges, *args: object) -> None:
            real_init(ranges, *args)  # type: ignore[arg-type]
            self.maps.extend(ranges.resident)

        monkeypatch.setattr(residency.CachedRanges, "__init__", init)

    def direct_pages(self) -> set[int]:
        return {page for direct, offset, length in self.reads if direct
                for page in range(offset // PAGE, -(-(offset + length) // PAGE))}

    def bytes(self, direct: bool) -> int:
        return sum(length for d, _, length in self.reads if d == direct)


def check_reads(seam: Seam, expected: np.ndarray, path: Path, mapped: int = 0) -> None:
    """The load's own map (taken when it started) matches the state the test set up (memory
    pressure may have taken a few pages since), and no page that map shows cached was read with
    O_DIRECT: the uncached half came from disk, the cached half out of the cache (copied by
    buffered reads, or ``mapped``: handed out as views of windows)."""
    assert len(seam.maps) == 1 and seam.maps[0] is not None
    resident = seam.maps[0]
    assert np.count_nonzero(resident & ~expected) <= 16  # a header read may cache a few pages
    assert np.count_nonzero(resident) >= 0.9 * np.count_nonzero(expected)
    assert not seam.direct_pages() & set(np.flatnonzero(resident).tolist())
    size = path.stat().st_size
    uncached = size - int(resident.sum()) * PAGE
    assert seam.bytes(direct=True) >= uncached - STEP // 2
    assert seam.bytes(direct=False) + mapped >= size - uncached - STEP // 2


@pytest.mark.parametrize("kind", ["load", "convert", "stream"])
def test_half_evicted_checkpoint_reads_only_the_evicted_half_from_disk(
        half_evicted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch,
        kind: str) -> None:
    path, resident = half_evicted
    assert 0.3 < resident.mean() < 0.7
    seam = Seam(monkeypatch)
    reports: list[weightlift.LoadReport] = []
    if kind == "load":
        state = weightlift.load(path, strategy="direct", on_report=reports.append)
    elif kind == "convert":  # through the ring of reused slots, converted piece by piece
        state = weightlift.load(path, strategy="direct", dtype=torch.float32,
                                on_report=reports.append)
    else:  # cached blocks are views of windows, the rest read with O_DIRECT
        state = {name: tensor.clone() for name, tensor in
                 weightlift.stream(path, strategy="direct", max_host_memory=8 << 20,
                                   on_report=reports.append)}
    report = reports[0]
    assert report.bytes_mapped + report.bytes_read == report.bytes
    assert (report.bytes_mapped > 0) == (kind != "load")  # a CPU load keeps what it reads
    check_reads(seam, resident, path, report.bytes_mapped)
    reference = load_file(path)  # only now: reading it caches the whole file
    if kind == "convert":
        reference = {k: v.float() if v.is_floating_point() else v for k, v in reference.items()}
    assert_same(state, reference)


def test_auto_picks_direct_for_a_half_evicted_checkpoint_and_says_why(
        half_evicted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    path, resident = half_evicted
    seam = Seam(monkeypatch)
    reports: list[weightlift.LoadReport] = []
    # A budget below the file's size: files within it take the small-file path (mapped).
    state = weightlift.load(path, on_report=reports.append, max_host_memory="16MiB")
    assert reports[0].strategy == "direct", reports[0].reason
    assert "only the rest is read from disk" in reports[0].reason
    check_reads(seam, resident, path)
    assert_same(state, load_file(path))


@pytest.mark.parametrize("kind", ["load", "stream"])
def test_a_page_evicted_after_the_map_was_taken_is_still_read_right(
        half_evicted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch,
        kind: str) -> None:
    """The map is a snapshot: a cached run evicted meanwhile is read again (buffered, or
    faulted in through its window)."""
    path, _ = half_evicted
    real_init = residency.CachedRanges.__init__

    def init_then_evict(self: object, *args: object) -> None:
        real_init(self, *args)  # type: ignore[arg-type]
        pagecache.sync(path)
        weightlift.probes.evict(path)

    monkeypatch.setattr(residency.CachedRanges, "__init__", init_then_evict)
    if kind == "load":
        state = weightlift.load(path, strategy="direct")
    else:
        state = {name: tensor.clone() for name, tensor in
                 weightlift.stream(path, strategy="direct", max_host_memory=8 << 20)}
    assert_same(state, load_file(path))


def test_a_cold_file_keeps_no_residency_map(written: Path, tmp_path: Path) -> None:
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(written, copy)
    pagecache.evict(copy)
    with weightlift.sources.resolve(copy) as layout:
        strategy = weightlift.io.make_strategy("direct")
        try:
            strategy.prepare(layout.shards)
        except weightlift.io.Unavailable:
            pytest.skip("this file system refuses O_DIRECT")
        try:
            # The header's read (and its read-ahead) cached a few pages: not worth a map, and
            # the load keeps the cold path's reads in flight.
            assert strategy.cache is None  # type: ignore[attr-defined]
            assert strategy.in_flight == type(strategy).in_flight
        finally:
            strategy.close()


def test_cachestat_counts_the_pages_mincore_shows(
        half_evicted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's count (``cachestat``, Linux 6.5) is the number of pages mincore shows, for
    the file and for a range of it; without it, the residency probes sample with mincore."""
    path, resident = half_evicted
    fd = os.open(path, os.O_RDONLY)
    try:
        counted = weightlift.probes.cached_pages(fd)
        if counted is None:
            pytest.skip("this kernel has no cachestat (Linux < 6.5): the probes sample instead")
        half = len(resident) // 2
        assert counted == int(resident.sum())
        assert weightlift.probes.cached_pages(fd, 0, half * PAGE) == int(resident[:half].sum())
        # Beyond 16 MiB, runs of the file are counted: an estimate, as mincore's sample.
        sampled = weightlift.probes.sampled_resident_bytes(fd)
        assert abs(sampled - int(resident.sum()) * PAGE) <= 0.1 * path.stat().st_size
        monkeypatch.setattr(weightlift.probes, "_cachestat_works", False)
        assert weightlift.probes.cached_pages(fd) is None
    finally:
        os.close(fd)


def test_sampled_residency_estimates_a_half_evicted_file(
        half_evicted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    path, resident = half_evicted
    exact = int(resident.sum()) * PAGE
    monkeypatch.setattr(weightlift.probes, "_cachestat_works", False)  # the mincore sample
    fd = os.open(path, os.O_RDONLY)
    try:
        estimate = weightlift.probes.sampled_resident_bytes(fd, samples=256)
        pagecache.evict(path)
        cold = weightlift.probes.sampled_resident_bytes(fd, samples=256)
    finally:
        os.close(fd)
    assert abs(estimate - exact) <= 0.1 * path.stat().st_size, (estimate, exact)
    assert cold == 0


class FlakyMincore:
    """``probes.mincore`` answering ``code`` (nothing done) ``times`` times before each call
    that goes through; ``times=None``: for ever."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, code: int, times: int | None) -> None:
        self.code, self.times = code, times
        self.refused = self.passed = 0
        self.streak = 0
        real = weightlift.probes.mincore
        # The kernel's count (cachestat) would answer before any mincore: these probes' mincore
        # path is the one under test.
        monkeypatch.setattr(weightlift.probes, "_cachestat_works", False)

        def mincore(address: int, length: int, vector: int) -> None:
            if self.times is None or self.streak < self.times:
                self.streak += 1
                self.refused += 1
                raise OSError(code, os.strerror(code))
            self.streak = 0
            self.passed += 1
            real(address, length, vector)

        monkeypatch.setattr(weightlift.probes, "mincore", mincore)


@pytest.mark.parametrize("code", [errno.EAGAIN, errno.EINTR])
def test_residency_probes_ask_again_after_a_transient_mincore_error(
        half_evicted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch,
        code: int) -> None:
    """EAGAIN (the kernel short of memory for a moment) and EINTR are asked again, as a read
    is (io/retry.py): the answer is the one a calm kernel gives, not "cold"."""
    path, resident = half_evicted
    monkeypatch.setattr(weightlift.probes, "_cachestat_works", False)  # the mincore sample
    fd = os.open(path, os.O_RDONLY)
    try:
        calm = weightlift.probes.sampled_resident_bytes(fd)
        flaky = FlakyMincore(monkeypatch, code, times=2)
        pages = weightlift.probes.resident_pages(fd)
        sampled = weightlift.probes.sampled_resident_bytes(fd)
    finally:
        os.close(fd)
    assert np.array_equal(pages, resident)
    assert sampled == calm > 0
    assert flaky.refused == 2 * flaky.passed and flaky.passed == 1 + 64  # one map, 64 windows


def test_a_mincore_that_keeps_refusing_gives_up_and_the_load_still_works(
        half_evicted: tuple[Path, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    path, _ = half_evicted
    flaky = FlakyMincore(monkeypatch, errno.EAGAIN, times=None)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError, match=f"gave up after {retry.ATTEMPTS} attempts"):
            weightlift.probes.sampled_resident_bytes(fd)
    finally:
        os.close(fd)
    assert flaky.refused == retry.ATTEMPTS and flaky.passed == 0
    reports: list[weightlift.LoadReport] = []
    # A budget below the file's size: files within it take the small-file path (mapped).
    assert_same(weightlift.load(path, on_report=reports.append, max_host_memory="16MiB"),
                load_file(path))
    assert reports[0].reason.startswith("0% of the checkpoint is in the page cache"), \
        "unknown residency counts as cold"
    # The small-file path counts it as not cached too: every page populated, bytes exact.
    assert_same(weightlift.load(path), load_file(path))
