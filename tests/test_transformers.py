"""``weightlift.transformers.from_pretrained`` against transformers' own ``from_pretrained``.

Every model here is a tiny random one written by ``save_pretrained`` (plus the real MiniLM from
PyPI); the oracle is transformers loading the same directory, compared with ``torch.equal``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import (AutoModel, AutoModelForCausalLM, BertConfig, BertForPreTraining,
                          BertForSequenceClassification, BertModel, GPT2Config, GPT2LMHeadModel,
                          LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM)

import weightlift
import weightlift.load_into  # noqa: F401 - the module, shadowed by the function below
from weightlift.errors import CheckpointError, PlacementError, WeightliftError
from weightlift.transformers import from_pretrained

load_into_module = sys.modules["weightlift.load_into"]
wl_transformers = sys.modules["weightlift.transformers"]

IDS = torch.tensor([[3, 17, 42, 5, 99, 7, 1, 64, 23, 11]])
SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
BERT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64)


def save(tmp_path: Path, model: torch.nn.Module, name: str, **options: object) -> Path:
    path = tmp_path / name
    model.save_pretrained(path, **options)
    return path


def outputs(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        out = model(IDS)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_model(got: torch.nn.Module, want: torch.nn.Module) -> None:
    """Same class, same tensors (parameters and every buffer) bit for bit, same outputs, eval."""
    assert type(got) is type(want)
    assert not got.training
    got_tensors = dict([*got.named_parameters(), *got.named_buffers()])
    want_tensors = dict([*want.named_parameters(), *want.named_buffers()])
    assert sorted(got_tensors) == sorted(want_tensors)
    for name, tensor in want_tensors.items():
        assert got_tensors[name].dtype == tensor.dtype, name
        assert not got_tensors[name].is_meta, name
        assert torch.equal(got_tensors[name], tensor), name
    assert torch.equal(outputs(got), outputs(want))


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny saved model per decoder family, with and without tied embeddings."""
    root = tmp_path_factory.mktemp("families")
    torch.manual_seed(0)
    models = {
        "mistral": MistralForCausalLM(MistralConfig(**SMALL, sliding_window=16)),
        "qwen2": Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=True)),
        "llama-tied": LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=True)),
        "gpt2": GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                           n_positions=64, bos_token_id=0,
                                           eos_token_id=0)),
    }
    return {name: save(root, model, name) for name, model in models.items()}


@pytest.mark.parametrize("family", ["mistral", "qwen2", "llama-tied", "gpt2"])
def test_decoder_families_equal_from_pretrained(families: dict[str, Path], family: str) -> None:
    want = AutoModelForCausalLM.from_pretrained(families[family])
    got = from_pretrained(families[family])
    assert_same_model(got, want)
    tied = got.get_output_embeddings().weight is got.get_input_embeddings().weight
    assert tied == want.config.tie_word_embeddings == (family != "mistral")


def test_sharded_llama_equals_from_pretrained(llama_dir: Path) -> None:
    assert len(list(llama_dir.glob("*.safetensors"))) > 2
    want = LlamaForCausalLM.from_pretrained(llama_dir)
    got = from_pretrained(llama_dir, strategy="stream", max_host_memory="64MB")
    assert_same_model(got, want)
    assert got.lm_head.weight is not got.model.embed_tokens.weight, "untied stays untied"


def test_bfloat16_equals_from_pretrained(families: dict[str, Path]) -> None:
    want = AutoModelForCausalLM.from_pretrained(families["qwen2"], dtype=torch.bfloat16)
    got = from_pretrained(families["qwen2"], dtype="bfloat16")
    assert got.model.embed_tokens.weight.dtype == torch.bfloat16
    assert got.model.rotary_emb.inv_freq.dtype == want.model.rotary_emb.inv_freq.dtype
    assert_same_model(got, want)


def test_auto_dtype_follows_the_config(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**SMALL)).to(torch.float16)
    path = save(tmp_path, model, "fp16")
    assert json.loads((path / "config.json").read_text())["dtype"] == "float16"
    want = AutoModelForCausalLM.from_pretrained(path)
    got = from_pretrained(path)
    assert got.dtype == want.dtype == torch.float16
    assert_same_model(got, want)


def test_minilm_equals_from_pretrained(minilm_path: Path) -> None:
    directory = minilm_path.parent
    want = AutoModel.from_pretrained(directory)
    # The checkpoint still holds the old persistent position_ids: ignored, like transformers does.
    with weightlift.open(minilm_path) as checkpoint:
        assert "embeddings.position_ids" in checkpoint
    got = from_pretrained(directory, model_class=AutoModel)
    assert_same_model(got, want)


