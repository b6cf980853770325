"""``stream_sharded``: every rank of a group gets the whole tensors it wants, read once.

What a serving engine's loader needs under tensor parallelism (vLLM's weight loaders cut each
rank's shard out of full tensors): each rank names the tensors it wants (they may differ: with
expert parallelism each rank wants its own experts), and the group plans *once, over the union*,
so every rank takes part in the same steps; each rank yields only what it wants.

On one host the tensors are zero-copy views of the page cache the ranks share (``shared``);
across hosts, or from object storage, they are read by one rank and sent to the ranks that want
them (``collective.exchange``) in batches of ``batch`` bytes. The checkpoint is resolved, and the
strategy prepared, once per load.

    for name, tensor in stream_sharded(files, wanted=lambda name: ..., group=tp_group):
        param.copy_(tensor[my_rows])       # a view: copy what you keep
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from ..budget import resolve_budget
from ..errors import CheckpointError
from ..io import NAMES
from ..remote import StorageOptions, as_remote
from ..slicing import Axis
from ..sources import Source, resolve
from ..sources.records import Entry, Layout, iter_entries
from .collective import exchange
from .hosts import Hosts, host_key
from .load import ShardReport, Share, _strategy, check_share, choose_share
from .parts import normalize
from .shared import Shared, shared, wholly_cached
from .sync import Peers

#: The exchange path holds the whole tensors of one batch besides the budget.
BATCH = 128 << 20

Wanted = Callable[[str], bool] | Iterable[str] | None


def stream_sharded(source: Source, *, wanted: Wanted = None,
                   group: dist.ProcessGroup | None = None, share: Share = "auto",
                   strategy: str = "auto", max_host_memory: int | str | None = None,
                   host: str | None = None, batch: int = BATCH,
                   storage_options: StorageOptions | None = None,
                   on_report: Callable[[ShardReport], None] | None = None
                   ) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of every tensor this rank ``wanted`` (a predicate on names, a
    collection of names, or None for all), whole, in file order.

        for name, tensor in stream_sharded("Llama-3-8B/", group=tp_group):
            model.load_weight(name, tensor)

    Call it on every rank of ``group`` with the same ``source``. With ``share="page_cache"``
    (``auto`` on one host with local files) the tensors are zero-copy views over the page cache
    that stay valid while referenced: copy what you keep, drop the rest (the budget counts on
    it). With ``"exchange"`` they are the rank's own tensors. If any rank fails — a read, a bad
    file, or its consumer raising or closing the iterator early — every rank raises
    (``RankFailed`` on the others) at the next step, in seconds, not at the group's timeout.
    ``on_report``: called at the end with this rank's ``ShardReport``.
    """
    check_share(share)
    if strategy not in NAMES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(NAMES)}")
    peers = Peers.of(group)
    budget = resolve_budget(max_host_memory)
    started = time.perf_counter()
    layout: Layout | None = None
    try:
        error: Exception | None = None
        entries: list[Entry] = []
        mine_of: Start | None = None
        try:
            layout = resolve(as_remote(source, storage_options))  # type: ignore[arg-type]
            entries = list(iter_entries(layout))
            mine_of = _start(layout, entries, _mask(layout, wanted), host, peers)
        except Exception as exc:  # noqa: BLE001 - agreed on below
            error = exc
        # One exchange to start: every rank opened the checkpoint (else all raise), and what
        # each wants, where it runs and whether it found the files cached.
        starts: list[Start] = peers.gather_agreed(error, mine_of)  # type: ignore[assignment]
        assert layout is not None
        wants = _wants(starts, entries, layout)
        union = [entry for i, entry in enumerate(entries) if wants[:, i].any()]
        mine = {entry.name for i, entry in enumerate(entries) if wants[peers.rank, i]}
        hosts = Hosts(tuple(start.host for start in starts), peers.rank)
        medium = choose_share(share, hosts, layout)
        report = ShardReport(peers.rank, peers.world, "collective", medium, medium, "", budget,
                             checkpoint_bytes=layout.total_bytes)
        if medium == "page_cache":
            report.reason = "ranks on one host share it"
            stats = Shared()
            # Each rank looked at its part of the pages: together, all of them, on one host.
            cached = hosts.single and all(start.cached for start in starts)
            views = shared(peers, layout, union, budget, hosts.local, stats, cached=cached)
            try:
                for entry, view in views:
                    if entry.name in mine:
                        report.tensors += 1
                        report.bytes_needed += entry.info.nbytes
                        yield entry.name, view
                    del view
            finally:
                views.close()  # stopped early: the views post it to the others now
            report.bytes_read = stats.bytes_read
        else:
            yield from _exchanged(peers, layout, union, wants, entries, strategy, budget, batch,
                                  report)
        report.seconds = time.perf_counter() - started
        (report.total_bytes_read, report.total_bytes_needed), report.slowest_seconds = \
            peers.totals([report.bytes_read, report.bytes_needed], report.seconds)
        if on_report is not None:
            on_report(report)
    finally:
        if layout is not None:
            layout.close()


