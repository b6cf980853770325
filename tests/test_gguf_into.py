"""``load_into`` from GGUF: tiny Llama, Mistral and Qwen2 models built by transformers, exported to
GGUF the way llama.cpp's converter does (names, q/k permutation), then loaded by weightlift and
by transformers' own GGUF path: same logits."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter

import weightlift
from weightlift.errors import PlacementError
from weightlift.gguf_families import gguf_name, hf_name, permute_qk, unpermute_qk

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

HAS_DEQUANT = importlib.util.find_spec("weightlift.dequant") is not None


def llama_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp writes q and k."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def export(model: torch.nn.Module, path: Path, arch: str, name: str, qtype: Q,
           permute: bool) -> Path:
    cfg = model.config
    writer = GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or 10000.0))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    for hf, tensor in model.state_dict().items():
        if hf == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name_ = gguf_name(hf)
        assert name_ is not None, hf
        data = tensor.float().numpy()
        if permute and ".attn_q." in name_:
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_attention_heads)
        elif permute and ".attn_k." in name_:
            data = llama_permute(data, cfg.num_attention_heads, cfg.num_key_value_heads)
        if data.ndim == 1 or qtype == Q.F32:
            writer.add_tensor(name_, data.astype(np.float32))
        elif qtype == Q.F16:
            writer.add_tensor(name_, data.astype(np.float16))
        else:
            writer.add_tensor(name_, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def tiny(kind: str, tie: bool = False) -> torch.nn.Module:
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  tie_word_embeddings=tie)
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**common))
    with torch.no_grad():
        for p in model.parameters():  # norms away from 1, biases away from 0
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


CASES = {
    # family, GGUF arch, general.name, type, q/k permuted by llama.cpp, tied embeddings
    "llama-f32": ("llama", "llama", "tiny-llama", Q.F32, True, False),
    "llama-f16": ("llama", "llama", "tiny-llama", Q.F16, True, False),
    "llama-bf16": ("llama", "llama", "tiny-llama", Q.BF16, True, False),
    "mistral-f16": ("mistral", "llama", "tiny-mistral", Q.F16, True, False),
    "qwen2-f32-tied": ("qwen2", "qwen2", "tiny-qwen2", Q.F32, False, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_equal_transformers_gguf_loading(tmp_path: Path, case: str) -> None:
    family, arch, name, qtype, permute, tie = CASES[case]
    source = tiny(family, tie)
    path = export(source, tmp_path / "m.gguf", arch, name, qtype, permute)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    torch.manual_seed(5)
    model = type(source)(source.config).eval()  # different random weights, all overwritten
    result = weightlift.load_into(model, path)
    assert result == ([], [])
    tokens = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(tokens).logits
        want = reference(tokens).logits
        original = source(tokens).logits
    assert torch.equal(got, want)
    if qtype == Q.F32:  # an F32 export is lossless: the original model's logits too
        assert torch.equal(got, original)


def test_unmapped_names_are_reported(tmp_path: Path) -> None:
    source = tiny("llama")
    path = export(source, tmp_path / "m.gguf", "llama", "tiny", Q.F32, True)
    smaller = transformers.LlamaForCausalLM(source.config.__class__(
        **{**source.config.to_dict(), "num_hidden_layers": 1}))
    with pytest.raises(PlacementError, match=r"unexpected key\(s\).*model\.layers\.1\."):
        weightlift.load_into(smaller, path)
    result = weightlift.load_into(smaller, path, strict=False)
    assert result.missing_keys == []
    assert all(k.startswith("model.layers.1.") for k in result.unexpected_keys)


def test_unknown_architecture_is_refused(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "x.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", np.ones((4, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PlacementError, match="'gpt2' has no name map"):
        weightlift.load_into(tiny("llama"), tmp_path / "x.gguf")


def test_quantized_tensors_are_dequantized_or_refused_clearly(tmp_path: Path) -> None:
    source = tiny("llama")
    path = export(source, tmp_path / "m.gguf", "llama", "tiny-llama", Q.Q8_0, True)
    model = type(source)(source.config).eval()
    if not HAS_DEQUANT:
        with pytest.raises(PlacementError, match="Q8_0.*needs dequantization"):
            weightlift.load_into(model, path)
        return
    weightlift.load_into(model, path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    tokens = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(model(tokens).logits, reference(tokens).logits)


def test_name_map_and_permutation_round_trip() -> None:
    for name in ("token_embd.weight", "output.weight", "blk.7.attn_k.bias",
                 "blk.0.ffn_down.weight", "blk.12.attn_norm.weight"):
        mapped = hf_name(name)
        assert mapped is not None and gguf_name(mapped) == name
    assert hf_name("blk.0.attn_qkv.weight") is None
    weight = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)
    assert torch.equal(unpermute_qk(permute_qk(weight, 4), 4), weight)
    assert torch.equal(permute_qk(weight, 4),
                       torch.from_numpy(llama_permute(weight.numpy(), 4, None)))
