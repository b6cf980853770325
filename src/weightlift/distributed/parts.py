"""A rank's part of a tensor in normal form, and the piece of it that falls in a run of rows.

The collective mode moves tensors in runs of whole rows (contiguous bytes); each rank then needs
the rows of its part inside the run, and in them its columns. ``Axis`` is one dimension of an index
(from ``slicing``, which ``get_slice`` uses too) with negative and open bounds resolved, so that
intersection is plain arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PlacementError
from ..formats.records import TensorInfo
from ..slicing import Axis
from ..slicing import normalize as normalize_index
from .plan import Index


def take(axis: Axis, offset: int = 0) -> slice | int:
    """The index selecting ``axis``'s positions in a tensor whose first position is ``offset``."""
    first = axis.start - offset
    if not axis.keep:
        return first
    if axis.count == 0:
        return slice(first, first)
    return slice(first, first + (axis.count - 1) * axis.step + 1, axis.step)


def normalize(index: Index, info: TensorInfo) -> tuple[Axis, ...]:
    """One ``Axis`` per dimension of ``info``; a ``PlacementError`` for what cannot be a part."""
    items = index if isinstance(index, tuple) else (index,)
    if any(item is None for item in items):
        raise PlacementError(f"the plan's index {index!r} adds an axis (None); a part of a tensor "
                             "can only select from it", tensor=info.name)
    try:
        axes, _ = normalize_index(info.shape, index, info.name)
    except (IndexError, ValueError, TypeError) as exc:
        raise PlacementError(f"the plan's index {index!r} does not fit: {exc}") from None
    return axes


def part_shape(axes: tuple[Axis, ...]) -> tuple[int, ...]:
    return tuple(axis.count for axis in axes if axis.keep)


@dataclass(frozen=True)
class Part:
    """What one rank takes from a run of rows: ``run[src]`` goes to ``local[dst]``."""

    src: tuple[slice | int, ...]
    dst: tuple[slice, ...]
    shape: tuple[int, ...]
    nbytes: int


def part_in_rows(axes: tuple[Axis, ...], info: TensorInfo, r0: int, r1: int) -> Part | None:
    """The rank's piece of rows ``[r0, r1)`` of the tensor (all of a 0-d one), or None if empty."""
    if not axes:
        return Part((), (), (), info.nbytes)
    first, rest = axes[0], axes[1:]
    lo = max(0, -(-(r0 - first.start) // first.step))
    hi = min(first.count, -(-(r1 - first.start) // first.step))
    if hi <= lo:
        return None
    rows = Axis(first.start + lo * first.step, first.step, hi - lo, first.keep)
    shape = part_shape((rows, *rest))
    nbytes = math.prod(shape) * info.dtype.itemsize
    if nbytes == 0:
        return None
    src = (take(rows, r0), *(take(axis) for axis in rest))
    dst = (slice(lo, hi),) if first.keep else ()
    return Part(src, dst, shape, nbytes)
