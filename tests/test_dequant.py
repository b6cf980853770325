"""Dequantization kernels against gguf-py's numpy reference, bit for bit, whole and piece by piece."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants

from weightlift.bench.dequant import random_blocks
from weightlift.dequant import KERNELS, dequantize, supports
from weightlift.errors import PlacementError, UnsupportedQuantization
from weightlift.formats.ggml import GGML_TYPES_BY_NAME

#: Types gguf-py can quantize, so real quantizer output is tested too.
QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "MXFP4")
REQUIRED = ("F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K",
            "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "MXFP4")


def reference(blocks: np.ndarray, name: str) -> np.ndarray:
    return quants.dequantize(blocks, GGMLQuantizationType[name]).astype(np.float32)


def assert_bits_equal(got: torch.Tensor, want: np.ndarray) -> None:
    got32 = got.float().numpy()
    assert got32.shape == want.shape
    assert np.array_equal(got32.view(np.uint32), want.view(np.uint32)), (
        f"{int((got32.view(np.uint32) != want.view(np.uint32)).sum())} elements differ")


def test_every_required_type_is_supported():
    assert all(supports(name) for name in REQUIRED)


@pytest.mark.parametrize("name", REQUIRED)
def test_random_blocks_match_gguf_reference_bit_for_bit(name):
    kind = GGML_TYPES_BY_NAME[name]
    rows = random_blocks(name, 4 * 3, seed=len(name)).reshape(4, 3 * kind.type_size)
    got = dequantize(torch.from_numpy(rows), name, dtype=torch.float32)
    assert got.shape == (4, 3 * kind.block_size)
    assert_bits_equal(got, reference(rows, name))


@pytest.mark.parametrize("name", REQUIRED)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cast_equals_reference_then_to_dtype(name, dtype):
    rows = random_blocks(name, 8, seed=3).reshape(2, -1)
    got = dequantize(torch.from_numpy(rows), name, dtype=dtype)
    want = torch.from_numpy(reference(rows, name)).to(dtype)
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantizer_output_round_trips_like_reference(name):
    values = np.random.default_rng(7).standard_normal((3, 4, 64)).astype(np.float32)
    values[0, 0, :32] = 0.0  # an all-zero block: zero scale
    packed = quants.quantize(values, GGMLQuantizationType[name])
    got = dequantize(torch.from_numpy(np.ascontiguousarray(packed)), name, dtype=torch.float32)
    assert got.shape == (3, 4, 64)
    assert_bits_equal(got, reference(packed, name))


@pytest.mark.parametrize("name", REQUIRED)
def test_pieces_at_every_block_boundary_pattern_equal_the_whole(name):
    kind = GGML_TYPES_BY_NAME[name]
    n_blocks = 5
    flat = torch.from_numpy(random_blocks(name, n_blocks, seed=11).reshape(-1))
    whole = dequantize(flat, name, dtype=torch.float32)
    for cuts in itertools.product((False, True), repeat=n_blocks - 1):
        edges = [0] + [i + 1 for i, cut in enumerate(cuts) if cut] + [n_blocks]
        out = torch.full((n_blocks * kind.block_size,), float("nan"))
        for lo, hi in zip(edges[:-1], edges[1:]):
            piece = flat[lo * kind.type_size:hi * kind.type_size]
            dequantize(piece, name, dtype=torch.float32,
                       out=out[lo * kind.block_size:hi * kind.block_size])
        assert torch.equal(out.view(torch.int32), whole.view(torch.int32)), edges


def test_bytes_at_an_odd_offset_are_dequantized():
    rows = random_blocks("Q4_K", 3, seed=5).reshape(-1)
    shifted = torch.zeros(rows.size + 1, dtype=torch.uint8)
    shifted[1:] = torch.from_numpy(rows)
    got = dequantize(shifted[1:], "Q4_K", dtype=torch.float32)
    assert_bits_equal(got, reference(rows, "Q4_K").reshape(-1))


def test_batches_cut_inside_a_tensor_match_reference(monkeypatch):
    import weightlift.dequant as dq
    monkeypatch.setattr(dq, "BATCH_ELEMENTS", 512)  # 2 Q6_K blocks per batch, last batch partial
    rows = random_blocks("Q6_K", 7, seed=9).reshape(1, -1)
    assert_bits_equal(dequantize(torch.from_numpy(rows), "Q6_K", torch.float32),
                      reference(rows, "Q6_K"))


@pytest.mark.parametrize("name", ["IQ2_XXS", "Q8_K", "TQ1_0", "IQ1_M"])
def test_unsupported_types_raise_an_error_naming_the_type(name):
    assert not supports(name)
    kind = GGML_TYPES_BY_NAME[name]
    with pytest.raises(UnsupportedQuantization, match=rf"GGML type {name}\b.*packed"):
        dequantize(torch.zeros(kind.type_size, dtype=torch.uint8), name)


def test_unknown_type_id_raises():
    with pytest.raises(UnsupportedQuantization, match="unknown GGML type 4"):
        dequantize(torch.zeros(18, dtype=torch.uint8), 4)


def test_partial_block_is_refused():
    with pytest.raises(PlacementError, match="Q4_0 packs 32 elements in 18 bytes.*20 bytes"):
        dequantize(torch.zeros(2, 20, dtype=torch.uint8), "Q4_0")


def test_wrong_out_is_refused():
    with pytest.raises(PlacementError, match="out= must be"):
        dequantize(torch.zeros(18, dtype=torch.uint8), "Q4_0", torch.bfloat16,
                   out=torch.empty(32, dtype=torch.float16))


def test_every_kernel_is_a_known_ggml_type():
    assert set(KERNELS) <= set(GGML_TYPES_BY_NAME)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
@pytest.mark.parametrize("name", REQUIRED)
def test_same_kernels_run_on_cuda(name):
    rows = random_blocks(name, 16, seed=2).reshape(4, -1)
    got = dequantize(torch.from_numpy(rows).cuda(), name, dtype=torch.float32)
    assert got.device.type == "cuda"
    assert_bits_equal(got.cpu(), reference(rows, name))