def _mask(layout: Layout, wanted: Wanted) -> np.ndarray:
    """Which entries (file order) this rank wants."""
    names = [entry.name for entry in iter_entries(layout)]
    if wanted is None:
        return np.ones(len(names), dtype=bool)
    if callable(wanted):
        return np.array([bool(wanted(name)) for name in names], dtype=bool)
    chosen = set(wanted)
    missing = sorted(chosen - set(names))
    if missing:
        raise CheckpointError(f"has no tensor named {missing[0]!r}", path=layout.root)
    return np.array([name in chosen for name in names], dtype=bool)


@dataclass(frozen=True)
class Start:
    """What a rank tells the others before a load: which checkpoint it opened (its tensor names'
    count and digest), which tensors it wants, its host (``hosts.host_key``), and whether it
    found its part of every file wholly in the page cache."""

    names: tuple[int, str]
    wants: bytes
    host: str
    cached: bool


def _start(layout: Layout, entries: Sequence[Entry], mask: np.ndarray, host: str | None,
           peers: Peers) -> Start:
    """This rank's ``Start``. Each rank looks at its part of the files' pages (1 / world of
    them): where the page cache is shared, every rank's part cached means all is."""
    names = hashlib.sha256("\0".join(entry.name for entry in entries).encode()).hexdigest()
    return Start((len(entries), names), np.packbits(mask).tobytes(),
                 host if host is not None else host_key(),
                 wholly_cached(layout, peers.rank, peers.world))


def _wants(starts: Sequence[Start], entries: Sequence[Entry], layout: Layout) -> np.ndarray:
    """Every rank's wanted entries, ``[rank, entry]``; refuses ranks that opened different
    checkpoints (their plans would not line up)."""
    if len({start.names for start in starts}) != 1:
        raise CheckpointError("the ranks of the group opened different checkpoints (tensor "
                              "names differ): pass every rank the same files",
                              path=layout.root)
    return np.stack([np.unpackbits(np.frombuffer(start.wants, dtype=np.uint8),
                                   count=len(entries)).astype(bool) for start in starts])


def _exchanged(peers: Peers, layout: Layout, union: Sequence[Entry], wants: np.ndarray,
               entries: Sequence[Entry], strategy: str, budget: int, batch: int,
               report: ShardReport) -> Iterator[tuple[str, torch.Tensor]]:
    """The union read once in the group and sent to the ranks that want each tensor, in
    batches; the strategy prepared once. Ends with an agreement, so that a rank whose consumer
    fails at the last batch still reaches the others."""
    position = {entry.name: i for i, entry in enumerate(entries)}
    reader = None
    try:
        error: Exception | None = None
        try:
            reader = _strategy(strategy, layout, sum(e.info.nbytes for e in union), report)
        except Exception as exc:  # noqa: BLE001 - agreed on below
            error = exc
        peers.agree(error)
        assert reader is not None
        for part in _batches(union, batch):
            plan: dict[str, list[tuple[Axis, ...] | None]] = {}
            local: dict[str, torch.Tensor] = {}
            for entry in part:
                axes = normalize((), entry.info)
                plan[entry.name] = [axes if wants[rank, position[entry.name]] else None
                                    for rank in range(peers.world)]
                if wants[peers.rank, position[entry.name]]:
                    local[entry.name] = torch.empty(entry.info.torch_shape,
                                                    dtype=entry.info.dtype.torch)
            traffic = exchange(peers, layout, plan, local, reader, budget)
            report.bytes_read += traffic.read
            report.bytes_sent += traffic.sent
            report.bytes_received += traffic.received
            try:
                for entry in part:
                    if entry.name in local:
                        report.tensors += 1
                        report.bytes_needed += entry.info.nbytes
                        yield entry.name, local.pop(entry.name)
            except BaseException as exc:
                peers.leave(exc)
                raise
        peers.agree(None)
    finally:
        if reader is not None:
            reader.close()


def _batches(entries: Sequence[Entry], limit: int) -> Iterator[list[Entry]]:
    """Consecutive entries whose bytes add up to at most ``limit`` (one tensor may exceed it)."""
    part: list[Entry] = []
    total = 0
    for entry in entries:
        if part and total + entry.info.nbytes > limit:
            yield part
            part, total = [], 0
        part.append(entry)
        total += entry.info.nbytes
    if part:
        yield part
