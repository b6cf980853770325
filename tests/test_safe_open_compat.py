"""weightlift.safe_open and weightlift.torch.load_file against the real safetensors package.

Every comparison opens the same file with both and compares bytes, shapes, dtypes, names and
errors. The behaviours mirror the read side of safetensors' own Python tests (test_pt_comparison,
test_simple): odd dtypes (bf16, f16, bool, complex, every float8), zero-sized tensors, metadata
present or absent, get_slice with get_shape/get_dtype and `[:, :, 1:2]`, steps, ints, negative
indices, Ellipsis, None, empty ranges, and the errors for bad indices or names.
"""

from __future__ import annotations

import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors import safe_open as reference_open
from safetensors.numpy import load_file as reference_np_load_file
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import load_file as reference_load_file
from safetensors.torch import load_model as reference_load_model
from safetensors.torch import save_file, save_model

import weightlift.numpy as wnumpy
import weightlift.torch as wtorch
from weightlift.compat import numpy_dtype, safe_open
from weightlift.errors import (CheckpointError, MissingFileError, ModelMismatchError,
                               SliceError, WeightliftError)

from conftest import DTYPE_NAMES, bytes_of, random_tensor

STRATEGIES = ["mmap", "direct", "stream"]
#: Every dtype both torch and safetensors know.
ALL_DTYPES = sorted(DTYPE_NAMES, key=str)


def tensors_of_every_dtype() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(6)
    out = {f"t_{DTYPE_NAMES[dtype]}": random_tensor((5, 6, 7), dtype, gen) for dtype in ALL_DTYPES}
    out["scalar"] = torch.tensor(3.5)
    out["empty_rows"] = torch.zeros((0, 4))
    out["empty_cols"] = torch.zeros((2, 0))
    out["vector"] = torch.arange(11, dtype=torch.int64)
    return out


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("compat") / "every_dtype.safetensors"
    save_file(tensors_of_every_dtype(), path, metadata={"format": "pt", "note": "x"})
    return path


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and raw(a) == raw(b)


