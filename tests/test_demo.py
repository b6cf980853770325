"""``weightlift demo`` end to end on a few-MB checkpoint: both scenarios, auto's choices, the mmap
path beside them, and the same against safetensors when it is installed (and without it, on core
dependencies only)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from weightlift.bench.loaders import WEIGHTLIFT_STRATEGIES
from weightlift.cli import main
from weightlift.cli import demo
from weightlift.cli.bench import measure
from weightlift.bench.runner import RunResult
from weightlift.cli.demo import AUTO, MMAP, MMAP_LABEL, PEER
from weightlift.units import format_bytes


def rows_of(out: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split("│")[1:-1]]
            for line in out.splitlines() if line.startswith("│")]


def test_demo_shows_both_scenarios_against_safetensors_and_why_auto_chose(
        tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    sessions = []

    def keep(*args: object, **kwargs: object) -> object:
        sessions.append(measure(*args, **kwargs))
        return sessions[-1]

    monkeypatch.setattr(demo, "measure", keep)
    assert main(["demo", "--size", "8MB", "--cache-dir", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    runs = {(run["scenario"], run["loader"]): run for run in data["runs"]}
    assert set(runs) == {(scenario, loader) for scenario in ("device", "to_cpu")
                         for loader in (AUTO, MMAP, PEER)}
    assert all(run["status"] == "ok" and run["cache"] == "cold" for run in runs.values())
    for scenario in ("device", "to_cpu"):
        auto = runs[(scenario, AUTO)]
        assert auto["strategy"] in WEIGHTLIFT_STRATEGIES and auto["reason"]
    assert runs[("device", PEER)]["strategy"] is None  # a peer: no weightlift strategy
    assert runs[("device", MMAP)]["strategy"] == runs[("to_cpu", MMAP)]["strategy"] == "mmap"
    assert all(run["bytes"] == data["checkpoint"]["bytes"] for run in runs.values())
    assert len(list(tmp_path.glob("synthetic-llama-*"))) == 1

    # The screen, from the same measured runs.
    console = Console(width=100, file=io.StringIO())
    for scenario, heading in demo.SECTIONS:
        console.print(demo.table([r for r in sessions[0].runs if r.scenario == scenario],
                                 heading))
    for line in demo.story(sessions[0], budget=64 << 20):
        console.print(line, highlight=False)
    out = console.file.getvalue()
    names = [row[0] for row in rows_of(out)]
    assert [name.split("→")[0] for name in names] == [AUTO, MMAP_LABEL, PEER] * 2
    for row in rows_of(out):
        assert float(row[1]) > 0 and float(row[2]) > 0   # seconds, GB/s
        assert row[3].endswith("B") and row[4].endswith("B")  # peak host memory, cache left
    assert "For a GPU, weightlift held" in out and "safetensors held" in out
    assert "Into CPU memory, weightlift took" in out
    assert out.count("auto chose") in (1, 2)  # once when both loads chose alike, for one reason
    assert "What it means: for a GPU the mmap path held" in out


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
    assert "auto chose" in done.stdout and "pip install safetensors" in done.stdout
    assert PEER not in done.stdout.split("safetensors is not installed")[0]
    # The contrast shows without safetensors: the mmap path beside auto, in both tables.
    names = [row[0] for row in rows_of(done.stdout)]
    assert [name.split("→")[0] for name in names] == [AUTO, MMAP_LABEL] * 2
    assert "What it means: for a GPU the mmap path held" in done.stdout
    assert "…" not in done.stdout  # piped: nothing cut to fit 80 columns


def result(scenario: str, loader: str, peak: int, left: int) -> RunResult:
    return RunResult(loader, scenario, "cold", 0, "ok", seconds=1.0, bytes=100, peak_memory=peak,
                     memory_source="cgroup", cache_left=left)


def test_the_meaning_line_says_what_the_numbers_show() -> None:
    mib, size, budget = 1 << 20, 1000 << 20, 500 << 20
    runs = {("device", AUTO): result("device", AUTO, 350 * mib, 1 * mib),
            ("device", MMAP): result("device", MMAP, 1001 * mib, 1000 * mib),
            ("to_cpu", AUTO): result("to_cpu", AUTO, 1005 * mib, 1 * mib),
            ("to_cpu", MMAP): result("to_cpu", MMAP, 1002 * mib, 1000 * mib)}
    line = demo.meaning(runs, size, budget)
    assert line is not None and line.count("\n") == 0
    assert f"the mmap path held {format_bytes(1001 * mib)} of host memory (100% of" in line
    assert f"weightlift {format_bytes(350 * mib)} (35%), 2.9× less" in line
    assert "grows with the checkpoint" in line and format_bytes(budget) in line
    assert f"left {format_bytes(1000 * mib)} in the page cache where weightlift left " \
           f"{format_bytes(1 * mib)}" in line

    # Where the mmap path held no more and left nothing, the line does not claim it did.
    runs[("device", MMAP)] = result("device", MMAP, 340 * mib, 0)
    runs[("to_cpu", MMAP)] = result("to_cpu", MMAP, 1000 * mib, 0)
    line = demo.meaning(runs, size, budget)
    assert line is not None
    assert "about the same at this size" in line and "grows" not in line
    assert "neither left much page cache behind" in line and "reclaims" not in line
    runs[("to_cpu", AUTO)] = result("to_cpu", AUTO, 1000 * mib, 900 * mib)
    line = demo.meaning(runs, size, budget)
    assert line is not None and "neither" not in line
    assert f"{format_bytes(0)} on the mmap path, {format_bytes(900 * mib)} with weightlift" in line
    assert demo.meaning({}, size, budget) is None
