"""safetensors' own Python tests for the read API, run against the real package *and* weightlift.

Ported from huggingface/safetensors ``bindings/python/tests`` (test_pt_comparison.py's
TorchTestCase/LoadTestCase/SliceTestCase read parts, test_simple.py's path and README cases,
test_pread_backend.py). Each test takes ``api``: the reference package or weightlift swapped in,
so a behaviour asserted here is first checked to be the reference's own. Tests of the write API
(save/serialize), of CUDA/NPU devices, and of device_map/tp_plan (not in safetensors 0.8) are
left out. The list indices and misuse errors below come from the issue's list of differences.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import SafetensorError
from safetensors import safe_open as reference_open
from safetensors.torch import load_file as reference_load_file
from safetensors.torch import save_file

import weightlift.torch as wtorch
from weightlift.compat import safe_open
from weightlift.errors import CheckpointError, MissingFileError, WeightliftError

APIS = {
    "safetensors": SimpleNamespace(safe_open=reference_open, load_file=reference_load_file),
    "weightlift": SimpleNamespace(safe_open=safe_open, load_file=wtorch.load_file),
}


@pytest.fixture(params=sorted(APIS))
def api(request: pytest.FixtureRequest) -> SimpleNamespace:
    return APIS[request.param]


def raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# -- test_pt_comparison.py: TorchTestCase ---------------------------------------------------------

def test_odd_dtype(api: SimpleNamespace, tmp_path: Path) -> None:
    data = {"test": torch.randn((2, 2), dtype=torch.bfloat16),
            "test2": torch.randn((2, 2), dtype=torch.float16),
            "test3": torch.zeros((2, 2), dtype=torch.bool),
            "test4": torch.zeros((2, 2), dtype=torch.complex64)}
    data["test3"][0, 0] = True
    save_file(data, tmp_path / "out.safetensors")
    reloaded = api.load_file(tmp_path / "out.safetensors")
    for name, tensor in data.items():
        assert torch.equal(tensor, reloaded[name]), name


def test_odd_dtype_fp8(api: SimpleNamespace, tmp_path: Path) -> None:
    data = {"test1": torch.tensor([-0.5], dtype=torch.float8_e4m3fn),
            "test2": torch.tensor([-0.5], dtype=torch.float8_e5m2)}
    save_file(data, tmp_path / "out.safetensors")
    reloaded = api.load_file(tmp_path / "out.safetensors")
    assert reloaded["test1"].dtype == torch.float8_e4m3fn and reloaded["test1"].item() == -0.5
    assert reloaded["test2"].dtype == torch.float8_e5m2 and reloaded["test2"].item() == -0.5


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no float4")
def test_odd_dtype_fp4(api: SimpleNamespace, tmp_path: Path) -> None:
    test1 = torch.tensor([0.0, 4.0], dtype=torch.float8_e8m0fnu)
    test2 = torch.arange(12, dtype=torch.uint8).reshape(2, 6).view(torch.float4_e2m1fn_x2)
    save_file({"test1": test1, "test2": test2}, tmp_path / "out.safetensors")
    reloaded = api.load_file(tmp_path / "out.safetensors")
    assert reloaded["test1"].dtype == torch.float8_e8m0fnu
    assert raw(reloaded["test1"]) == raw(test1)
    assert reloaded["test2"].dtype == torch.float4_e2m1fn_x2
    assert reloaded["test2"].shape == test2.shape  # the packed last dim, as torch holds it
    assert raw(reloaded["test2"]) == raw(test2)
    with api.safe_open(tmp_path / "out.safetensors", framework="pt") as f:
        assert f.get_slice("test2").get_shape() == [2, 12]  # the file counts 4-bit elements
        assert f.get_slice("test2").get_dtype() == "F4"


@pytest.mark.parametrize("names", [["test"], ["test", "test2"]])
def test_zero_sized(api: SimpleNamespace, tmp_path: Path, names: list[str]) -> None:
    data = {name: torch.zeros((2, 0), dtype=torch.float) for name in names}
    save_file(data, tmp_path / "out.safetensors")
    reloaded = api.load_file(tmp_path / "out.safetensors")
    for name in names:
        assert torch.equal(data[name], reloaded[name])


# -- test_pt_comparison.py: LoadTestCase ----------------------------------------------------------

def test_deserialization_safe(api: SimpleNamespace, tmp_path: Path) -> None:
    data = {f"test{i}": torch.randn((256, 256)) for i in ("", "2", "3")}
    save_file(data, tmp_path / "load.safetensors")
    weights = api.load_file(tmp_path / "load.safetensors")
    for name, tensor in weights.items():
        assert torch.equal(tensor, data[name])
        assert tensor.device == torch.device("cpu")


# -- test_pt_comparison.py: SliceTestCase ---------------------------------------------------------

@pytest.fixture
def sliced(tmp_path: Path) -> Path:
    path = tmp_path / "slice.safetensors"
    save_file({"test": torch.arange(6, dtype=torch.float32).reshape((1, 2, 3))}, path)
    return path


def test_deserialization_slice(api: SimpleNamespace, sliced: Path) -> None:
    with api.safe_open(sliced, framework="pt") as f:
        _slice = f.get_slice("test")
        assert _slice.get_shape() == [1, 2, 3]
        assert _slice.get_dtype() == "F32"
        tensor = _slice[:, :, 1:2]
    assert torch.equal(tensor, torch.Tensor([[[1.0], [4.0]]]))
    assert tensor.numpy().tobytes() == b"\x00\x00\x80?\x00\x00\x80@"


def test_deserialization_metadata(api: SimpleNamespace, sliced: Path, tmp_path: Path) -> None:
    with api.safe_open(sliced, framework="pt") as f:
        assert f.metadata() is None
    other = tmp_path / "meta.safetensors"
    save_file({"test": torch.zeros(3)}, other, metadata={"Something": "more"})
    with api.safe_open(other, framework="pt") as f:
        assert f.metadata() == {"Something": "more"}


# -- test_simple.py ---------------------------------------------------------------------------

def test_accept_path(api: SimpleNamespace, tmp_path: Path) -> None:
    tensors = {"a": torch.zeros((2, 2)), "b": torch.zeros((2, 3), dtype=torch.uint8)}
    save_file(tensors, tmp_path / "out.safetensors")
    loaded = api.load_file(Path(tmp_path / "out.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_get_correctly_dropped(api: SimpleNamespace, tmp_path: Path) -> None:
    path = tmp_path / "out.safetensors"
    save_file({"a": torch.zeros((2, 2))}, path)
    with api.safe_open(path, framework="pt"):
        pass
    path.write_text("something")  # the handle let go of the file


# -- test_pread_backend.py --------------------------------------------------------------------

SOURCE_TENSORS = {
    "fp32_2d": torch.arange(12, dtype=torch.float32).reshape(3, 4),
    "bf16_2d": torch.arange(8, dtype=torch.bfloat16).reshape(2, 4),
    "fp16_3d": torch.arange(24, dtype=torch.float16).reshape(2, 3, 4),
    "scalar_fp32": torch.tensor(7.5, dtype=torch.float32),
    "empty_2d": torch.empty((0, 5), dtype=torch.float16),
    "i64_1d": torch.arange(5, dtype=torch.int64),
    "fp8_e4m3fn": torch.zeros(8, dtype=torch.float8_e4m3fn),
}


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.safetensors"
    save_file(SOURCE_TENSORS, path, metadata={"foo": "bar"})
    return path


def assert_state_dict_equal(state: dict[str, torch.Tensor]) -> None:
    assert set(state) == set(SOURCE_TENSORS)
    for name, expected in SOURCE_TENSORS.items():
        assert state[name].dtype == expected.dtype and state[name].shape == expected.shape
        assert raw(state[name]) == raw(expected), name


@pytest.mark.parametrize("backend", ["mmap", "pread"])
def test_backend_round_trip(api: SimpleNamespace, tiny: Path, backend: str) -> None:
    with api.safe_open(tiny, framework="pt", device="cpu", backend=backend) as f:
        assert f.metadata() == {"foo": "bar"}
        assert_state_dict_equal({k: f.get_tensor(k) for k in f.keys()})
        assert torch.equal(f.get_slice("fp32_2d")[:, 1:3], SOURCE_TENSORS["fp32_2d"][:, 1:3])
    assert_state_dict_equal(api.load_file(tiny, backend=backend))


def test_invalid_backend_string_raises(api: SimpleNamespace, tiny: Path) -> None:
    with pytest.raises(SafetensorError, match="not_a_backend"):
        api.safe_open(tiny, framework="pt", device="cpu", backend="not_a_backend")


def test_truncated_header_is_rejected(api: SimpleNamespace, tiny: Path, tmp_path: Path) -> None:
    bad = tmp_path / "truncated.safetensors"
    head = tiny.read_bytes()
    (length,) = struct.unpack("<Q", head[:8])
    bad.write_bytes(head[:8 + length // 2])
    with pytest.raises(SafetensorError):
        with api.safe_open(bad, framework="pt", device="cpu") as f:
            f.get_tensors() if hasattr(f, "get_tensors") else None


def test_data_offset_overflow_is_rejected(api: SimpleNamespace, tmp_path: Path) -> None:
    bad = tmp_path / "lying.safetensors"
    header = b'{"liar":{"dtype":"F32","shape":[1024,1024],"data_offsets":[0,4194304]}}'
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00")
    with pytest.raises(SafetensorError):
        with api.safe_open(bad, framework="pt", device="cpu") as f:
            f.get_tensor("liar")


# -- the differences listed in the issue ------------------------------------------------------

def test_missing_file_is_file_not_found(api: SimpleNamespace, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        api.safe_open(tmp_path / "nope.safetensors", framework="pt")
    with pytest.raises(FileNotFoundError):
        api.load_file(tmp_path / "nope.safetensors")


def test_missing_file_keeps_the_weightlift_hierarchy(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="nope.safetensors") as info:
        safe_open(tmp_path / "nope.safetensors", framework="pt")
    assert isinstance(info.value, WeightliftError) and info.value.errno == 2


@pytest.mark.parametrize("call", ["keys()", "metadata()", "get_tensor('test')",
                                  "get_slice('test')"])
def test_use_after_close_is_a_safetensor_error(api: SimpleNamespace, sliced: Path,
                                               call: str) -> None:
    with api.safe_open(sliced, framework="pt") as f:
        pass
    with pytest.raises(SafetensorError, match="(?i)file is closed"):
        eval(f"f.{call}")


def test_misuse_is_a_safetensor_error(api: SimpleNamespace, sliced: Path) -> None:
    with pytest.raises(SafetensorError):
        api.safe_open(sliced, framework="tf2")
    with api.safe_open(sliced, framework="pt") as f:
        with pytest.raises(SafetensorError, match="nope"):
            f.get_tensor("nope")


LIST_INDICES = ["[[]]", "[[0]]", "[[1, 0]]", "[:, [0, 2]]", "[[0], 1]", "[[0, 1], [0, 2]]",
                "[[-1]]", "[[True, False]]", "[[0, 0]]", "[None, [1]]", "[[1], ..., 1:3]",
                "[1:2, [2, 0], None, ::2]", "[1, :, [0, 1]]", "[[0, 1], :, 1]", "[:, [], 1]",
                "[..., [3]]", "[torch.tensor([1])]", "[:, torch.tensor([2, 0])]"]


@pytest.fixture(scope="module")
def cube(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lists") / "cube.safetensors"
    gen = torch.Generator().manual_seed(3)
    save_file({"f32": torch.randn((2, 3, 4), generator=gen),
               "f8": torch.randn((2, 3, 4), generator=gen).to(torch.float8_e4m3fn)}, path)
    return path


@pytest.mark.parametrize("name", ["f32", "f8"])
@pytest.mark.parametrize("index", LIST_INDICES)
def test_list_indices_match_the_reference(cube: Path, name: str, index: str) -> None:
    with reference_open(cube, framework="pt") as f, safe_open(cube, framework="pt") as g:
        expected = eval(f"f.get_slice(name){index}")
        got = eval(f"g.get_slice(name){index}")
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert raw(got) == raw(expected)


@pytest.mark.parametrize("index", ["[[2]]", "[:, [-4]]", "[[True]]"])
def test_bad_list_indices_fail_like_the_reference(api: SimpleNamespace, cube: Path,
                                                  index: str) -> None:
    with api.safe_open(cube, framework="pt") as f:
        with pytest.raises(IndexError):
            eval(f"f.get_slice('f32'){index}")


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no float4")
@pytest.mark.parametrize("strategy", ["mmap", "direct", "stream"])
def test_f4_loads_bit_exact_through_every_strategy(tmp_path: Path, strategy: str) -> None:
    packed = torch.randint(0, 256, (5, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    path = tmp_path / "f4.safetensors"
    save_file({"w": packed.view(torch.float4_e2m1fn_x2), "pad": torch.ones(3)}, path)
    got = wtorch.load_file(path, strategy=strategy)["w"]
    assert got.dtype == torch.float4_e2m1fn_x2 and got.shape == (5, 8)
    assert torch.equal(got.view(torch.uint8), packed)


@pytest.mark.skipif(not hasattr(torch, "float4_e2m1fn_x2"), reason="this torch has no float4")
def test_f4_slices_read_whole_tensors_and_refuse_parts(tmp_path: Path) -> None:
    packed = torch.arange(40, dtype=torch.uint8).reshape(5, 8)
    path = tmp_path / "f4.safetensors"
    save_file({"w": packed.view(torch.float4_e2m1fn_x2)}, path)
    with safe_open(path, framework="pt") as f:
        whole = f.get_slice("w")[:]
        assert whole.dtype == torch.float4_e2m1fn_x2 and torch.equal(whole.view(torch.uint8),
                                                                      packed)
        with pytest.raises(SafetensorError, match="F4 packs 2 elements per byte.*whole tensor"):
            f.get_slice("w")[1:3]


def test_dtypes_torch_lacks_are_refused_clearly(tmp_path: Path) -> None:
    header = b'{"w":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}'
    path = tmp_path / "f6.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\x00" * 3)
    with pytest.raises(WeightliftError, match="F6_E2M3.*smaller than a byte"):
        wtorch.load_file(path)


def test_compatible_errors_pickle_as_weightlift_errors(sliced: Path) -> None:
    with safe_open(sliced, framework="pt") as f:
        with pytest.raises(SafetensorError) as info:
            f.get_tensor("nope")
    copy = pickle.loads(pickle.dumps(info.value))
    assert type(copy) is CheckpointError and str(copy) == str(info.value)
    assert copy.path == info.value.path
