"""The host-memory budget: what the loading path itself may hold at once.

Bounce buffers, chunks in flight and page cache left behind all count against it; the tensors of a
CPU load are the result, not overhead. The default is small enough for a laptop and large enough
to keep ~32 reads of 8 MiB in flight on a server.
"""

from __future__ import annotations

from .probes import cgroup_memory_limit, meminfo
from .units import parse_size

#: The default never exceeds this ("no larger than 512 MB").
DEFAULT_CAP = 512 * 1000**2
#: Below this, reads get too small to be efficient.
MINIMUM = 4 << 20


def available_memory() -> int:
    """Memory a load can use without swapping: MemAvailable, capped by a cgroup limit."""
    available = meminfo().get("MemAvailable", 0)
    limit = cgroup_memory_limit()
    return min(available, limit) if limit is not None else available


def default_budget(available: int | None = None) -> int:
    """1/4 of available memory, at least 64 MiB and at most 512 MB.

    Under a 1.5 GiB cgroup that is ~384 MiB: 32 reads of ~12 MiB in flight. (1/32 gave 64 MiB
    there and O_DIRECT loads ran ~25% slower for want of requests in flight; 1/8 gave 192 MiB
    and 0.83-0.88× the unconstrained load.) A stream holds the budget plus the tensor its
    consumer has, so even a 1 GiB cgroup keeps room for a 250 MiB tensor and the rest.
    """
    if available is None:
        available = available_memory()
    return max(min(DEFAULT_CAP, available // 4), 64 << 20)


def resolve_budget(value: int | str | None) -> int:
    """``max_host_memory=`` as given by a user → bytes."""
    if value is None:
        return default_budget()
    size = parse_size(value) if isinstance(value, str) else int(value)
    if size < MINIMUM:
        raise ValueError(f"max_host_memory={value!r} is below the minimum of {MINIMUM >> 20} MiB")
    return size
