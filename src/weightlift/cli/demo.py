"""``weightlift demo``: the project's point in one screen, measured, in about a minute.

A synthetic Llama-shaped checkpoint (generated once and cached) is loaded twice over, each load in
a fresh process with the checkpoint evicted from the page cache first (``posix_fadvise``) and the
memory an earlier load freed settled, by the bench's own child/runner machinery:

* **for a GPU** (the bench's ``device`` scenario: each tensor is copied into a reused destination
  buffer and dropped): weightlift streams through a bounded window, where the mmap path (how
  safetensors and llama.cpp load by default) maps whole files, so its host memory and page cache
  grow with the checkpoint;
* **into CPU memory** (a state dict kept): every loader holds the checkpoint; what differs is the
  speed and the page cache left behind.

The mmap path is weightlift's own ``mmap`` strategy used as those libraries use a mapping, so the
contrast shows with the core dependencies alone; safetensors' rows join where it is installed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from rich.table import Table

from ..bench import report
from ..bench.loaders import MMAP_PATH
from ..bench.runner import RunResult, Session, Settings
from ..budget import resolve_budget
from ..units import format_bytes, parse_size
from .bench import checkpoint_source, device_target, measure, title
from .output import console as stdout, label, number

AUTO = "weightlift auto"
MMAP = MMAP_PATH
PEER = "safetensors load_file"
#: How the table names the mmap path (the line under it says more).
MMAP_LABEL = "mmap, as safetensors/llama.cpp"
#: (scenario, heading) in the order the screen shows them; each has a row per loader.
SECTIONS = (
    ("device", "For a GPU: each tensor copied to its device buffer, then dropped"),
    ("to_cpu", "Into CPU memory: a state dict kept"),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="see what weightlift does, measured, in about a minute")
    parser.add_argument("--size", type=parse_size, default=1000**3, metavar="SIZE",
                        help="synthetic checkpoint size (default 1GB)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where the checkpoint is cached (default ~/.cache/weightlift)")
    parser.add_argument("--max-host-memory", type=parse_size, metavar="SIZE",
                        help="weightlift's host-memory budget (default: its own default)")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    parser.set_defaults(func=run)


def loaders() -> list[str]:
    """Every loader the demo runs here; safetensors only where it is installed."""
    try:
        import safetensors  # noqa: F401 - importable, not just present
        peer = True
    except ImportError:
        peer = False
    return [AUTO, MMAP, PEER] if peer else [AUTO, MMAP]


def run(args: argparse.Namespace) -> int:
    source = checkpoint_source(None, args.size, args.cache_dir, quiet=args.json)
    settings = Settings(source, budget=args.max_host_memory, device=device_target())
    session = measure(settings, loaders(), scenarios=[s for s, _ in SECTIONS],
                      caches=["cold"], reps=1, verify=False)
    if args.json:
        print(json.dumps(report.to_json(session), indent=2))
        return 0
    console = stdout()
    console.print(f"[bold]{title(session)}[/bold]; each load in a fresh process, page cache "
                  "evicted first")
    for scenario, heading in SECTIONS:
        console.print(table([r for r in session.runs if r.scenario == scenario], heading))
    budget = resolve_budget(args.max_host_memory)
    for line in story(session, budget):
        console.print(line, highlight=False, markup=False)
    return 0 if all(r.status == "ok" for r in session.runs) else 1


def table(runs: Sequence[RunResult], heading: str) -> Table:
    out = Table(title=heading, title_justify="left")
    label(out, "loader")
    for name in ("seconds", "GB/s", "peak host memory", "page cache left"):
        number(out, name)
    for result in runs:
        name = MMAP_LABEL if result.loader == MMAP else result.loader
        if result.loader == AUTO and result.strategy:
            name += f"→{result.strategy}"
        if result.status != "ok":
            out.add_row(name, result.status, "-", format_bytes(result.peak_memory), "-")
            continue
        out.add_row(name, f"{result.seconds:.2f}", f"{result.gbps:.2f}",
                    format_bytes(result.peak_memory), format_bytes(result.cache_left))
    return out


def story(session: Session, budget: int) -> list[str]:
    """The table's meaning in a few sentences, every number a measured one."""
    size = session.checkpoint["bytes"]
    runs = {(r.scenario, r.loader): r for r in session.runs if r.status == "ok"}
    lines = []
    gpu, gpu_peer = runs.get(("device", AUTO)), runs.get(("device", PEER))
    if gpu is not None and gpu_peer is not None:
        lines.append(f"For a GPU, weightlift held {format_bytes(gpu.peak_memory)} of host memory "
                     f"for a {format_bytes(size)} checkpoint (budget {format_bytes(budget)}); "
                     f"safetensors held {format_bytes(gpu_peer.peak_memory)} and left "
                     f"{format_bytes(gpu_peer.cache_left)} in the page cache, weightlift "
                     f"{format_bytes(gpu.cache_left)}.")
    cpu, cpu_peer = runs.get(("to_cpu", AUTO)), runs.get(("to_cpu", PEER))
    if cpu is not None and cpu_peer is not None and cpu.seconds and cpu_peer.seconds:
        ratio = cpu_peer.seconds / cpu.seconds
        pace = f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"
        lines.append(f"Into CPU memory, weightlift took {cpu.seconds:.2f} s ({pace} than "
                     f"safetensors' {cpu_peer.seconds:.2f} s) and left "
                     f"{format_bytes(cpu.cache_left)} of page cache where safetensors left "
                     f"{format_bytes(cpu_peer.cache_left)}.")
    contrast = meaning(runs, size, budget)
    if contrast is not None:
        lines.append(contrast)
    if MMAP in {r.loader for r in session.runs}:
        lines.append(f"{MMAP_LABEL}: weightlift's mmap strategy, used as safetensors and "
                     "llama.cpp use a mapping by default; its memory is the mapping's, its speed "
                     "weightlift's.")
    choices = {scenario: runs[(scenario, AUTO)] for scenario, _ in SECTIONS
               if (scenario, AUTO) in runs and runs[(scenario, AUTO)].strategy}
    if len({(r.strategy, r.reason) for r in choices.values()}) == 1 and len(choices) > 1:
        first = next(iter(choices.values()))
        lines.append(f"auto chose {first.strategy} for both: {first.reason}")
    else:
        for scenario, chosen in choices.items():
            where = "for a GPU" if scenario == "device" else "into CPU memory"
            lines.append(f"auto chose {chosen.strategy} {where}: {chosen.reason}")
    for result in session.runs:
        if result.error:
            lines.append(f"{result.loader} ({result.scenario}): {result.status}: {result.error}")
    if PEER not in {r.loader for r in session.runs}:
        lines.append("safetensors is not installed: pip install safetensors to compare with it.")
    source = next((r.memory_source for r in session.runs if r.memory_source), "not measured")
    lines.append(f"peak host memory: what the load added ({source}). More loaders and warm "
                 "runs: weightlift bench --peers")
    return lines


