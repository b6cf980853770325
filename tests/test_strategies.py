"""Strategy behaviour: fallbacks, auto's reasons, the host-memory budget, the report."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pagecache
import weightlift
from conftest import assert_same, random_tensor
from weightlift import probes
from weightlift.budget import DEFAULT_CAP, default_budget, resolve_budget
from weightlift.io.auto import Facts, choose
from weightlift.read import ring_shape
from weightlift.io import make_strategy

GiB = 1 << 30


def facts(**changes: object) -> Facts:
    base = dict(device="cpu", copying=False, total_bytes=4 * GiB, resident_bytes=0,
                file_bytes=4 * GiB, available=16 * GiB, direct_refused=None)
    base.update(changes)
    return Facts(**base)  # type: ignore[arg-type]


def test_auto_prefers_mmap_for_a_cached_checkpoint() -> None:
    choice = choose(facts(resident_bytes=4 * GiB))
    assert choice.strategy == "mmap"
    assert "100% of the checkpoint is in the page cache" in choice.reason


def test_auto_prefers_direct_for_a_cold_checkpoint() -> None:
    choice = choose(facts())
    assert choice.strategy == "direct"
    assert "O_DIRECT works" in choice.reason


def test_auto_uses_stream_where_o_direct_is_refused() -> None:
    choice = choose(facts(direct_refused="tmpfs says no"))
    assert choice.strategy == "stream"
    assert "tmpfs says no" in choice.reason


def test_auto_streams_past_the_uncached_rest_when_it_exceeds_the_budget() -> None:
    """95% cached, but the 5% mmap would leave behind a stream() is larger than the budget."""
    cached = int(4 * GiB * 0.95)
    assert choose(facts(resident_bytes=cached, streaming=True, budget=64 << 20)).strategy == "direct"
    refused = choose(facts(resident_bytes=cached, streaming=True, budget=64 << 20,
                           direct_refused="no"))
    assert refused.strategy == "stream" and "beyond the host-memory budget" in refused.reason
    assert choose(facts(resident_bytes=cached, streaming=True, budget=1 * GiB)).strategy == "stream"
    assert choose(facts(resident_bytes=cached, budget=64 << 20)).strategy == "mmap"


@pytest.mark.parametrize("load", [dict(streaming=True), dict(copying=True, device="cuda"),
                                  dict(copying=True)])
def test_auto_maps_windows_of_a_cached_checkpoint_whose_consumer_copies(load: dict) -> None:
    """Zero-copy views of the whole files only where they are the result (a CPU ``load()``);
    a stream or a copying load gets views of windows mapped at most the budget at a time."""
    choice = choose(facts(resident_bytes=4 * GiB, budget=64 << 20, **load))
    assert choice.strategy == "stream"
    assert "views of windows" in choice.reason and "at most the budget" in choice.reason


def test_auto_reads_only_the_uncached_part_of_a_partly_cached_checkpoint() -> None:
    choice = choose(facts(resident_bytes=2 * GiB))
    assert choice.strategy == "direct"
    assert "50% of the checkpoint is in the page cache" in choice.reason
    assert "only the rest is read from disk" in choice.reason
    refused = choose(facts(resident_bytes=2 * GiB, direct_refused="tmpfs says no"))
    assert refused.strategy == "stream" and "tmpfs says no" in refused.reason


def test_auto_warns_when_the_result_cannot_fit() -> None:
    assert choose(facts(available=2 * GiB)).warning is not None
    assert choose(facts(available=2 * GiB, copying=True, device="cuda")).warning is None
    assert choose(facts()).warning is None


def test_budget_default_and_parsing() -> None:
    assert default_budget(24 * GiB) == DEFAULT_CAP
    assert default_budget(100 << 20) == 64 << 20
    assert default_budget(256 << 20) == 128 << 20
    assert default_budget(768 << 20) == 384 << 20
    assert default_budget(1536 << 20) == DEFAULT_CAP  # 512 MiB, capped at 512 MB
    assert default_budget(4 * GiB) == DEFAULT_CAP
    assert resolve_budget("512MB") == 512 * 1000**2
    assert resolve_budget(100 << 20) == 100 << 20
    with pytest.raises(ValueError, match="below the minimum"):
        resolve_budget("1KB")
    with pytest.raises(ValueError, match="invalid size"):
        resolve_budget("lots")


def test_ring_fits_the_budget() -> None:
    for name in ("direct", "stream", "mmap"):
        strategy = make_strategy(name, copying=True)
        for budget in (4 << 20, 32 << 20, 512 << 20, 8 << 30):
            slot, count = ring_shape(budget, strategy)
            assert count >= 2
            assert count * (slot + 3 * 4096) <= max(budget, 2 * (256 << 10) + 6 * 4096)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~96 MB on the repository's own file system (ext4 here), several tensors larger than 8 MiB."""
    gen = torch.Generator().manual_seed(5)
    tensors = {f"layers.{i}.weight": random_tensor((1536, 2048), torch.bfloat16, gen)
               for i in range(16)}
    tensors.update({f"layers.{i}.norm": random_tensor((2048,), torch.float32, gen)
                    for i in range(16)})
    path = tmp_path_factory.mktemp("strategies") / "model.safetensors"
    save_file(tensors, path)
    # Written back now: dirty pages survive an eviction, and a "cold" file still cached would be
    # mapped in windows rather than read (the test below measures the cold reading path).
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def test_direct_falls_back_to_stream_where_o_direct_is_refused(checkpoint: Path, no_direct_dir: Path) -> None:
    copy = no_direct_dir / "model.safetensors"
    shutil.copyfile(checkpoint, copy)
    reports: list[weightlift.LoadReport] = []
    with pytest.warns(RuntimeWarning, match="falling back to stream"):
        state = weightlift.load(copy, strategy="direct", on_report=reports.append)
    assert_same(state, load_file(copy))
    assert reports[0].strategy == "stream"
    assert "O_DIRECT" in reports[0].fallbacks[0]


