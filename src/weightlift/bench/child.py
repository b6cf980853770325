"""One measured load in a fresh process: ``python -m weightlift.bench.child '<job json>'``.

A fresh process per load means no allocator, page-table or import state carries over between
loaders. Everything is imported and the destination allocated before the clock starts. The child
prints exactly one JSON line (the last line of stdout) with time, bytes and memory; memory a
cgroup sees is read by the parent, which owns the group.

Without a cgroup, peak host memory is sampled here as anonymous RSS plus the checkpoint's
page-cache residency (mincore) at the same instant: file pages an mmap load maps count once.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import probes
from ..api import parse_dtype
from .loaders import LOADERS, Job
from .runner import local_files


def anon_rss() -> int:
    """Resident memory not backed by the file system (RssAnon + RssShmem: anonymous shared
    mappings are shmem), i.e. what page-cache residency does not already count."""
    total = 0
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total


def cached(paths: Sequence[str]) -> int:
    return sum(probes.resident_bytes(p) for p in local_files(paths))


class Sampler:
    """Peak of ``anon RSS + checkpoint page cache``, sampled until stopped, where no cgroup
    measures it (``sample=False``: only the kernel's RSS high-water mark).

    mincore costs ~10 ms per GB of checkpoint, so sampling backs off to stay under ~10% of a
    core: on a small machine a busy probe would slow the load it measures.
    """

    def __init__(self, paths: Sequence[str], *, sample: bool = True, interval: float = 0.02,
                 probe: Callable[[], tuple[int, int]] | None = None) -> None:
        self.paths = list(paths)
        self.probe = probe or (lambda: (anon_rss(), cached(self.paths)))
        self.interval = interval
        self.sampling = sample
        anon, cache = self.probe() if sample else (0, 0)
        self.start = anon + cache
        self.peak = self.start
        self.cache_start = cache
        self.cache_peak = cache
        self.rss_start = probes.rss_bytes()
        self.hwm_reset = probes.reset_peak_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        if sample:
            self._thread.start()

    def sample(self) -> float:
        """Take one sample; returns how long it took."""
        began = time.perf_counter()
        anon, cache = self.probe()
        self.peak = max(self.peak, anon + cache)
        self.cache_peak = max(self.cache_peak, cache)
        return time.perf_counter() - began

    def _run(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            wait = max(self.interval, 9 * self.sample())

    def stop(self) -> dict[str, int | None]:
        peak_rss = probes.peak_rss() if self.hwm_reset else None
        memory: dict[str, int | None] = {
            "rss_growth": None if peak_rss is None else peak_rss - self.rss_start}
        if self.sampling:
            self._stop.set()
            self._thread.join()
            self.sample()
            memory.update(sampled_peak=self.peak - self.start,
                          cache_peak=self.cache_peak - self.cache_start)
        return memory


@dataclass
class Keep:
    """``to_cpu`` (and ``device`` on a real GPU): every tensor is kept until the load ends, and
    its pages touched."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    bytes: int = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = tensor
        self.bytes += tensor.nbytes
        touch(tensor)


def touch(tensor: torch.Tensor) -> None:
    """Read one byte per page, so a state dict over a lazy mapping is really in memory when the
    clock stops, as it is after any use of the weights; a no-op cost for loaded memory."""
    if tensor.device.type == "cpu" and tensor.numel():
        tensor.reshape(-1).view(torch.uint8)[::probes.PAGE_SIZE].sum()


class Scratch:
    """``device`` without a GPU: each tensor's bytes are copied into one preallocated buffer the
    size of the largest tensor (as into GPU memory) and the tensor is dropped."""

    def __init__(self, largest: int) -> None:
        self.buffer = torch.zeros(largest, dtype=torch.uint8)  # touched now, not while timed
        self.bytes = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        n = tensor.nbytes
        if n > self.buffer.numel():  # a dequantizing loader's tensors outgrow the packed ones
            self.buffer = torch.zeros(n, dtype=torch.uint8)
        if n:
            self.buffer[:n].copy_(tensor.reshape(-1).view(torch.uint8))
        self.bytes += n


@dataclass(frozen=True)
class Expected:
    """Where a tensor's bytes are in its file, as the file's own header says."""

    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


def safetensors_entries(path: str) -> dict[str, Expected]:
    """Each tensor's dtype, shape and absolute byte range, from the file's header read with plain
    ``struct`` and ``json`` (the format in full: an 8-byte length, then JSON), so the reference
    shares no code with the loaders it checks and needs no optional package."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    base = 8 + length
    return {name: Expected(path, entry["dtype"], tuple(entry["shape"]),
                           base + entry["data_offsets"][0], base + entry["data_offsets"][1])
            for name, entry in header.items() if name != "__metadata__"}


def read_range(want: Expected, name: str) -> bytearray:
    """The bytes of ``[want.start, want.end)``, with plain positional reads."""
    data = bytearray(want.end - want.start)
    view = memoryview(data)
    done = 0
    with open(want.path, "rb", buffering=0) as f:
        while done < len(data):
            n = os.preadv(f.fileno(), [view[done:]], want.start + done)
            if n == 0:
                raise AssertionError(f"{name}: {want.path} ends before its bytes")
            done += n
    return data


class Verify:
    """Compares every tensor bit for bit with the bytes its file holds at the offsets its header
    gives, read with plain positional reads: the reference is the file itself, on every install
    (``bench`` verifies where the safetensors package is not installed)."""

    def __init__(self, files: Sequence[str]) -> None:
        self.where: dict[str, Expected] = {}
        for path in files:
            self.where.update(safetensors_entries(path))
        self.seen: set[str] = set()
        self.bytes = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where:
            raise AssertionError(f"unexpected tensor {name!r}")
        want = self.where[name]
        dtype = parse_dtype(want.dtype)
        shape = want.shape
        if want.dtype == "F4" and shape:  # torch's float4 packs two values in a byte
            shape = (*shape[:-1], shape[-1] // 2)
        got = tensor.detach().cpu().contiguous()
        if got.dtype != dtype or tuple(got.shape) != shape:
            raise AssertionError(f"{name}: {got.dtype}{list(got.shape)} != "
                                 f"{dtype}{list(shape)} (the header of {want.path})")
        size = want.end - want.start
        if size and not torch.equal(got.reshape(-1).view(torch.uint8),
                                    torch.frombuffer(read_range(want, name), dtype=torch.uint8)):
            raise AssertionError(f"{name}: bytes differ from {want.path}")
        self.seen.add(name)
        self.bytes += tensor.nbytes

    def finish(self) -> None:
        missing = set(self.where) - self.seen
        if missing:
            raise AssertionError(f"{len(missing)} tensors missing, e.g. {sorted(missing)[0]!r}")


class VerifyGGUF(Verify):
    """Compares every tensor's bytes with what gguf-py's ``GGUFReader`` reads."""

    def __init__(self, files: Sequence[str]) -> None:  # noqa: D107 - not the safetensors header
        from gguf import GGUFReader

        self.where = {t.name: t for path in files for t in GGUFReader(path).tensors}
        self.seen: set[str] = set()
        self.bytes = 0

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.where:
            raise AssertionError(f"unexpected tensor {name!r}")
        import numpy as np

        want = np.ascontiguousarray(self.where[name].data).reshape(-1).view(np.uint8)
        got = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if not np.array_equal(got, want):
            raise AssertionError(f"{name}: bytes differ from gguf-py's GGUFReader")
        self.seen.add(name)
        self.bytes += tensor.nbytes


def measure(job: Job, loader_name: str, *, largest: int = 0, verify: bool = False,
            sample: bool = True) -> dict[str, Any]:
    """Run one load and return what the parent needs (one JSON object)."""
    loader = LOADERS[loader_name]
    if verify:
        gguf = bool(job.files) and job.files[0].endswith(".gguf")
        sink: Any = VerifyGGUF(job.files) if gguf else Verify(job.files)
    elif job.scenario == "device" and job.device == "cpu":
        sink = Scratch(largest)
    else:
        sink = Keep()
    result: dict[str, Any] = {"status": "ok"}
    if loader.choice is not None:  # before the clock: what auto will pick, and why
        result["strategy"], result["reason"] = loader.choice(job)
    if loader.prepare is not None:
        loader.prepare()
    usage_before = probes.cgroup_usage()
    sampler = Sampler(job.files, sample=sample)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first: float | None = None
        started = time.perf_counter()
        if loader.raw is not None:
            nbytes = loader.raw(job.files)
        else:
            for name, tensor in loader.run(job):
                if first is None:  # time to first tensor: what a stream's consumer waits
                    first = time.perf_counter() - started
                sink(name, tensor)
            if job.device.startswith("cuda"):
                torch.cuda.synchronize()
            nbytes = sink.bytes
        seconds = time.perf_counter() - started
    memory = sampler.stop()
    if verify:
        sink.finish()
    fallbacks = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if fallbacks:  # e.g. O_DIRECT refused: the strategy that really ran is named there
        result["reason"] = "; ".join(filter(None, [result.get("reason"), *fallbacks]))
    result.update(seconds=seconds, first=first, bytes=nbytes, cgroup_baseline=usage_before, **memory)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    spec = json.loads(args[0])
    job = Job(source=spec["source"], files=tuple(spec["files"]), scenario=spec["scenario"],
              device=spec.get("device", "cpu"), budget=spec.get("budget"),
              engine=spec.get("engine", "auto"))
    try:
        result = measure(job, spec["loader"], largest=spec.get("largest", 0),
                         verify=spec.get("verify", False), sample=spec.get("sample", True))
    except Exception as exc:  # reported to the parent, which shows it in the table
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
