"""Summaries over repeated runs: the minimum (the machine at its best) and the median (typical).

Min/median rather than mean/stddev: load times on a shared machine have a long right tail, and a
single slow outlier should not move the headline number.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    """Min and median of one measured quantity over the runs that produced a value."""

    min: float
    median: float
    max: float
    n: int


def summarize(values: Iterable[float | int | None]) -> Summary | None:
    """``None`` values (not measured) are skipped; no values at all gives ``None``."""
    present = [float(v) for v in values if v is not None]
    if not present:
        return None
    return Summary(min(present), statistics.median(present), max(present), len(present))


def most_common(values: Sequence[str | None]) -> str | None:
    """The value most runs agree on (e.g. the strategy ``auto`` chose), ignoring ``None``."""
    counts = Counter(v for v in values if v is not None)
    return counts.most_common(1)[0][0] if counts else None