def raw(tensor: torch.Tensor) -> bytes:
    # clone, not contiguous(): a size-1 dimension may keep any stride, which view() refuses
    return bytes_of(tensor.detach().cpu().clone(memory_format=torch.contiguous_format))


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Same tensors in the same order; zero-sized tensors share an offset, and the reference
    orders such ties by hash, so they may come in any order among themselves."""
    sized = [name for name in want if want[name].numel()]
    assert [name for name in got if name in sized] == sized
    assert sorted(got) == sorted(want)
    assert all(same(got[name], want[name]) for name in want)


# -- the handle ------------------------------------------------------------------------------


def test_keys_offset_keys_and_metadata_match(every_dtype: Path) -> None:
    with reference_open(every_dtype, "pt") as ref, safe_open(every_dtype, "pt") as ours:
        assert ours.keys() == ref.keys()
        # Zero-sized tensors share an offset; the reference orders those ties by hash.
        sized = [name for name in ref.offset_keys() if ref.get_tensor(name).numel()]
        assert [name for name in ours.offset_keys() if name in sized] == sized
        assert sorted(ours.offset_keys()) == sorted(ref.offset_keys())
        starts = [ours._layout().entries[name].info.start for name in ours.offset_keys()]
        assert starts == sorted(starts)
        assert ours.metadata() == ref.metadata() == {"format": "pt", "note": "x"}


def test_metadata_is_none_without_metadata(tmp_path: Path) -> None:
    path = tmp_path / "plain.safetensors"
    save_file({"test": torch.arange(6, dtype=torch.float32).reshape(1, 2, 3)}, path)
    with reference_open(path, "pt") as ref, safe_open(path, "pt") as ours:
        assert ours.metadata() is None and ref.metadata() is None


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_get_tensor_of_every_dtype_is_bit_exact(every_dtype: Path, strategy: str) -> None:
    with reference_open(every_dtype, "pt") as ref, \
            safe_open(every_dtype, "pt", strategy=strategy) as ours:
        for name in ref.keys():
            assert same(ours.get_tensor(name), ref.get_tensor(name)), name


def test_get_tensors_matches_in_file_order(every_dtype: Path) -> None:
    with reference_open(every_dtype, "pt") as ref, safe_open(every_dtype, "pt") as ours:
        assert_same_state(ours.get_tensors(), ref.get_tensors())


def test_device_forms_the_reference_accepts(every_dtype: Path) -> None:
    for device in ("cpu", torch.device("cpu")):
        with safe_open(every_dtype, "pt", device=device) as ours:
            assert ours.get_tensor("vector").device == torch.device("cpu")


def test_framework_aliases(every_dtype: Path) -> None:
    for framework in ("pt", "torch", "pytorch"):
        with safe_open(every_dtype, framework) as ours:
            assert isinstance(ours.get_tensor("vector"), torch.Tensor)
    with safe_open(every_dtype, "numpy") as ours:
        assert isinstance(ours.get_tensor("vector"), np.ndarray)


def test_unsupported_framework_is_refused(every_dtype: Path) -> None:
    with pytest.raises(ValueError, match="framework 'tf' is not supported"):
        safe_open(every_dtype, "tf")


def test_missing_tensor_is_an_error_naming_it(every_dtype: Path) -> None:
    with safe_open(every_dtype, "pt") as ours:
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            ours.get_tensor("nope")
        with pytest.raises(CheckpointError, match="no tensor named 'nope'"):
            ours.get_slice("nope")


def test_closed_handle_refuses_use(every_dtype: Path) -> None:
    with safe_open(every_dtype, "pt") as ours:
        pass
    with pytest.raises(CheckpointError, match="file is closed"):
        ours.keys()
    with pytest.raises(CheckpointError, match="file is closed"):
        ours.get_tensor("vector")


def test_missing_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FileNotFoundError) as want:
        reference_open(path, "pt")
    with pytest.raises(WeightliftError) as got:
        safe_open(path, "pt")
    assert str(got.value) == str(want.value) == f"No such file or directory: {path}"
    assert isinstance(got.value, FileNotFoundError) and got.value.path == str(path)


# -- slices ----------------------------------------------------------------------------------


def test_slice_like_the_reference_test(tmp_path: Path) -> None:
    """safetensors' SliceTestCase.test_deserialization_slice, against weightlift."""
    path = tmp_path / "slice.safetensors"
    tensor = torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))
    save_file({"test": tensor}, path)
    with safe_open(path, framework="pt") as f:
        part = f.get_slice("test")
        assert part.get_shape() == [1, 2, 3]
        assert part.get_dtype() == "F32"
        out = part[:, :, 1:2]
    assert torch.equal(out, torch.Tensor([[[1.0], [4.0]]]))
    if sys.byteorder == "little":
        assert out.numpy().tobytes() == b"\x00\x00\x80?\x00\x00\x80@"


INDICES = [
    (slice(None),),
    (slice(1, 3),),
    (slice(None), slice(2, 5)),
    (slice(None), slice(None), slice(1, 2)),
    (slice(None, None, 2),),
    (slice(None), slice(None, None, 3), slice(1, None, 2)),
    (1,),
    (-1,),
    (slice(None), -2),
    (2, 3, 4),
    (-5, -6, -7),
    (Ellipsis, 1),
    (Ellipsis, slice(2, 4)),
    (1, Ellipsis),
    (slice(0, 2), Ellipsis, slice(1, 3)),
    (None, slice(1, 3)),
    (slice(3, 3),),
    (slice(None), slice(6, 9)),
    (slice(-100, 100),),
    (np.int64(1), slice(None)),
    (slice(None, 1), 0, 0),
]


@pytest.mark.parametrize("index", INDICES, ids=repr)
def test_slices_of_every_dtype_match(every_dtype: Path, index: tuple[object, ...]) -> None:
    with reference_open(every_dtype, "pt") as ref, safe_open(every_dtype, "pt") as ours:
        for dtype in ALL_DTYPES:
            name = f"t_{DTYPE_NAMES[dtype]}"
            assert ours.get_slice(name).get_dtype() == ref.get_slice(name).get_dtype()
            assert ours.get_slice(name).get_shape() == ref.get_slice(name).get_shape()
            assert same(ours.get_slice(name)[index], ref.get_slice(name)[index]), (name, index)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_slices_read_through_every_strategy(every_dtype: Path, strategy: str) -> None:
    with reference_open(every_dtype, "pt") as ref, \
            safe_open(every_dtype, "pt", strategy=strategy) as ours:
        for index in [(slice(1, 4),), (slice(None), slice(2, 4)), (Ellipsis, slice(None, None, 2))]:
            assert same(ours.get_slice("t_F32")[index], ref.get_slice("t_F32")[index]), index