def test_auto_explains_its_choice_where_o_direct_is_refused(checkpoint: Path, no_direct_dir: Path) -> None:
    copy = no_direct_dir / "model.safetensors"
    shutil.copyfile(checkpoint, copy)
    probes.evict(copy)  # ramfs/tmpfs pages cannot be evicted: the file stays "cached"
    reports: list[weightlift.LoadReport] = []
    weightlift.load(copy, on_report=reports.append)
    assert reports[0].strategy == "mmap"
    assert "page cache" in reports[0].reason
    facts = weightlift.io.auto.gather(weightlift.sources.resolve(copy).shards,
                                      total_bytes=1, device="cpu", copying=False)
    assert facts.direct_refused is not None and "O_DIRECT" in facts.direct_refused


def test_auto_on_a_cold_checkpoint_reads_around_the_cache(checkpoint: Path,
                                                          tmp_path: Path) -> None:
    # A fresh copy: pages some earlier test still maps could not be evicted.
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(checkpoint, copy)
    checkpoint = copy
    with weightlift.sources.resolve(checkpoint) as layout:
        if weightlift.io.auto.direct_refusal(layout.shards):
            pytest.skip("this file system refuses O_DIRECT")
    pagecache.evict(checkpoint)  # writes dirty pages back first: those cannot be evicted
    reports: list[weightlift.LoadReport] = []
    # A budget below the file's size: files within it take the small-file path (mapped).
    state = weightlift.load(checkpoint, on_report=reports.append, max_host_memory="32MiB")
    assert reports[0].strategy == "direct", reports[0].reason
    # Only the header's read (and its read-ahead, waited for) may have been cached.
    assert pagecache.settled_bytes(checkpoint) < 1 << 20
    assert_same(state, load_file(checkpoint))


