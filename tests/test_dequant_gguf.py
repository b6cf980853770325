"""End to end: GGUF files written by gguf-py's GGUFWriter, loaded with ``dtype=`` through every
strategy, equal gguf-py's own dequantization bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

import weightlift  # noqa: E402
from weightlift.bench.dequant import random_blocks  # noqa: E402
from weightlift.formats.ggml import GGML_TYPES_BY_NAME  # noqa: E402

#: name → (GGML type, logical shape): several tensors larger than a 256 KiB ring slot, one Q8_0
#: row (278 528 bytes) larger than a slot, small ones grouped, plain types next to packed ones.
SPECS = {
    "token_embd.weight": ("Q4_K", (128, 4096)),
    "output_norm.weight": ("F32", (4096,)),
    "blk.0.ffn_down.weight": ("Q6_K", (160, 2048)),
    "blk.0.wide.weight": ("Q8_0", (2, 262144)),
    "blk.0.attn_q.weight": ("IQ4_XS", (8, 512)),
    "blk.0.experts.weight": ("MXFP4", (4, 64)),
    "blk.0.attn_k.weight": ("F16", (16, 16)),
    "blk.0.attn_v.weight": ("Q5_1", (40, 1024)),
    "blk.0.ffn_up.weight": ("Q2_K", (40, 1024)),
    "blk.0.ffn_gate.weight": ("Q3_K", (40, 1024)),
}


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "mixed.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for seed, (name, (kind, shape)) in enumerate(SPECS.items()):
        ggml = GGML_TYPES_BY_NAME[kind]
        if kind in ("F32", "F16"):
            values = np.random.default_rng(seed).standard_normal(shape)
            writer.add_tensor(name, values.astype(np.float32 if kind == "F32" else np.float16))
            continue
        blocks = random_blocks(kind, int(np.prod(shape)) // ggml.block_size, seed=seed)
        packed = blocks.reshape(*shape[:-1], shape[-1] // ggml.block_size * ggml.type_size)
        writer.add_tensor(name, packed, raw_dtype=gguf.GGMLQuantizationType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    out = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        values = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
        out[tensor.name] = torch.from_numpy(np.array(values, dtype=np.float32)).to(dtype)
    return out


@pytest.mark.parametrize("strategy", ["mmap", "direct", "stream"])
def test_gguf_load_with_dtype_equals_gguf_dequantize(gguf_file, strategy):
    want = reference(gguf_file, torch.bfloat16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # direct → stream without O_DIRECT
        got = weightlift.load(gguf_file, dtype=torch.bfloat16, strategy=strategy,
                              max_host_memory="4MiB")
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert got[name].shape == SPECS[name][1], name
        assert torch.equal(got[name].view(torch.int16), tensor.view(torch.int16)), name


def test_gguf_stream_and_get_tensor_dequantize(gguf_file):
    want = reference(gguf_file, torch.float16)
    for name, tensor in weightlift.stream(gguf_file, dtype=torch.float16, max_host_memory="4MiB"):
        assert torch.equal(tensor, want[name]), name
    with weightlift.open(gguf_file) as ckpt:
        assert torch.equal(ckpt.get_tensor("blk.0.ffn_down.weight", dtype=torch.float16),
                           want["blk.0.ffn_down.weight"])