@pytest.mark.parametrize("name, index", [
    ("empty_rows", (slice(None),)),
    ("empty_rows", (slice(None), slice(1, 3))),
    ("empty_rows", (Ellipsis, slice(0, 0))),
    ("empty_cols", (slice(None),)),
    ("empty_cols", (1,)),
    ("empty_cols", (slice(0, 1), slice(0, 0))),
    ("scalar", ()),
    ("scalar", Ellipsis),
    ("vector", slice(2, 9, 3)),
    ("vector", -1),
], ids=repr)
def test_zero_sized_and_scalar_slices_match(every_dtype: Path, name: str, index: object) -> None:
    with reference_open(every_dtype, "pt") as ref, safe_open(every_dtype, "pt") as ours:
        assert same(ours.get_slice(name)[index], ref.get_slice(name)[index])


@pytest.mark.parametrize("index, error", [
    ((5,), IndexError),
    ((-6,), IndexError),
    ((0, 0, 0, 0), IndexError),
    ((slice(None, None, -1),), ValueError),
    ((slice(None, None, 0),), ValueError),
    ((slice(1.0, 2),), TypeError),
], ids=repr)
def test_bad_indices_fail_like_the_reference(every_dtype: Path, index: tuple[object, ...],
                                             error: type[Exception]) -> None:
    with reference_open(every_dtype, "pt") as ref, safe_open(every_dtype, "pt") as ours:
        with pytest.raises(error):
            ref.get_slice("t_F32")[index]
        with pytest.raises(error, match="t_F32"):
            ours.get_slice("t_F32")[index]


def outcome(part: object, index: object) -> object:
    """``part[index]``, or the exception it raised (a reference's Rust panic included)."""
    try:
        return part[index]  # type: ignore[index]
    except BaseException as exc:  # noqa: BLE001 - pyo3's PanicException is a BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return exc


def assert_same_outcome(ref_part: object, our_part: object, index: object) -> None:
    """Same array/tensor, or the same error: the reference's class (``SafetensorError``,
    ``IndexError``, ...) and message (torch's errors: ours adds the tensor's name in front)."""
    want, got = outcome(ref_part, index), outcome(our_part, index)
    if not isinstance(want, BaseException):
        assert not isinstance(got, BaseException), (index, got)
        if isinstance(want, torch.Tensor):
            assert same(got, want), index
        else:
            assert got.dtype == want.dtype and got.shape == want.shape, index
            assert got.tobytes() == want.tobytes(), index
        return
    assert isinstance(got, type(want)), (index, want, got)
    if isinstance(want, SafetensorError):
        assert str(got) == str(want), index
    else:  # (torch numbers the dimension after an ellipsis its own way: the value must match)
        assert str(want).split(" for dimension")[0] in str(got), (index, str(want), str(got))
    if isinstance(want, IndexError) or "out of bounds" in str(want) or "Invalid index" in str(want):
        assert isinstance(got, IndexError) and isinstance(got, SafetensorError), index


S = slice
#: Negative indices, out-of-range ints and steps in every dimension of a (5, 6, 7) tensor.
EDGE_INDICES = [
    (-1,), (S(None), -6), (S(None), S(None), -7), (-5, -6, -7), (Ellipsis, -1), (-2, Ellipsis),
    (-6,), (S(None), -7), (S(None), S(None), -8), (Ellipsis, -8), (0, -7, 0),
    (5,), (S(None), 6), (S(None), S(None), 7), (Ellipsis, 7), (4, 5, 7), (9, -9), (2, 0, 0, 0),
    (S(None, None, 2),), (S(None), S(1, None, 3)), (S(None), S(None), S(None, None, 4)),
    (S(1, 5, 2), S(0, 6, 5), S(2, 7, 3)), (Ellipsis, S(6, None, 100)), (S(4, 5, 9), -1, 2),
    (S(None, 9, 2),), (S(None), S(2, 20, 3)), (S(None), S(None), S(3, 8)), (S(5, None),),
    (S(None), S(6, 6)), (S(0, 0), S(None), 6), (S(None, None, 0),), (S(None), S(None, None, -1)),
    (S(-3, None),), (S(None), S(None, -2)), (S(1.0, 2),), (None, 1), ([0, 2],), ([],), (),
    ([9],), (S(None), [0, -7]), ([True, False],),
]


