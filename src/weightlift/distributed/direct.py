"""Direct mode: each rank reads only the byte ranges of its own slices.

A slice along the first dimension (or a whole tensor) is one contiguous range: it is read straight
into the buffer that becomes the tensor, no copy. A slice along a later dimension is a row of
strided ranges; ranges whose gaps are small are read as one extent and the slice is gathered out
of it (one strided copy when the ranges are evenly spaced), larger gaps become separate reads, run
several at a time like every other read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from ..formats.records import DTYPES, TensorInfo
from ..io import Strategy
from ..io.base import PAGE
from ..read import read_tensors
from ..slicing import plan_slice
from ..sources.records import Entry, Layout, iter_entries
from .plan import Index

Range = tuple[int, int]


@dataclass(frozen=True)
class Extent:
    """One read ``[start, end)`` of a strided slice, and the ranges in it that the slice keeps;
    they land at ``offset`` in the slice's bytes."""

    name: str
    start: int
    end: int
    ranges: tuple[Range, ...]
    offset: int


def extents(name: str, ranges: Sequence[Range], max_gap: int | None, cap: int) -> list[Extent]:
    """Group ``ranges`` (sorted, disjoint) into reads: bridge a gap when it is at most ``max_gap``
    (default: a page, or the shorter neighbouring range — never more than doubling the bytes) and
    the read stays within ``cap`` bytes."""
    groups: list[list[Range]] = []
    for start, end in ranges:
        if groups:
            prev_start, prev_end = groups[-1][-1]
            gap = start - prev_end
            limit = max_gap if max_gap is not None else max(
                PAGE, min(end - start, prev_end - prev_start))
            if gap <= limit and end - groups[-1][0][0] <= cap:
                groups[-1].append((start, end))
                continue
        groups.append([(start, end)])
    out = []
    offset = 0
    for group in groups:
        out.append(Extent(name, group[0][0], group[-1][1], tuple(group), offset))
        offset += sum(end - start for start, end in group)
    return out


def read_direct(layout: Layout, indices: Mapping[str, Index | None], strategy: Strategy, *,
                budget: int, max_gap: int | None, device: torch.device,
                local: dict[str, torch.Tensor]) -> int:
    """Fill ``local`` with this rank's slices on ``device``; return the bytes read.

    ``strategy`` must be prepared for ``layout.shards``. Reads run at most ``budget`` bytes ahead
    of the copies; a strided slice is assembled in host memory, then moved to ``device``.
    """
    runs: list[Entry] = []
    jobs: dict[Entry, Extent | None] = {}  # None: the run is the whole slice
    partial: dict[str, torch.Tensor] = {}  # strided slices being assembled (host)
    missing: dict[str, int] = {}
    for entry in iter_entries(layout, [n for n, index in indices.items() if index is not None]):
        info = entry.info
        index = indices[entry.name]
        assert index is not None
        plan = plan_slice(info, index)
        ranges = list(plan.ranges)
        if not ranges:
            local[entry.name] = torch.empty(plan.shape, dtype=info.dtype.torch, device=device)
        elif len(ranges) == 1:
            start, end = ranges[0]
            run = Entry(entry.shard, TensorInfo(info.name, info.dtype, tuple(plan.shape), start, end))
            runs.append(run)
            jobs[run] = None
        else:
            partial[entry.name] = torch.empty(plan.shape, dtype=info.dtype.torch)
            missing[entry.name] = sum(end - start for start, end in ranges)
            for extent in extents(entry.name, ranges, max_gap, max(budget // 4, PAGE)):
                run = Entry(entry.shard, TensorInfo(info.name, DTYPES["U8"],
                                                    (extent.end - extent.start,), extent.start,
                                                    extent.end))
                runs.append(run)
                jobs[run] = extent
    for run, tensor in read_tensors(layout, runs, strategy, budget=budget, window=budget):
        extent = jobs[run]
        if extent is None:
            local[run.name] = tensor.to(device)
            continue
        dest = partial[extent.name].view(-1).view(torch.uint8)
        kept = sum(end - start for start, end in extent.ranges)
        gather(tensor, extent.start, extent.ranges, dest[extent.offset:extent.offset + kept])
        missing[extent.name] -= kept
        if missing[extent.name] == 0:
            local[extent.name] = partial.pop(extent.name).to(device)
    return sum(run.info.nbytes for run in runs)


def gather(src: torch.Tensor, base: int, ranges: Sequence[Range], dest: torch.Tensor) -> None:
    """Copy ``ranges`` (file offsets; ``src`` holds the file from ``base`` on) one after another
    into ``dest``. Ranges of one length (what a slice is made of) take a single strided copy when
    evenly spaced, else one gather; only mixed lengths copy range by range."""
    length = ranges[0][1] - ranges[0][0]
    if any(end - start != length for start, end in ranges):
        torch.cat([src[start - base:end - base] for start, end in ranges], out=dest)
        return
    rows = dest.view(len(ranges), length)
    step = ranges[1][0] - ranges[0][0] if len(ranges) > 1 else length
    if all(start == ranges[0][0] + i * step for i, (start, _) in enumerate(ranges)):
        rows.copy_(src.as_strided((len(ranges), length), (step, 1),
                                  src.storage_offset() + ranges[0][0] - base))
        return
    starts = torch.tensor([start - base for start, _ in ranges], dtype=torch.int64)
    torch.index_select(src.unfold(0, length, 1), 0, starts, out=rows)
