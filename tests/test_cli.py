"""The command line, through its entry point: output, JSON, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from weightlift.cli import main


def test_info_json_describes_a_sharded_checkpoint(llama_dir: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(llama_dir), "--json", "--tensors"]) == 0
    info = json.loads(capsys.readouterr().out)
    index = json.loads(next(llama_dir.glob("*.index.json")).read_text())
    assert info["tensors"] == len(index["weight_map"]) == len(info["tensor_list"])
    assert {Path(s["path"]).name for s in info["shards"]} == set(index["weight_map"].values())
    assert info["bytes"] == sum(t["bytes"] for t in info["tensor_list"])
    assert set(info["dtypes"]) == {"F32"}


def test_info_prints_tables(minilm_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(minilm_path)]) == 0
    out = capsys.readouterr().out
    assert "104 tensors" in out and "F32" in out and "I64" in out


@pytest.mark.parametrize("strategy", ["auto", "direct", "stream", "mmap"])
def test_load_json_report(minilm_path: Path, strategy: str,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", str(minilm_path), "--strategy", strategy, "--json",
                 "--max-host-memory", "16MB"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] == 104
    assert report["bytes"] == minilm_path.stat().st_size - report_header_bytes(minilm_path)
    assert report["budget"] == 16_000_000
    assert report["gbps"] > 0 and report["peak_rss"] > 0
    if strategy != "auto":
        assert report["strategy"] == strategy
    assert report["reason"]


def test_load_verbose_says_why(minilm_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["load", str(minilm_path), "-v", "-q"]) == 0
    out = capsys.readouterr().out
    assert "why" in out and "page cache" in out and "GB/s" in out


def test_errors_are_one_line_with_exit_code_1(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{}")
    done = subprocess.run([sys.executable, "-m", "weightlift", "load", str(bad)],
                          capture_output=True, text=True)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and str(bad) in lines[0] and lines[0].startswith("weightlift: error:")


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "weightlift", "--debug", "info",
                           str(tmp_path / "missing.safetensors")], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback" in done.stderr and "MissingFileError" in done.stderr  # a CheckpointError


def test_usage_errors_exit_2() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["load"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["load", "x", "--strategy", "teleport"])
    assert exc.value.code == 2


def report_header_bytes(path: Path) -> int:
    """8 bytes of length plus the JSON header: everything in the file that is not tensor data."""
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")