@pytest.mark.parametrize("framework", ["pt", "np"])
@pytest.mark.parametrize("index", EDGE_INDICES, ids=repr)
def test_edge_indices_behave_like_the_reference(every_dtype: Path, framework: str,
                                                index: object) -> None:
    with reference_open(every_dtype, framework) as ref, safe_open(every_dtype, framework) as ours:
        for name in ("t_F32", "t_I16"):
            assert_same_outcome(ref.get_slice(name), ours.get_slice(name), index)


def test_upstream_numpy_out_of_range_is_a_safetensor_error_and_an_index_error(
        tmp_path: Path) -> None:
    """safetensors' test_simple.py::test_numpy_slice: ``[2:, -6]`` on a (10, 5) array."""
    path = tmp_path / "slice.safetensors"
    np_save_file({"a": np.random.default_rng(0).random((10, 5))}, path)
    with safe_open(path, framework="np") as f:
        with pytest.raises(SafetensorError) as info:
            f.get_slice("a")[2:, -6]
    assert str(info.value) == "Invalid index -6 for dimension 1 of size 5"
    assert isinstance(info.value, IndexError) and isinstance(info.value, SliceError)
    assert info.value.tensor == "a"


@st.composite
def reference_numpy_indices(draw: st.DrawFn) -> object:
    """Indices of every form the reference's numpy slices meet, most of them valid."""
    bound = st.none() | st.integers(-3, 12)
    item = st.one_of(st.integers(-12, 12),
                     st.builds(slice, bound, bound, st.none() | st.integers(-1, 4)),
                     st.just(Ellipsis), st.just(None), st.just([1]), st.just(True))
    return draw(st.one_of(st.tuples() | st.lists(item, max_size=4).map(tuple), item,
                          st.just([]), st.just([0, 1])))


@settings(max_examples=300, deadline=None)
@given(index=reference_numpy_indices(), name=st.sampled_from(["t_F32", "empty_rows", "scalar",
                                                             "vector", "t_U8"]))
def test_random_numpy_indices_behave_like_the_reference(every_dtype: Path, index: object,
                                                        name: str) -> None:
    with reference_open(every_dtype, "np") as ref, safe_open(every_dtype, "np") as ours:
        want, got = outcome(ref.get_slice(name), index), outcome(ours.get_slice(name), index)
        broken = type(want).__name__ in ("PanicException", "SystemError") or (
            isinstance(want, ValueError) and not isinstance(want, SafetensorError))
        if broken or (isinstance(got, SliceError) and "past its stop" in str(got)):
            # A slice whose start is past its stop breaks the reference (a panic, a SystemError
            # or numpy's reshape, safetensors issue 843), depending on where it sits: ours
            # refuses the index, with the first error the reference's checks would have met.
            assert isinstance(got, SliceError) and isinstance(want, BaseException), (want, got)
            return
        assert_same_outcome(ref.get_slice(name), ours.get_slice(name), index)


def test_a_column_slice_reads_only_its_bytes(tmp_path: Path) -> None:
    """Bytes outside the slice are never read: corrupt them and the slice is still exact."""
    path = tmp_path / "wide.safetensors"
    tensor = torch.arange(64 * 512, dtype=torch.float32).reshape(64, 512)
    save_file({"w": tensor}, path)
    with safe_open(path, "pt") as f:
        info = f._layout().entries["w"].info
    raw = bytearray(path.read_bytes())
    row = 512 * 4
    for r in range(64):  # scribble over everything but columns 128:256 of each row
        base = info.start + r * row
        raw[base:base + 128 * 4] = b"\xff" * (128 * 4)
        raw[base + 256 * 4:base + row] = b"\xff" * (256 * 4)
    path.write_bytes(bytes(raw))
    for strategy in STRATEGIES:
        with safe_open(path, "pt", strategy=strategy) as f:
            assert torch.equal(f.get_slice("w")[:, 128:256], tensor[:, 128:256]), strategy


@st.composite
def indices(draw: st.DrawFn) -> tuple[object, ...]:
    shape = (5, 6, 7)
    out: list[object] = []
    for size in shape[:draw(st.integers(0, 3))]:
        if draw(st.booleans()):
            out.append(draw(st.integers(-size, size - 1)))
        else:
            out.append(slice(draw(st.none() | st.integers(-8, 8)),
                             draw(st.none() | st.integers(-8, 8)),
                             draw(st.none() | st.integers(1, 4))))
    return tuple(out)


