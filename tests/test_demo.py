"""``weightlift demo`` end to end on a few-MB checkpoint: a row per strategy, auto's choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from weightlift.bench.loaders import WEIGHTLIFT_STRATEGIES
from weightlift.cli import main


def test_demo_prints_a_row_per_strategy_and_why_auto_chose(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "8MB", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("│")]
    names = [row.split("│")[1].strip() for row in rows]
    assert [name.split(" →")[0] for name in names] == list(WEIGHTLIFT_STRATEGIES)
    for row in rows:
        cells = [cell.strip() for cell in row.split("│")[1:-1]]
        assert float(cells[1]) > 0 and float(cells[2]) > 0   # seconds, GB/s
        assert cells[3].endswith(("B", "iB"))                 # peak host memory
    assert "auto chose" in out and "page cache" in out
    assert len(list(tmp_path.glob("synthetic-llama-*"))) == 1


def test_demo_json_has_every_strategy_cold_and_a_reason(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--size", "8MB", "--cache-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    runs = {run["loader"]: run for run in data["runs"]}
    assert set(runs) == {f"weightlift {s}" for s in WEIGHTLIFT_STRATEGIES}
    assert all(run["status"] == "ok" and run["cache"] == "cold" for run in runs.values())
    auto = runs["weightlift auto"]
    assert auto["strategy"] in WEIGHTLIFT_STRATEGIES and auto["reason"]
    assert runs["weightlift mmap"]["strategy"] == "mmap"
    assert all(run["bytes"] == data["checkpoint"]["bytes"] for run in runs.values())


def test_demo_needs_only_the_core_dependencies(tmp_path: Path) -> None:
    """As on a fresh machine: the optional packages fail to import, in every process."""
    blocked = tmp_path / "blocked"
    for name in ("safetensors", "matplotlib", "runai_model_streamer", "fastsafetensors"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(f"raise ImportError('{name} is blocked')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(blocked), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "weightlift", "demo", "--size", "8MB",
                           "--cache-dir", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "auto chose" in done.stdout and "stream" in done.stdout
