"""Strategies: how bytes get from files into host memory. One module each, one interface.

Adding a strategy is a new module and one line in ``STRATEGIES``.
"""

from __future__ import annotations

from .base import Strategy, Unavailable
from .direct import DirectStrategy
from .mapped import MmapStrategy
from .remote import RemoteStrategy
from .stream import StreamStrategy

STRATEGIES: dict[str, type[Strategy]] = {
    "mmap": MmapStrategy,
    "direct": DirectStrategy,
    "stream": StreamStrategy,
    "remote": RemoteStrategy,
}

#: What ``strategy=`` accepts.
NAMES = ("auto", *STRATEGIES)


def make_strategy(name: str, *, copying: bool = False, windows: bool = False) -> Strategy:
    """A fresh strategy; ``copying`` loads copy into destinations (device, dtype, module);
    ``windows``: ranges in the page cache are handed out as views of mapped windows (loads whose
    consumer copies and drops: ``stream()``, copying loads), not read."""
    if name == "mmap":
        # When the mapping is only a source, release what has been copied.
        return MmapStrategy(release=copying)
    if name == "direct":
        return DirectStrategy(windows=windows)
    if name == "stream":
        return StreamStrategy(windows=windows)
    if name in STRATEGIES:
        return STRATEGIES[name]()
    raise ValueError(f"unknown strategy {name!r}; choose one of {', '.join(NAMES)}")


__all__ = ["NAMES", "STRATEGIES", "Strategy", "Unavailable", "make_strategy"]