def meaning(runs: Mapping[tuple[str, str], RunResult], size: int, budget: int) -> str | None:
    """One line on what the mmap path's host memory and page cache mean next to weightlift's,
    each claim made only where the measured numbers bear it out."""
    parts = []
    gpu, gpu_map = runs.get(("device", AUTO)), runs.get(("device", MMAP))
    if gpu is not None and gpu_map is not None and None not in (gpu.peak_memory,
                                                                 gpu_map.peak_memory):
        held, mapped = gpu.peak_memory, gpu_map.peak_memory
        text = (f"for a GPU the mmap path held {format_bytes(mapped)} of host memory "
                f"({mapped / size:.0%} of the checkpoint) and weightlift "
                f"{format_bytes(held)} ({held / size:.0%})")
        if mapped > 1.25 * held:
            text += f", {mapped / max(held, 1):.1f}× less"
            if mapped >= size / 2 and held <= budget:
                text += (": on the mmap path host memory grows with the checkpoint, weightlift's "
                         f"stays within its {format_bytes(budget)} budget")
        elif held > 1.25 * mapped:
            text += ": weightlift held more at this size"
        else:
            text += ": about the same at this size"
        parts.append(text)
    left = [(runs[(s, MMAP)].cache_left, runs[(s, AUTO)].cache_left) for s, _ in SECTIONS
            if (s, MMAP) in runs and (s, AUTO) in runs]
    left = [(mapped, held) for mapped, held in left if mapped is not None and held is not None]
    if left:
        mapped, held = max(m for m, _ in left), max(h for _, h in left)
        if mapped > held + size // 10:
            parts.append(f"after the load the mmap path left {format_bytes(mapped)} in the page "
                         f"cache where weightlift left {format_bytes(held)}: memory this machine "
                         "(and a container's memory limit) still counts until the kernel "
                         "reclaims it")
        elif max(mapped, held) < size // 10:
            parts.append(f"neither left much page cache behind ({format_bytes(mapped)} and "
                         f"{format_bytes(held)})")
        else:
            parts.append(f"page cache left behind: {format_bytes(mapped)} on the mmap path, "
                         f"{format_bytes(held)} with weightlift")
    if not parts:
        return None
    return "What it means: " + "; ".join(parts) + "."
