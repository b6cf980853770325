"""The benchmark's own logic: synthetic checkpoints, interleaving, statistics, memory accounting
and output. No timing assertions: only what the numbers are made of."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from weightlift.bench import child, report, runner, synthetic
from weightlift.api import parse_dtype
from weightlift.bench.loaders import LOADERS, RAW, Job, peer_loaders, raw_read
from weightlift.bench.runner import Run, RunResult
from weightlift.bench.stats import most_common, summarize
from weightlift.cli import main

SIZE = 4_000_000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------------------------------------
# synthetic checkpoints


def test_synthetic_checkpoint_has_llama_names_shapes_and_shards(checkpoint: Path) -> None:
    config = synthetic.config_for(SIZE)
    files = synthetic.shard_paths(checkpoint)
    assert len(files) >= 2
    shapes: dict[str, tuple[int, ...]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                assert tensor.dtype == torch.bfloat16
                shapes[name] = tuple(tensor.shape)
    h, kv, inter = config.hidden, config.kv, config.intermediate
    assert len(shapes) == 9 * config.layers + 3
    assert shapes["model.embed_tokens.weight"] == (config.vocab, h)
    assert shapes["lm_head.weight"] == (config.vocab, h)
    last = config.layers - 1
    assert shapes[f"model.layers.{last}.self_attn.k_proj.weight"] == (kv, h)
    assert shapes[f"model.layers.{last}.mlp.down_proj.weight"] == (h, inter)
    index = json.loads((checkpoint / synthetic.INDEX_NAME).read_text())
    assert set(index["weight_map"]) == set(shapes)
    total = sum(np.prod(s) * 2 for s in shapes.values())
    assert index["metadata"]["total_size"] == total
    assert 0.8 * SIZE < total < 1.2 * SIZE


def test_synthetic_content_is_deterministic_finite_and_seeded(checkpoint: Path,
                                                              tmp_path: Path) -> None:
    again = synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path)
    for a, b in zip(synthetic.shard_paths(checkpoint), synthetic.shard_paths(again)):
        assert a.read_bytes() == b.read_bytes()
    other = synthetic.synthetic_checkpoint(SIZE, seed=1, cache_dir=tmp_path)
    assert synthetic.shard_paths(other)[0].read_bytes() != \
        synthetic.shard_paths(checkpoint)[0].read_bytes()
    with safe_open(str(synthetic.shard_paths(checkpoint)[0]), framework="pt") as f:
        weight = f.get_tensor("model.layers.0.mlp.up_proj.weight").float()
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
    assert torch.isfinite(weight).all() and 0 < weight.abs().max() < 1
    assert weight.std() > 0
    assert torch.equal(norm, torch.ones_like(norm))


def test_content_does_not_depend_on_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = synthetic.Spec("w", (300, 7))
    whole = synthetic.tensor_data(spec, 0)
    monkeypatch.setattr(synthetic, "CHUNK_ELEMENTS", 1000)
    assert len(list(synthetic.tensor_chunks(spec, 0))) == 3
    assert np.array_equal(synthetic.tensor_data(spec, 0), whole)


def test_cached_checkpoint_is_reused_not_rewritten(tmp_path: Path) -> None:
    first = synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path)
    stamp = (first / synthetic.INDEX_NAME).stat().st_mtime_ns
    calls: list[int] = []
    second = synthetic.synthetic_checkpoint(SIZE, cache_dir=tmp_path,
                                            on_progress=lambda done, total: calls.append(done))
    assert second == first and not calls
    assert (first / synthetic.INDEX_NAME).stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob(".writing-*"))


@pytest.mark.parametrize("size", [1_000_000, 64_000_000, 1000**3, 6 * 1000**3])
def test_sizes_scale_the_model_and_shards(size: int) -> None:
    config = synthetic.config_for(size)
    shards = synthetic.shard_specs(synthetic.tensor_specs(config))
    planned = synthetic.planned_bytes(size)
    assert config.layers >= (1 if size < 2_000_000 else synthetic.MIN_LAYERS)
    assert 2 <= len(shards) <= 8
    assert sum(s.nbytes for shard in shards for s in shard) == planned
    if size >= 64_000_000:
        assert 0.85 * size < planned < 1.15 * size


def test_cache_root_follows_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert synthetic.cache_root() == tmp_path / "weightlift"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert synthetic.cache_root() == Path.home() / ".cache" / "weightlift"


# ---------------------------------------------------------------------------------------------
# interleaving and statistics


def test_interleave_rotates_loaders_each_rep_and_covers_every_combination() -> None:
    runs = runner.interleave(["a", "b", "c"], ["to_cpu", "device"], ["cold", "warm"], 3)
    assert len(runs) == 3 * 2 * 2 * 3
    assert len(set(runs)) == len(runs)
    first = [r.loader for r in runs if r.scenario == "to_cpu" and r.cache == "cold"]
    assert first == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # every rep finishes before the next starts: a loader's runs are spread over the session
    assert [r.rep for r in runs] == sorted(r.rep for r in runs)
    assert runs[:6] == [Run(x, "to_cpu", c, 0) for c in ("cold", "warm") for x in "abc"]


def test_summarize_gives_min_median_and_skips_missing() -> None:
    summary = summarize([3.0, None, 1.0, 10.0, 2.0])
    assert summary is not None
    assert (summary.min, summary.median, summary.max, summary.n) == (1.0, 2.5, 10.0, 4)
    assert summarize([None]) is None
    assert most_common(["direct", None, "mmap", "direct"]) == "direct"
    assert most_common([None]) is None


def _result(loader: str, seconds: float | None, status: str = "ok", **extra: object
            ) -> RunResult:
    return RunResult(loader, "to_cpu", "cold", 0, status, seconds=seconds, bytes=10**9,
                     **extra)  # type: ignore[arg-type]


def test_rows_summarize_runs_per_loader_and_report_oom() -> None:
    runs = [_result("weightlift auto", 1.0, peak_memory=100, strategy="direct", reason="cold"),
            _result("weightlift auto", 2.0, peak_memory=300, strategy="direct", reason="cold"),
            _result("weightlift auto", 4.0, peak_memory=200, strategy="mmap", reason="warm"),
            _result("peer", None, "oom-killed", peak_memory=1000),
            _result("peer", 0.5, peak_memory=900)]
    rows = {row.loader: row for row in report.summarize_runs(runs)}
    auto = rows["weightlift auto"]
    assert auto.status == "ok" and auto.runs == 3
    assert auto.seconds is not None and (auto.seconds.min, auto.seconds.median) == (1.0, 2.0)
    assert auto.gbps is not None and auto.gbps.max == pytest.approx(1.0)
    assert auto.peak_memory is not None and auto.peak_memory.median == 200
    assert auto.strategy == "direct"
    peer = rows["peer"]
    assert peer.status == "OOM-killed 1/2"
    assert peer.seconds is not None and peer.seconds.n == 1
    assert peer.peak_memory is not None and peer.peak_memory.max == 900  # killed: the limit
    text = report.markdown(list(rows.values()))
    assert "weightlift auto → direct" in text and "OOM-killed 1/2" in text
    assert "**to_cpu, cold**" in text


# ---------------------------------------------------------------------------------------------
# memory accounting and child outcomes (fakes for what the machine would say)


def test_cgroup_peak_is_taken_above_the_interpreter_baseline() -> None:
    assert runner.peak_memory({"cgroup_baseline": 300, "sampled_peak": 5}, 1300) == \
        (1000, "cgroup")
    assert runner.peak_memory(None, 2000) == (2000, "cgroup")  # killed child: no baseline
    memory, source = runner.peak_memory({"sampled_peak": 42}, None)
    assert memory == 42 and "sampled" in source
    assert runner.peak_memory(None, None) == (None, "")


def test_child_outcomes_are_classified() -> None:
    assert runner.classify(0, 0, {"status": "ok"}) == "ok"
    assert runner.classify(-9, 1, None) == "oom-killed"
    assert runner.classify(-9, 0, None) == "oom-killed"
    assert runner.classify(1, 1, {"status": "failed"}) == "oom-killed"
    assert runner.classify(1, 0, {"status": "failed"}) == "failed"
    assert runner.classify(1, 0, None) == "failed"


def test_last_json_line_ignores_library_chatter() -> None:
    out = "INFO streaming\n{not json\n{\"status\": \"ok\", \"seconds\": 1}\n"
    assert runner.last_json_line(out) == {"status": "ok", "seconds": 1}
    assert runner.last_json_line("nothing here") is None


def test_sampler_tracks_the_peak_of_anon_plus_cache() -> None:
    samples = iter([(100, 50), (400, 80), (120, 300), (110, 60)])
    sampler = child.Sampler([], interval=3600, probe=lambda: next(samples))
    sampler.sample()
    sampler.sample()
    memory = sampler.stop()
    assert memory["sampled_peak"] == 480 - 150
    assert memory["cache_peak"] == 300 - 50


def test_without_sampling_only_the_rss_high_water_mark_is_reported() -> None:
    def probe() -> tuple[int, int]:
        raise AssertionError("a cgroup measures memory: no sampling wanted")

    memory = child.Sampler([], sample=False, probe=probe).stop()
    assert "sampled_peak" not in memory and "rss_growth" in memory


def test_auto_choice_is_asked_before_the_clock_and_follows_the_cache(checkpoint: Path) -> None:
    files = [str(p) for p in synthetic.shard_paths(checkpoint)]
    job = Job(str(checkpoint), tuple(files), "to_cpu", "cpu")
    auto = LOADERS["weightlift auto"].choice
    assert auto is not None
    runner.set_cache(files, "warm")
    assert auto(job)[0] == "mmap"
    runner.set_cache(files, "cold")
    strategy, reason = auto(job)
    assert strategy in ("direct", "stream") and "O_DIRECT" in reason
    # asking read the headers, not the tensors
    assert (runner.resident(files) or 0) < 0.1 * synthetic.planned_bytes(SIZE)
    direct = LOADERS["weightlift direct"].choice
    assert direct is not None and direct(job) == ("direct", "requested")


def test_memory_limit_without_a_cgroup_is_an_error(monkeypatch: pytest.MonkeyPatch,
                                                   checkpoint: Path) -> None:
    from weightlift import probes
    from weightlift.errors import WeightliftError

    monkeypatch.setattr(probes.MemoryGroup, "available",
                        staticmethod(lambda: (False, "no hierarchy (test)")))
    settings = runner.Settings(str(checkpoint), memory_limit=1 << 30)
    with pytest.raises(WeightliftError, match="no hierarchy"):
        runner.cgroup_usable(settings)
    assert not runner.cgroup_usable(runner.Settings(str(checkpoint)))


def test_cache_states_are_set_before_each_run(checkpoint: Path) -> None:
    files = [str(p) for p in synthetic.shard_paths(checkpoint)]
    runner.set_cache(files, "warm")
    assert runner.resident(files) == sum(Path(f).stat().st_size for f in files)
    runner.set_cache(files, "cold")
    assert runner.resident(files) == 0


@pytest.mark.parametrize("folios", ["large", "small", "as-is"])
def test_a_warm_state_in_either_folio_size_holds_the_whole_checkpoint(checkpoint: Path,
                                                                      folios: str) -> None:
    """``set_folios`` leaves every page cached (``small`` waits for the reads WILLNEED only
    submitted), whatever folios hold them."""
    files = [str(p) for p in synthetic.shard_paths(checkpoint)]
    runner.set_cache(files, "cold")
    runner.set_cache(files[:1], "warm")  # as-is must read in what is missing
    runner.set_folios(files, folios)
    assert runner.resident(files) == sum(Path(f).stat().st_size for f in files)
    assert runner.cachestat_seconds(files) > 0
    with pytest.raises(ValueError, match="unknown folios 'huge'"):
        runner.set_folios(files, "huge")


# ---------------------------------------------------------------------------------------------
# loaders and the child, in process (fast) and as a real child (once)


@pytest.mark.parametrize(("name", "scenario"), [(n, s) for n in LOADERS for s in LOADERS[n].scenarios
                                               if LOADERS[n].kind != "reference"
                                               and "safetensors" in LOADERS[n].formats])
def test_every_loader_returns_the_safetensors_bytes(name: str, scenario: str,
                                                    checkpoint: Path) -> None:
    why = LOADERS[name].unavailable()
    if why is not None:
        pytest.skip(why)
    files = tuple(str(p) for p in synthetic.shard_paths(checkpoint))
    job = Job(str(checkpoint), files, scenario, "cpu")
    result = child.measure(job, name, verify=True)
    assert result["status"] == "ok"
    assert result["bytes"] == synthetic.planned_bytes(SIZE)
    # The first tensor came out during the load: time to first tensor is part of the load's time.
    assert 0 <= result["first"] <= result["seconds"]


def test_verification_catches_wrong_bytes(checkpoint: Path) -> None:
    files = [str(p) for p in synthetic.shard_paths(checkpoint)]
    verify = child.Verify(files)
    with safe_open(files[0], framework="pt") as f:
        name = next(iter(f.keys()))
        tensor = f.get_tensor(name).clone()
    tensor.view(-1)[0] += 1
    with pytest.raises(AssertionError, match="bytes differ"):
        verify(name, tensor)
    with pytest.raises(AssertionError, match="missing"):
        verify.finish()


def test_the_reference_reads_what_safetensors_reads(checkpoint: Path) -> None:
    """The bench's reference (the header parsed with struct + json, bytes read with preads) agrees
    with the safetensors package on every tensor: dtype, shape and bytes."""
    files = [str(p) for p in synthetic.shard_paths(checkpoint)]
    verify = child.Verify(files)
    seen = 0
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                want, tensor = verify.where[name], f.get_tensor(name)
                assert want.path == path
                assert parse_dtype(want.dtype) == tensor.dtype
                assert want.shape == tuple(tensor.shape)
                assert bytes(child.read_range(want, name)) == \
                    tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
                seen += 1
    assert seen == len(verify.where) == len(synthetic.tensor_specs(synthetic.config_for(SIZE)))


def without(tmp_path: Path, *modules: str) -> dict[str, str]:
    """An environment in which ``modules`` cannot be imported, in every process started from it
    (as where they are not installed: ``find_spec`` finds nothing, ``import`` fails)."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{name!r}] = None\n" for name in modules))
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(site), *filter(None, [os.environ.get("PYTHONPATH")])])}


