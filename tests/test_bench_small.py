"""``weightlift bench --small``: what its numbers are made of (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import weightlift.torch
from weightlift.bench import small
from weightlift.cli import main


def test_bench_small_compares_every_case_warm_and_cold_and_checks_the_bytes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "small.json"
    assert main(["bench", "--small", "--small-sizes", "64KiB,256KiB", "--adapters", "2",
                 "--reps", "2", "--cache-dir", str(tmp_path), "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    cases = {r["case"] for r in data["results"]}
    assert cases == {"torch.load_file 64.00 KiB", "weightlift.load 64.00 KiB",
                     "torch.load_file 256.00 KiB", "weightlift.load 256.00 KiB",
                     "safe_open + get_tensor 256.00 KiB",
                     "safe_open + keys + metadata 256.00 KiB", "2 adapters, load_file each"}
    assert sorted((r["case"], r["cache"]) for r in data["results"]) == sorted(
        (case, cache) for case in cases for cache in ("cold", "warm"))
    for r in data["results"]:
        assert r["verified"] is True
        assert len(r["weightlift_ms"]) == len(r["safetensors_ms"]) == data["reps"] == 2
        assert r["ratio"] == pytest.approx(r["median_weightlift_ms"] / r["median_safetensors_ms"])
    printed = capsys.readouterr().out
    assert "| 2 adapters, load_file each | cold |" in printed and "load average" in printed
    # The files were written by safetensors itself, and the adapters are ~130 KB each.
    adapter = tmp_path / "small" / "adapter-0000.safetensors"
    assert 120_000 < adapter.stat().st_size < 140_000


def test_a_loader_returning_other_bytes_fails_the_bench(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    real = weightlift.torch.load_file

    def wrong(path: str) -> dict[str, torch.Tensor]:
        state = real(path)
        first = next(iter(state))
        state[first] = state[first].clone()
        state[first].view(-1).view(torch.uint8)[0] ^= 1  # one bit
        return state

    monkeypatch.setattr(weightlift.torch, "load_file", wrong)
    with pytest.raises(AssertionError, match="differs from safetensors"):
        small.run_small(tmp_path, sizes=[64 << 10], adapters=0, reps=1)


def test_cold_and_warm_runs_see_the_page_cache_they_asked_for(tmp_path: Path) -> None:
    singles, _ = small.make_files(tmp_path, [256 << 10], 0)
    path = singles[256 << 10]
    small.set_cache([path], "cold")
    assert small.probes.resident_bytes(path) == 0
    small.set_cache([path], "warm")
    assert small.probes.resident_bytes(path) >= Path(path).stat().st_size


def test_a_checkpoint_adds_its_first_tensor_and_whole_load(tmp_path: Path) -> None:
    singles, _ = small.make_files(tmp_path / "files", [256 << 10], 0)
    session = small.run_small(tmp_path, sizes=[], adapters=0, reps=1, caches=["warm"],
                              source=singles[256 << 10])
    assert [r.case.split(": ")[1] for r in session.results] == [
        "stream() first tensor vs safe_open + get_tensor",
        "weightlift.load vs load_file of each file"]
    assert all(r.verified and len(r.weightlift) == 1 for r in session.results)
