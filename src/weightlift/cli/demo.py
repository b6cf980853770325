"""``weightlift demo``: the project's point in one screen, measured, in under a minute.

A synthetic Llama-shaped checkpoint (generated once and cached) is loaded twice over, each load in
a fresh process with the checkpoint evicted from the page cache first (``posix_fadvise``), by the
bench's own child/runner machinery:

* **for a GPU** (the bench's ``device`` scenario: each tensor is copied into a reused destination
  buffer and dropped): weightlift streams through a bounded window, where safetensors' mmap path
  maps whole files, so its host memory and page cache grow with the checkpoint;
* **into CPU memory** (a state dict kept): every loader holds the checkpoint; what differs is the
  speed and the page cache left behind.

Needs only the core dependencies; safetensors rows appear when the package is installed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..bench import report
from ..bench.runner import RunResult, Session, Settings
from ..budget import resolve_budget
from ..units import format_bytes, parse_size
from .bench import checkpoint_source, device_target, measure, title

AUTO = "weightlift auto"
PEER = "safetensors load_file"
#: (scenario, heading) in the order the screen shows them; each has a row per loader.
SECTIONS = (
    ("device", "For a GPU: each tensor copied to its device buffer, then dropped"),
    ("to_cpu", "Into CPU memory: a state dict kept"),
)


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="see what weightlift does, measured, in under a minute")
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
    return [AUTO, PEER] if peer else [AUTO]


def run(args: argparse.Namespace) -> int:
    source = checkpoint_source(None, args.size, args.cache_dir, quiet=args.json)
    settings = Settings(source, budget=args.max_host_memory, device=device_target())
    session = measure(settings, loaders(), scenarios=[s for s, _ in SECTIONS],
                      caches=["cold"], reps=1, verify=False)
    if args.json:
        print(json.dumps(report.to_json(session), indent=2))
        return 0
    console = Console()
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
    for name in ("loader", "seconds", "GB/s", "peak host memory", "page cache left"):
        out.add_column(name, justify="left" if name == "loader" else "right", no_wrap=True)
    for result in runs:
        name = result.loader
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
    if gpu is not None:
        text = (f"For a GPU, weightlift held {format_bytes(gpu.peak_memory)} of host memory for a "
                f"{format_bytes(size)} checkpoint (budget {format_bytes(budget)})")
        if gpu_peer is not None:
            text += (f"; safetensors held {format_bytes(gpu_peer.peak_memory)} and left "
                     f"{format_bytes(gpu_peer.cache_left)} in the page cache, weightlift "
                     f"{format_bytes(gpu.cache_left)}")
        lines.append(text + ".")
    cpu, cpu_peer = runs.get(("to_cpu", AUTO)), runs.get(("to_cpu", PEER))
    if cpu is not None and cpu_peer is not None and cpu.seconds and cpu_peer.seconds:
        ratio = cpu_peer.seconds / cpu.seconds
        pace = f"{ratio:.1f}× faster" if ratio >= 1 else f"{1 / ratio:.1f}× slower"
        lines.append(f"Into CPU memory, weightlift took {cpu.seconds:.2f} s ({pace} than "
                     f"safetensors' {cpu_peer.seconds:.2f} s) and left "
                     f"{format_bytes(cpu.cache_left)} of page cache where safetensors left "
                     f"{format_bytes(cpu_peer.cache_left)}.")
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
