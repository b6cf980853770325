"""The small-file path: a CPU load of files within the host-memory budget maps them, cached or
not, with nothing the larger paths need (no O_DIRECT probe, no thread, no budget arithmetic)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pagecache
import weightlift
from conftest import assert_same, random_tensor
from weightlift.io import auto, base
from weightlift.io.mapped import MADV_POPULATE_READ, MmapStrategy

#: About the size of the file below (a little over 4 MiB, so a 4 MiB budget is too small).
SIZE = 4 << 20


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(25)
    tensors = {f"lora.{i}.weight": random_tensor((64, 2100 + i), torch.bfloat16, gen)
               for i in range(16)}
    tensors["norm"] = random_tensor((777,), torch.float32, gen)  # odd sizes: unaligned views
    path = tmp_path / "adapter.safetensors"
    save_file(tensors, path)
    pagecache.sync(path)
    return path


class Calls:
    """Records every ``MADV_POPULATE_READ`` the mapped strategy asks for, and every thread."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.populated: list[int] = []
        self.threads: set[str] = set()
        real = base.madvise

        def madvise(address: int, length: int, advice: int) -> None:
            if advice == MADV_POPULATE_READ:
                self.populated.append(length)
            real(address, length, advice)

        monkeypatch.setattr(base, "madvise", madvise)

    def progress(self, done: int, total: int) -> None:
        self.threads.update(t.name for t in threading.enumerate())


def load(path: Path, calls: Calls, **options: object) -> tuple[dict[str, torch.Tensor],
                                                              weightlift.LoadReport]:
    reports: list[weightlift.LoadReport] = []
    state = weightlift.load(path, on_report=reports.append, on_progress=calls.progress,
                            **options)  # type: ignore[arg-type]
    return state, reports[0]


