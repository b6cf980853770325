"""``weightlift bench``: weightlift against its peers and the storage's raw-read ceiling, each load
in a fresh process, interleaved and repeated, with time, GB/s, peak host memory and page cache."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..bench import report
from ..bench.loaders import (TRANSFORMERS_GGUF, URING_ROWS, VERIFIED, WEIGHTLIFT_BF16, WEIGHTLIFT_STRATEGIES,
                             model_loaders, peer_loaders, reference_loaders, write_digests)
from ..bench.models import SCENARIO as MODEL, needs_config
from ..bench.runner import ALL_SCENARIOS, CACHES, SCENARIOS, Run, Session, Settings, benchmark
from ..bench.small import ADAPTERS, SIZES as SMALL_SIZES, markdown as small_markdown, run_small
from ..bench.synthetic import planned_bytes, synthetic_checkpoint
from ..bench.synthetic_gguf import planned_bytes as gguf_planned_bytes
from ..bench.synthetic_gguf import synthetic_gguf
from ..io.engine import ENGINES
from ..remote import is_remote
from ..sources import resolve
from ..units import format_bytes, parse_size
from .output import console as stdout
from .progress import byte_progress, stderr


def _choices(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse type for comma-separated values out of ``allowed``."""
    def parse(text: str) -> list[str]:
        values = [v.strip() for v in text.split(",") if v.strip()]
        wrong = [v for v in values if v not in allowed]
        if wrong or not values:
            raise argparse.ArgumentTypeError(
                f"{text!r}: choose from {', '.join(allowed)} (comma-separated)")
        return values
    return parse


def _sizes(text: str) -> list[int]:
    """An argparse type for comma-separated sizes (``1MiB,8MiB``)."""
    try:
        return [parse_size(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench", help="benchmark weightlift against other loaders, speed and host memory",
        description="Each load runs in a fresh process; runs are interleaved across loaders and "
                    "repeated; min/median reported. Without SOURCE a synthetic ~1 GB Llama-shaped "
                    "checkpoint is generated (and cached).")
    parser.add_argument("source", nargs="?", help="checkpoint to load (file, index or directory)")
    parser.add_argument("--synthetic", type=parse_size, metavar="SIZE",
                        help="generate a synthetic checkpoint of about SIZE (default 1GB)")
    parser.add_argument("--format", choices=("safetensors", "gguf"), default="safetensors",
                        help="the synthetic checkpoint's format: gguf writes a Llama-shaped "
                             "Q4_K_M-like file (peers: gguf-py, transformers)")
    parser.add_argument("--dequant-peer-limit", type=parse_size, metavar="SIZE",
                        default=2 * 1000**3,
                        help="GGUF: run transformers' (slow, fp32) dequantizing loader only on "
                             "checkpoints up to SIZE (default 2GB)")
    parser.add_argument("--scenario", type=_choices(ALL_SCENARIOS), default=list(SCENARIOS),
                        help="to_cpu (keep a CPU state dict), device (copy each tensor to a "
                             "device destination and drop it), model (time to a usable "
                             "transformers model: weightlift.transformers.from_pretrained "
                             "against transformers' from_pretrained; needs config.json); "
                             "default to_cpu,device")
    parser.add_argument("--cache", type=_choices(CACHES), default=list(CACHES),
                        help="cold (pages evicted first), warm (in page cache); default both")
    parser.add_argument("--reps", type=int, default=None,
                        help="repetitions per loader (default 3; with --small 15)")
    parser.add_argument("--small", action="store_true",
                        help="the fixed cost of a load instead: weightlift's drop-ins against "
                             "safetensors on small files (and many of them), in this process, "
                             "interleaved, warm and cold; medians and ratios. With SOURCE, also "
                             "its first streamed tensor and its whole load")
    parser.add_argument("--small-sizes", type=_sizes, default=list(SMALL_SIZES), metavar="SIZES",
                        help="--small: the single files' sizes (default 1MiB,8MiB,64MiB)")
    parser.add_argument("--adapters", type=int, default=ADAPTERS, metavar="N",
                        help=f"--small: how many ~130 KB adapters to load one after another "
                             f"(default {ADAPTERS})")
    parser.add_argument("--memory-limit", type=parse_size, metavar="SIZE",
                        help="run every load in a memory cgroup with this limit; reports "
                             "survived / OOM-killed")
    parser.add_argument("--peers", action="store_true",
                        help="also measure safetensors, runai-model-streamer and fastsafetensors "
                             "where installed (pip install 'weightlift[bench]')")
    parser.add_argument("--strategies", type=_choices(WEIGHTLIFT_STRATEGIES),
                        default=list(WEIGHTLIFT_STRATEGIES),
                        help="weightlift strategies to measure (default all)")
    parser.add_argument("--compare-engines", action="store_true",
                        help="also measure direct and stream on the io_uring engine, next to the "
                             "rows on --engine's (default auto: threads where io_uring is not "
                             "known to be faster)")
    parser.add_argument("--sha256", action="store_true",
                        help="also measure auto with verify= (every file's SHA-256 checked as it "
                             "is read; digests from the HF cache, else computed before the runs)")
    parser.add_argument("--no-raw", action="store_true",
                        help="skip the raw-read reference rows (O_DIRECT and buffered)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip the bit-exact check of each loader against the files' "
                             "bytes (read at the offsets their headers give)")
    parser.add_argument("--max-host-memory", type=parse_size, metavar="SIZE",
                        help="weightlift's host-memory budget (default: its own default)")
    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="weightlift's read engine (default auto: io_uring where it helps)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every run as JSON")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="write the markdown table")
    parser.add_argument("--plot", type=Path, metavar="FILE.png",
                        help="write a throughput / peak-memory chart (needs matplotlib)")
    parser.add_argument("--cache-dir", type=Path, help="where synthetic checkpoints are cached")
    parser.set_defaults(func=run)


