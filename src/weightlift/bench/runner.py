"""The side-by-side runner: every (loader, scenario, cache state) measured in a fresh process,
interleaved and repeated, with memory measured from outside the loader.

Interleaving (rep-major, loader order rotated each rep) spreads each loader's runs over the whole
session, so a noisy neighbour or a thermal dip hits every loader instead of one. Cold runs evict
the checkpoint's pages first (posix_fadvise DONTNEED: no root needed); warm runs read it into the
page cache first. Peak host memory comes from a fresh memory cgroup per child where the machine
allows one (it counts page cache, not only RSS); elsewhere the child samples anonymous RSS plus
the checkpoint's page-cache residency.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import probes
from ..errors import WeightliftError
from ..remote import is_remote
from ..sources import resolve
from .loaders import LOADERS

SCENARIOS = ("to_cpu", "device")
#: Every scenario: the default ones, and ``model`` (time to a usable transformers model).
ALL_SCENARIOS = (*SCENARIOS, "model")
CACHES = ("cold", "warm")


@dataclass(frozen=True)
class Run:
    loader: str
    scenario: str
    cache: str
    rep: int


def interleave(loaders: Sequence[str], scenarios: Sequence[str], caches: Sequence[str],
               reps: int) -> list[Run]:
    """All runs in the order they execute: repetition, then scenario and cache state, then loader,
    with the loader order rotated by one each repetition so no loader always goes first."""
    runs: list[Run] = []
    for rep in range(reps):
        shift = rep % len(loaders) if loaders else 0
        order = list(loaders[shift:]) + list(loaders[:shift])
        for scenario in scenarios:
            for cache in caches:
                runs.extend(Run(loader, scenario, cache, rep) for loader in order)
    return runs


@dataclass
class RunResult:
    loader: str
    scenario: str
    cache: str
    rep: int
    #: "ok", "oom-killed", "failed" or "wrong bytes" (verification).
    status: str
    seconds: float | None = None
    #: Seconds until the loader handed out its first tensor (None: raw reads hand none out).
    first: float | None = None
    bytes: int | None = None
    #: Peak host memory the load added (page cache included), and how it was measured.
    peak_memory: int | None = None
    memory_source: str = ""
    #: Page cache of the checkpoint's files the load left behind (after minus before).
    cache_left: int | None = None
    strategy: str | None = None
    reason: str | None = None
    error: str | None = None

    @property
    def gbps(self) -> float | None:
        if self.status != "ok" or not self.seconds or self.bytes is None:
            return None
        return self.bytes / self.seconds / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "gbps": self.gbps}


def classify(returncode: int, oom_kills: int, result: dict[str, Any] | None) -> str:
    """A child's outcome: its own status if it reported one, else why it died."""
    if result is not None and returncode == 0:
        return str(result.get("status", "failed"))
    if oom_kills > 0 or returncode == -9:
        return "oom-killed"
    return "failed"


def peak_memory(result: dict[str, Any] | None, group_peak: int | None) -> tuple[int | None, str]:
    """Peak host memory of one load and its source: the cgroup's peak minus what the process held
    before the load started (the interpreter and imports) where a group was used, else the
    child's own sampling."""
    if group_peak is not None:
        baseline = (result or {}).get("cgroup_baseline") or 0
        return max(group_peak - baseline, 0), "cgroup"
    if result is not None and result.get("sampled_peak") is not None:
        return int(result["sampled_peak"]), "anon RSS + page cache (sampled)"
    return None, ""


