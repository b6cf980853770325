"""Plan: which byte ranges to read, in what pieces, and where each piece goes.

Two shapes of plan, for the two ways bytes reach their destination:

* ``Block`` — the destination is a fresh host buffer the reader fills directly (a CPU load with no
  dtype change). A block is one large tensor, or a run of adjacent small tensors sharing one
  buffer (so 20 000 tiny tensors cost a few reads, not 20 000). Its reads are split at absolute
  file offsets that are multiples of the chunk size, so parallel reads never touch the same page.
* ``Chunk`` — the bytes pass through a reused ring slot and are copied into destinations that
  already exist (a device, a dtype conversion, a module's parameters). A chunk is a run of whole
  small tensors, or a piece of one large tensor cut at an element boundary (packed GGML tensors:
  at a row boundary, or a block boundary when a row is larger than a chunk, so each piece can be
  dequantized on its own).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .dequant import packed_type
from .sources.records import Entry

#: Tensors below this size are grouped with their neighbours into one read.
SMALL_TENSOR = 1 << 20


class Block(NamedTuple):
    """One host allocation: the file range ``[start, end)`` of ``shard`` and the tensors in it.
    (A named tuple: made once per tensor of a stream before its first tensor is handed out, at
    a fifth of a frozen dataclass's cost.)"""

    shard: int
    start: int
    end: int
    entries: tuple[Entry, ...]
    #: Reads are cut at the multiples of this (``reads``).
    step: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def reads(self) -> tuple[tuple[int, int], ...]:
        """The block's reads: ``[start, end)`` cut at the multiples of ``step``. Cut when the
        block is submitted, not planned: a stream plans every block before its first tensor,
        and a 2 GB checkpoint's cuts (~8,000 at 256 KiB) took ~0.5 ms of that."""
        return split_range(self.start, self.end, self.step)


@dataclass(frozen=True)
class Piece:
    """Bytes ``[begin, end)`` of one tensor (offsets within the tensor)."""

    entry: Entry
    begin: int
    end: int

    @property
    def last(self) -> bool:
        return self.end == self.entry.info.nbytes


@dataclass(frozen=True)
class Chunk:
    """One read of ``[start, end)`` from ``shard`` into a ring slot, and the pieces it carries."""

    shard: int
    start: int
    end: int
    pieces: tuple[Piece, ...]

    @property
    def nbytes(self) -> int:
        return self.end - self.start


#: Says which small tensors may share a read: neighbours of the same kind (e.g. in the page cache
#: or not, so that a run of cached tensors can be mapped rather than read).
Kind = Callable[[Entry], object]


def _runs(entries: Sequence[Entry], limit: int, kind: Kind | None = None,
          small: int = SMALL_TENSOR) -> Iterator[list[Entry]]:
    """Group entries (in file order) into runs of adjacent tensors smaller than ``small`` of one
    ``kind``; larger ones stand alone."""
    run: list[Entry] = []
    run_bytes = 0
    for entry in entries:
        size = entry.info.nbytes
        adjacent = bool(run) and run[-1].shard == entry.shard and run[-1].info.end == entry.info.start
        if adjacent and kind is not None:
            adjacent = kind(run[-1]) == kind(entry)
        if size >= small:
            if run:
                yield run
                run, run_bytes = [], 0
            yield [entry]
            continue
        if run and (not adjacent or run_bytes + size > limit):
            yield run
            run, run_bytes = [], 0
        run.append(entry)
        run_bytes += size
    if run:
        yield run


def split_range(start: int, end: int, step: int) -> tuple[tuple[int, int], ...]:
    """Cut ``[start, end)`` at the multiples of ``step`` inside it (at least one range)."""
    edge = (start // step + 1) * step
    if end <= start or edge >= end:  # nothing to cut (most tensors): one range
        return ((start, end),)
    cuts = [start, *range(edge, end, step), end]
    return tuple(zip(cuts, cuts[1:]))


#: ``plan_blocks(..., whole=True)``: no limit to a block.
WHOLE = 1 << 62


def plan_blocks(entries: Iterable[Entry], read_size: int, group_limit: int = 16 << 20,
                kind: Kind | None = None, whole: bool = False) -> list[Block]:
    """Blocks for a load into fresh host buffers; ``read_size`` must be a multiple of 4096.
    Small tensors share a block with neighbours of their ``kind`` only. ``whole``: every run of
    adjacent tensors is one block, whatever their sizes (zero-copy views of a mapped file: a
    block costs no memory, only its per-block work); reads are still cut at ``read_size``."""
    blocks = []
    small = SMALL_TENSOR
    if whole:
        group_limit = small = WHOLE
    for run in _runs(list(entries), group_limit, kind, small):
        start, end = run[0].info.start, run[-1].info.end
        blocks.append(Block(run[0].shard, start, end, tuple(run), read_size))
    return blocks


def _cut_unit(entry: Entry, chunk_size: int) -> int:
    """Pieces of a tensor are multiples of this: an element, or a packed tensor's row or block."""
    kind = packed_type(entry.info)
    if kind is None:
        return entry.info.dtype.itemsize
    row = entry.info.shape[-1] if entry.info.shape else kind.type_size
    return row if row <= chunk_size else kind.type_size


def plan_chunks(entries: Iterable[Entry], chunk_size: int, kind: Kind | None = None
                ) -> list[Chunk]:
    """Chunks of at most ``chunk_size`` bytes for a load through a ring of that slot size.
    Small tensors share a chunk with neighbours of their ``kind`` only."""
    chunks = []
    for run in _runs(list(entries), chunk_size, kind):
        if len(run) > 1 or run[0].info.nbytes <= chunk_size:
            pieces = tuple(Piece(e, 0, e.info.nbytes) for e in run)
            chunks.append(Chunk(run[0].shard, run[0].info.start, run[-1].info.end, pieces))
            continue
        entry = run[0]
        # Cut a large tensor at element boundaries so each piece can be converted on its own.
        unit = _cut_unit(entry, chunk_size)
        step = max(unit, chunk_size - chunk_size % unit)
        for begin in range(0, entry.info.nbytes, step):
            end = min(begin + step, entry.info.nbytes)
            chunks.append(Chunk(entry.shard, entry.info.start + begin, entry.info.start + end,
                                (Piece(entry, begin, end),)))
    return chunks
