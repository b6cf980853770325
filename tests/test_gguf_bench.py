"""The GGUF benchmark: a deterministic Q4_K_M-like synthetic file, its loaders, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGUFReader

import weightlift
from weightlift.bench import child, synthetic_gguf
from weightlift.bench.loaders import LOADERS, TRANSFORMERS_GGUF, Job, peer_loaders
from weightlift.cli import main

SIZE = 12_000_000


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_gguf.synthetic_gguf(SIZE, cache_dir=tmp_path_factory.mktemp("gguf-cache"))


def test_synthetic_gguf_is_a_q4_k_m_like_llama(small: Path) -> None:
    config = synthetic_gguf.config_for(SIZE)
    reader = GGUFReader(small)
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert len(kinds) == 9 * config.layers + 3
    assert kinds["blk.0.attn_q.weight"] == "Q4_K" and kinds["blk.0.ffn_down.weight"] == "Q6_K"
    assert kinds["output.weight"] == "Q6_K" and kinds["output_norm.weight"] == "F32"
    assert sum(int(t.n_bytes) for t in reader.tensors) == synthetic_gguf.planned_bytes(SIZE)
    with weightlift.open(small) as ckpt:
        meta = ckpt.metadata()
        assert meta is not None and meta["llama.block_count"] == config.layers
        assert len(meta["tokenizer.ggml.tokens"]) == config.vocab


def test_synthetic_gguf_is_deterministic_and_its_blocks_are_valid(small: Path,
                                                                   tmp_path: Path) -> None:
    again = synthetic_gguf.synthetic_gguf(SIZE, cache_dir=tmp_path)
    assert again.read_bytes() == small.read_bytes()
    other = synthetic_gguf.write_gguf(tmp_path / "seed1.gguf", SIZE, seed=1)
    assert other.read_bytes() != small.read_bytes()
    for t in GGUFReader(small).tensors:
        if t.name.startswith("blk.0."):
            values = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            assert np.isfinite(values).all(), t.name


@pytest.mark.parametrize("name", ["weightlift stream", "weightlift mmap", "gguf-py GGUFReader",
                                  "gguf-py GGUFReader + copy"])
def test_packed_loaders_return_gguf_py_bytes(small: Path, name: str) -> None:
    job = Job(str(small), (str(small),), "to_cpu", "cpu")
    result = child.measure(job, name, verify=True)
    assert result["status"] == "ok"
    assert result["bytes"] == synthetic_gguf.planned_bytes(SIZE)


def test_verification_catches_wrong_gguf_bytes(small: Path) -> None:
    verify = child.VerifyGGUF([str(small)])
    tensor = weightlift.load(small, keys=["blk.0.attn_q.weight"])["blk.0.attn_q.weight"].clone()
    tensor.view(-1)[5] ^= 1
    with pytest.raises(AssertionError, match="bytes differ"):
        verify("blk.0.attn_q.weight", tensor)


def test_transformers_peer_dequantizes_to_float32(tmp_path: Path) -> None:
    if LOADERS[TRANSFORMERS_GGUF].unavailable():
        pytest.skip(str(LOADERS[TRANSFORMERS_GGUF].unavailable()))
    tiny = synthetic_gguf.write_gguf(tmp_path / "tiny.gguf", 1)  # the smallest: one layer
    job = Job(str(tiny), (str(tiny),), "to_cpu", "cpu")
    tensors = dict(LOADERS[TRANSFORMERS_GGUF].run(job))
    q = tensors["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float32 and q.shape == (synthetic_gguf.config_for(1).hidden,) * 2


def test_gguf_peers_are_listed_by_format() -> None:
    assert set(peer_loaders("gguf")) == {"gguf-py GGUFReader", "gguf-py GGUFReader + copy",
                                         TRANSFORMERS_GGUF}
    assert not set(peer_loaders("gguf")) & set(peer_loaders())


def test_bench_cli_on_a_synthetic_gguf(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # Each run is a fresh process: one loader, one run, verification and peers are in process above.
    assert main(["bench", "--format", "gguf", "--synthetic", str(SIZE), "--cache-dir",
                 str(tmp_path), "--strategies", "stream", "--scenario", "to_cpu",
                 "--cache", "warm", "--reps", "1", "--no-raw", "--no-verify", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    loaders = {run["loader"]: run["status"] for run in data["runs"]}
    dequant = "weightlift auto → bf16"
    assert loaders == {"weightlift stream": "ok"} | (
        {} if dequant in data["unavailable"] else {dequant: "ok"})
    assert data["checkpoint"]["bytes"] == synthetic_gguf.planned_bytes(SIZE)
