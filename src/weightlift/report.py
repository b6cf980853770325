"""LoadReport: what a load did and what it cost, measured while it ran.

A sampling thread records this process's RSS and the checkpoint files' page-cache residency, so
the report shows peaks, not just before/after. The peak RSS also comes from the kernel's
high-water mark (reset at the start of the load where the kernel allows it), so short spikes
between samples are not missed. Measuring costs no more than the load is long: a load of fewer
than ``SAMPLED_FROM`` bytes (a few milliseconds) starts no thread and measures before and after.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from . import probes

#: Loads of at least this many bytes are sampled by a thread while they run; smaller ones take
#: milliseconds, less than a thread costs to start and stop (~0.15 ms) plus one 20 ms interval.
SAMPLED_FROM = 64 << 20


@dataclass
class LoadReport:
    """One load: sizes, timing, the strategy and why, and host memory it used."""

    source: str
    device: str
    strategy: str
    reason: str
    budget: int
    fallbacks: list[str] = field(default_factory=list)
    #: Tensors the checkpoint's index lists that no file stores: not loaded (as vLLM's and
    #: transformers' loaders skip them; a ``CheckpointWarning`` says so too).
    missing: list[str] = field(default_factory=list)
    #: What was accepted of an index and files that disagree (those missing tensors, a tensor
    #: stored in two files and which copy loaded, ...), each also a ``CheckpointWarning``.
    notes: list[str] = field(default_factory=list)
    #: How reads were submitted: "threads" (a pool of blocking reads), "uring" (io_uring), or
    #: "inline" (the small-file path: pages mapped in the calling thread, no read in flight).
    engine: str = "threads"
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0
    #: Of ``bytes``: handed out as views of the mapped files (the page cache; no read, no copy
    #: by weightlift), and read into buffers (from storage, or copied out of the page cache).
    bytes_mapped: int = 0
    bytes_read: int = 0
    #: The most bytes of the checkpoint's files mapped at once (windows, or whole files).
    mapped_peak: int = 0
    time_to_first_tensor: float | None = None
    #: Peak resident set size of the process during the load (the kernel's high-water mark
    #: where it can be reset, and samples; see ``SAMPLED_FROM`` for loads too short to sample).
    peak_rss: int | None = None
    #: Peak RSS above the RSS at the start (for CPU loads this includes the result).
    rss_growth: int | None = None
    #: Page cache held by the checkpoint's files before, at peak during, and after the load.
    #: The peak of a load under ``SAMPLED_FROM`` bytes is the larger of before and after: it
    #: is not sampled while it runs.
    cache_before: int | None = None
    cache_peak: int | None = None
    cache_after: int | None = None
    #: Limit and peak usage of the memory cgroup this process runs in, where one applies.
    cgroup_limit: int | None = None
    cgroup_peak: int | None = None

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    @property
    def cache_growth(self) -> int | None:
        """Page cache the load left behind (after minus before)."""
        if self.cache_after is None or self.cache_before is None:
            return None
        return self.cache_after - self.cache_before

    @property
    def cache_peak_growth(self) -> int | None:
        if self.cache_peak is None or self.cache_before is None:
            return None
        return self.cache_peak - self.cache_before

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(gbps=self.gbps, cache_growth=self.cache_growth,
                    cache_peak_growth=self.cache_peak_growth)
        return data


class Monitor:
    """Samples RSS and page-cache residency of ``paths`` until stopped (``sample=False``: only
    at the start and at ``finish``)."""

    def __init__(self, paths: Sequence[str], interval: float = 0.02,
                 cache_interval: float = 0.1, sample: bool = True) -> None:
        self.paths = list(paths)
        self.interval = interval
        self.cache_interval = cache_interval
        self.rss_start = probes.rss_bytes()
        self.rss_peak = self.rss_start
        self.cache_start = self._cache()
        self.cache_peak = self.cache_start
        self.hwm_reset = probes.reset_peak_rss()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if sample:  # else: before and after, and the kernel's high-water mark in between
            self._thread = threading.Thread(target=self._run, name="weightlift-monitor",
                                            daemon=True)
            self._thread.start()

    def _cache(self) -> int | None:
        try:
            return sum(probes.resident_bytes(p) for p in self.paths)
        except OSError:
            return None

    def _run(self) -> None:
        next_cache = time.monotonic()
        while not self._stop.wait(self.interval):
            self.rss_peak = max(self.rss_peak, probes.rss_bytes())
            if time.monotonic() >= next_cache:
                began = time.monotonic()
                cache = self._cache()
                if cache is not None and self.cache_peak is not None:
                    self.cache_peak = max(self.cache_peak, cache)
                # mincore costs ~10 ms per GB: spend at most a tenth of one core on it.
                cost = time.monotonic() - began
                next_cache = time.monotonic() + max(self.cache_interval, 9 * cost)

    def finish(self, report: LoadReport) -> None:
        """Stop sampling and fill the memory fields of ``report``."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        peak = max(self.rss_peak, probes.rss_bytes())
        if self.hwm_reset:
            peak = max(peak, probes.peak_rss() or 0)
        report.peak_rss = peak
        report.rss_growth = peak - self.rss_start
        report.cache_before = self.cache_start
        report.cache_after = self._cache()
        if self.cache_peak is not None and report.cache_after is not None:
            report.cache_peak = max(self.cache_peak, report.cache_after)
        report.cgroup_limit = probes.cgroup_memory_limit()
        report.cgroup_peak = probes.cgroup_peak()
