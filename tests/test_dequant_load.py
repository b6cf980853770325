"""Dequantizing inside a load: ``dtype=`` turns packed GGML tensors into floats piece by piece.

The files are written by the ``gguf`` package's ``GGUFWriter`` (packed blocks of every supported
family, plain F32 beside them), and every expected value comes from ``gguf.quants.dequantize``, so
the placement step is tested through the parser, every strategy, the ring and the planner.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants

import weightlift
from weightlift.api import run_load
from weightlift.bench.dequant import random_blocks
from weightlift.errors import UnsupportedQuantization
from weightlift.formats.ggml import GGML_TYPES_BY_NAME
from weightlift.plan import plan_chunks
from weightlift.sources import resolve
from weightlift.sources.records import Layout


#: name → (GGML type, logical shape). Sizes put several tensors above a 256 KiB ring slot, and
#: one Q8_0 row (278 528 bytes) above it too, so pieces are cut at rows and at blocks.
TENSORS = {
    "tok_embd": ("Q4_K", (160, 4096)),       # 368 640 bytes: cut at rows
    "norm": ("F32", (4096,)),                 # plain: converted like safetensors
    "wide": ("Q8_0", (2, 262144)),            # rows larger than a slot: cut at blocks
    "q6": ("Q6_K", (40, 2048)),
    "small_q4_0": ("Q4_0", (4, 64)),          # small ones grouped into one chunk
    "small_iq4": ("IQ4_XS", (2, 256)),
    "small_mx": ("MXFP4", (3, 32)),
    "q3": ("Q3_K", (96, 1024)),
}


def packed_bytes(kind: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    ggml = GGML_TYPES_BY_NAME[kind]
    rows = int(np.prod(shape[:-1]))
    blocks = random_blocks(kind, rows * shape[-1] // ggml.block_size, seed=seed)
    return blocks.reshape(*shape[:-1], shape[-1] // ggml.block_size * ggml.type_size)


def write_checkpoint(path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]]
                     ) -> dict[str, np.ndarray]:
    """A GGUF file written by GGUFWriter (packed blocks, plain types as themselves); returns the
    packed arrays."""
    packed = {}
    writer = GGUFWriter(str(path), "llama")
    for seed, (name, (kind, shape)) in enumerate(tensors.items()):
        if kind == "F32":
            packed[name] = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
            writer.add_tensor(name, packed[name])
        else:
            packed[name] = packed_bytes(kind, shape, seed)
            writer.add_tensor(name, packed[name], raw_dtype=GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return packed


def expected(packed: dict[str, np.ndarray], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for name, (kind, _) in TENSORS.items():
        ref = quants.dequantize(packed[name], GGMLQuantizationType[kind])
        out[name] = torch.from_numpy(np.ascontiguousarray(ref, dtype=np.float32)).to(dtype)
    return out


def load(layout: Layout, **kwargs: object) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # direct → stream where O_DIRECT is refused
        return dict(run_load(layout, keys=None, device="cpu", streaming=False,
                             **kwargs))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("dequant") / "packed.gguf"
    return path, write_checkpoint(path, TENSORS)


@pytest.mark.parametrize("strategy", ["mmap", "direct", "stream"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_dtype_dequantizes_inside_the_load_bit_for_bit(checkpoint, strategy, dtype):
    path, packed = checkpoint
    want = expected(packed, dtype)
    with resolve(path) as layout:
        got = load(layout, strategy=strategy, dtype=dtype, max_host_memory="4MiB")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].dtype == dtype and got[name].shape == TENSORS[name][1], name
        assert torch.equal(got[name].view(-1).view(torch.uint8),
                           tensor.view(-1).view(torch.uint8)), name


def test_without_dtype_quantized_tensors_stay_packed(checkpoint):
    path, packed = checkpoint
    with resolve(path) as layout:
        got = load(layout, strategy="auto", dtype=None)
    for name, array in packed.items():
        assert torch.equal(got[name], torch.from_numpy(array)), name


def test_stream_yields_dequantized_tensors_in_file_order(checkpoint):
    path, packed = checkpoint
    want = expected(packed, torch.float16)
    with resolve(path) as layout:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            seen = [(name, tensor.clone()) for name, tensor in run_load(
                layout, keys=None, device="cpu", strategy="stream", dtype=torch.float16,
                streaming=True, max_host_memory="4MiB")]
    assert [name for name, _ in seen] == [e.name for e in sorted(
        layout.entries.values(), key=lambda e: e.info.start)]
    for name, tensor in seen:
        assert torch.equal(tensor, want[name]), name


def test_pieces_of_packed_tensors_are_cut_at_rows_or_blocks(checkpoint):
    path, _ = checkpoint
    with resolve(path) as layout:
        entries = sorted(layout.entries.values(), key=lambda e: e.info.start)
        chunk = 100_000  # not a multiple of any row or block size
        cut = {}
        for planned in plan_chunks(entries, chunk):
            assert planned.nbytes <= chunk or len(planned.pieces) == 1
            for piece in planned.pieces:
                cut.setdefault(piece.entry.name, []).append((piece.begin, piece.end))
        for entry in entries:
            kind = entry.info.ggml
            row = entry.info.shape[-1]
            unit = (row if row <= chunk else kind.type_size) if kind.quantized else kind.type_size
            pieces = cut[entry.name]
            assert pieces[0][0] == 0 and pieces[-1][1] == entry.info.nbytes
            assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
            assert all(begin % unit == 0 for begin, _ in pieces), entry.name
        assert len(cut["tok_embd"]) > 1 and cut["tok_embd"][0][1] % 2304 == 0   # whole Q4_K rows
        assert len(cut["wide"]) > 2 and cut["wide"][0][1] % 34 == 0             # whole Q8_0 blocks


def test_unsupported_type_with_dtype_raises_before_reading(tmp_path):
    tensors = {"odd": ("IQ2_XXS", (2, 256))}
    path = tmp_path / "odd.gguf"
    raw = np.random.default_rng(0).integers(0, 256, (2, 66), dtype=np.uint8)
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("odd", raw, raw_dtype=GGMLQuantizationType.IQ2_XXS)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with resolve(path) as layout:
        progress: list[int] = []
        with pytest.raises(UnsupportedQuantization, match="'odd'.*IQ2_XXS"):
            list(run_load(layout, keys=None, device="cpu", strategy="stream",
                          dtype=torch.bfloat16, streaming=False,
                          on_progress=lambda done, total: progress.append(done)))
        assert progress == []  # refused before any byte was read
        packed = load(layout, strategy="stream", dtype=None)
    assert torch.equal(packed["odd"], torch.from_numpy(raw))


def test_non_floating_dtype_leaves_packed_tensors_alone(checkpoint):
    path, packed = checkpoint
    with resolve(path) as layout:
        got = load(layout, strategy="stream", dtype=torch.int32)
    assert torch.equal(got["q6"], torch.from_numpy(packed["q6"]))


def test_load_into_float_destinations_dequantizes(checkpoint):
    path, packed = checkpoint
    want = expected(packed, torch.float16)
    names = ["q6", "small_iq4", "norm"]
    destinations = {name: torch.empty(TENSORS[name][1], dtype=torch.float16) for name in names}
    with resolve(path) as layout:
        for _ in run_load(layout, keys=names, device="cpu", strategy="stream", dtype=None,
                          streaming=False, destinations=destinations):
            pass
    for name in names:
        assert torch.equal(destinations[name], want[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA/ROCm device")
def test_cuda_load_dequantizes_on_the_device(checkpoint):
    path, packed = checkpoint
    want = expected(packed, torch.bfloat16)
    with resolve(path) as layout:
        got = dict(run_load(layout, keys=None, device="cuda", strategy="stream",
                            dtype=torch.bfloat16, streaming=False, max_host_memory="4MiB"))
    for name, tensor in want.items():
        assert got[name].device.type == "cuda"
        assert torch.equal(got[name].cpu(), tensor), name


def test_public_api_reexports_the_error():
    assert issubclass(UnsupportedQuantization, weightlift.PlacementError)


def test_cpu_dequantizing_loads_leave_room_for_the_kernels_in_the_budget():
    from weightlift.place import DEQUANT_WORKSPACE, ring_budget
    cpu = torch.device("cpu")
    assert ring_budget(64 << 20, True, cpu) == (64 << 20) - DEQUANT_WORKSPACE
    assert ring_budget(4 << 20, True, cpu) == 3 << 20       # never more than a quarter
    assert ring_budget(64 << 20, False, cpu) == 64 << 20
    assert ring_budget(64 << 20, True, torch.device("meta")) == 64 << 20  # kernels run on device
