"""``weightlift bench --small``: the fixed cost of a load, weightlift's drop-ins against safetensors
in one process, side by side.

Where ``bench/runner.py`` measures large loads, each in a fresh process, this measures what a
program that opens many small files pays per call: LoRA adapters, VAEs, embeddings, test
fixtures. Every case runs both loaders in one process, interleaved (the order alternates each
repetition), warm and cold, and reports medians and their ratio. Cold: the files' pages are
dropped first (``POSIX_FADV_DONTNEED``) and mincore must show none cached; warm: they are read
into the page cache and mincore must show all of them. A result is dropped after the clock stops.
Before any timing, each case's weightlift result is compared with safetensors' byte for byte.

    session = run_small(directory, sizes=(1_000_000, 8_000_000), adapters=200, reps=15)
    print(markdown(session))
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import probes
from ..units import format_bytes

#: The sizes of the single-file cases (bytes of tensors), and the files of the many-files case.
SIZES = (1 << 20, 8 << 20, 64 << 20)
ADAPTERS = 200
#: One adapter: 32 LoRA matrices of rank 8 around a 256-wide layer, bf16 (~130 KB).
ADAPTER_SHAPES = ((8, 256), (256, 8))
#: Tensors per single-file case (equal sizes, bf16).
TENSORS = 16

Call = Callable[[], Any]


@dataclass
class Case:
    """One comparison: a weightlift call and the safetensors call it stands in for."""

    name: str
    files: list[str]
    weightlift: Call
    safetensors: Call


@dataclass
class Result:
    case: str
    cache: str
    weightlift: list[float] = field(default_factory=list)
    safetensors: list[float] = field(default_factory=list)
    verified: bool = False

    @property
    def ratio(self) -> float:
        return statistics.median(self.weightlift) / statistics.median(self.safetensors)

    def to_dict(self) -> dict[str, Any]:
        return {"case": self.case, "cache": self.cache, "verified": self.verified,
                "weightlift_ms": [t * 1e3 for t in self.weightlift],
                "safetensors_ms": [t * 1e3 for t in self.safetensors],
                "median_weightlift_ms": statistics.median(self.weightlift) * 1e3,
                "median_safetensors_ms": statistics.median(self.safetensors) * 1e3,
                "ratio": self.ratio}


@dataclass
class SmallSession:
    results: list[Result]
    reps: int
    loadavg_before: str
    loadavg_after: str

    def to_dict(self) -> dict[str, Any]:
        return {"reps": self.reps, "loadavg_before": self.loadavg_before,
                "loadavg_after": self.loadavg_after,
                "results": [r.to_dict() for r in self.results]}


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> str:
    """``tensors`` saved by safetensors itself, written back (dirty pages cannot be dropped)."""
    from safetensors.torch import save_file

    if not path.exists():
        save_file(tensors, str(path))
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return str(path)


def make_files(directory: Path, sizes: Sequence[int], adapters: int
               ) -> tuple[dict[int, str], list[str]]:
    """The single files (size → path) and the adapters, made once per directory."""
    directory.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(25)
    singles = {}
    for size in sizes:
        per = max(1, size // TENSORS // 2)
        tensors = {f"layers.{i}.weight": torch.randn(per, generator=gen).to(torch.bfloat16)
                   for i in range(TENSORS)}
        singles[size] = write_file(directory / f"single-{size}.safetensors", tensors)
    files = []
    for n in range(adapters):
        tensors = {f"base_model.layers.{i // 2}.lora_{'AB'[i % 2]}.weight":
                   torch.randn(ADAPTER_SHAPES[i % 2], generator=gen).to(torch.bfloat16)
                   for i in range(32)}
        files.append(write_file(directory / f"adapter-{n:04d}.safetensors", tensors))
    return singles, files


def cases(singles: dict[int, str], adapters: list[str]) -> list[Case]:
    import safetensors
    import safetensors.torch

    import weightlift
    import weightlift.torch

    def one_tensor(opener: Callable[..., Any], path: str) -> Call:
        def run() -> torch.Tensor:
            with opener(path, framework="pt") as f:
                return f.get_tensor(f.keys()[len(f.keys()) // 2])
        return run

    def keys(opener: Callable[..., Any], path: str) -> Call:
        def run() -> tuple[list[str], Any]:
            with opener(path, framework="pt") as f:
                return f.keys(), f.metadata()
        return run

    found: list[Case] = []
    for size, path in singles.items():
        label = format_bytes(size)
        found.append(Case(f"torch.load_file {label}", [path],
                          lambda p=path: weightlift.torch.load_file(p),
                          lambda p=path: safetensors.torch.load_file(p)))
        found.append(Case(f"weightlift.load {label}", [path], lambda p=path: weightlift.load(p),
                          lambda p=path: safetensors.torch.load_file(p)))
    middle = sorted(singles)[len(singles) // 2] if singles else None
    if middle is not None:
        path, label = singles[middle], format_bytes(middle)
        found.append(Case(f"safe_open + get_tensor {label}", [path],
                          one_tensor(weightlift.safe_open, path),
                          one_tensor(safetensors.safe_open, path)))
        found.append(Case(f"safe_open + keys + metadata {label}", [path],
                          keys(weightlift.safe_open, path), keys(safetensors.safe_open, path)))
    if adapters:
        found.append(Case(f"{len(adapters)} adapters, load_file each", adapters,
                          lambda: [weightlift.torch.load_file(p) for p in adapters],
                          lambda: [safetensors.torch.load_file(p) for p in adapters]))
    return found


def checkpoint_cases(source: str) -> list[Case]:
    """A (large) checkpoint: the first tensor of ``stream()`` against safetensors' ``safe_open`` +
    ``get_tensor`` of the first file's first tensor, and ``load()`` against ``load_file`` of every
    file. Each returns the same tensors for both (by name), so the bytes are compared too."""
    import safetensors
    import safetensors.torch

    import weightlift
    from ..sources import resolve

    with resolve(source) as layout:
        files = [shard.path for shard in layout.shards]
        first = min(layout.entries.values(), key=lambda e: (e.shard, e.info.start)).name

    def stream_first() -> dict[str, torch.Tensor]:
        tensors = weightlift.stream(source)
        try:
            name, tensor = next(tensors)
        finally:
            tensors.close()
        return {name: tensor}

    def open_first() -> dict[str, torch.Tensor]:
        with safetensors.safe_open(files[0], framework="pt") as f:
            return {first: f.get_tensor(first)}

    def load_files() -> dict[str, torch.Tensor]:
        state: dict[str, torch.Tensor] = {}
        for path in files:
            state.update(safetensors.torch.load_file(path))
        return state

    name = os.path.basename(os.path.normpath(source))
    return [Case(f"{name}: stream() first tensor vs safe_open + get_tensor", files, stream_first,
                 open_first),
            Case(f"{name}: weightlift.load vs load_file of each file", files,
                 lambda: weightlift.load(source), load_files)]


def same(a: Any, b: Any) -> bool:
    """Equal results, byte for byte: tensors, and lists, tuples and dicts of them."""
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and torch.equal(a.contiguous().view(-1).view(torch.uint8),
                                b.contiguous().view(-1).view(torch.uint8)))
    if isinstance(a, dict):
        return isinstance(b, dict) and sorted(a) == sorted(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(
            same(x, y) for x, y in zip(a, b))
    return bool(a == b)


def set_cache(files: Sequence[str], state: str) -> None:
    """Drop the files' pages (``cold``) or read them in (``warm``); mincore must agree."""
    for path in files:
        size = os.path.getsize(path)
        for _ in range(100):
            if state == "cold":
                probes.evict(path)
                if probes.resident_bytes(path) == 0:
                    break
            else:
                if probes.resident_bytes(path) >= size:
                    break
                with open(path, "rb", buffering=0) as f:
                    while f.read(16 << 20):
                        pass
            time.sleep(0.001)
        else:
            raise RuntimeError(f"{path}: the page cache did not reach {state}")


