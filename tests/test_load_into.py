"""load_into: a checkpoint copied into an existing module, checked like load_state_dict.

transformers' own from_pretrained on the same saved checkpoint is the oracle for the Llama tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import bytes_of
from weightlift.errors import PlacementError
from weightlift.load_into import LoadIntoResult, load_into

CONFIG = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tied_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaConfig]:
    """A tiny Llama with tied embeddings, saved by transformers (the checkpoint holds only
    model.embed_tokens.weight of the tied pair)."""
    config = LlamaConfig(**CONFIG, tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tied_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    return path, config


def logits(model: nn.Module) -> torch.Tensor:
    ids = torch.arange(12).reshape(1, 12) % 128
    with torch.no_grad():
        return model(ids).logits


def assert_same_weights(got: nn.Module, want: nn.Module) -> None:
    got_state, want_state = got.state_dict(), want.state_dict()
    assert sorted(got_state) == sorted(want_state)
    for name, tensor in want_state.items():
        assert got_state[name].dtype == tensor.dtype, name
        assert bytes_of(got_state[name]) == bytes_of(tensor), name


# -- transformers --------------------------------------------------------------------------


def test_cpu_model_matches_from_pretrained(tied_llama: tuple[Path, LlamaConfig]) -> None:
    path, config = tied_llama
    reference = LlamaForCausalLM.from_pretrained(path)
    torch.manual_seed(1)  # other random weights, so a skipped tensor would show
    model = LlamaForCausalLM(config)
    before = {name: p.data_ptr() for name, p in model.named_parameters()}
    assert load_into(model, path) == LoadIntoResult([], [])
    assert_same_weights(model, reference)
    assert torch.equal(logits(model), logits(reference))
    # Copied in place: every parameter still uses its own storage, the tie still holds.
    assert {name: p.data_ptr() for name, p in model.named_parameters()} == before
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_meta_model_is_materialised_and_matches(tied_llama: tuple[Path, LlamaConfig]) -> None:
    path, config = tied_llama
    reference = LlamaForCausalLM.from_pretrained(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    # The rotary buffers are computed, never saved: the model's own init code computes them.
    assert load_into(model, path, device="cpu") == LoadIntoResult([], [])
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert isinstance(model.lm_head.weight, nn.Parameter) and model.lm_head.weight.requires_grad
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)
    assert_same_weights(model, reference)
    assert torch.equal(logits(model), logits(reference))


def test_meta_model_strict_names_the_missing_weights(tied_llama: tuple[Path, LlamaConfig]) -> None:
    path, config = tied_llama
    config = LlamaConfig(**{**config.to_dict(), "tie_word_embeddings": False})
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with pytest.raises(PlacementError, match=r"missing key\(s\) in the checkpoint: "
                                             r"\"lm_head\.weight\""):
        load_into(model, path)
    result = load_into(model, path, strict=False)
    assert result.missing_keys == ["lm_head.weight"]
    assert not model.lm_head.weight.is_meta


def test_sharded_checkpoint_into_untied_llama(llama_dir: Path) -> None:
    reference = LlamaForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(3)
    model = LlamaForCausalLM(reference.config)
    load_into(model, llama_dir, strategy="stream")
    assert_same_weights(model, reference)
    ids = torch.arange(10).reshape(1, 10)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_bf16_model_gets_converted_weights(tied_llama: tuple[Path, LlamaConfig]) -> None:
    path, config = tied_llama
    reference = LlamaForCausalLM.from_pretrained(path).to(torch.bfloat16)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    load_into(model, path)
    assert_same_weights(model, reference)


# -- plain modules -------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(3, 2, bias=False)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.register_buffer("scratch", torch.full((2,), 7.0), persistent=False)


def saved(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "net") -> Path:
    path = tmp_path / f"{name}.safetensors"
    save_file({k: v.detach().contiguous() for k, v in state.items()}, path)
    return path


def test_every_strategy_fills_every_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Net()
    source.steps.fill_(5)
    path = saved(tmp_path, source.state_dict())
    for strategy in ("auto", "mmap", "direct", "stream"):
        net = Net()
        load_into(net, path, strategy=strategy)
        assert_same_weights(net, source)
        assert torch.equal(net.scratch, torch.full((2,), 7.0)), "non-persistent buffers stay"


def test_missing_and_unexpected_keys_like_load_state_dict(tmp_path: Path) -> None:
    state = dict(Net().state_dict())
    del state["b.weight"]
    state["extra"] = torch.ones(1)
    path = saved(tmp_path, state)
    with pytest.raises(PlacementError) as raised:
        load_into(Net(), path)
    message = str(raised.value)
    assert 'missing key(s) in the checkpoint: "b.weight"' in message
    assert 'unexpected key(s) in the checkpoint: "extra"' in message
    assert str(path.parent) in message
    net = Net()
    result = load_into(net, path, strict=False)
    reference = Net()
    assert tuple(result) == tuple(reference.load_state_dict(state, strict=False))
    assert torch.equal(net.a.weight, state["a.weight"])


def test_shape_mismatch_is_refused_even_when_not_strict(tmp_path: Path) -> None:
    state = dict(Net().state_dict())
    state["a.weight"] = torch.zeros(4, 4)
    path = saved(tmp_path, state)
    net = Net()
    before = net.a.weight.detach().clone()
    with pytest.raises(PlacementError, match=r"size mismatch for a\.weight: the checkpoint has "
                                             r"shape \[4, 4\], the module \[3, 4\]"):
        load_into(net, path, strict=False)
    assert torch.equal(net.a.weight, before), "nothing is written when a check fails"


def test_non_floating_dtype_mismatch_is_refused(tmp_path: Path) -> None:
    state = dict(Net().state_dict())
    state["steps"] = torch.zeros((), dtype=torch.int32)
    path = saved(tmp_path, state)
    with pytest.raises(PlacementError, match=r"dtype mismatch for steps: the checkpoint has I32"):
        load_into(Net(), path)


def test_float_checkpoint_into_half_module_converts(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Net()
    path = saved(tmp_path, source.state_dict())
    net = Net().to(torch.float16)
    load_into(net, path)
    assert net.a.weight.dtype == torch.float16
    assert torch.equal(net.a.weight, source.a.weight.to(torch.float16))


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(5, 3)
        self.head = nn.Linear(3, 5, bias=False)
        self.head.weight = self.embed.weight


@pytest.mark.parametrize("saved_names", [["embed.weight"], ["head.weight"],
                                         ["embed.weight", "head.weight"]])
def test_tied_weights_load_from_any_of_their_names(tmp_path: Path,
                                                   saved_names: list[str]) -> None:
    weight = torch.randn(5, 3)
    path = saved(tmp_path, {name: weight.clone() for name in saved_names})
    model = Tied()
    assert load_into(model, path) == LoadIntoResult([], [])
    assert model.head.weight is model.embed.weight
    assert torch.equal(model.embed.weight, weight)


def test_meta_module_with_device(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = Net()
    path = saved(tmp_path, source.state_dict())
    with torch.device("meta"):
        net = Net()
    result = load_into(net, path, strict=False, device="cpu")
    assert result == LoadIntoResult(["scratch"], [])
    assert net.a.weight.device == torch.device("cpu") and net.a.weight.requires_grad
    assert net.scratch.shape == (2,) and not net.scratch.is_meta
    assert_same_weights(net, source)
