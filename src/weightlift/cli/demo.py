"""``weightlift demo``: the quick-start job. Generate a synthetic Llama-shaped checkpoint, load it
with every strategy (each in a fresh process, cold page cache) and show what each cost.

Needs only the core dependencies: no peers, no matplotlib.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..bench import report
from ..bench.loaders import WEIGHTLIFT_STRATEGIES
from ..bench.runner import Settings
from ..units import format_bytes, parse_size
from .bench import checkpoint_source, device_target, measure, title


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("demo", help="generate a checkpoint and load it with every strategy")
    parser.add_argument("--size", type=parse_size, default=1000**3, metavar="SIZE",
                        help="synthetic checkpoint size (default 1GB)")
    parser.add_argument("--cache-dir", type=Path,
                        help="where the checkpoint is cached (default ~/.cache/weightlift)")
    parser.add_argument("--max-host-memory", type=parse_size, metavar="SIZE",
                        help="weightlift's host-memory budget (default: its own default)")
    parser.add_argument("--json", action="store_true", help="print the runs as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    source = checkpoint_source(None, args.size, args.cache_dir, quiet=args.json)
    settings = Settings(source, budget=args.max_host_memory, device=device_target())
    session = measure(settings, [f"weightlift {s}" for s in WEIGHTLIFT_STRATEGIES],
                      scenarios=["to_cpu"], caches=["cold"], reps=1, verify=False)
    if args.json:
        print(json.dumps(report.to_json(session), indent=2))
        return 0
    console = Console()
    console.print(table(session.runs, title(session)))
    for result in session.runs:
        if result.loader == "weightlift auto" and result.strategy:
            console.print(f"auto chose [bold]{result.strategy}[/bold]: {result.reason}")
    for result in session.runs:
        if result.error:
            console.print(f"{result.loader}: {result.status}: {result.error}", highlight=False)
    source = next((r.memory_source for r in session.runs if r.memory_source), "")
    console.print(f"peak host memory = what the load added ({source or 'not measured'}); "
                  "each load ran in a fresh process with the checkpoint evicted from the page "
                  "cache first. For peers and more scenarios: weightlift bench --peers",
                  highlight=False)
    return 0 if all(r.status == "ok" for r in session.runs) else 1


def table(runs: list, caption: str) -> Table:
    out = Table(title=caption)
    for name in ("strategy", "seconds", "GB/s", "peak host memory", "page cache left"):
        out.add_column(name, justify="left" if name == "strategy" else "right")
    for result in runs:
        name = result.loader.removeprefix("weightlift ")
        if name == "auto" and result.strategy:
            name += f" → {result.strategy}"
        if result.status != "ok":
            out.add_row(name, result.status, "-", format_bytes(result.peak_memory), "-")
            continue
        out.add_row(name, f"{result.seconds:.3f}", f"{result.gbps:.2f}",
                    format_bytes(result.peak_memory), format_bytes(result.cache_left))
    return out
