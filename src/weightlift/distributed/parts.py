"""A rank's part of a tensor in normal form, and the piece of it that falls in a run of rows.

The collective mode moves tensors in runs of whole rows (contiguous bytes); each rank then needs
the rows of its part inside the run, and in them its columns. ``Axis`` is one dimension of an index
with negative and open bounds resolved, so that intersection is plain arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import PlacementError
from ..format import TensorInfo
from .plan import Index


@dataclass(frozen=True)
class Axis:
    """Positions ``start + k * step`` for ``k < count``; ``keep`` is False for an int index (the
    dimension is dropped from the result, as in numpy)."""

    start: int
    step: int
    count: int
    keep: bool

    def take(self, offset: int = 0) -> slice | int:
        """The index selecting these positions, in a tensor whose first position is ``offset``."""
        first = self.start - offset
        if not self.keep:
            return first
        if self.count == 0:
            return slice(first, first)
        return slice(first, first + (self.count - 1) * self.step + 1, self.step)


def normalize(index: Index, info: TensorInfo) -> tuple[Axis, ...]:
    """One ``Axis`` per dimension of ``info``; raises on what a basic numpy index cannot be."""
    if not isinstance(index, tuple):
        raise PlacementError(f"the plan returned {index!r}; an index is a tuple of slices and ints "
                             "(() for the whole tensor) or None", tensor=info.name)
    if len(index) > len(info.shape):
        raise PlacementError(f"index {index!r} has more entries than shape {list(info.shape)} "
                             "has dimensions", tensor=info.name)
    axes = []
    for dim, size in enumerate(info.shape):
        item = index[dim] if dim < len(index) else slice(None)
        if isinstance(item, slice):
            start, stop, step = item.indices(size)
            if step <= 0:
                raise PlacementError(f"index {index!r}: steps must be positive", tensor=info.name)
            axes.append(Axis(start, step, len(range(start, stop, step)), True))
        elif isinstance(item, int) and not isinstance(item, bool):
            position = item + size if item < 0 else item
            if not 0 <= position < size:
                raise PlacementError(f"index {index!r}: {item} is out of range for dimension {dim} "
                                     f"of size {size}", tensor=info.name)
            axes.append(Axis(position, 1, 1, False))
        else:
            raise PlacementError(f"index {index!r}: {item!r} is neither a slice nor an int",
                                 tensor=info.name)
    return tuple(axes)


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
    src = (rows.take(r0), *(axis.take() for axis in rest))
    dst = (slice(lo, hi),) if first.keep else ()
    return Part(src, dst, shape, nbytes)