def last_json_line(stdout: str) -> dict[str, Any] | None:
    """The child's result: the last stdout line that parses as a JSON object (libraries may print
    before it)."""
    for line in reversed(stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def local_files(files: Sequence[str]) -> list[str]:
    """The files of ``files`` on this machine (object-storage URLs have no page cache here)."""
    return [path for path in files if not is_remote(path)]


def resident(files: Sequence[str]) -> int | None:
    try:
        return sum(probes.resident_bytes(path) for path in local_files(files))
    except OSError:
        return None


def set_cache(files: Sequence[str], state: str) -> None:
    """Evict the files (``cold``) or read them into the page cache (``warm``)."""
    for path in local_files(files):
        if state == "cold":
            probes.evict(path)
        elif probes.resident_bytes(path) < os.path.getsize(path):
            with open(path, "rb", buffering=0) as f:
                buffer = bytearray(16 << 20)
                while f.readinto(buffer):
                    pass


#: How the page cache may hold a checkpoint for a warm run (``set_folios``).
FOLIOS = ("as-is", "large", "small")


def set_folios(files: Sequence[str], folios: str) -> None:
    """Bring ``files`` wholly into the page cache, held in ``folios``: ``as-is`` (read in only if
    some of it is not cached: ``set_cache``), ``large`` (dropped, then read by buffered reads,
    whose read-ahead makes large folios, up to 2 MiB, where the file system allows) or ``small``
    (dropped, then asked for with ``POSIX_FADV_WILLNEED``, which makes 4 KiB folios, as pages
    read at random or split under memory pressure are). Every loader maps and counts the page
    cache by folio: a warm load over 4 KiB folios took ~1.9x as long as over 2 MiB ones, for
    every loader (docs/vllm.md, "Fifth session")."""
    if folios not in FOLIOS:
        raise ValueError(f"unknown folios {folios!r}; choose one of {', '.join(FOLIOS)}")
    if folios != "as-is":
        set_cache(files, "cold")
    if folios != "small":
        set_cache(files, "warm")
        return
    for path in local_files(files):
        fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            for offset in range(0, size, 4 << 20):  # the kernel clamps one call to read-ahead's
                os.posix_fadvise(fd, offset, 4 << 20, os.POSIX_FADV_WILLNEED)
            deadline = time.monotonic() + 60 + size / (50 << 20)
            while (probes.cached_pages(fd, 0, size) or 0) < -(-size // probes.PAGE_SIZE):
                if time.monotonic() > deadline:  # evicted as fast as read: no room for it
                    raise WeightliftError(f"{path}: not wholly cached after WILLNEED")
                time.sleep(0.01)  # the reads were only submitted
        finally:
            os.close(fd)


def cachestat_seconds(files: Sequence[str]) -> float:
    """Seconds one ``cachestat`` over each of ``files`` takes: it walks the page cache's folios,
    so ~8 ms a GB over 4 KiB folios and ~0.1 ms over 2 MiB ones tell the two apart."""
    total = 0.0
    for path in local_files(files):
        fd = os.open(path, os.O_RDONLY)
        try:
            started = time.perf_counter()
            probes.cached_pages(fd, 0, os.fstat(fd).st_size)
            total += time.perf_counter() - started
        finally:
            os.close(fd)
    return total


#: Checkpoints this large wait for freed memory to settle between runs (small ones: no effect
#: worth the seconds).
SETTLE_FROM = 256 << 20
#: Memory the kernel has handed back to a hypervisor (virtio-balloon free page reporting).
REPORTED_KIB = Path("/sys/module/page_reporting/parameters/reported_kib")


def settle_reported_memory(quiet: float = 2.5, limit: float = 15.0, path: Path = REPORTED_KIB,
                           clock: Callable[[], float] = time.monotonic,
                           sleep: Callable[[float], None] = time.sleep) -> float:
    """On a VM that hands freed memory back to its host, wait until it has stopped (the counter
    unchanged for ``quiet`` seconds, at most ``limit`` in all); returns the seconds waited, 0 where
    there is no such counter.

    The first touch of returned memory is a fault on the host too (0.54 GiB/s against 2 GiB/s on
    this project's VM), and the kernel returns freed memory in bursts over seconds. Without this
    a run inherits whatever the previous one freed and the host still backs, and a loader's rank
    depended on the order (runai-model-streamer: 1.9 GB/s right after a loader that had freed
    11 GiB, 0.5-0.7 GB/s alternating with weightlift).
    """
    began = clock()
    try:
        last = path.read_text()
    except OSError:
        return 0.0
    changed = began
    while clock() - began < limit:
        sleep(0.1)
        try:
            now = path.read_text()
        except OSError:
            break
        if now != last:
            last, changed = now, clock()
        elif clock() - changed >= quiet:
            break
    return clock() - began


@dataclass
class Settings:
    """What every run of one benchmark shares."""

    source: str
    budget: int | None = None          # weightlift's max_host_memory
    engine: str = "auto"               # weightlift's read engine
    memory_limit: int | None = None    # cgroup limit each child runs under
    device: str = "cpu"                # the device scenario's target
    use_cgroup: bool = True            # measure in a fresh cgroup when the machine allows it
    files: list[str] = field(default_factory=list)
    #: Bytes of the largest tensor: the size of the device scenario's destination buffer.
    largest: int = 0
    #: Wait for freed memory to go back to the hypervisor before each run
    #: (``settle_reported_memory``); None: for checkpoints of ``SETTLE_FROM`` bytes or more.
    settle: bool | None = None

    def __post_init__(self) -> None:
        # Headers are read here, once, so children measuring a cold load never read them first.
        if not self.files:
            with resolve(self.source) as layout:
                self.files = [shard.path for shard in layout.shards]
                self.largest = max((e.info.nbytes for e in layout.entries.values()), default=0)
                if self.settle is None:
                    self.settle = layout.total_bytes >= SETTLE_FROM


def cgroup_usable(settings: Settings) -> bool:
    """Whether runs will use a fresh memory cgroup; a memory limit without one is an error."""
    available, reason = probes.MemoryGroup.available()
    if settings.memory_limit is not None and not available:
        raise WeightliftError(f"--memory-limit needs a memory cgroup, but {reason}")
    return available and (settings.use_cgroup or settings.memory_limit is not None)


def run_one(run: Run, settings: Settings, *, verify: bool = False,
            in_group: bool | None = None) -> RunResult:
    """One child process for ``run``, with the cache state set first and memory measured."""
    if in_group is None:
        in_group = cgroup_usable(settings)
    job = {"loader": run.loader, "scenario": run.scenario, "source": settings.source,
           "files": settings.files, "budget": settings.budget, "verify": verify,
           "engine": settings.engine,
           "largest": settings.largest, "sample": not in_group,
           "device": settings.device if run.scenario == "device" else "cpu"}
    argv = [sys.executable, "-m", "weightlift.bench.child", json.dumps(job)]
    set_cache(settings.files, run.cache)
    if settings.settle:
        settle_reported_memory()  # every run starts with the memory freed before it returned
    before = resident(settings.files)
    group_peak = None
    oom_kills = 0
    if in_group:
        with probes.MemoryGroup(None if verify else settings.memory_limit) as group:
            done = subprocess.run(group.command(argv), capture_output=True, text=True)
            group_peak, oom_kills = group.peak(), group.oom_kills()
    else:
        done = subprocess.run(argv, capture_output=True, text=True)
    after = resident(settings.files)
    result = last_json_line(done.stdout)
    status = classify(done.returncode, oom_kills, result)
    memory, source = peak_memory(result, group_peak)
    out = RunResult(run.loader, run.scenario, run.cache, run.rep, status, peak_memory=memory,
                    memory_source=source,
                    cache_left=None if before is None or after is None else after - before)
    if result is not None:
        out.seconds, out.bytes = result.get("seconds"), result.get("bytes")
        out.first = result.get("first")
        out.strategy, out.reason = result.get("strategy"), result.get("reason")
        out.error = result.get("error")
    if status == "failed" and out.error is None:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        out.error = tail[0]
    if verify and status == "failed" and "AssertionError" in (out.error or ""):
        out.status = "wrong bytes"
    return out


@dataclass
class Session:
    """Everything one benchmark produced, as it goes to JSON."""

    settings: Settings
    runs: list[RunResult] = field(default_factory=list)
    #: (loader, scenario) → "ok" or what went wrong, from the one verification run.
    verified: dict[tuple[str, str], str] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    #: Why no loader was verified though verification was asked for (None: they were).
    unverified: str | None = None
    machine: dict[str, Any] = field(default_factory=dict)
    checkpoint: dict[str, Any] = field(default_factory=dict)


def benchmark(settings: Settings, loaders: Sequence[str], *, scenarios: Sequence[str] = SCENARIOS,
              caches: Sequence[str] = CACHES, reps: int = 3, verify: bool = True,
              on_start: Callable[[int, int, Run], None] | None = None,
              on_result: Callable[[RunResult], None] | None = None) -> Session:
    """Verify each loader once per scenario, then run the interleaved measurements."""
    session = Session(settings, machine=machine_info(settings.files),
                      checkpoint=checkpoint_info(settings))
    in_group = cgroup_usable(settings)
    usable = []
    for name in loaders:
        why = LOADERS[name].unavailable()
        if why is None:
            usable.append(name)
        else:
            session.unavailable[name] = why
    checks = []
    if verify:
        session.unverified = reference_missing(settings.files)
    if verify and session.unverified is None:
        checks = [Run(name, scenario, "warm", -1) for name in usable for scenario in scenarios
                  if LOADERS[name].kind != "reference" and LOADERS[name].verifiable
                  and scenario in LOADERS[name].scenarios]
    runs = [run for run in interleave(usable, scenarios, caches, reps)
            if run.scenario in LOADERS[run.loader].scenarios]
    total = len(checks) + len(runs)
    for i, run in enumerate(checks):
        if on_start is not None:
            on_start(i, total, run)
        check = run_one(run, settings, verify=True, in_group=in_group)
        session.verified[(run.loader, run.scenario)] = (
            "ok" if check.status == "ok" else f"{check.status}: {check.error}")
    for i, run in enumerate(runs, start=len(checks)):
        if on_start is not None:
            on_start(i, total, run)
        if session.verified.get((run.loader, run.scenario), "ok") != "ok":
            continue  # a loader that returns wrong bytes has no speed worth reporting
        result = run_one(run, settings, in_group=in_group)
        session.runs.append(result)
        if on_result is not None:
            on_result(result)
    return session


def reference_missing(files: Sequence[str]) -> str | None:
    """Why the loaders' bytes cannot be checked here, or None. safetensors files are checked
    against plain reads of the file (child.Verify); GGUF files against gguf-py's reader."""
    if any(path.endswith(".gguf") for path in files) and importlib.util.find_spec("gguf") is None:
        return "GGUF is checked against gguf-py's reader: pip install 'weightlift[bench]'"
    return None


def checkpoint_info(settings: Settings) -> dict[str, Any]:
    with resolve(settings.source) as layout:
        sizes = [entry.info.nbytes for entry in layout.entries.values()]
        return {"source": settings.source, "files": len(layout.shards),
                "tensors": len(layout.entries), "bytes": layout.total_bytes,
                "largest_tensor": max(sizes, default=0)}


def machine_info(files: Sequence[str]) -> dict[str, Any]:
    """The hardware and software a table was produced on, for the reader of the numbers."""
    import platform
    from importlib import metadata

    import torch

    cpu = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for package in ("weightlift", "torch", "safetensors", "runai-model-streamer",
                    "fastsafetensors"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    available, how = probes.MemoryGroup.available()
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory": probes.meminfo().get("MemTotal"),
        "kernel": platform.release(), "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "file_system": (probes.file_system(files[0]) if local_files(files)
                        else "object storage" if files else None),
        "memory_cgroup": how if available else f"unavailable: {how}",
        "versions": versions,
    }
