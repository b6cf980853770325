"""``load_sharded``: each rank of a tensor-parallel group loads only its part of a checkpoint.

The same four steps as ``weightlift.load`` — resolve, plan, read, place — with a sharding plan in
the middle and the group agreeing after planning and after reading, so one rank's failure stops
all of them together instead of leaving the others blocked in a collective.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from ..api import prepare_strategy as prepare
from ..budget import resolve_budget
from ..formats.records import TensorInfo
from ..io import NAMES, Strategy, make_strategy
from ..io.auto import choose, gather
from ..place import parse_device
from ..remote import StorageOptions, as_remote
from ..sources import Source, resolve
from ..sources.records import Layout, iter_entries
from .collective import Traffic, exchange
from .direct import read_direct
from .hosts import Hosts, host_key
from .parts import Axis, normalize, part_in_rows, part_shape
from .plan import Index, PlanFn
from .shared import Shared, shared, wholly_cached
from .sync import Peers

Mode = Literal["direct", "collective"]
MODES = ("direct", "collective")
#: How collective mode moves bytes between ranks: through the page cache of a host the ranks
#: share (``page_cache``), or read by one rank and sent over the group (``exchange``).
Share = Literal["auto", "page_cache", "exchange"]
SHARES = ("auto", "page_cache", "exchange")


@dataclass
class ShardReport:
    """What one rank's sharded load did, with totals over the group (equal on every rank).

    ``total_bytes_read`` is about 1x ``checkpoint_bytes`` in collective mode (each byte read once)
    and about 1x ``total_bytes_needed`` in direct mode (each rank reads its own slices; strided
    slices may read small gaps too).
    """

    rank: int
    world_size: int
    mode: str
    #: Collective mode: ``page_cache`` (ranks on one host map what one of them read) or
    #: ``exchange`` (sent over the group); empty in direct mode.
    share: str
    strategy: str
    reason: str
    budget: int
    fallbacks: list[str] = field(default_factory=list)
    #: Tensors in this rank's state dict, and their bytes.
    tensors: int = 0
    bytes_needed: int = 0
    #: Bytes this rank read from storage, and moved to/from other ranks (collective mode).
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    #: The checkpoint's tensor bytes, and sums over all ranks.
    checkpoint_bytes: int = 0
    total_bytes_read: int = 0
    total_bytes_needed: int = 0
    #: The slowest rank's seconds: when the whole group was done.
    slowest_seconds: float = 0.0

    @property
    def read_amplification(self) -> float:
        """Bytes the group read per checkpoint byte (1.0 = each byte once)."""
        return self.total_bytes_read / self.checkpoint_bytes if self.checkpoint_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["read_amplification"] = self.read_amplification
        return data


def load_sharded(source: Source, plan: PlanFn, *, group: dist.ProcessGroup | None = None,
                 device: str | torch.device = "cpu", mode: Mode = "direct",
                 strategy: str | Strategy = "auto", max_host_memory: int | str | None = None,
                 max_gap: int | None = None, storage_options: StorageOptions | None = None,
                 share: Share = "auto", host: str | None = None
                 ) -> tuple[dict[str, torch.Tensor], ShardReport]:
    """This rank's part of every tensor ``plan`` gives it, as a state dict on ``device``.

        dist.init_process_group("nccl", timeout=timedelta(minutes=5))
        torch.cuda.set_device(local_rank)
        state, report = load_sharded("Llama-3-70B/", llama_plan(8), device="cuda")

    Call it on every rank of ``group`` (default: the whole job) with the same arguments.
    ``mode="direct"``: each rank reads only its slices' bytes; ``"collective"``: each byte is read
    by one rank and sent on with broadcast/scatter (for storage that is slow per reader).
    ``max_gap``: in direct mode, strided slices read across gaps up to this many bytes rather than
    issue another read (default: gaps up to a page or the slice's run length, at most 2x the bytes).
    An object-storage URL (``"s3://bucket/llama/"``, with ``storage_options``) works the same way:
    in direct mode each rank fetches only its slices' byte ranges, in collective mode each byte
    is fetched once in the group.
    ``share`` (collective mode): ``"page_cache"``: the ranks of one host map the checkpoint from
    their shared page cache, each byte read once per host by one of them and no weight byte sent
    between ranks, at most ``max_host_memory`` of it cached or mapped by the load at a time
    (``strategy`` is not used); ``"exchange"``: read by one rank, sent on over the group;
    ``"auto"``: ``page_cache`` when every rank is on one host and the files are local, else
    ``exchange``. ``host``: this rank's host key (default: host name and boot id; ranks with
    equal keys share a page cache).
    If any rank fails, every rank raises (``RankFailed`` on those that did not fail themselves).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    check_share(share)
    if isinstance(strategy, str) and strategy not in NAMES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(NAMES)}")
    peers = Peers.of(group)
    target = parse_device(device)
    budget = resolve_budget(max_host_memory)
    started = time.perf_counter()
    layout: Layout | None = None
    reader: Strategy | None = None
    try:
        error: Exception | None = None
        start: tuple[str, bool] | None = None
        try:
            layout = resolve(as_remote(source, storage_options))  # type: ignore[arg-type]
            ranks = range(peers.world) if mode == "collective" else [peers.rank]
            indices = {rank: _indices(layout, plan, rank, peers.world) for rank in ranks}
            if mode == "collective":
                # Where this rank runs, and whether its part of the files' pages is cached.
                start = (host if host is not None else host_key(),
                         share != "exchange" and wholly_cached(layout, peers.rank, peers.world))
        except Exception as exc:
            error = exc
        hosts: Hosts | None = None
        cached = False
        if mode == "collective":
            # One exchange: every rank planned (else all raise), its host and its cached part.
            starts: list[tuple[str, bool]] = \
                peers.gather_agreed(error, start)  # type: ignore[assignment]
            hosts = Hosts(tuple(key for key, _ in starts), peers.rank)
            cached = hosts.single and all(whole for _, whole in starts)
        else:
            peers.agree(error)
        assert layout is not None
        mine = indices[peers.rank]
        needed = [entry for entry in iter_entries(layout) if mine[entry.name] is not None]
        medium = "" if hosts is None else choose_share(share, hosts, layout)
        report = ShardReport(peers.rank, peers.world, mode, medium, "", "", budget,
                             checkpoint_bytes=layout.total_bytes)
        local: dict[str, torch.Tensor] = {}
        try:
            if medium == "page_cache":
                assert hosts is not None
                report.strategy, report.reason = "page_cache", "ranks on one host share it"
                report.bytes_read = _shared(peers, layout, indices, budget, target, local,
                                            hosts.local, cached)
            else:
                reader = _strategy(strategy, layout, sum(e.info.nbytes for e in needed), report)
                if mode == "collective":
                    traffic = _collective(peers, layout, indices, reader, budget, target, local)
                    report.bytes_read, report.bytes_sent = traffic.read, traffic.sent
                    report.bytes_received = traffic.received
                else:
                    report.bytes_read = read_direct(layout, mine, reader, budget=budget,
                                                    max_gap=max_gap, device=target, local=local)
            error = None
        except Exception as exc:
            error = exc
        if medium != "page_cache":
            peers.agree(error)
        elif error is not None:
            raise error  # ``shared`` agreed at its end: every rank raises here, or none does
        report.seconds = time.perf_counter() - started
        state = {entry.name: local[entry.name] for entry in needed}
        report.tensors = len(state)
        report.bytes_needed = sum(t.numel() * t.element_size() for t in state.values())
        (report.total_bytes_read, report.total_bytes_needed), report.slowest_seconds = \
            peers.totals([report.bytes_read, report.bytes_needed], report.seconds)
        return state, report
    finally:
        if reader is not None:
            reader.close()
        if layout is not None:
            layout.close()