WITHOUT_SAFETENSORS = """
import importlib.util, json, sys
import torch
import weightlift
from weightlift.bench import child
from weightlift.bench.loaders import LOADERS, Job, Loader

assert importlib.util.find_spec("safetensors") is None
source, files = sys.argv[1], tuple(sys.argv[2:])
out = {"measured": child.measure(Job(source, files, "to_cpu", "cpu"), "weightlift auto",
                                 verify=True)["status"]}

def corrupt(job):
    for i, (name, tensor) in enumerate(weightlift.stream(job.source)):
        if i == 3:
            tensor = tensor.clone()
            tensor.reshape(-1).view(torch.uint8)[-1] ^= 1
        yield name, tensor

LOADERS["corrupt"] = Loader("corrupt", "weightlift", corrupt)

def outcome(call):
    try:
        call()
        return "ok"
    except AssertionError as exc:
        return str(exc)

out["corrupt load"] = outcome(lambda: child.measure(Job(source, files, "device", "cpu"),
                                                    "corrupt", verify=True))
name, tensor = next(iter(weightlift.load(files[0]).items()))
verify = child.Verify(files)
out["retyped"] = outcome(lambda: verify(name, tensor.view(torch.int16)))
out["reshaped"] = outcome(lambda: verify(name, tensor.reshape(-1)))
out["missing"] = outcome(verify.finish)
out["safetensors imported"] = sys.modules.get("safetensors") is not None
print(json.dumps(out))
"""