def test_a_cached_small_file_is_mapped_as_it_is(small_file: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pagecache.warm(small_file, 0, small_file.stat().st_size)
    calls = Calls(monkeypatch)
    state, report = load(small_file, calls)
    assert report.strategy == "mmap" and report.engine == "inline", report
    assert "within the host-memory budget" in report.reason
    assert calls.populated == []  # every page was cached: nothing to read, nothing populated
    assert not any(name.startswith(("weightlift-read", "weightlift-monitor"))
                   for name in calls.threads), calls.threads
    assert report.peak_rss is not None and report.cache_before == report.cache_after
    assert_same(state, load_file(small_file))


def test_a_cold_small_file_is_read_through_the_mapping_and_stays_within_the_budget(
        small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pagecache.evict(small_file)
    calls = Calls(monkeypatch)
    state, report = load(small_file, calls)
    assert report.strategy == "mmap" and report.engine == "inline", report
    # What WILLNEED had not brought in yet was populated (an unreadable page is a ReadError,
    # not SIGBUS); never more than the file.
    assert sum(calls.populated) <= small_file.stat().st_size
    assert report.cache_after is not None and report.cache_after <= small_file.stat().st_size
    assert_same(state, load_file(small_file))


def test_pages_not_cached_are_populated_and_cached_ones_are_not(
        small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Without the read-ahead advice nothing arrives on its own: the missing runs are exactly
    # what the populates must bring in.
    monkeypatch.setattr(MmapStrategy, "expect", lambda self, shard, start, end: None)
    size = small_file.stat().st_size
    pagecache.evict(small_file)
    calls = Calls(monkeypatch)
    state, _ = load(small_file, calls)
    assert size - (1 << 20) <= sum(calls.populated) <= size  # all but the header's read-ahead
    assert_same(state, load_file(small_file))
    del state
    pagecache.evict(small_file)
    half = SIZE // 2 // pagecache.PAGE * pagecache.PAGE
    pagecache.warm(small_file, 0, half)
    calls = Calls(monkeypatch)
    state, _ = load(small_file, calls)
    assert 0 < sum(calls.populated) <= size - half  # the cached half is left as it is
    assert_same(state, load_file(small_file))


def test_a_stream_and_a_selection_take_the_small_path_too(small_file: Path) -> None:
    pagecache.evict(small_file)
    reference = load_file(small_file)
    reports: list[weightlift.LoadReport] = []
    streamed = dict(weightlift.stream(small_file, on_report=reports.append))
    assert reports[0].engine == "inline"
    assert_same(streamed, reference)
    chosen = weightlift.load(small_file, keys=["norm", "lora.3.weight"])
    assert_same(chosen, {k: reference[k] for k in ("norm", "lora.3.weight")})
    with weightlift.open(small_file) as ckpt:
        assert_same({"w": ckpt.get_tensor("lora.7.weight")}, {"w": reference["lora.7.weight"]})


@pytest.mark.parametrize("options", [dict(max_host_memory="4MiB"), dict(dtype=torch.float32),
                                     dict(strategy="mmap"), dict(engine="threads")],
                         ids=["over-the-budget", "converting", "named-strategy", "named-engine"])
def test_the_general_rules_apply_where_the_small_path_does_not(
        small_file: Path, monkeypatch: pytest.MonkeyPatch, options: dict[str, object]) -> None:
    calls = Calls(monkeypatch)
    state, report = load(small_file, calls, **options)
    assert "within the host-memory budget" not in report.reason
    reference = load_file(small_file)
    if "dtype" in options:
        reference = {k: v.float() for k, v in reference.items()}
    assert_same(state, reference)


def test_small_asks_for_the_default_budget_only_above_its_floor(small_file: Path) -> None:
    asked: list[int] = []

    def default() -> int:
        asked.append(1)
        return 1 << 30

    with weightlift.sources.resolve(small_file) as layout:
        choice = auto.small(layout.shards, device="cpu", copying=False, budget=None,
                            default=default)
        assert choice is not None and choice.small and asked == []
        assert auto.small(layout.shards, device="cpu", copying=True, budget=None) is None
        assert auto.small(layout.shards, device="meta", copying=False, budget=None) is None
        assert auto.small(layout.shards, device="cpu", copying=False, budget=1 << 20) is None


def test_a_warm_stream_is_mapped_in_windows_and_a_load_runs_inline(
        small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Over its budget (4 MiB): auto's general rules, which stream a cached checkpoint as views
    # of windows of the file (issue 24): nothing read, at most the budget mapped at once.
    pagecache.warm(small_file, 0, small_file.stat().st_size)
    calls = Calls(monkeypatch)
    reports: list[weightlift.LoadReport] = []
    streamed = dict(weightlift.stream(small_file, max_host_memory="4MiB",
                                      on_report=reports.append))
    report = reports[0]
    reference = load_file(small_file)
    largest = max(t.numel() * t.element_size() for t in reference.values())
    assert report.strategy == "stream" and report.bytes_mapped > 0, report
    # A stream holds at most its budget plus the tensor its consumer has (and page rounding).
    assert report.mapped_peak <= (4 << 20) + largest + 2 * 4096, report
    assert_same(streamed, reference)
    # load() leaves cached pages to the first touch, and runs inline.
    calls.populated.clear()
    state, report = load(small_file, calls, max_host_memory="4MiB")
    assert report.engine == "inline" and calls.populated == []
    assert_same(state, load_file(small_file))


def test_mapping_ahead_skips_the_first_tensor_only(small_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    pagecache.warm(small_file, 0, small_file.stat().st_size)
    calls = Calls(monkeypatch)
    with weightlift.sources.resolve(small_file) as layout:
        strategy = MmapStrategy(skip_cached=True, known_cached=True)
        strategy.prepare(layout.shards)
        strategy.map_ahead, strategy.lazy_until = True, (0, 3 * pagecache.PAGE)
        strategy.populate(0, 0, 3 * pagecache.PAGE)          # the first tensor: left lazy
        assert calls.populated == []
        strategy.populate(0, 3 * pagecache.PAGE, 5 * pagecache.PAGE)
        assert calls.populated == [2 * pagecache.PAGE]
        strategy.map_ahead = False                           # load(): nothing mapped ahead
        strategy.populate(0, 5 * pagecache.PAGE, 9 * pagecache.PAGE)
        assert calls.populated == [2 * pagecache.PAGE]
        strategy.close()


def test_a_cold_small_file_is_read_ahead_whole_with_its_header(
        small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from weightlift.sources import local

    advised: list[tuple[int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_WILLNEED:
            advised.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(local.os, "posix_fadvise", spy)
    size = small_file.stat().st_size
    pagecache.evict(small_file)
    weightlift.sources.resolve(small_file, read_ahead=size).close()
    if not hasattr(os, "RWF_NOWAIT"):
        pytest.skip("no RWF_NOWAIT here: files are not read ahead")
    assert advised == [(0, size)]
    pagecache.wait_for(small_file, lambda now: now.all(), "the file read ahead")
    advised.clear()
    weightlift.sources.resolve(small_file, read_ahead=size).close()  # cached: nothing to ask
    pagecache.evict(small_file)
    weightlift.sources.resolve(small_file, read_ahead=size - 1).close()  # larger than allowed
    weightlift.sources.resolve(small_file).close()  # not asked for (e.g. open())
    assert advised == []


def test_get_tensor_maps_the_files_once_and_covers_each_tensor_when_asked(
        small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``open(...).get_tensor`` on the small path maps the files at its first call and keeps
    them until ``close``; each call maps in that tensor's pages unless every one is cached *now*
    (a file evicted after the first call is populated again, not left to a first touch)."""
    # Copies: safetensors' own tensors would keep the file's pages mapped (then not evictable).
    reference = {name: tensor.clone() for name, tensor in load_file(small_file).items()}
    names = list(reference)
    pagecache.warm(small_file, 0, small_file.stat().st_size)
    calls = Calls(monkeypatch)
    with weightlift.open(small_file) as ckpt:
        first = ckpt.get_tensor(names[0])
        reader = ckpt._mapped
        assert isinstance(reader, MmapStrategy)
        assert calls.populated == []  # cached: a view, nothing populated
        pagecache.evict(small_file)
        second = ckpt.get_tensor(names[1])
        assert ckpt._mapped is reader  # mapped once
        nbytes = reference[names[1]].numel() * reference[names[1]].element_size()
        assert nbytes <= sum(calls.populated) <= nbytes + 2 * pagecache.PAGE
        with pytest.raises(weightlift.CheckpointError, match="no tensor named"):
            ckpt.get_tensor("missing")
        # Named strategies and other devices take a load's path, as before.
        named = ckpt.get_tensor(names[2], strategy="stream")
    assert ckpt._mapped is None
    assert_same({name: tensor for name, tensor in zip(names, (first, second, named))},
                {name: reference[name] for name in names[:3]})
    with pytest.raises(weightlift.WeightliftError):
        ckpt.get_tensor(names[0])  # closed
