"""A numpy-style index into a stored tensor → the output shape and the byte ranges it needs.

Pure arithmetic on ``TensorInfo``: no file handles, no tensors. The ranges are absolute file
offsets, sorted, disjoint and coalesced (touching ranges are merged), and their bytes, read one
after another, are the selected elements in C order — so a reader can fill the output buffer by
concatenating them. Used by ``safe_open(...).get_slice`` and by tensor-parallel loading.

Basic indexing only, as ``safetensors`` slices are: ints (negative ones count from the end),
slices with positive steps, one ``...`` and ``None`` (a new axis of length 1). Errors are the
ones numpy raises for the same mistakes (``IndexError``, ``ValueError``, ``TypeError``); an index
out of range is a ``SliceError``, which is an ``IndexError``.

``reference_numpy_index`` checks an index as safetensors checks one for ``framework="np"``: more
strictly than numpy (a slice running past the end is refused, not clamped), with its messages.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from .errors import FormatError, SliceError
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
        raise slice_error(f"{name}: an index can only have a single ellipsis ('...')", name)
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    if used > len(shape):
        raise slice_error(f"{name}: too many indices for tensor of dimension {len(shape)} "
                          f"(shape {list(shape)}, {used} indices given)", name)
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
        raise slice_error(f"{name}: index {operator.index(item)} is out of bounds for dimension "
                          f"{dim} with size {size}", name)
    return Axis(position, 1, 1, False)


def slice_error(message: str, name: str) -> SliceError:
    """A ``SliceError`` saying exactly ``message`` (no prefix added) about tensor ``name``."""
    error = SliceError(message)
    error.tensor = name
    return error


def reference_numpy_index(shape: tuple[int, ...], index: Any, name: str = "tensor"
                          ) -> tuple[int | slice, ...]:
    """``index`` checked as safetensors (0.8) checks a ``framework="np"`` slice, as a basic index
    of non-negative ints and bounded slices that ``plan_slice`` reads the same way.

    Stricter than numpy, like the reference: a slice whose start is not below the dimension's
    size, or whose stop is past it, is refused (numpy would clamp it); so are ``None``, lists
    other than ``[]`` and negative slice bounds. The errors carry the reference's messages:

    >>> reference_numpy_index((10, 5), (slice(2, None), -6))
    Traceback (most recent call last):
    weightlift.errors.SliceError: Invalid index -6 for dimension 1 of size 5
    """
    if isinstance(index, list):
        if index:
            raise slice_error("Non empty lists are not implemented", name)
        given: list[Any] = [slice(0, 0)]  # the reference reads `[]` as `[0:0]`
    else:
        given = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for item in given if item is Ellipsis) > 1:
        raise slice_error("Only one ellipsis (...) is allowed in slice index", name)
    # One pass in the reference's order: each item is checked as it is reached.
    fill = max(len(shape) - (len(given) - (Ellipsis in given)), 0)
    items: list[int | slice] = []
    for item in given:
        dim = len(items)
        if item is Ellipsis:
            items += [slice(None)] * fill
        elif isinstance(item, slice):
            items.append(_reference_slice(item, name))
        else:
            position = _reference_int(item)
            if position is None:
                raise slice_error(f"Unsupported slice index at position {dim}: expected slice, "
                                  "int, or ellipsis", name)
            size = shape[dim] if dim < len(shape) else 0
            if position < 0:
                if position + size < 0:
                    raise slice_error(f"Invalid index {position} for dimension {dim} of size "
                                      f"{size}", name)
                position += size
            items.append(position)
    where = f"Error during slicing {_show(items)} with shape {list(shape)}"
    if len(items) > len(shape):
        raise slice_error(f"{where}: more slicing indexes than dimensions in tensor", name)
    basic: list[int | slice] = []
    backwards = ""
    for dim, (item, size) in reversed(list(enumerate(zip(items, shape)))):  # last dim first
        if isinstance(item, slice):
            start = 0 if item.start is None else item.start
            stop = size if item.stop is None else item.stop
            asked = start if start >= size else stop - 1 if stop > size else None
            if asked is not None:
                raise slice_error(f"{where}: index {asked} out of bounds for tensor dimension "
                                  f"#{dim} of size {size}", name)
            if start > stop:  # the reference checks every bound first, then fails on this one
                backwards = backwards or (f"{where}: slice start {start} is past its stop {stop} "
                                          f"in tensor dimension #{dim}")
            basic.append(slice(start, stop, item.step))
        else:
            if item >= size:
                raise slice_error(f"{where}: index {item} out of bounds for tensor dimension "
                                  f"#{dim} of size {size}", name)
            basic.append(item)
    if backwards:  # (with a SystemError for a negative size, or a panic)
        raise slice_error(backwards, name)
    return tuple(reversed(basic))


def _reference_slice(item: slice, name: str) -> slice:
    """A slice as the reference takes it: bounds from 0 up, a positive step."""
    bounds = []
    for bound in (item.start, item.stop):
        if bound is not None:
            bound = operator.index(bound)  # TypeError: 'float' object cannot be interpreted…
            if bound < 0:
                raise OverflowError(f"can't convert negative int to unsigned: slice bound {bound} "
                                    f"of {name!r} (safetensors' numpy slices count from 0 up)")
        bounds.append(bound)
    step = 1 if item.step is None else operator.index(item.step)
    if step <= 0:
        raise slice_error(f"Slice step must be a positive integer, got {step}", name)
    return slice(bounds[0], bounds[1], step)


def _reference_int(item: Any) -> int | None:
    """``item`` as the reference's 32-bit int index (numpy ints, bools and one-element tensors
    included), or None when it is not one."""
    if item is None or isinstance(item, (list, tuple, str, bytes)):
        return None
    try:
        position = operator.index(item)
    except TypeError:
        return None
    return position if -2**31 <= position < 2**31 else None


def _show(items: list[Any]) -> str:
    """An index as the reference prints it in its errors: ``[2:, 20]``, ``[::3, :20:2]``."""
    parts = []
    for item in items:
        if isinstance(item, slice):
            text = "" if item.start is None else str(item.start)
            text += ":" + ("" if item.stop is None else str(item.stop))
            if item.step not in (None, 1):
                text += f":{item.step}"
            parts.append(text)
        else:
            parts.append(str(item))
    return "[" + ", ".join(parts) + "]"


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


__all__ = ["Axis", "Index", "Range", "SlicePlan", "byte_ranges", "normalize", "plan_slice", "slice_error",
           "reference_numpy_index"]