def timed(call: Call, files: Sequence[str], state: str) -> float:
    set_cache(files, state)
    started = time.perf_counter()
    result = call()
    seconds = time.perf_counter() - started
    del result  # unmapping and freeing are the consumer's, after the clock stops
    return seconds


def run_small(directory: Path, *, sizes: Sequence[int] = SIZES, adapters: int = ADAPTERS,
              reps: int = 15, caches: Sequence[str] = ("warm", "cold"),
              source: str | None = None,
              on_step: Callable[[str], None] | None = None) -> SmallSession:
    """Every case, warm and cold, ``reps`` times each loader, interleaved; with ``source``, also
    the cases of ``checkpoint_cases`` on that checkpoint."""
    singles, files = make_files(directory, sizes, adapters)
    loadavg = _loadavg()
    results = []
    chosen = cases(singles, files) + (checkpoint_cases(source) if source is not None else [])
    for case in chosen:
        if on_step is not None:
            on_step(case.name)
        verified = same(case.weightlift(), case.safetensors())
        if not verified:
            raise AssertionError(f"{case.name}: weightlift's result differs from safetensors'")
        for _ in range(2):  # imports and first-use costs out of the way
            case.weightlift()
            case.safetensors()
        for cache in caches:
            result = Result(case.name, cache, verified=verified)
            for rep in range(reps):
                pair = [("weightlift", case.weightlift), ("safetensors", case.safetensors)]
                for name, call in pair if rep % 2 == 0 else pair[::-1]:
                    getattr(result, name).append(timed(call, case.files, cache))
            results.append(result)
    return SmallSession(results, reps, loadavg, _loadavg())


def _loadavg() -> str:
    try:
        with open("/proc/loadavg", encoding="ascii") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "unknown"


def markdown(session: SmallSession) -> str:
    lines = ["| case | cache | weightlift ms | safetensors ms | ratio | bytes checked |",
             "|---|---|---:|---:|---:|---|"]
    for r in session.results:
        lines.append(f"| {r.case} | {r.cache} | {statistics.median(r.weightlift) * 1e3:.2f} | "
                     f"{statistics.median(r.safetensors) * 1e3:.2f} | {r.ratio:.2f}× | "
                     f"{'yes' if r.verified else 'no'} |")
    lines.append("")
    lines.append(f"medians of {session.reps} interleaved runs each; load average "
                 f"{session.loadavg_before} before, {session.loadavg_after} after")
    return "\n".join(lines)