def _indices(layout: Layout, plan: PlanFn, rank: int, world: int) -> dict[str, Index | None]:
    """What ``rank`` needs of every tensor, checked now so a bad plan fails before any read."""
    out: dict[str, Index | None] = {}
    for entry in iter_entries(layout):
        index = plan(entry.name, entry.info, rank, world)
        if index is not None:
            normalize(index, entry.info)
        out[entry.name] = index
    return out


def check_share(share: str) -> None:
    if share not in SHARES:
        raise ValueError(f"unknown share {share!r}; choose one of {', '.join(SHARES)}")


def choose_share(share: str, hosts: Hosts, layout: Layout) -> str:
    """``page_cache`` or ``exchange`` for ``share``: ``auto`` shares the page cache when every
    rank is on one host and every file is local (object storage has no page cache)."""
    remote = any(shard.remote for shard in layout.shards)
    if share == "page_cache" and remote:
        raise ValueError("share='page_cache' needs local files; object storage is read with "
                         "share='exchange'")
    if share == "auto":
        return "page_cache" if hosts.single and not remote else "exchange"
    return share


def _shared(peers: Peers, layout: Layout, indices: dict[int, dict[str, Index | None]],
            budget: int, device: torch.device, local: dict[str, torch.Tensor],
            on_host: list[int], cached: bool) -> int:
    """Fill this rank's parts from views of the page cache its host shares (``shared``; with
    ``cached``, every page was found cached at the start); return the bytes this rank asked
    storage for."""
    names = {name for rank in indices for name, index in indices[rank].items()
             if index is not None}
    entries = list(iter_entries(layout, names))
    stats = Shared()
    views = shared(peers, layout, entries, budget, on_host, stats, cached=cached)
    try:
        for entry, view in views:
            index = indices[peers.rank][entry.name]
            if index is None:
                continue
            axes = normalize(index, entry.info)
            part = part_in_rows(axes, entry.info, 0,
                                entry.info.shape[0] if entry.info.shape else 1)
            out = torch.empty(part_shape(axes), dtype=entry.info.dtype.torch, device=device)
            if part is not None:
                out[part.dst].copy_(view[part.src])
            local[entry.name] = out
            del view
    except BaseException as exc:
        views.throw(exc)  # the views post it to the others, waiting in the next agreement
        raise
    finally:
        views.close()
    return stats.bytes_read


