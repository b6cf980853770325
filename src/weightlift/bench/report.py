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
            gbps=summarize(r.gbps for r in ok),
            # A killed run reached the limit; its status says so, its peak would only repeat it.
            peak_memory=summarize(r.peak_memory for r in ok),
            cache_left=summarize(r.cache_left for r in ok),
            strategy=most_common([r.strategy for r in ok]),
            reason=most_common([r.reason for r in ok]),
        ))
    return sorted(rows, key=lambda row: (_order(row.scenario, ("to_cpu", "device")),
                                         _order(row.cache, ("cold", "warm"))))


def _order(value: str, known: tuple[str, ...]) -> int:
    return known.index(value) if value in known else len(known)


# ---------------------------------------------------------------------------------------------
# cells shared by the terminal and markdown tables

#: Column name and whether it holds a number (right-aligned); one table per scenario and cache.
COLUMNS = (("loader", False), ("s min / med", True), ("GB/s best / med", True),
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
    return [
        loader, seconds, gbps,
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
            table.add_column(name, justify="right" if numeric else "left", no_wrap=name == "loader")
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
    """Loaders that did not run or failed verification, with the reason."""
    lines = [f"{name}: not run ({why})" for name, why in session.unavailable.items()]
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
        "summary": [row.to_dict() for row in summarize_runs(session.runs)],
        "runs": [run.to_dict() for run in session.runs],
    }


def write_json(session: Session, path: Path) -> None:
    path.write_text(json.dumps(to_json(session), indent=2) + "\n")


def plot(rows: Sequence[Row], path: Path, title: str = "") -> None:
    """Two panels, best throughput and median peak host memory, one bar per loader, grouped by
    scenario and cache state. matplotlib is imported here: it is an optional dependency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((row.scenario, row.cache) for row in rows))
    loaders = list(dict.fromkeys(row.loader for row in rows))
    by_key = {(row.scenario, row.cache, row.loader): row for row in rows}
    width = 0.8 / max(len(loaders), 1)
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 2.2 * len(groups) * 2), 5))
    panels = (
        ("best GB/s", lambda row: row.gbps.max if row.gbps else 0.0),
        ("median peak host memory (GiB)",
         lambda row: row.peak_memory.median / 2**30 if row.peak_memory else 0.0),
    )
    for ax, (label, value) in zip(axes, panels):
        for i, loader in enumerate(loaders):
            xs = [g + (i - (len(loaders) - 1) / 2) * width for g in range(len(groups))]
            ys = [value(by_key[(s, c, loader)]) if (s, c, loader) in by_key else 0.0
                  for s, c in groups]
            ax.bar(xs, ys, width, label=loader)
        ax.set_xticks(range(len(groups)), [f"{s}\n{c}" for s, c in groups])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(loaders), 5), fontsize="small")
    if title:
        fig.suptitle(title)
    legend_rows = -(-len(loaders) // 5)
    fig.tight_layout(rect=(0, 0.06 * legend_rows, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