def test_bert_prefixes_are_matched_both_ways(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = save(tmp_path, BertModel(BertConfig(**BERT)), "base")  # keys without "bert."
    masked = save(tmp_path, BertForPreTraining(BertConfig(**BERT)), "pre")  # "bert." keys, a pooler
    # A BertModel checkpoint into a model with a head: the body loads, the head is new.
    want = BertForSequenceClassification.from_pretrained(base)
    with pytest.warns(UserWarning, match=r"newly initialised.*classifier\.weight"):
        got = from_pretrained(base, model_class=BertForSequenceClassification)
    assert_same_model(got.bert, want.bert)
    assert not got.classifier.weight.is_meta and not got.training
    # A head checkpoint into the bare body: "bert." is stripped, the head's tensors are unused.
    want_body = BertModel.from_pretrained(masked)
    with pytest.warns(UserWarning, match=r"does not use: cls\.predictions"):
        got_body = from_pretrained(masked, model_class=BertModel)
    assert_same_model(got_body, want_body)


def test_hub_reference_loads_from_the_local_cache(tmp_path: Path, families: dict[str, Path],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from test_hub import add_snapshot

    cache = tmp_path / "hub"
    add_snapshot(cache, "tiny-org/tiny-mistral", families["mistral"], "c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    got = from_pretrained("hf://tiny-org/tiny-mistral")
    assert_same_model(got, AutoModelForCausalLM.from_pretrained(families["mistral"]))


class FloatAllocations(TorchDispatchMode):
    """Bytes of floating tensors created off the meta device while the mode is on."""

    FACTORIES = {"aten::empty", "aten::empty_strided", "aten::empty_like", "aten::zeros",
                 "aten::ones", "aten::full", "aten::clone", "aten::_to_copy"}

    def __init__(self) -> None:
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if (func._schema.name in self.FACTORIES and isinstance(out, torch.Tensor)
                and not out.is_meta and out.dtype.is_floating_point):
            self.bytes += out.numel() * out.element_size()
        return out


@pytest.mark.parametrize("strategy", ["mmap", "stream"])
def test_parameters_are_the_loaded_tensors_never_a_second_copy(
        llama_dir: Path, strategy: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_load, real_build = wl_transformers.load, wl_transformers.build_on_meta
    built: list[torch.nn.Module] = []
    loaded: dict[str, torch.Tensor] = {}
    seen: list[bool] = []

    def recording_build(*args: object, **kwargs: object) -> torch.nn.Module:
        built.append(real_build(*args, **kwargs))
        return built[-1]

    def recording_load(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        seen.append(all(t.is_meta for t in [*built[0].parameters(), *built[0].buffers()]))
        state = real_load(*args, **kwargs)
        loaded.update(state)
        return state

    monkeypatch.setattr(wl_transformers, "build_on_meta", recording_build)
    monkeypatch.setattr(wl_transformers, "load", recording_load)
    with FloatAllocations() as allocations:
        model = from_pretrained(llama_dir, strategy=strategy)
    assert seen == [True], "the model reached the load with real storage"
    # Every parameter is a loaded tensor itself (same storage), not a copy of one.
    storages = {t.untyped_storage().data_ptr() for t in loaded.values()}
    assert all(p.untyped_storage().data_ptr() in storages for p in model.parameters())
    assert len(loaded) == len(list(model.parameters()))
    # Nothing parameter-sized was allocated besides: only the computed buffers.
    assert allocations.bytes <= sum(b.numel() * b.element_size() for b in model.buffers())
    assert_same_model(model, LlamaForCausalLM.from_pretrained(llama_dir))


def test_on_a_device_parameters_are_created_only_after_the_build(
        llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The copying path (used for accelerators) on the CPU: one fresh tensor per parameter."""
    real_load_into = load_into_module.load_into
    seen: list[bool] = []

    def checking_load_into(module: torch.nn.Module, *args: object, **kwargs: object) -> object:
        seen.append(all(t.is_meta for t in [*module.parameters(), *module.buffers()]))
        return real_load_into(module, *args, **kwargs)

    monkeypatch.setattr(wl_transformers, "load_into", checking_load_into)
    monkeypatch.setattr(wl_transformers, "copies_into_place", lambda device: True)
    with FloatAllocations() as allocations:
        model = from_pretrained(llama_dir)
    assert seen == [True], "the model reached the load with real storage"
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # Every parameter's storage is made once (filled in place); the rest is the computed buffers.
    assert params <= allocations.bytes <= params + buffers
    assert_same_model(model, LlamaForCausalLM.from_pretrained(llama_dir))


def test_load_into_a_meta_built_transformers_model_computes_its_buffers(
        families: dict[str, Path]) -> None:
    want = AutoModelForCausalLM.from_pretrained(families["qwen2"])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(want.config)
    assert weightlift.load_into(model, families["qwen2"]) == ([], [])
    model.eval()
    assert_same_model(model, want)


def test_load_into_a_meta_module_with_buffers_says_what_to_do(tmp_path: Path) -> None:
    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(2, 2)
            self.register_buffer("scale", torch.ones(2), persistent=False)

    path = tmp_path / "scaled.safetensors"
    from safetensors.torch import save_file
    save_file(Scaled().state_dict(), path)
    with torch.device("meta"):
        module = Scaled()
    with pytest.raises(PlacementError, match=r"non-persistent buffer\(s\) on the meta device.*"
                                             r"\"scale\".*strict=False.*from_pretrained"):
        weightlift.load_into(module, path)


def test_a_directory_without_config_is_refused(tmp_path: Path, llama_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in llama_dir.glob("*.safetensors*"):
        (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(CheckpointError, match=r"bare: has no config\.json.*config="):
        from_pretrained(bare)


def test_a_weights_file_finds_its_config(families: dict[str, Path]) -> None:
    got = from_pretrained(families["gpt2"] / "model.safetensors")
    assert_same_model(got, AutoModelForCausalLM.from_pretrained(families["gpt2"]))


def test_a_failed_load_raises_and_returns_nothing(tmp_path: Path, families: dict[str, Path]
                                                  ) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((families["qwen2"] / "config.json").read_bytes())
    data = (families["qwen2"] / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:len(data) - 100])  # truncated
    with pytest.raises(WeightliftError, match="model.safetensors"):
        from_pretrained(broken)


def test_without_transformers_the_error_says_what_to_install(
        families: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(WeightliftError, match=r"pip install 'weightlift\[transformers\]'"):
        from_pretrained(families["gpt2"])
    assert transformers.__name__ == "transformers"


def test_a_given_config_is_used_and_left_unchanged(families: dict[str, Path]) -> None:
    config = transformers.AutoConfig.from_pretrained(families["llama-tied"])
    before = config.to_dict()
    got = from_pretrained(families["llama-tied"], config=config, dtype=torch.bfloat16,
                          attn_implementation="eager")
    assert config.to_dict() == before
    assert got.config._attn_implementation == "eager" and got.dtype == torch.bfloat16
    want = AutoModelForCausalLM.from_pretrained(families["llama-tied"], dtype=torch.bfloat16,
                                                attn_implementation="eager")
    assert_same_model(got, want)


def test_a_config_that_does_not_fit_the_weights_names_the_tensor(
        families: dict[str, Path]) -> None:
    config = transformers.AutoConfig.from_pretrained(families["qwen2"])
    config.intermediate_size = 48  # the checkpoint's MLP is 64 wide
    with pytest.raises(PlacementError, match=r"size mismatch for model\.layers\.0\.mlp\.gate_proj"
                                             r"\.weight: the checkpoint has shape \[64, 32\]"):
        from_pretrained(families["qwen2"], config=config)


def test_a_base_model_checkpoint_feeds_a_tied_head(tmp_path: Path,
                                                   recwarn: pytest.WarningsRecorder) -> None:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                        bos_token_id=0, eos_token_id=0)
    path = save(tmp_path, transformers.GPT2Model(config), "gpt2-base")  # no "transformer."
    want = GPT2LMHeadModel.from_pretrained(path)
    with FloatAllocations() as allocations:
        got = from_pretrained(path, model_class=GPT2LMHeadModel)
    assert got.lm_head.weight is got.transformer.wte.weight
    assert_same_model(got, want)
    assert not [w for w in recwarn if "newly initialised" in str(w.message)
                or "does not use" in str(w.message)], "nothing was missing or left over"
    # The tied head took the loaded embeddings: no head-sized tensor was ever allocated.
    assert allocations.bytes < got.lm_head.weight.numel() * got.lm_head.weight.element_size()