def test_verification_needs_no_optional_package(checkpoint: Path, tmp_path: Path) -> None:
    """With safetensors unimportable, a good load verifies and corrupted ones are caught."""
    files = [str(p) for p in synthetic.shard_paths(checkpoint)]
    done = subprocess.run([sys.executable, "-c", WITHOUT_SAFETENSORS, str(checkpoint), *files],
                          capture_output=True, text=True, env=without(tmp_path, "safetensors"))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["measured"] == "ok"
    assert "bytes differ from" in out["corrupt load"]
    assert "torch.int16" in out["retyped"] and "torch.bfloat16" in out["retyped"]
    assert "!=" in out["reshaped"]
    assert "tensors missing" in out["missing"]
    assert out["safetensors imported"] is False


def test_bench_measures_and_verifies_on_a_base_install(checkpoint: Path, tmp_path: Path) -> None:
    """``weightlift bench`` where only the core dependencies are installed: every row verified
    and measured, no 'verification failed'."""
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "weightlift", "bench", str(checkpoint),
                           "--strategies", "auto,mmap", "--scenario", "device", "--cache", "cold",
                           "--reps", "1", "--no-raw", "--json", str(out)],
                          capture_output=True, text=True,
                          env=without(tmp_path, "safetensors", "matplotlib"))
    assert done.returncode == 0, done.stderr
    assert "verification failed" not in done.stdout
    data = json.loads(out.read_text())
    assert {v["loader"]: v["result"] for v in data["verified"]} == \
        {"weightlift auto": "ok", "weightlift mmap": "ok"}
    assert data["unverified"] is None
    assert [(r["loader"], r["status"]) for r in data["runs"]] == \
        [("weightlift auto", "ok"), ("weightlift mmap", "ok")]
    assert "device, cold" in done.stdout and "weightlift mmap" in done.stdout


