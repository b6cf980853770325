"""Loads are bit-exact with the safetensors package, for every dtype and awkward layout."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift
from conftest import SAFETENSORS_DTYPES, assert_same, bytes_of, random_tensor, write_raw

STRATEGIES = ["auto", "mmap", "direct", "stream"]


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    for i, (name, dtype) in enumerate(sorted(SAFETENSORS_DTYPES.items())):
        tensors[f"{name}.matrix"] = random_tensor((3 + i, 5), dtype, gen)
        tensors[f"{name}.scalar"] = random_tensor((), dtype, gen)
        tensors[f"{name}.empty"] = random_tensor((0, 4), dtype, gen)
        tensors[f"{name}.big"] = random_tensor((300_000 + i,), dtype, gen)
    path = tmp_path_factory.mktemp("dtypes") / "all.safetensors"
    save_file(tensors, path, metadata={"origin": "safetensors"})
    return path


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_dtype_matches_safetensors(every_dtype: Path, strategy: str) -> None:
    assert_same(weightlift.load(every_dtype, strategy=strategy), load_file(every_dtype))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stream_yields_file_order_and_same_bytes(every_dtype: Path, strategy: str) -> None:
    with weightlift.open(every_dtype) as ckpt:
        order = ckpt.keys()
    streamed = list(weightlift.stream(every_dtype, strategy=strategy, max_host_memory="8MiB"))
    assert [name for name, _ in streamed] == order
    assert_same(dict(streamed), load_file(every_dtype))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_odd_byte_offsets(tmp_path: Path, strategy: str) -> None:
    """Tensors at offsets no dtype alignment allows (safetensors' own writer never makes these)."""
    gen = torch.Generator().manual_seed(2)
    tensors = []
    for i in range(40):
        tensors.append((f"odd.{i}", random_tensor((2 * i + 1,), torch.uint8, gen)))
        dtype = [torch.float32, torch.bfloat16, torch.int64, torch.float64][i % 4]
        size = 3 if i % 5 else 700_001
        tensors.append((f"t.{i}", random_tensor((size,), dtype, gen)))
    path = write_raw(tmp_path / "odd.safetensors", tensors)
    assert_same(weightlift.load(path, strategy=strategy), load_file(path))
    converted = weightlift.load(path, strategy=strategy, dtype=torch.float64)
    for name, tensor in load_file(path).items():
        want = tensor.to(torch.float64) if tensor.is_floating_point() else tensor
        assert torch.equal(converted[name], want) or (
            torch.isnan(want).any() and torch.equal(converted[name].nan_to_num(), want.nan_to_num()))


@pytest.fixture(scope="module")
def twenty_thousand(tmp_path_factory: pytest.TempPathFactory
                    ) -> tuple[Path, dict[str, torch.Tensor]]:
    """20,000 tensors of 0 to 6 elements, written once for every strategy, and safetensors'
    load of them."""
    gen = torch.Generator().manual_seed(3)
    tensors = {f"layer.{i}.w": random_tensor((i % 7,), torch.float16, gen) for i in range(20_000)}
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    save_file(tensors, path)
    return path, load_file(path)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_twenty_thousand_tiny_tensors(twenty_thousand: tuple[Path, dict[str, torch.Tensor]],
                                      strategy: str) -> None:
    path, reference = twenty_thousand
    assert_same(weightlift.load(path, strategy=strategy), reference)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dtype_conversion_matches_torch(every_dtype: Path, strategy: str) -> None:
    """``dtype=`` converts floating tensors as ``.to(dtype)`` would; others keep their dtype."""
    ref = load_file(every_dtype)
    got = weightlift.load(every_dtype, strategy=strategy, dtype=torch.float32)
    for name, tensor in ref.items():
        if tensor.is_floating_point():
            want = tensor.to(torch.float32)
            assert got[name].dtype == torch.float32
            assert torch.equal(got[name].nan_to_num(), want.nan_to_num()), name
            assert torch.equal(got[name].isnan(), want.isnan()), name
        else:
            assert got[name].dtype == tensor.dtype
            assert bytes_of(got[name]) == bytes_of(tensor), name


def test_keys_select_a_subset(every_dtype: Path) -> None:
    ref = load_file(every_dtype)
    keys = ["BF16.big", "I8.scalar", "F32.empty"]
    assert_same(weightlift.load(every_dtype, keys=keys), {k: ref[k] for k in keys})
    with pytest.raises(weightlift.CheckpointError, match="no tensor named 'nope'"):
        weightlift.load(every_dtype, keys=["nope"])


def test_open_describes_without_reading(every_dtype: Path) -> None:
    ref = load_file(every_dtype)
    with weightlift.open(every_dtype) as ckpt:
        assert sorted(ckpt.keys()) == sorted(ref)
        assert ckpt.metadata() == {"origin": "safetensors"}
        assert ckpt.total_bytes == sum(t.numel() * t.element_size() for t in ref.values())
        info = ckpt.info("BF16.big")
        want = ref["BF16.big"]
        assert (info.dtype, info.shape, info.nbytes) == ("BF16", tuple(want.shape),
                                                          2 * want.numel())
        assert info.file == str(every_dtype)
        with open(every_dtype, "rb") as f:
            f.seek(info.offset)
            assert f.read(info.nbytes) == ref["BF16.big"].view(torch.uint8).numpy().tobytes()
        for strategy in STRATEGIES:
            got = ckpt.get_tensor("F8_E5M2.matrix", strategy=strategy)
            assert_same({"x": got}, {"x": ref["F8_E5M2.matrix"]})


def test_loaded_tensors_are_independent_and_writable(every_dtype: Path) -> None:
    """Zero-copy tensors are private mappings: writing one never touches the file."""
    before = every_dtype.read_bytes()
    state = weightlift.load(every_dtype, strategy="mmap")
    state["F32.big"].fill_(1.5)
    assert every_dtype.read_bytes() == before