@settings(max_examples=60, deadline=None)
@given(index=indices(), dtype=st.sampled_from(ALL_DTYPES))
def test_random_slices_match_the_reference(every_dtype: Path, index: tuple[object, ...],
                                           dtype: torch.dtype) -> None:
    name = f"t_{DTYPE_NAMES[dtype]}"
    with reference_open(every_dtype, "pt") as ref, safe_open(every_dtype, "pt") as ours:
        assert same(ours.get_slice(name)[index], ref.get_slice(name)[index]), index


# -- numpy -----------------------------------------------------------------------------------


def test_numpy_arrays_match_the_reference_where_it_has_them(every_dtype: Path) -> None:
    with reference_open(every_dtype, "np") as ref, safe_open(every_dtype, "np") as ours:
        compared = 0
        for name in ref.keys():
            try:
                want = ref.get_tensor(name)
            except (TypeError, AttributeError):
                continue  # bf16 and float8: the reference has no numpy type for them
            got = ours.get_tensor(name)
            assert got.dtype == want.dtype and got.shape == want.shape
            assert got.tobytes() == want.tobytes(), name
            if want.ndim:  # slices of zero-length dimensions are refused by both, alike
                assert_same_outcome(ref.get_slice(name), ours.get_slice(name), (slice(1, None),
                                                                               Ellipsis))
            compared += 1
    assert compared >= 12


@pytest.mark.parametrize("name, dtype", [("t_BF16", ml_dtypes.bfloat16),
                                         ("t_F8_E4M3", ml_dtypes.float8_e4m3fn),
                                         ("t_F8_E5M2", ml_dtypes.float8_e5m2)])
def test_numpy_bfloat16_and_float8_come_from_ml_dtypes(every_dtype: Path, name: str,
                                                       dtype: type) -> None:
    with reference_open(every_dtype, "pt") as ref, safe_open(every_dtype, "np") as ours:
        got = ours.get_tensor(name)
        part = ours.get_slice(name)[:, 1:3]
        want = ref.get_tensor(name)
    assert got.dtype == np.dtype(dtype) and got.shape == tuple(want.shape)
    assert got.tobytes() == bytes_of(want)
    assert part.tobytes() == bytes_of(want[:, 1:3].contiguous())


def test_numpy_without_ml_dtypes_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)
    with pytest.raises(WeightliftError, match="pip install ml_dtypes"):
        numpy_dtype("BF16")
    assert numpy_dtype("F32") == np.float32


def test_numpy_handle_refuses_an_accelerator(every_dtype: Path) -> None:
    with pytest.raises(ValueError, match="framework='np'"):
        safe_open(every_dtype, "np", device="meta")


# -- weightlift.torch --------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_load_file_matches_safetensors_load_file(every_dtype: Path, strategy: str) -> None:
    assert_same_state(wtorch.load_file(every_dtype, strategy=strategy),
                      reference_load_file(every_dtype))


def test_zero_sized_like_the_reference_test(tmp_path: Path) -> None:
    """safetensors' test_zero_sized and test_multiple_zero_sized."""
    path = tmp_path / "zeros.safetensors"
    data = {"test": torch.zeros((2, 0)), "test2": torch.zeros((2, 0))}
    save_file(data, path)
    got = wtorch.load_file(path)
    assert all(torch.equal(got[k], data[k]) for k in data)


def test_odd_dtypes_like_the_reference_test(tmp_path: Path) -> None:
    """safetensors' test_odd_dtype and the float8 tests: values survive a round trip."""
    path = tmp_path / "odd.safetensors"
    data = {"bf16": torch.randn((2, 2), dtype=torch.bfloat16),
            "f16": torch.randn((2, 2), dtype=torch.float16),
            "bool": torch.tensor([[True, False], [False, False]]),
            "c64": torch.complex(torch.tensor([-1.0]), torch.tensor([1.0])),
            "e4m3": torch.tensor([-0.5], dtype=torch.float8_e4m3fn),
            "e5m2": torch.tensor([-0.5], dtype=torch.float8_e5m2),
            "e8m0": torch.tensor([0.5], dtype=torch.float8_e8m0fnu)}
    save_file(data, path)
    got = wtorch.load_file(path)
    for key in ("bf16", "f16", "bool", "c64"):
        assert torch.equal(got[key], data[key]), key
    assert got["e4m3"].item() == -0.5 and got["e5m2"].item() == -0.5
    assert got["e8m0"].item() == 0.5


