"""Benchmark output: one summary row per (scenario, cache state, loader), as a rich table for the
terminal, a markdown table for docs, JSON for machines and a PNG chart for readers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from rich.table import Table

from ..units import format_bytes
from .runner import RunResult, Session
from .stats import Summary, most_common, summarize


@dataclass(frozen=True)
class Row:
    loader: str
    scenario: str
    cache: str
    status: str
    runs: int
    seconds: Summary | None
    first: Summary | None
    gbps: Summary | None
    peak_memory: Summary | None
    cache_left: Summary | None
    strategy: str | None
    reason: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def status_of(results: Sequence[RunResult]) -> str:
    """``ok``, or how many of the runs ended otherwise (``OOM-killed 3/3``)."""
    bad = [r for r in results if r.status != "ok"]
    if not bad:
        return "ok"
    worst = most_common([r.status for r in bad]) or "failed"
    label = "OOM-killed" if worst == "oom-killed" else worst
    return f"{label} {len(bad)}/{len(results)}"


def summarize_runs(results: Sequence[RunResult]) -> list[Row]:
    """One row per (scenario, cache, loader) in the order the runs first appear."""
    groups: dict[tuple[str, str, str], list[RunResult]] = {}
    for result in results:
        groups.setdefault((result.scenario, result.cache, result.loader), []).append(result)
    rows = []
    for (scenario, cache, loader), group in groups.items():
        ok = [r for r in group if r.status == "ok"]
        rows.append(Row(
            loader=loader, scenario=scenario, cache=cache, status=status_of(group),
            runs=len(group),
            seconds=summarize(r.seconds for r in ok),
            first=summarize(r.first for r in ok),
            gbps=summarize(r.gbps for r in ok),
            # A killed run reached the limit; its status says so, its peak would only repeat it.
            peak_memory=summarize(r.peak_memory for r in ok),
            cache_left=summarize(r.cache_left for r in ok),
            strategy=most_common([r.strategy for r in ok]),
            reason=most_common([r.reason for r in ok]),
        ))
    return sorted(rows, key=lambda row: (_order(row.scenario, ("to_cpu", "device", "model")),
                                         _order(row.cache, ("cold", "warm"))))


def _order(value: str, known: tuple[str, ...]) -> int:
    return known.index(value) if value in known else len(known)


# ---------------------------------------------------------------------------------------------
# cells shared by the terminal and markdown tables

#: Column name and whether it holds a number (right-aligned); one table per scenario and cache.
COLUMNS = (("loader", False), ("s min / med", True), ("first tensor ms", True),
           ("GB/s best / med", True),
           ("peak host mem", True), ("cache left", True), ("status", False))


def _pair(best: float, median: float, n: int, fmt: str) -> str:
    if n == 1:
        return format(best, fmt)
    return f"{format(best, fmt)} / {format(median, fmt)}"


def cells(row: Row) -> list[str]:
    loader = row.loader
    if row.strategy is not None and row.loader.endswith("auto"):
        loader += f" → {row.strategy}"
    seconds = gbps = "-"
    if row.seconds is not None:
        seconds = _pair(row.seconds.min, row.seconds.median, row.seconds.n, ".3f")
    if row.gbps is not None:
        gbps = _pair(row.gbps.max, row.gbps.median, row.gbps.n, ".2f")
    first = "-"
    if row.first is not None:
        first = _pair(row.first.min * 1e3, row.first.median * 1e3, row.first.n, ".1f")
    return [
        loader, seconds, first, gbps,
        "-" if row.peak_memory is None else format_bytes(row.peak_memory.median),
        "-" if row.cache_left is None else format_bytes(row.cache_left.median),
        row.status,
    ]


def sections(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows grouped under a heading per scenario and cache state (``to_cpu, cold``)."""
    out: dict[str, list[Row]] = {}
    for row in rows:
        out.setdefault(f"{row.scenario}, {row.cache}", []).append(row)
    return out


