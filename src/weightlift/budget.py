"""The host-memory budget: what the loading path itself may hold at once.

Bounce buffers, chunks in flight and page cache left behind all count against it; the tensors of a
CPU load are the result, not overhead. The default is small enough for a laptop and large enough
to keep ~32 reads of 8 MiB in flight on a server.
"""

from __future__ import annotations

from .probes import cgroup_memory_limit, cgroup_usage, mem_available
from .units import parse_size

#: The default never exceeds this ("no larger than 512 MB").
DEFAULT_CAP = 512 * 1000**2
#: Below this, reads get too small to be efficient.
MINIMUM = 4 << 20
#: The default is never below this.
MINIMUM_DEFAULT = 64 << 20


def available_memory() -> int:
    """Memory a load can use without swapping: MemAvailable, capped by what is left under a
    cgroup limit (the limit less what the group already holds, e.g. the Python and torch
    importing weightlift: ~300 MiB)."""
    available = mem_available()
    limit = cgroup_memory_limit()
    if limit is None:
        return available
    return min(available, max(0, limit - (cgroup_usage() or 0)))


def default_budget(available: int | None = None) -> int:
    """Half of the available memory (what is left, ``available_memory``), at least 64 MiB and
    at most 512 MB.

    Under a 1.5 GiB cgroup that is the cap: a device-bound stream there runs like an
    unconstrained one. Smaller budgets cost speed, as a stream's window is what keeps reads in
    flight past a large tensor: 1/32 of the limit (64 MiB) ran ~25 % slower, 1/8 (192 MiB)
    0.83-0.88×, 1/4 (384 MiB) 0.89× (docs/benchmarks.md). A stream holds the budget plus the
    tensor its consumer has; the other half of what is left is room for that tensor.
    """
    if available is None:
        available = available_memory()
    return max(min(DEFAULT_CAP, available // 2), MINIMUM_DEFAULT)


def resolve_budget(value: int | str | None) -> int:
    """``max_host_memory=`` as given by a user → bytes."""
    if value is None:
        return default_budget()
    size = parse_size(value) if isinstance(value, str) else int(value)
    if size < MINIMUM:
        raise ValueError(f"max_host_memory={value!r} is below the minimum of {MINIMUM >> 20} MiB")
    return size