class Tied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = self.a
        self.c = torch.nn.Linear(8, 2)


class Untied(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.c = torch.nn.Linear(8, 2)


@pytest.mark.parametrize("saved, loaded", [(Tied, Tied), (Tied, Untied), (Untied, Tied),
                                           (Untied, Untied)], ids=lambda cls: cls.__name__)
def test_load_model_fills_and_reports_like_the_reference(tmp_path: Path, saved: type,
                                                         loaded: type) -> None:
    path = tmp_path / "model.safetensors"
    save_model(saved(), path)
    want_model, got_model = loaded(), loaded()
    missing, unexpected = reference_load_model(want_model, path, strict=False)
    got_missing, got_unexpected = wtorch.load_model(got_model, path, strict=False)
    assert sorted(got_missing) == sorted(missing) and sorted(got_unexpected) == sorted(unexpected)
    want_state, got_state = want_model.state_dict(), got_model.state_dict()
    filled = [name for name in want_state if name not in missing]  # the rest keep their init
    assert filled and all(same(got_state[name], want_state[name]) for name in filled)
    assert (got_model.a.weight is got_model.b.weight) == (loaded is Tied)
    if missing or unexpected:
        with pytest.raises(RuntimeError) as want:
            reference_load_model(loaded(), path)
        with pytest.raises(ModelMismatchError) as got:
            wtorch.load_model(loaded(), path)
        assert str(got.value).endswith(str(want.value))
        assert isinstance(got.value, RuntimeError)


def test_load_model_refuses_tied_views_none_of_which_is_whole(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_file({"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4)}, path)
    model = torch.nn.Module()
    storage = torch.zeros(40)
    model.a = torch.nn.Linear(4, 4, bias=False)
    model.b = torch.nn.Linear(4, 4, bias=False)
    model.a.weight = torch.nn.Parameter(storage[:16].view(4, 4))
    model.b.weight = torch.nn.Parameter(storage[8:24].view(4, 4))  # overlaps a, neither whole
    with pytest.raises(ModelMismatchError, match=r"\['a.weight', 'b.weight'\].*none spans"):
        wtorch.load_model(model, path)


def test_numpy_load_file_matches_safetensors_numpy_load_file(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    arrays = {"f64": rng.standard_normal((3, 4)), "f16": rng.standard_normal(7).astype(np.float16),
              "i8": rng.integers(-128, 127, (2, 2, 2), dtype=np.int8), "b": np.asarray(True),
              "u64": rng.integers(0, 2**63, 5, dtype=np.uint64), "empty": np.zeros((0, 3))}
    np_save_file(arrays, tmp_path / "np.safetensors")
    want = reference_np_load_file(tmp_path / "np.safetensors")
    got = wnumpy.load_file(tmp_path / "np.safetensors")
    assert sorted(got) == sorted(want) == sorted(arrays)
    for name, array in want.items():
        assert got[name].dtype == array.dtype and got[name].shape == array.shape, name
        assert got[name].tobytes() == array.tobytes(), name


def test_a_missing_shard_keeps_weightlift_s_message(tmp_path: Path) -> None:
    """Only the named file itself gets the reference's wording; a shard an index lists does not."""
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": {}, "weight_map": {"w": "model-00001.safetensors"}}')
    with pytest.raises(MissingFileError, match="shard 'model-00001.safetensors'.*missing"):
        safe_open(index, "pt")


def test_weightlift_torch_does_not_shadow_torch() -> None:
    """Every module of the package that imports torch gets the real one."""
    import importlib
    import pkgutil

    import weightlift

    assert sys.modules["weightlift.torch"] is wtorch
    assert wtorch.torch is torch
    for module in pkgutil.walk_packages(weightlift.__path__, "weightlift."):
        if module.name.startswith(("weightlift.bench", "weightlift.distributed",
                                   "weightlift.__main__")):
            continue  # heavy optional parts; they import torch the same way
        loaded = importlib.import_module(module.name)
        if "torch" in vars(loaded) and loaded is not wtorch and module.name != "weightlift":
            assert vars(loaded)["torch"] is torch, module.name