def rich_tables(rows: Sequence[Row]) -> list[Table]:
    tables = []
    for heading, group in sections(rows).items():
        table = Table(title=heading)
        for name, numeric in COLUMNS:
            # Folded, never cut to "0.…", where a terminal is too narrow for the table.
            table.add_column(name, justify="right" if numeric else "left", overflow="fold")
        for row in group:
            table.add_row(*cells(row))
        tables.append(table)
    return tables


def markdown(rows: Sequence[Row]) -> str:
    parts = []
    for heading, group in sections(rows).items():
        lines = [f"**{heading}**", "",
                 "| " + " | ".join(name for name, _ in COLUMNS) + " |",
                 "|" + "|".join("---:" if numeric else "---" for _, numeric in COLUMNS) + "|"]
        for row in group:
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells(row)) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def unavailable_lines(session: Session) -> list[str]:
    """Loaders that did not run or failed verification, with the reason; those an extra would
    bring in one line per extra (``pip install 'weightlift[bench]'``)."""
    lines = []
    by_install: dict[str, list[str]] = {}
    for name, why in session.unavailable.items():
        _, missing, install = why.partition(" is not installed ")
        if missing:
            by_install.setdefault(install, []).append(name)
        else:
            lines.append(f"{name}: not run ({why})")
    lines += [f"not installed here, not run: {', '.join(names)} {install}"
              for install, names in by_install.items()]
    if session.unverified is not None:
        lines.append(f"bytes not verified: {session.unverified}")
    lines += [f"{loader} ({scenario}): verification failed: {why}"
              for (loader, scenario), why in session.verified.items() if why != "ok"]
    return lines


def to_json(session: Session) -> dict[str, Any]:
    return {
        "machine": session.machine,
        "checkpoint": session.checkpoint,
        "settings": asdict(session.settings),
        "verified": [{"loader": loader, "scenario": scenario, "result": result}
                     for (loader, scenario), result in session.verified.items()],
        "unavailable": session.unavailable,
        "unverified": session.unverified,
        "summary": [row.to_dict() for row in summarize_runs(session.runs)],
        "runs": [run.to_dict() for run in session.runs],
    }


def write_json(session: Session, path: Path) -> None:
    path.write_text(json.dumps(to_json(session), indent=2) + "\n")


def plot(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Best throughput (top) and median peak host memory (bottom), one panel per scenario and
    cache state, each with its own scale: warm zero-copy loads would flatten a shared axis.
    matplotlib is imported here: it is an optional dependency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sections(rows)
    loaders = list(dict.fromkeys(row.loader for row in rows))
    colors = [plt.get_cmap("tab10")(i % 10) for i in range(len(loaders))]
    panels = (
        ("best GB/s", lambda row: row.gbps.max if row.gbps else 0.0, "{:.2f}"),
        ("peak host memory, GiB (median)",
         lambda row: row.peak_memory.median / 2**30 if row.peak_memory else 0.0, "{:.2f}"),
    )
    fig, axes = plt.subplots(2, len(groups), squeeze=False,
                             figsize=(3.6 * len(groups) + 2.4, 0.55 * len(loaders) + 2.5))
    for column, (heading, group) in enumerate(groups.items()):
        by_loader = {row.loader: row for row in group}
        for line, (label, value, fmt) in enumerate(panels):
            ax = axes[line][column]
            ys = [value(by_loader[name]) if name in by_loader else 0.0 for name in loaders]
            bars = ax.barh(range(len(loaders)), ys, color=colors)
            ax.bar_label(bars, labels=[fmt.format(y) if y else "" for y in ys],
                         fontsize="x-small", padding=2)
            ax.set_yticks(range(len(loaders)), loaders if column == 0 else [""] * len(loaders))
            ax.invert_yaxis()
            ax.set_xlabel(label, fontsize="small")
            ax.margins(x=0.25)
            ax.grid(axis="x", alpha=0.3)
            if line == 0:
                ax.set_title(heading)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
