"""Collective mode: every byte is read from storage by exactly one rank, then moved by collectives.

For shared storage that is slow per reader (network file systems, object-store mounts), N ranks
each reading their slices would fetch the strided tensors N times. Here the rows some rank needs
are cut into runs of whole rows (``Unit``s, each at most a chunk), and the runs are dealt out as
contiguous, byte-balanced stretches of the files, so each rank reads one region front to back.

The load proceeds in rounds: in round k every rank reads its k-th run (the next is read ahead in
the background), the ranks agree that all reads succeeded, then each owner in turn sends its run —
a ``broadcast`` when some rank needs all of it, else a ``scatter`` of each rank's packed piece.
Host memory per rank stays within about five chunks: the run in hand, the one read ahead, the
packed pieces (at most two runs' worth, else it broadcasts) and the receive buffer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..formats.records import TensorInfo
from ..io import Strategy
from ..place import as_tensor, typed_view
from ..read import ALIGN, read_tensors
from ..sources.records import Entry, Layout, iter_entries
from .parts import Axis, Part, part_in_rows
from .sync import Peers

#: Parts of each tensor by rank (None: the rank needs none of it).
Wanted = Mapping[str, Sequence["tuple[Axis, ...] | None"]]

#: Host memory in use at once, in chunks (see the module docstring).
CHUNKS_IN_BUDGET = 5


@dataclass(frozen=True)
class Unit:
    """Rows ``[r0, r1)`` of a tensor, read by ``owner``; ``run`` locates just those bytes."""

    tensor: TensorInfo
    run: Entry
    r0: int
    r1: int
    owner: int


@dataclass
class Traffic:
    """Bytes this rank read from storage, sent to and received from other ranks."""

    read: int = 0
    sent: int = 0
    received: int = 0


def plan_units(entries: Sequence[tuple[Entry, int, int]], chunk: int, world: int) -> list[Unit]:
    """Runs of at most ``chunk`` bytes (one row if a row is larger) of rows ``[lo, hi)`` of each
    entry, in file order, each owned by the rank whose equal share of the bytes holds its middle."""
    runs = [(entry, r0, r1) for entry, lo, hi in entries
            for r0, r1 in _row_runs(entry.info, chunk, lo, hi)]
    total = sum(_run_entry(entry, r0, r1).info.nbytes for entry, r0, r1 in runs)
    units = []
    done = 0
    for entry, r0, r1 in runs:
        run = _run_entry(entry, r0, r1)
        owner = min(world - 1, (2 * done + run.info.nbytes) * world // (2 * total))
        units.append(Unit(entry.info, run, r0, r1, owner))
        done += run.info.nbytes
    return units


def _row_runs(info: TensorInfo, chunk: int, lo: int, hi: int) -> list[tuple[int, int]]:
    if not info.shape:
        return [(0, 1)]
    per = max(1, chunk // (info.nbytes // info.shape[0]))
    return [(r0, min(r0 + per, hi)) for r0 in range(lo, hi, per)]


def needed_rows(info: TensorInfo, parts: Sequence[tuple[Axis, ...] | None]) -> tuple[int, int]:
    """The rows ``[lo, hi)`` spanning every rank's part (``lo == hi``: no rank needs a byte)."""
    if not info.nbytes:
        return 0, 0
    spans = [(axes[0].start, axes[0].start + (axes[0].count - 1) * axes[0].step + 1) if axes
             else (0, 1) for axes in parts
             if axes is not None and all(axis.count for axis in axes)]
    if not spans:
        return 0, 0
    return min(lo for lo, _ in spans), max(hi for _, hi in spans)


def _run_entry(entry: Entry, r0: int, r1: int) -> Entry:
    info = entry.info
    if not info.shape:
        return entry
    row = info.nbytes // info.shape[0]
    return Entry(entry.shard, TensorInfo(info.name, info.dtype, (r1 - r0, *info.shape[1:]),
                                         info.start + r0 * row, info.start + r1 * row))