def checkpoint_source(source: str | None, size: int | None, cache_dir: Path | None,
                      quiet: bool = False, fmt: str = "safetensors") -> str:
    """The checkpoint to measure: the one given, or a cached synthetic one of ``size``."""
    if source is not None:
        return source
    size = size or 1000**3
    if fmt == "gguf":
        with byte_progress(f"generating synthetic GGUF (~{format_bytes(size)})",
                           gguf_planned_bytes(size), quiet=quiet) as progress:
            return str(synthetic_gguf(size, cache_dir=cache_dir, on_progress=progress))
    with byte_progress(f"generating synthetic checkpoint (~{format_bytes(size)})",
                       planned_bytes(size), quiet=quiet) as progress:
        return str(synthetic_checkpoint(size, cache_dir=cache_dir, on_progress=progress))


def measure(settings: Settings, loaders: Sequence[str], **options: object) -> Session:
    """``benchmark`` with a rich bar over the runs (each a fresh process, so no byte progress)."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=stderr, transient=True) as progress:
        task = progress.add_task("starting", total=None)

        def started(index: int, total: int, run: Run) -> None:
            what = "verifying" if run.rep < 0 else f"{run.cache} {run.scenario}"
            progress.update(task, total=total, completed=index,
                            description=f"{what}: {run.loader}")

        session = benchmark(settings, loaders, on_start=started, **options)  # type: ignore[arg-type]
        progress.update(task, completed=progress.tasks[0].total)
    return session


def run(args: argparse.Namespace) -> int:
    if args.small:
        return run_small_cli(args)
    if args.reps is None:
        args.reps = 3
    if args.source is not None and args.synthetic is not None:
        raise SystemExit("weightlift bench: give SOURCE or --synthetic, not both")
    if args.reps < 1:
        raise SystemExit("weightlift bench: --reps must be at least 1")
    source = checkpoint_source(args.source, args.synthetic, args.cache_dir, fmt=args.format)
    with resolve(source) as layout:
        fmt, total = layout.format, layout.total_bytes
    loaders = [f"weightlift {s}" for s in args.strategies]
    if fmt == "gguf":
        loaders.append(WEIGHTLIFT_BF16)
    if args.compare_engines:
        loaders += list(URING_ROWS)
    if args.sha256:
        loaders.append(VERIFIED)
        _prepare_digests(source)
    if args.peers:
        loaders += peer_loaders(fmt)
        if TRANSFORMERS_GGUF in loaders and total > args.dequant_peer_limit:
            loaders.remove(TRANSFORMERS_GGUF)
            stderr.print(f"{TRANSFORMERS_GGUF}: skipped, the checkpoint is over "
                         f"--dequant-peer-limit {format_bytes(args.dequant_peer_limit)}")
    if not args.no_raw:
        loaders += reference_loaders()
    if MODEL in args.scenario:
        why = needs_config(source)
        if why is not None:
            raise SystemExit(f"weightlift bench: --scenario model builds the model: {why}")
        loaders += model_loaders()
    caches, verify = args.cache, not args.no_verify
    if is_remote(source):
        loaders, caches, verify = remote_runs(loaders)
    settings = Settings(source, budget=args.max_host_memory, memory_limit=args.memory_limit,
                        device=device_target(), engine=args.engine)
    session = measure(settings, loaders, scenarios=args.scenario, caches=caches,
                      reps=args.reps, verify=verify)
    rows = report.summarize_runs(session.runs)
    console = stdout()
    console.print(title(session), highlight=False, markup=False)
    for table in report.rich_tables(rows):
        console.print(table)
    for line in explain(session, rows):
        console.print(line, highlight=False, markup=False)
    if args.json:
        report.write_json(session, args.json)
    if args.markdown:
        args.markdown.write_text(f"{title(session)}\n\n{report.markdown(rows)}")
    if args.plot:
        report.plot(rows, args.plot, title=title(session))
    return 0


def run_small_cli(args: argparse.Namespace) -> int:
    """``--small``: files made under --cache-dir (default: the synthetic checkpoints' cache)."""
    import json

    from ..bench.synthetic import cache_root

    reps = 15 if args.reps is None else args.reps
    if reps < 1:
        raise SystemExit("weightlift bench: --reps must be at least 1")
    directory = (args.cache_dir or cache_root()) / "small"
    with stderr.status("measuring") as status:
        session = run_small(directory, sizes=args.small_sizes, adapters=args.adapters, reps=reps,
                            caches=args.cache, source=args.source,
                            on_step=lambda name: status.update(f"measuring {name}"))
    table = small_markdown(session)
    stdout().print(table, highlight=False, markup=False)
    if args.json:
        args.json.write_text(json.dumps(session.to_dict(), indent=1))
    if args.markdown:
        args.markdown.write_text(table + "\n")
    return 0


def _prepare_digests(source: str) -> None:
    """Digests for the ``+sha256`` row where the HF cache has none, computed before timing."""
    from ..sources import resolve
    from ..verify import hub_digest

    with resolve(source) as layout:
        files = tuple(shard.path for shard in layout.shards)
    if not all(hub_digest(path) for path in files):
        with stderr.status("computing SHA-256 digests for the +sha256 row"):
            write_digests(files)


def remote_runs(loaders: list[str]) -> tuple[list[str], list[str], bool]:
    """An object-storage source: weightlift (``auto`` picks ``remote``) and the peers that read
    URLs, with the configuration from the environment (AWS_ENDPOINT_URL, AWS_* keys, ...). There
    is no local page cache to set and no local copy to verify against (the tests compare remote
    loads with safetensors bit for bit)."""
    chosen = [name for name in loaders if name in ("weightlift auto", *REMOTE_PEERS)]
    print("object-storage source: measuring " + ", ".join(chosen) + " (cold only: the local page "
          "cache is not involved; bytes are not re-verified)", file=sys.stderr)
    return chosen, ["cold"], False


#: Peers that read object-storage URLs (runai-model-streamer with runai-model-streamer-s3).
REMOTE_PEERS = ("runai-model-streamer",)


def device_target() -> str:
    """The ``device`` scenario's destination: the real GPU where there is one."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def title(session: Session) -> str:
    info = session.checkpoint
    limit = session.settings.memory_limit
    text = (f"{Path(info['source']).name}: {format_bytes(info['bytes'])} in {info['files']} "
            f"files, {info['tensors']} tensors")
    if limit is not None:
        text += f", memory limit {format_bytes(limit)}"
    return text


def explain(session: Session, rows: Sequence[report.Row]) -> list[str]:
    """What a reader needs next to the table: auto's choices, skipped loaders, how memory was
    measured and on what."""
    lines = [f"auto ({row.scenario}, {row.cache}) chose {row.strategy}: {row.reason}"
             for row in rows if row.loader == "weightlift auto" and row.strategy]
    lines += report.unavailable_lines(session)
    sources = sorted({r.memory_source for r in session.runs if r.memory_source})
    if sources:
        lines.append(f"peak host memory: added by the load, measured by {', '.join(sources)}")
    machine = session.machine
    lines.append(f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, "
                 f"{format_bytes(machine.get('memory'))} RAM, {machine.get('file_system')}")
    return lines