def _collective(peers: Peers, layout: Layout, indices: dict[int, dict[str, Index | None]],
                reader: Strategy, budget: int, device: torch.device,
                local: dict[str, torch.Tensor]) -> Traffic:
    """Allocate this rank's parts, then fill them from every rank's reads."""
    wanted: dict[str, list[tuple[Axis, ...] | None]] = {}
    for entry in iter_entries(layout):
        wanted[entry.name] = [_axes(indices[rank][entry.name], entry.info)
                              for rank in range(peers.world)]
        axes = wanted[entry.name][peers.rank]
        if axes is not None:
            local[entry.name] = torch.empty(part_shape(axes), dtype=entry.info.dtype.torch,
                                            device=device)
    return exchange(peers, layout, wanted, local, reader, budget)


def _axes(index: Index | None, info: TensorInfo) -> tuple[Axis, ...] | None:
    return None if index is None else normalize(index, info)


def _strategy(strategy: str | Strategy, layout: Layout, nbytes: int, report: ShardReport
              ) -> Strategy:
    """The requested (or ``auto``-chosen) strategy, prepared as ``load`` does (``stream`` where
    O_DIRECT fails).

    Both modes hand read buffers to their consumer before the strategy is told they are consumed,
    so a mapping must not drop its pages then (``copying=False``)."""
    if isinstance(strategy, Strategy):
        chosen, report.reason = strategy, "given as an object"
    elif strategy == "auto":
        choice = choose(gather(layout.shards, total_bytes=nbytes, device="cpu", copying=False))
        chosen, report.reason = make_strategy(choice.strategy), choice.reason
    else:
        chosen, report.reason = make_strategy(strategy), "requested"
    report.strategy = chosen.name
    return prepare(chosen, layout, report)  # type: ignore[arg-type]  # uses .strategy, .fallbacks