def exchange(peers: Peers, layout: Layout, wanted: Wanted, local: dict[str, torch.Tensor],
             strategy: Strategy, budget: int) -> Traffic:
    """Fill this rank's ``local`` tensors (allocated, shaped like its parts) from every rank's reads.

    ``strategy`` must be prepared for ``layout.shards``. Raises on every rank if any rank fails to
    read; an error while moving data surfaces on the other ranks as the group's timeout at worst.
    """
    chunk = max(ALIGN, budget // CHUNKS_IN_BUDGET)
    spans = [(entry, *needed_rows(entry.info, wanted[entry.name]))
             for entry in iter_entries(layout, wanted)]
    units = plan_units([(entry, lo, hi) for entry, lo, hi in spans if hi > lo], chunk,
                       peers.world)
    by_owner = [[unit for unit in units if unit.owner == owner] for owner in range(peers.world)]
    mine = by_owner[peers.rank]
    traffic = Traffic(read=sum(unit.run.info.nbytes for unit in mine))
    reader = read_tensors(layout, [unit.run for unit in mine], strategy, budget=budget,
                          window=chunk)
    try:
        for k in range(max(len(owned) for owned in by_owner)):
            data, error = None, None
            if k < len(mine):
                try:
                    _, data = next(reader)
                except Exception as exc:  # agreed on below, then raised on every rank
                    error = exc
            peers.agree(error)
            for owned in by_owner:
                if k < len(owned):
                    _move(peers, owned[k], data if owned[k].owner == peers.rank else None,
                          wanted, local, traffic)
        error = None
        try:
            for _ in reader:  # runs the reader's final check that no file changed meanwhile
                raise AssertionError("the reader yielded more runs than were planned")
        except Exception as exc:
            error = exc
        peers.agree(error)
    finally:
        reader.close()
    return traffic


def _move(peers: Peers, unit: Unit, data: torch.Tensor | None, wanted: Wanted,
          local: dict[str, torch.Tensor], traffic: Traffic) -> None:
    """Give every rank its piece of ``unit``; ``data`` is the unit's tensor on its owner."""
    name, me = unit.tensor.name, peers.rank
    parts: list[Part | None] = [None if axes is None else part_in_rows(axes, unit.tensor, unit.r0,
                                                                       unit.r1)
                                for axes in wanted[name]]
    if data is not None:
        data = data.to(peers.device)
        own = parts[me]
        if own is not None:
            local[name][own.dst].copy_(data[own.src])
    receivers = [rank for rank, part in enumerate(parts) if part is not None and rank != unit.owner]
    if not receivers:
        return
    nbytes = unit.run.info.nbytes
    widest = max(parts[rank].nbytes for rank in receivers)  # type: ignore[union-attr]
    src = peers.global_rank(unit.owner)
    mine = parts[me] if me in receivers else None
    if widest == nbytes or widest * peers.world > 2 * nbytes:
        # Someone needs (nearly) all of it: one broadcast beats packing copies for everyone.
        if data is not None:
            buf = data.reshape(-1).view(torch.uint8)
            traffic.sent += nbytes * len(receivers)
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8, device=peers.device)
        dist.broadcast(buf, src=src, group=peers.group)
        if mine is not None:
            local[name][mine.dst].copy_(as_tensor(buf, unit.run.info)[mine.src])
            traffic.received += nbytes
        return
    dtype = unit.tensor.dtype.torch
    out = torch.empty(widest, dtype=torch.uint8, device=peers.device)
    pieces = None
    if data is not None:
        packed = torch.empty(peers.world, widest, dtype=torch.uint8, device=peers.device)
        for rank in receivers:
            part = parts[rank]
            assert part is not None
            typed_view(packed[rank, :part.nbytes], dtype).view(part.shape).copy_(data[part.src])
            traffic.sent += part.nbytes
        pieces = list(packed.unbind(0))
    dist.scatter(out, pieces, src=src, group=peers.group)
    if mine is not None:
        local[name][mine.dst].copy_(typed_view(out[:mine.nbytes], dtype).view(mine.shape))
        traffic.received += mine.nbytes