def test_peers_an_extra_brings_are_named_in_one_line(checkpoint: Path) -> None:
    why = "{} is not installed (pip install 'weightlift[bench]')"
    settings = runner.Settings(str(checkpoint))
    session = runner.Session(settings, unavailable={
        "safetensors load_file": why.format("safetensors"),
        "safetensors pread": why.format("safetensors"),
        "fastsafetensors": why.format("fastsafetensors"),
        "raw O_DIRECT read": "this platform has no O_DIRECT"})
    assert report.unavailable_lines(session) == [
        "raw O_DIRECT read: not run (this platform has no O_DIRECT)",
        "not installed here, not run: safetensors load_file, safetensors pread, fastsafetensors "
        "(pip install 'weightlift[bench]')"]
    session.unverified = "GGUF is checked against gguf-py's reader: pip install 'weightlift[bench]'"
    assert report.unavailable_lines(session)[-1] == f"bytes not verified: {session.unverified}"


def test_gguf_without_its_reference_is_measured_unverified_and_says_so(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    assert "weightlift[bench]" in str(runner.reference_missing(["model.gguf"]))
    assert runner.reference_missing(["model-00001-of-00002.safetensors"]) is None


@pytest.mark.parametrize("direct", [True, False])
def test_raw_reads_read_every_byte(checkpoint: Path, direct: bool) -> None:
    if direct and LOADERS[RAW].unavailable() is not None:
        pytest.skip(str(LOADERS[RAW].unavailable()))
    files = tuple(str(p) for p in synthetic.shard_paths(checkpoint))
    try:
        nbytes = raw_read(files, direct=direct, block=1 << 20, in_flight=4)
    except OSError as exc:
        pytest.skip(f"the file system refuses O_DIRECT: {exc}")
    assert nbytes == sum(Path(f).stat().st_size for f in files)


def test_device_scenario_copies_into_one_preallocated_buffer() -> None:
    sink = child.Scratch(16)
    sink("a", torch.arange(4, dtype=torch.int32))
    sink("b", torch.tensor([7], dtype=torch.uint8))
    assert sink.bytes == 17
    assert sink.buffer[:1].item() == 7 and sink.buffer[4:8].view(torch.int32).item() == 1


def test_peers_are_listed_and_missing_ones_say_how_to_install(monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    import importlib.util

    assert set(peer_loaders()) >= {"safetensors load_file", "safetensors safe_open",
                                   "safetensors pread", "runai-model-streamer",
                                   "fastsafetensors"}
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastsafetensors" else real(name, *a))
    assert "weightlift[bench]" in str(LOADERS["fastsafetensors"].unavailable())


def test_bench_cli_writes_table_json_markdown_and_plot(checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench.json"
    md, png = tmp_path / "bench.md", tmp_path / "bench.png"
    assert main(["bench", str(checkpoint), "--strategies", "auto", "--scenario", "device",
                 "--cache", "cold", "--reps", "1", "--json", str(out), "--markdown", str(md),
                 "--plot", str(png)]) == 0
    data = json.loads(out.read_text())
    loaders = {run["loader"] for run in data["runs"]}
    assert "weightlift auto" in loaders
    assert all(run["status"] == "ok" for run in data["runs"])
    assert {v["loader"]: v["result"] for v in data["verified"]}["weightlift auto"] == "ok"
    assert data["checkpoint"]["bytes"] == synthetic.planned_bytes(SIZE)
    assert data["machine"]["cores"] >= 1
    assert "weightlift auto →" in md.read_text()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "device, cold" in capsys.readouterr().out


def test_bench_rejects_unknown_scenarios() -> None:
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--scenario", "to_gpu"])
    assert exc.value.code == 2


def test_runs_wait_until_freed_memory_has_settled(tmp_path: Path) -> None:
    """The counter of memory handed back to the hypervisor is polled until it stops moving."""
    counter = tmp_path / "reported_kib"
    counter.write_text("100\n")
    now = [0.0]
    bumps = {0.5: "200\n", 1.0: "300\n"}  # returned in two bursts, then quiet

    def sleep(seconds: float) -> None:
        now[0] = round(now[0] + seconds, 3)
        if now[0] in bumps:
            counter.write_text(bumps[now[0]])

    waited = runner.settle_reported_memory(quiet=2.5, path=counter, clock=lambda: now[0],
                                           sleep=sleep)
    assert waited == pytest.approx(3.5)  # quiet for 2.5 s after the last burst at 1.0 s
    assert runner.settle_reported_memory(path=tmp_path / "absent") == 0.0  # bare metal: no wait
    counter.write_text("0\n")
    endless = iter(range(1, 10**6))

    def busy(seconds: float) -> None:
        now[0] = round(now[0] + seconds, 3)
        counter.write_text(f"{next(endless)}\n")

    now[0] = 0.0
    assert runner.settle_reported_memory(limit=15.0, path=counter, clock=lambda: now[0],
                                         sleep=busy) == pytest.approx(15.0)  # bounded
