"""The CLI's tables piped to a file, as benchmark logs and CI keep them: one row per line, every
number whole (never ``0.…``), and the same numbers the JSON output holds, whether ``$COLUMNS`` is
unset or 80.

The commands run in this process with stdout captured (not a terminal, as a pipe is): one
``python -m weightlift`` piped to a real pipe shows that its output is the same, byte for byte.
The two widths of ``bench`` render one measured session (the runs are child processes either
way; what differs between the widths is only how the tables are printed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from weightlift.bench import synthetic
from weightlift.bench.runner import Session
from weightlift.cli import bench, main
from weightlift.units import format_bytes

SIZE = 4_000_000
WIDTHS = [None, "80"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path_factory.mktemp("cache"))


def in_a_pipe(args: list[str], columns: str | None) -> str:
    """``python -m weightlift ARGS`` with stdout a pipe, ``$COLUMNS`` as given (unset: None)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    if columns is not None:
        env["COLUMNS"] = columns
    done = subprocess.run([sys.executable, "-m", "weightlift", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    assert done.returncode == 0, done.stderr
    return done.stdout


def piped(args: list[str], columns: str | None, capsys: pytest.CaptureFixture[str],
          monkeypatch: pytest.MonkeyPatch) -> str:
    """``weightlift ARGS``'s stdout, not a terminal, ``$COLUMNS`` as given (unset: None), run in
    this process (``in_a_pipe`` in a process of its own: the same text)."""
    monkeypatch.delenv("LINES", raising=False)
    if columns is None:
        monkeypatch.delenv("COLUMNS", raising=False)
    else:
        monkeypatch.setenv("COLUMNS", columns)
    capsys.readouterr()
    assert main(args) == 0
    return capsys.readouterr().out


def as_json(args: list[str], capsys: pytest.CaptureFixture[str]) -> Any:
    """``weightlift ARGS --json``'s document, run in this process: JSON is the same piped or
    not and at any width, so only the tables need a process of their own."""
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def tables(out: str) -> list[list[dict[str, str]]]:
    """Every table's rows as ``{header: cell}``; a row continued on a second line (a wrapped
    cell) fails here, as it would fail a script reading the log."""
    found: list[list[dict[str, str]]] = []
    headers: list[str] = []
    for line in out.splitlines():
        cells = [cell.strip() for cell in line[1:-1].split(line[0])] if line else []
        if line.startswith("┃"):
            headers = cells
            found.append([])
        elif line.startswith("│"):
            if not found:  # a table without a header row (``load``)
                found.append([])
                headers = [str(i) for i in range(len(cells))]
            assert len(cells) == len(headers) and cells[0], f"not one row per line: {line!r}"
            found[-1].append(dict(zip(headers, cells)))
    return found


#: The session ``bench`` measured in this module: both widths print it.
MEASURED: list[Session] = []


@pytest.mark.parametrize("columns", WIDTHS)
def test_bench_numbers_are_whole_and_match_the_json(checkpoint: Path, tmp_path: Path,
                                                    columns: str | None,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    measure = bench.measure

    def once(*args: Any, **kwargs: Any) -> Session:
        if not MEASURED:
            MEASURED.append(measure(*args, **kwargs))
        return MEASURED[0]

    monkeypatch.setattr(bench, "measure", once)
    data_file = tmp_path / "bench.json"
    # --no-verify: the verify pass prints no row (test_bench checks it through the CLI).
    out = piped(["bench", str(checkpoint), "--strategies", "auto,mmap", "--scenario", "device",
                 "--cache", "cold", "--reps", "1", "--no-verify", "--json", str(data_file)],
                columns, capsys, monkeypatch)
    assert "…" not in out
    data = json.loads(data_file.read_text())
    runs = {run["loader"]: run for run in data["runs"]}
    [rows] = tables(out)
    assert len(rows) == len(runs) >= 4  # auto, mmap and the raw-read rows
    for row in rows:
        run = runs[row["loader"].split(" → ")[0]]
        assert run["status"] == row["status"] == "ok"
        assert float(row["s min / med"]) == pytest.approx(run["seconds"], abs=5e-4)
        assert row["s min / med"] == f"{run['seconds']:.3f}"
        assert row["GB/s best / med"] == f"{run['gbps']:.2f}"
        first = "-" if run["first"] is None else f"{run['first'] * 1e3:.1f}"
        assert row["first tensor ms"] == first
        assert row["peak host mem"] == format_bytes(run["peak_memory"])
        assert row["cache left"] == format_bytes(run["cache_left"])
    assert any(len(line) > 80 for line in out.splitlines())  # not squeezed to 80 columns


@pytest.mark.parametrize("columns", WIDTHS)
def test_info_tables_match_the_json(llama_dir: Path, columns: str | None,
                                    capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    info = as_json(["info", str(llama_dir), "--tensors"], capsys)
    out = piped(["info", str(llama_dir), "--tensors"], columns, capsys, monkeypatch)
    if columns is not None:  # what a real pipe receives is the same text
        assert in_a_pipe(["info", str(llama_dir), "--tensors"], columns) == out
    assert "…" not in out
    dtypes, files, *_, tensors = tables(out)  # a metadata table between, when there is one
    assert {row["dtype"]: (int(row["tensors"]), row["bytes"]) for row in dtypes} == \
        {name: (d["tensors"], format_bytes(d["bytes"])) for name, d in info["dtypes"].items()}
    assert [(row["file"], int(row["tensors"]), row["size"]) for row in files] == \
        [(s["path"], s["tensors"], format_bytes(s["file_bytes"])) for s in info["shards"]]
    assert [(row["name"], row["shape"], row["bytes"]) for row in tensors] == \
        [(t["name"], str(t["shape"]), format_bytes(t["bytes"])) for t in info["tensor_list"]]


@pytest.mark.parametrize("columns", WIDTHS)
def test_load_and_doctor_tables_match_the_json(minilm_path: Path, columns: str | None,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = as_json(["load", str(minilm_path)], capsys)
    out = piped(["load", str(minilm_path), "-q", "-v"], columns, capsys, monkeypatch)
    assert "…" not in out
    [rows] = tables(out)
    values = {row["0"]: row["1"] for row in rows}
    assert values["tensors"] == str(loaded["tensors"])
    assert values["bytes"] == format_bytes(loaded["bytes"])
    assert float(values["seconds"]) > 0 and float(values["throughput"].split()[0]) > 0
    assert values["why"]  # the reason, whole

    found = as_json(["doctor", str(minilm_path)], capsys)["source"]
    out = piped(["doctor", str(minilm_path)], columns, capsys, monkeypatch)
    assert "…" not in out
    [rows] = tables(out)
    checks = {row["check"]: row for row in rows}
    assert checks["checkpoint"]["value"] == found["path"]
    assert checks["checkpoint"]["note"] == (f"{found['tensors']} tensors, "
                                            f"{format_bytes(found['bytes'])} in 1 file(s)")
    assert checks["auto → cpu"]["note"].startswith(found["auto"]["cpu"]["reason"][:60])
