"""The bench's ``model`` scenario: synthetic checkpoints build as a Llama, both model loaders
return the checkpoint's bytes, and only they run in that scenario."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import weightlift
from weightlift.bench import child, synthetic
from weightlift.bench.loaders import LOADERS, Job, model_loaders
from weightlift.cli import main

SIZE = 4_000_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path_factory.mktemp("cache"))


def test_synthetic_config_builds_the_llama_the_checkpoint_holds(checkpoint: Path) -> None:
    config = AutoConfig.from_pretrained(checkpoint)
    assert config.model_type == "llama" and config.dtype == torch.bfloat16
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    # Every name and shape matches: a strict load leaves nothing missing or unexpected.
    assert weightlift.load_into(model, checkpoint) == ([], [])
    want = weightlift.load(checkpoint)
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, want[name]), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(8).reshape(1, 8)).logits).all()


def test_a_checkpoint_cached_before_config_json_gets_it_without_a_rewrite(tmp_path: Path) -> None:
    first = synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path)
    (first / synthetic.CONFIG_NAME).unlink()
    stamp = (first / synthetic.INDEX_NAME).stat().st_mtime_ns
    again = synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path)
    assert again == first and (first / synthetic.INDEX_NAME).stat().st_mtime_ns == stamp
    config = json.loads((first / synthetic.CONFIG_NAME).read_text())
    assert config["hidden_size"] == synthetic.config_for(SIZE).hidden
    assert config["num_attention_heads"] * config["head_dim"] == config["hidden_size"]


@pytest.mark.parametrize("name", ["weightlift from_pretrained", "transformers from_pretrained"])
def test_model_loaders_return_the_checkpoint_bytes(name: str, checkpoint: Path) -> None:
    assert name in model_loaders() and LOADERS[name].scenarios == ("model",)
    files = tuple(str(p) for p in synthetic.shard_paths(checkpoint))
    result = child.measure(Job(str(checkpoint), files, "model", "cpu"), name, verify=True)
    assert result["status"] == "ok"
    assert result["bytes"] == synthetic.planned_bytes(SIZE)


def test_bench_cli_runs_only_model_loaders_in_the_model_scenario(checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    assert main(["bench", str(checkpoint), "--scenario", "model", "--cache", "warm",
                 "--reps", "1", "--strategies", "auto", "--no-raw", "--no-verify",
                 "--json", str(out)]) == 0
    runs = json.loads(out.read_text())["runs"]
    assert sorted(run["loader"] for run in runs) == sorted(model_loaders())
    assert all(run["scenario"] == "model" and run["status"] == "ok" for run in runs)


def test_model_scenario_needs_a_config(tmp_path: Path, checkpoint: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in checkpoint.iterdir():
        if file.name != synthetic.CONFIG_NAME:
            (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(SystemExit, match="no config.json"):
        main(["bench", str(bare), "--scenario", "model", "--reps", "1"])
