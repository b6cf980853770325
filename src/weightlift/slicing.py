"""A numpy-style index into a stored tensor → the output shape and the byte ranges it needs.

Pure arithmetic on ``TensorInfo``: no file handles, no tensors. The ranges are absolute file
offsets, sorted, disjoint and coalesced (touching ranges are merged), and their bytes, read one
after another, are the selected elements in C order — so a reader can fill the output buffer by
concatenating them. Used by ``safe_open(...).get_slice`` and by tensor-parallel loading.

Basic indexing only, as ``safetensors`` slices are: ints (negative ones count from the end),
slices with positive steps, one ``...`` and ``None`` (a new axis of length 1). Errors are the
built-in ones numpy raises for the same mistakes (``IndexError``, ``ValueError``, ``TypeError``).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .errors import FormatError
from .formats.records import TensorInfo

#: One item of a basic index.
IndexItem = Union[slice, int, "type[Ellipsis]", None]
#: ``t[i]`` passes ``i``; ``t[i, j]`` passes the tuple ``(i, j)``.
Index = Union[IndexItem, tuple[Any, ...]]
#: ``[start, end)`` absolute file offsets.
Range = tuple[int, int]


@dataclass(frozen=True)
class Axis:
    """The positions ``start + k * step`` (``k < count``) taken from one stored dimension;
    ``keep`` is False for an int index (numpy drops that dimension from the result)."""

    start: int
    step: int
    count: int
    keep: bool


@dataclass(frozen=True)
class SlicePlan:
    """What ``tensor[index]`` is: its ``shape``, and the file ``ranges`` holding its bytes in
    order."""

    shape: tuple[int, ...]
    ranges: tuple[Range, ...]

    @property
    def nbytes(self) -> int:
        return sum(end - start for start, end in self.ranges)


def plan_slice(info: TensorInfo, index: Index) -> SlicePlan:
    """The shape of ``tensor[index]`` and the fewest contiguous byte ranges that hold it.

    >>> plan_slice(TensorInfo("w", DTYPES["F32"], (4, 8), 100, 228), (slice(1, 3), slice(2, 4)))
    SlicePlan(shape=(2, 2), ranges=((140, 148), (172, 180)))
    """
    axes, shape = normalize(info.shape, index, info.name)
    return SlicePlan(shape, byte_ranges(info, axes))


def normalize(shape: tuple[int, ...], index: Index, name: str = "tensor"
              ) -> tuple[tuple[Axis, ...], tuple[int, ...]]:
    """One ``Axis`` per stored dimension, and the output shape (with ``None`` axes inserted)."""
    items = list(index) if isinstance(index, tuple) else [index]
    ellipses = sum(1 for item in items if item is Ellipsis)
    if ellipses > 1:
        raise IndexError(f"{name}: an index can only have a single ellipsis ('...')")
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    if used > len(shape):
        raise IndexError(f"{name}: too many indices for a tensor of dimension {len(shape)} "
                         f"(shape {list(shape)}): {used} were given")
    if ellipses:
        at = items.index(Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - used)
    else:
        items += [slice(None)] * (len(shape) - used)
    axes: list[Axis] = []
    out: list[int] = []
    for item in items:
        if item is None:
            out.append(1)
            continue
        dim = len(axes)
        axis = _axis(item, shape[dim], dim, name)
        axes.append(axis)
        if axis.keep:
            out.append(axis.count)
    return tuple(axes), tuple(out)


def _axis(item: Any, size: int, dim: int, name: str) -> Axis:
    if isinstance(item, slice):
        try:
            start, stop, step = item.indices(size)
        except (TypeError, ValueError) as exc:  # non-integer bounds, a zero step
            raise type(exc)(f"{name}: {exc}") from None
        if step < 0:
            raise ValueError(f"{name}: slice step must be greater than zero (got {step}); "
                             "negative steps are not supported")
        return Axis(start, step, len(range(start, stop, step)), True)
    if isinstance(item, bool) or not hasattr(item, "__index__"):
        raise TypeError(f"{name}: only integers, slices, '...' and None are valid indices "
                        f"(got {type(item).__name__} {item!r})")
    position = operator.index(item)  # ints, numpy and 0-d torch integer scalars
    if position < 0:
        position += size
    if not 0 <= position < size:
        raise IndexError(f"{name}: index {operator.index(item)} is out of bounds for dimension "
                         f"{dim} with size {size}")
    return Axis(position, 1, 1, False)


def byte_ranges(info: TensorInfo, axes: tuple[Axis, ...]) -> tuple[Range, ...]:
    """The coalesced file ranges holding the elements ``axes`` select, in C order."""
    shape = info.shape
    if any(axis.count == 0 for axis in axes) or info.nbytes == 0:
        return ()
    # Trailing dimensions taken whole are one contiguous block per position of the others.
    inner = len(axes)
    while inner > 0 and axes[inner - 1].start == 0 and axes[inner - 1].count == shape[inner - 1]:
        inner -= 1
    if inner == 0:
        return ((info.start, info.end),)
    if info.dtype.pack > 1:
        raise FormatError(f"{info.dtype.name} packs {info.dtype.pack} elements per byte, so only "
                          "the whole tensor can be read, not a part of it", tensor=info.name)
    item = info.dtype.itemsize
    strides = [math.prod(shape[dim + 1:]) * item for dim in range(len(shape))]
    last = axes[inner - 1]
    # The innermost partial dimension: with step 1 its positions are one run; otherwise each
    # position is a run of its own.
    if last.step == 1:
        length = last.count * strides[inner - 1]
        walked = inner - 1
        base = info.start + last.start * strides[inner - 1]
    else:
        length = strides[inner - 1]
        walked = inner
        base = info.start
    offsets = np.array([base], dtype=np.int64)
    for dim in range(walked):
        axis = axes[dim]
        steps = (axis.start + axis.step * np.arange(axis.count, dtype=np.int64)) * strides[dim]
        offsets = np.add.outer(offsets, steps).reshape(-1)
    return _coalesce(offsets, length)


def _coalesce(offsets: np.ndarray, length: int) -> tuple[Range, ...]:
    """Runs of ``length`` bytes at sorted ``offsets`` → ranges, touching runs merged."""
    breaks = np.flatnonzero(offsets[1:] != offsets[:-1] + length) + 1
    starts = offsets[np.concatenate(([0], breaks))]
    ends = offsets[np.concatenate((breaks - 1, [len(offsets) - 1]))] + length
    return tuple(zip(starts.tolist(), ends.tolist()))


__all__ = ["Axis", "Index", "Range", "SlicePlan", "byte_ranges", "normalize", "plan_slice"]
