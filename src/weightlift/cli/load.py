"""``weightlift load SOURCE``: load a checkpoint and report time, GB/s and host memory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.table import Table

from ..api import load
from ..io import NAMES
from ..io.engine import ENGINES
from ..report import LoadReport
from ..units import format_bytes, parse_size
from .output import console, label
from .progress import byte_progress
from .storage import add_storage_flags, source_of


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("load", help="load a checkpoint and report speed and memory")
    parser.add_argument("source", help="a .safetensors file, an index .json, a directory or a "
                        "URL (s3://, gs://, az://, https://)")
    parser.add_argument("--device", default="cpu", help="target device (default: cpu)")
    parser.add_argument("--strategy", choices=NAMES, default="auto")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="how reads are issued: io_uring, a thread pool, or auto (default)")
    parser.add_argument("--dtype", help="convert floating tensors, e.g. float16 or bf16")
    parser.add_argument("--max-host-memory", type=parse_size, metavar="SIZE",
                        help="host-memory budget, e.g. 512MB (default: min(512MB, available/8))")
    parser.add_argument("--verify", action="store_true",
                        help="check each file's SHA-256 as it is read, against the HF cache's "
                             "blob names (or --sums)")
    parser.add_argument("--sums", metavar="FILE",
                        help="with --verify: expected digests as sha256sum lines")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also say why the strategy was chosen")
    add_storage_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    reports: list[LoadReport] = []
    from ..sources import resolve

    source = source_of(args)
    with resolve(source) as layout:
        total = layout.total_bytes
    with byte_progress("loading", total, quiet=args.quiet or args.json) as progress:
        state = load(source, device=args.device, strategy=args.strategy, dtype=args.dtype,
                     max_host_memory=args.max_host_memory, on_progress=progress,
                     on_report=reports.append, engine=args.engine,
                     verify=(args.sums or True) if args.verify else None)
    del state
    report = reports[0]
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report, verbose=args.verbose)
    return 0


def print_report(report: LoadReport, *, verbose: bool = False) -> None:
    table = Table(show_header=False, title=f"loaded {Path(report.source).name}")
    label(table, "", no_wrap=True)
    label(table, "")
    rows = [
        ("strategy", report.strategy),
        ("engine", report.engine),
        ("tensors", str(report.tensors)),
        ("bytes", format_bytes(report.bytes)),
        ("seconds", f"{report.seconds:.4g}"),  # a warm small load: a fraction of a ms
        ("throughput", f"{report.gbps:.2f} GB/s"),
        ("first tensor after", f"{report.time_to_first_tensor or 0:.3f} s"),
        ("peak RSS", format_bytes(report.peak_rss)),
        ("RSS growth", format_bytes(report.rss_growth)),
        ("page cache growth", format_bytes(report.cache_growth)),
        ("page cache peak growth", format_bytes(report.cache_peak_growth)),
        ("host-memory budget", format_bytes(report.budget)),
    ]
    if report.cgroup_limit is not None:
        rows.append(("cgroup limit / peak",
                     f"{format_bytes(report.cgroup_limit)} / {format_bytes(report.cgroup_peak)}"))
    if verbose:
        rows.append(("why", report.reason))
    for fallback in report.fallbacks:
        rows.append(("fallback", fallback))
    for key, value in rows:
        table.add_row(key, value)
    console().print(table)
