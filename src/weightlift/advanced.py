"""List and tensor indices in ``get_slice(...)[...]``, as the safetensors package accepts them.

``f.get_slice("w")[[0, 5], :16]`` selects rows 0 and 5. Only the basic part of such an index can
be planned as byte ranges, so an index with lists is split in two:

* ``box``: a basic index (ints, slices, ``None``, no ``...``) selecting the smallest block that
  holds every listed position, read as usual (``[0, 5]`` reads rows 0 to 5);
* ``rest``: the original index re-expressed against that block, applied with torch indexing, so
  the result has torch's (numpy's) advanced-indexing shape.

    >>> box, rest = split_index((4, 8), ([3, 1], slice(0, 2)))
    >>> box, rest[1]
    ((slice(1, 4, 1), slice(0, 2, 1)), slice(None, None, None))

Boolean lists are masks (their ``True`` positions); an empty list selects nothing. Reading the
covering block costs up to the span of the listed positions, not only the rows asked for.
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch

from .slicing import slice_error


def is_advanced(item: Any) -> bool:
    """True for a list, a numpy array or a torch tensor of at least one dimension."""
    if isinstance(item, (list, np.ndarray)):
        return isinstance(item, list) or item.ndim > 0
    return isinstance(item, torch.Tensor) and item.dim() > 0


def has_advanced(index: Any) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(is_advanced(item) for item in items)


def split_index(shape: tuple[int, ...], index: Any, name: str = "tensor"
                ) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(box, rest)``: ``stored[box][rest]`` equals ``stored[index]`` under torch indexing."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for item in items if item is Ellipsis) > 1:
        raise slice_error(f"{name}: an index can only have a single ellipsis ('...')", name)
    used = sum(1 for item in items if item is not None and item is not Ellipsis)
    if used > len(shape):
        raise slice_error(f"{name}: too many indices for tensor of dimension {len(shape)} "
                          f"(shape {list(shape)}, {used} indices given)", name)
    if Ellipsis in items:
        at = next(i for i, item in enumerate(items) if item is Ellipsis)
        items[at:at + 1] = [slice(None)] * (len(shape) - used)
    box: list[Any] = []
    rest: list[Any] = []
    dim = 0
    for item in items:
        if item is None:
            rest.append(None)
            continue
        size = shape[dim]
        if is_advanced(item):
            positions = _positions(item, shape, dim, name)
            lo = int(positions.min()) if positions.numel() else 0
            hi = int(positions.max()) + 1 if positions.numel() else 0
            box.append(slice(lo, hi, 1))
            rest.append(positions - lo)
        elif isinstance(item, slice):
            box.append(item)
            rest.append(slice(None))
        elif isinstance(item, bool) or not hasattr(item, "__index__"):
            box.append(item)  # not an index at all: planning the box raises numpy's TypeError
            rest.append(slice(None))
        else:
            position = operator.index(item)
            if not -size <= position < size:
                raise slice_error(f"{name}: index {position} is out of bounds for dimension "
                                  f"{dim} with size {size}", name)
            position %= size
            box.append(slice(position, position + 1, 1))
            rest.append(0)
        dim += 1
    return tuple(box), tuple(rest)


def _positions(item: Any, shape: tuple[int, ...], dim: int, name: str) -> torch.Tensor:
    """The int64 positions a list/array/tensor index selects on dimension ``dim``."""
    size = shape[dim]
    try:
        values = torch.as_tensor(np.asarray(item) if isinstance(item, list) else item)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{name}: index {item!r} is not a list of integers or booleans") from exc
    if isinstance(item, list) and not item:
        values = values.to(torch.int64)
    if values.dtype == torch.bool:
        if values.dim() != 1 or values.numel() != size:
            raise slice_error(f"{name}: The shape of the mask {list(values.shape)} at index "
                              f"{dim} does not match the shape of the indexed tensor "
                              f"{list(shape)} at index {dim}", name)
        return values.nonzero().reshape(-1)
    if values.is_floating_point() or values.is_complex():
        raise slice_error(f"{name}: tensors used as indices must be integer or boolean, got "
                          f"{values.dtype}", name)
    values = values.to(torch.int64)
    bad = (values < -size) | (values >= size)
    if bool(bad.any()):
        wrong = int(values[bad].reshape(-1)[0])
        raise slice_error(f"{name}: index {wrong} is out of bounds for dimension {dim} with "
                          f"size {size}", name)
    return torch.where(values < 0, values + size, values)


__all__ = ["has_advanced", "is_advanced", "split_index"]
