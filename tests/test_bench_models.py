"""The bench's ``model`` scenario: synthetic checkpoints build as a Llama, and only the model
loaders run in that scenario (test_bench checks every loader's bytes in its scenarios)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import weightlift
from weightlift.bench import runner, synthetic
from weightlift.bench.loaders import LOADERS, model_loaders
from weightlift.cli import main

from test_bench import SIZE, checkpoint  # noqa: F401 - the shared synthetic checkpoint fixture


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


def test_bench_cli_runs_only_model_loaders_in_the_model_scenario(
        checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[tuple[str, str, bool]] = []

    def run_one(run: runner.Run, settings: runner.Settings, *, verify: bool = False,
                in_group: bool | None = None) -> runner.RunResult:
        # The child processes are covered above; here only which runs the CLI asks for.
        asked.append((run.loader, run.scenario, verify))
        return runner.RunResult(run.loader, run.scenario, run.cache, run.rep, "ok",
                                seconds=1.0, bytes=1)

    monkeypatch.setattr(runner, "run_one", run_one)
    out = tmp_path / "bench.json"
    assert main(["bench", str(checkpoint), "--scenario", "to_cpu,model", "--cache", "warm",
                 "--reps", "1", "--strategies", "auto", "--no-raw", "--json", str(out)]) == 0
    models = set(model_loaders())
    assert models == {"weightlift from_pretrained", "transformers from_pretrained"}
    assert all(LOADERS[name].scenarios == ("model",) for name in models)
    assert {(loader, scenario) for loader, scenario, _ in asked} == {
        ("weightlift auto", "to_cpu"), *((name, "model") for name in models)}
    assert sum(verify for *_, verify in asked) == 1 + len(models), "each verified once"
    runs = json.loads(out.read_text())["runs"]
    assert {run["loader"] for run in runs if run["scenario"] == "model"} == models


def test_model_scenario_needs_a_config(tmp_path: Path, checkpoint: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for file in checkpoint.iterdir():
        if file.name != synthetic.CONFIG_NAME:
            (bare / file.name).write_bytes(file.read_bytes())
    with pytest.raises(SystemExit, match="no config.json"):
        main(["bench", str(bare), "--scenario", "model", "--reps", "1"])
