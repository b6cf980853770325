"""plan_slice: numpy is the oracle for which elements an index selects and in what order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightlift.formats.records import DTYPES, TensorInfo
from weightlift.slicing import SlicePlan, plan_slice


def info(shape: tuple[int, ...], dtype: str = "F32", start: int = 1000) -> TensorInfo:
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    return TensorInfo("w", DTYPES[dtype], shape, start, start + nbytes)


def expected_bytes(tensor: TensorInfo, index: object) -> tuple[tuple[int, ...], list[int]]:
    """numpy's answer: the shape of ``x[index]`` and the file offset of each of its bytes."""
    item = tensor.dtype.itemsize
    elements = np.arange(tensor.numel, dtype=np.int64).reshape(tensor.shape)[index]
    offsets = (tensor.start + elements.reshape(-1, 1) * item + np.arange(item)).reshape(-1)
    return elements.shape, offsets.tolist()


def covered(plan: SlicePlan) -> list[int]:
    return [offset for start, end in plan.ranges for offset in range(start, end)]


def assert_matches_numpy(tensor: TensorInfo, index: object) -> SlicePlan:
    plan = plan_slice(tensor, index)
    shape, offsets = expected_bytes(tensor, index)
    assert plan.shape == shape
    assert covered(plan) == offsets
    assert plan.nbytes == len(offsets)
    for (_, end), (start, _) in zip(plan.ranges, plan.ranges[1:]):
        assert end < start, "ranges must be sorted and coalesced (no two touching)"
    return plan


CASES = [
    (),
    Ellipsis,
    0,
    -1,
    (slice(None), 2),
    (slice(1, 3),),
    (slice(None), slice(1, 3)),
    (slice(None), slice(None, None, 2)),
    (slice(None, None, 3), -2, slice(1, None)),
    (Ellipsis, 1),
    (1, Ellipsis),
    (slice(0, 2), Ellipsis, slice(1, 3)),
    (None, slice(1, 2), None),
    (1, 2, 3),
    (slice(5, 10),),
    (slice(2, 1),),
    (slice(-100, 100),),
    (np.int64(1), torch.tensor(2)),
]


@pytest.mark.parametrize("index", CASES, ids=repr)
def test_selects_the_elements_numpy_selects(index: object) -> None:
    assert_matches_numpy(info((3, 4, 5)), index)


def test_whole_tensor_is_one_range() -> None:
    tensor = info((3, 4, 5))
    assert plan_slice(tensor, ()).ranges == ((tensor.start, tensor.end),)
    assert plan_slice(tensor, (slice(None), slice(None), slice(None))).ranges == \
        ((tensor.start, tensor.end),)


def test_leading_rows_are_one_range() -> None:
    tensor = info((8, 16), "BF16")
    plan = plan_slice(tensor, slice(2, 6))
    assert plan.ranges == ((tensor.start + 2 * 32, tensor.start + 6 * 32),)


def test_column_block_is_one_range_per_row() -> None:
    tensor = info((4, 8))
    plan = plan_slice(tensor, (slice(None), slice(2, 4)))
    assert plan.ranges == tuple((tensor.start + r * 32 + 8, tensor.start + r * 32 + 16)
                                for r in range(4))


def test_int_on_a_unit_dimension_keeps_ranges_merged() -> None:
    tensor = info((4, 1, 6))
    plan = assert_matches_numpy(tensor, (slice(1, 3), 0))
    assert len(plan.ranges) == 1


def test_empty_selections_read_nothing() -> None:
    assert plan_slice(info((3, 4)), (slice(2, 2),)) == SlicePlan((0, 4), ())
    assert plan_slice(info((0, 4)), (slice(None), slice(1, 3))) == SlicePlan((0, 2), ())
    assert plan_slice(info((4, 0)), 1) == SlicePlan((0,), ())


def test_scalar_tensor() -> None:
    tensor = info(())
    assert plan_slice(tensor, ()) == SlicePlan((), ((tensor.start, tensor.end),))
    assert plan_slice(tensor, Ellipsis).shape == ()
    assert plan_slice(tensor, None).shape == (1,)


@pytest.mark.parametrize("index, error", [
    ((3,), IndexError),
    ((-4,), IndexError),
    ((0, 0, 0), IndexError),
    ((Ellipsis, Ellipsis), IndexError),
    ((slice(None, None, -1),), ValueError),
    ((slice(None, None, 0),), ValueError),
    ((slice(1.0, 2),), TypeError),
    ((1.5,), TypeError),
    (("a",), TypeError),
    ((True,), TypeError),
], ids=repr)
def test_invalid_indices_raise_what_numpy_raises(index: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="w: "):
        plan_slice(info((3, 4)), index)


def test_error_names_the_tensor() -> None:
    with pytest.raises(IndexError, match="w: index 9 is out of bounds for dimension 1 with size 4"):
        plan_slice(info((3, 4)), (0, 9))


@st.composite
def shapes_and_indices(draw: st.DrawFn) -> tuple[TensorInfo, tuple[object, ...]]:
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=0, max_size=4)))
    dtype = draw(st.sampled_from(["U8", "F16", "F32", "F64"]))
    index: list[object] = []
    for size in shape:
        if size and draw(st.booleans()):
            index.append(draw(st.integers(-size, size - 1)))
        else:
            index.append(slice(draw(st.none() | st.integers(-7, 7)),
                               draw(st.none() | st.integers(-7, 7)),
                               draw(st.none() | st.integers(1, 4))))
    cut = draw(st.integers(0, len(index)))
    if draw(st.booleans()):  # '...' stands for the items from ``cut`` to ``resume``
        resume = draw(st.integers(cut, len(index)))
        index = index[:cut] + [Ellipsis] + index[resume:]
    else:
        index = index[:cut]
    if draw(st.booleans()):
        index.insert(draw(st.integers(0, len(index))), None)
    return info(shape, dtype, start=draw(st.integers(8, 4096))), tuple(index)


@settings(max_examples=300, deadline=None)
@given(shapes_and_indices())
def test_any_basic_index_matches_numpy(case: tuple[TensorInfo, tuple[object, ...]]) -> None:
    tensor, index = case
    assert_matches_numpy(tensor, index)