def test_named_mmap_hands_out_views_of_the_one_populated_mapping(checkpoint: Path,
                                                                  tmp_path: Path) -> None:
    """A cold ``strategy="mmap"`` CPU load: every tensor is a view of one private mapping of the
    file, populated during the load (its pages mapped, so the first use faults none in), and no
    page of it copied to anonymous memory: the same memory safetensors' ``load_file`` maps."""
    copy = tmp_path / "model.safetensors"  # a fresh copy, so that it can be evicted
    shutil.copyfile(checkpoint, copy)
    pagecache.evict(copy)
    state = weightlift.load(copy, strategy="mmap")
    (lo, hi, rss, anonymous), = pagecache.file_mappings(copy)
    assert hi - lo >= copy.stat().st_size
    starts = [tensor.data_ptr() for tensor in state.values()]
    ends = [tensor.data_ptr() + tensor.nbytes for tensor in state.values()]
    assert lo <= min(starts) and max(ends) <= hi
    data = (max(ends) - min(starts)) // probes.PAGE_SIZE * probes.PAGE_SIZE
    assert rss >= data - probes.PAGE_SIZE, (rss, data)  # populated, not left to first use
    assert anonymous == 0
    assert_same(state, load_file(copy))


def test_report_measures_the_load(checkpoint: Path) -> None:
    reports: list[weightlift.LoadReport] = []
    progress: list[tuple[int, int]] = []
    weightlift.load(checkpoint, strategy="stream", on_report=reports.append,
                    on_progress=lambda done, total: progress.append((done, total)))
    report = reports[0]
    total = checkpoint.stat().st_size
    assert report.bytes == progress[-1][0] == progress[-1][1]
    assert total - (1 << 20) < report.bytes <= total
    assert report.seconds > 0 and report.gbps > 0
    assert report.time_to_first_tensor is not None
    assert report.time_to_first_tensor <= report.seconds
    # A CPU load keeps the result: RSS grows by about the checkpoint size.
    assert report.rss_growth is not None and report.rss_growth >= report.bytes * 0.9
    assert report.to_dict()["strategy"] == "stream"
    assert [done for done, _ in progress] == sorted(done for done, _ in progress)


BOUNDED_STREAM = textwrap.dedent("""
    import json, sys, weightlift
    from weightlift import probes
    path, strategy, budget = sys.argv[1], sys.argv[2], int(sys.argv[3])
    probes.evict(path)
    reports = []
    for name, tensor in weightlift.stream(path, strategy=strategy, max_host_memory=budget,
                                          device="cpu", dtype="float32" if strategy == "stream2" else None,
                                          on_report=reports.append):
        tensor.sum()  # the consumer uses each tensor and drops it
    r = reports[0]
    print(json.dumps({"rss_growth": r.rss_growth, "cache_peak_growth": r.cache_peak_growth,
                      "cache_growth": r.cache_growth, "bytes": r.bytes}))
""")


@pytest.mark.parametrize("strategy", ["stream", "direct"])
def test_streaming_stays_within_the_budget(checkpoint: Path, strategy: str) -> None:
    """A checkpoint several times the budget passes through with host memory bounded by it."""
    import json

    budget = 24 << 20
    out = subprocess.run([sys.executable, "-c", BOUNDED_STREAM, str(checkpoint), strategy,
                          str(budget)], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout)
    assert measured["bytes"] > 3 * budget
    margin = 16 << 20  # one 6 MiB tensor being summed, allocator slack
    assert measured["rss_growth"] <= budget + margin, measured
    # Pages of reads still in flight (16 × up to 2 MiB) and the kernel's read-ahead are cached
    # until each read returns and drops them; a stream that kept the cache would reach ~96 MiB.
    in_flight = 32 << 20
    assert measured["cache_peak_growth"] <= budget + margin + in_flight, measured
    assert measured["cache_growth"] <= 1 << 20, measured


def test_stream_keeps_what_was_cached_before_and_drops_what_it_read(checkpoint: Path,
                                                                   tmp_path: Path) -> None:
    copy = tmp_path / "model.safetensors"
    shutil.copyfile(checkpoint, copy)
    pagecache.evict(copy)
    half = copy.stat().st_size // 2
    # Warm the first half without read-ahead, so nothing is still arriving when "before" is
    # measured (a plain read's read-ahead once landed 8 MiB after it and failed this test).
    pagecache.warm(copy, 0, half)
    before = pagecache.settled_bytes(copy)
    assert before >= half
    state = weightlift.load(copy, strategy="stream")
    after = pagecache.settled_bytes(copy)
    assert abs(after - before) <= 1 << 20, (before, after)
    assert_same(state, load_file(copy))
