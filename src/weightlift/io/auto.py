"""``auto``: pick a strategy from facts measured at load time, and say why.

``gather`` measures (page-cache residency via mincore, available memory and cgroup limit, whether
O_DIRECT works on the files' file system); ``choose`` is a pure function of those facts, so every
rule is testable without the machine that would produce them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .. import probes
from ..budget import MINIMUM_DEFAULT, available_memory, default_budget
from ..sources.records import PLAIN, Shard
from ..units import format_bytes
from .base import Unavailable
from .direct import DirectStrategy

#: At or above this fraction cached, reading from the page cache beats any disk read.
WARM = 0.9
#: Above this fraction cached, the reason names the cached part that is not read again (``direct``
#: splits every range into cached and uncached runs; ``stream`` reuses cached pages).
PARTLY_WARM = 0.25


@dataclass(frozen=True)
class Facts:
    """What ``auto`` knows about one load."""

    device: str             # "cpu", "cuda", ...
    copying: bool           # bytes are copied into destinations (device, dtype, module)
    total_bytes: int        # bytes to load
    resident_bytes: int     # of those files, bytes already in the page cache
    file_bytes: int         # total size of the files
    available: int          # MemAvailable, capped by a cgroup limit
    direct_refused: str | None  # why O_DIRECT does not work here, None if it does
    streaming: bool = False     # tensors are handed out and dropped (``stream()``), not kept
    budget: int | None = None   # the host-memory budget of the load
    remote: bool = False        # the shards are objects in object storage, not local files

    @property
    def residency(self) -> float:
        return self.resident_bytes / self.file_bytes if self.file_bytes else 1.0


@dataclass(frozen=True)
class Choice:
    strategy: str
    reason: str
    facts: Facts | None     # None when the caller named the strategy, or on the small path
    #: Set when the load will probably not fit in memory whatever the strategy.
    warning: str | None = None
    #: The small-file path (``small``): mapped files, no thread, no budget arithmetic.
    small: bool = False


def choose(facts: Facts) -> Choice:
    if facts.remote:
        return Choice("remote", "the checkpoint is in object storage: parallel ranged GETs, "
                      "each conditional on the object's ETag, straight into the destinations",
                      facts)
    cached = f"{facts.residency:.0%} of the checkpoint is in the page cache"
    warning = None
    if not facts.copying and facts.total_bytes > facts.available:
        warning = (f"the result ({format_bytes(facts.total_bytes)}) is larger than available "
                   f"memory ({format_bytes(facts.available)}); the load may swap or be killed")
    uncached = facts.file_bytes - facts.resident_bytes
    if (facts.residency >= WARM and facts.streaming and not facts.copying
            and facts.budget is not None and uncached > facts.budget):
        # Zero-copy tensors would leave the uncached rest in the page cache, beyond the budget.
        return _cold(facts, f"{cached}, but the other {format_bytes(uncached)} would stay "
                     "cached behind a stream, beyond the host-memory budget", warning)
    if facts.residency >= WARM and (facts.copying or facts.streaming):
        # The consumer copies each tensor and drops it: map only what is in use, not the files.
        return Choice("stream", f"{cached}: cached ranges are handed out as views of windows "
                      "of the files mapped at most the budget at a time, and copied once, "
                      "straight out of the page cache; the rest is read with buffered reads "
                      "whose pages are dropped behind", facts, warning)
    if facts.residency >= WARM:
        return Choice("mmap", f"{cached}: zero-copy tensors over the cached pages: no reads and "
                      "no second copy", facts, warning)
    if facts.residency > PARTLY_WARM:
        if facts.direct_refused is None:
            return Choice("direct", f"{cached}: cached ranges are copied out of the page cache "
                          "and only the rest is read from disk, with O_DIRECT", facts, warning)
        return Choice("stream", f"{cached} and O_DIRECT is refused ({facts.direct_refused}): "
                      "buffered reads reuse the cached part and drop the cache behind them",
                      facts, warning)
    return _cold(facts, cached, warning)


def _cold(facts: Facts, cached: str, warning: str | None) -> Choice:
    if facts.direct_refused is None:
        return Choice("direct", f"{cached} and O_DIRECT works here: parallel reads that bypass "
                      "the page cache and leave nothing behind", facts, warning)
    return Choice("stream", f"{cached} and O_DIRECT is refused ({facts.direct_refused}): "
                  "buffered reads with the page cache dropped behind the reader", facts, warning)


def direct_refusal(shards: Sequence[Shard]) -> str | None:
    """Why O_DIRECT cannot read these files, or None when it can."""
    strategy = DirectStrategy(per_range=False)  # only the probe: no residency maps
    try:
        strategy.prepare(shards)
    except Unavailable as exc:
        return str(exc)
    finally:
        strategy.close()
    return None


def gather(shards: Sequence[Shard], *, total_bytes: int, device: str, copying: bool,
           streaming: bool = False, budget: int | None = None, probe_direct: bool = True,
           available: int | None = None) -> Facts:
    """Measure the facts. ``probe_direct=False`` skips the O_DIRECT probe where the answer cannot
    matter (a cached checkpoint that ``choose`` will map), saving a warm load the probe's disk
    read (a few milliseconds, tens on a busy disk). ``available``: memory the caller has just
    measured (``budget.available_memory``), not read again."""
    if available is None:
        available = available_memory()
    if any(shard.remote for shard in shards):
        return Facts(device=device, copying=copying, total_bytes=total_bytes, resident_bytes=0,
                     file_bytes=sum(shard.header.file_size for shard in shards),
                     available=available, direct_refused="object storage",
                     streaming=streaming, budget=budget, remote=True)
    resident = 0
    for shard in shards:
        try:
            with shard.opened(PLAIN) as fd:
                estimate = probes.sampled_resident_bytes(fd)
                shard.resident_hint = (time.monotonic(), estimate)
                resident += estimate
        except OSError:
            pass  # unknown residency counts as cold
    file_bytes = sum(shard.header.file_size for shard in shards)
    # ``choose`` consults the probe only for a checkpoint not cached enough to map, or a stream
    # whose uncached rest would stay cached beyond the budget.
    beyond_budget = (streaming and not copying and budget is not None
                     and file_bytes - resident > budget)
    needed = probe_direct or not file_bytes or resident / file_bytes < WARM or beyond_budget
    return Facts(
        device=device,
        copying=copying,
        total_bytes=total_bytes,
        resident_bytes=resident,
        file_bytes=file_bytes,
        available=available,
        direct_refused=direct_refusal(shards) if needed else "not probed: checkpoint cached",
        streaming=streaming,
        budget=budget,
    )


# ---------------------------------------------------------------------------------------------
# The small-file path: decided first, before any probe the general rules need.

#: Files adding up to at most this may take the small-file path. Mapped-and-populated cold reads
#: were at least as fast as ``direct`` up to 512 MiB on this project's VM (fresh anonymous
#: result memory costs more to fault in than page-cache pages; docs/benchmarks.md).
SMALL_FILES = 512 << 20


def small(shards: Sequence[Shard], *, device: str, copying: bool, budget: int | None,
          default: Callable[[], int] = default_budget) -> Choice | None:
    """The shortest path for a CPU load of files that fit in the host-memory budget, or None
    where the general rules (``gather`` → ``choose``) apply.

    The files are mapped and the tensors are zero-copy views, cached or not: a file wholly in
    the page cache is mapped as it is (nothing to read, as safetensors does), any other is read
    by the kernel in requests all in flight at once (``POSIX_FADV_WILLNEED``) and mapped in
    (``MADV_POPULATE_READ``, so a read error is a ``ReadError``). The page cache this leaves is
    the files, at most the budget: the bound holds. No O_DIRECT probe, no available-memory or
    cgroup read: ``budget`` is the one the caller set (None: the default, asked of ``default()``
    only for files larger than the smallest default budget, ``MINIMUM_DEFAULT``).

        small(layout.shards, device="cpu", copying=False, budget=None)   # Choice("mmap", ...)
    """
    if copying or device != "cpu" or not shards or any(shard.remote for shard in shards):
        return None
    file_bytes = sum(shard.header.file_size for shard in shards)
    if file_bytes > SMALL_FILES:
        return None
    if budget is not None and file_bytes > budget:
        return None
    if budget is None and file_bytes > MINIMUM_DEFAULT and file_bytes > default():
        return None
    return Choice("mmap", f"{format_bytes(file_bytes)} of files, within the host-memory budget: "
                  "zero-copy views over the page cache; files already cached are mapped as they "
                  "are, others read all at once (POSIX_FADV_WILLNEED) and mapped in", None,
                  small=True)
