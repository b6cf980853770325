"""Cached ranges served as views of mapped windows (``io/window.py``): loads whose consumer copies
and drops (``stream()``, ``load_into``, a device's copy path) copy straight out of the page cache,
with at most the budget of any file mapped at once.

Every load is compared bit for bit with what the safetensors package reads, with the checkpoint
cold, warm and half cached (every other 4 MiB); the tests wait until mincore shows the state they
set up (``pagecache``). Mappings are read from ``/proc/self/maps`` while the load runs.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import pagecache
import weightlift
from conftest import assert_same, random_tensor
from test_gpu_logic import RecordingSink
from test_window import mapped_bytes, steady_sampler
from weightlift.io import auto, make_strategy
from weightlift.io.window import Window
from weightlift.read import read_tensors
from weightlift.sources import resolve
from weightlift.sources.records import iter_entries

BUDGET = 16 << 20
STEP = 4 << 20
STATES = ["cold", "warm", "partly"]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~40 MiB: tensors of 1-3 MiB (below the budget), runs of small ones, odd sizes and dtypes."""
    gen = torch.Generator().manual_seed(24)
    tensors = {}
    for i in range(12):
        tensors[f"layers.{i}.w"] = random_tensor((700 + 37 * i, 1024), torch.bfloat16, gen)
        tensors[f"layers.{i}.norm"] = random_tensor((4099,), torch.float16, gen)
        tensors[f"layers.{i}.bias"] = random_tensor((1001,), torch.float32, gen)
        tensors[f"layers.{i}.idx"] = random_tensor((333,), torch.int64, gen)
    tensors["head"] = random_tensor((3000, 1000), torch.float32, gen)
    path = tmp_path_factory.mktemp("windowed") / "model.safetensors"
    save_file(tensors, path)
    return path


@pytest.fixture(params=STATES)
def checkpoint(request: pytest.FixtureRequest, written: Path, tmp_path: Path
               ) -> tuple[Path, str]:
    path = tmp_path / "model.safetensors"
    path.write_bytes(written.read_bytes())
    if request.param == "cold":
        pagecache.evict(path)
    elif request.param == "warm":
        pagecache.sync(path)
        pagecache.warm(path, 0, path.stat().st_size)
    else:
        with resolve(path) as layout:
            if auto.direct_refusal(layout.shards):
                pytest.skip("this file system refuses O_DIRECT")
        pagecache.evict_every_other(path, STEP)
    return path, request.param


def reference_of(path: Path, state: str) -> dict[str, torch.Tensor]:
    """What safetensors reads (copies: its mapping would keep pages from being evicted), with
    the page cache put back in ``state`` afterwards."""
    reference = {name: tensor.clone() for name, tensor in load_file(path).items()}
    if state == "cold":
        pagecache.evict(path)
    elif state == "partly":
        pagecache.evict_every_other(path, STEP)
    return reference


def check_report(report: weightlift.LoadReport, state: str) -> None:
    assert report.bytes_mapped + report.bytes_read == report.bytes
    assert report.mapped_peak <= BUDGET
    if state == "cold":
        assert report.bytes_mapped == 0
    elif state == "warm":
        assert report.bytes_mapped == report.bytes, report.to_dict()
    else:  # tensors inside the cached half mapped; the rest, and any across a run edge, read
        assert 0.05 * report.bytes < report.bytes_mapped < 0.6 * report.bytes, report.to_dict()


@pytest.mark.parametrize("strategy", ["auto", "direct"])
def test_stream_equals_safetensors(checkpoint: tuple[Path, str], strategy: str) -> None:
    path, state = checkpoint
    reports: list[weightlift.LoadReport] = []
    out = {name: tensor.clone() for name, tensor in
           weightlift.stream(path, strategy=strategy, max_host_memory=BUDGET,
                             on_report=reports.append)}
    check_report(reports[0], state)
    assert_same(out, load_file(path))


class Flat(torch.nn.Module):
    """A module whose parameters and buffers are named like the checkpoint's tensors."""

    def __init__(self, reference: dict[str, torch.Tensor], dtype: torch.dtype | None) -> None:
        super().__init__()
        for name, tensor in reference.items():
            owner = self
            *parents, leaf = name.split(".")
            for part in parents:
                if not hasattr(owner, part):
                    owner.add_module(part, torch.nn.Module())
                owner = getattr(owner, part)
            if tensor.is_floating_point():
                empty = torch.zeros(tensor.shape, dtype=dtype or tensor.dtype)
                owner.register_parameter(leaf, torch.nn.Parameter(empty, requires_grad=False))
            else:
                owner.register_buffer(leaf, torch.zeros_like(tensor))


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_load_into_equals_safetensors(checkpoint: tuple[Path, str], dtype: torch.dtype | None,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    path, state = checkpoint
    module = Flat(reference_of(path, state), dtype)
    reports: list[weightlift.LoadReport] = []
    run_load = weightlift.api.run_load

    def reported(*args, **kwargs):  # type: ignore[no-untyped-def]
        return run_load(*args, **kwargs, on_report=reports.append)

    monkeypatch.setattr(weightlift.api, "run_load", reported)
    weightlift.load_into(module, path, max_host_memory=BUDGET)
    assert len(reports) == 1
    check_report(reports[0], state)
    expected = {name: t.to(dtype) if dtype is not None and t.is_floating_point() else t
                for name, t in load_file(path).items()}
    assert_same(dict(module.state_dict()), expected)


class PageableSink(RecordingSink):
    """A device sink over ``FakeCuda`` (fences on a side stream) whose ring is pageable, as CPU
    torch cannot pin."""

    def slot(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        return super().slot(nbytes, pinned=False)

    def release_slots(self) -> None:
        self.fake.note("release_slots")


def test_a_device_copy_path_copies_out_of_windows(checkpoint: tuple[Path, str]) -> None:
    path, state = checkpoint
    reference = reference_of(path, state)
    destinations = {name: torch.zeros_like(t) for name, t in reference.items()}
    sink = PageableSink(destinations)
    with resolve(path) as layout:
        strategy = make_strategy("direct", copying=True, windows=True)
        strategy.prepare(layout.shards)
        try:
            out = dict((entry.name, tensor) for entry, tensor in read_tensors(
                layout, list(iter_entries(layout)), strategy, budget=BUDGET, sink=sink))
            if state != "cold":
                assert strategy.viewed > 0 and strategy.windows is not None
                assert 0 < strategy.windows.peak <= BUDGET
                assert strategy.windows.live == 0  # every window unmapped by the end
            else:
                assert strategy.viewed == 0
        finally:
            strategy.close()
    # One blocking fence per chunk, waited on before the chunk's window or slot was let go.
    assert sink.fake.calls("event.synchronize")
    assert_same(out, reference)


@pytest.fixture
def warm(written: Path, tmp_path: Path) -> Path:
    path = tmp_path / "model.safetensors"
    path.write_bytes(written.read_bytes())
    pagecache.sync(path)
    pagecache.warm(path, 0, path.stat().st_size)
    return path


def test_a_warm_stream_never_maps_more_than_the_budget(warm: Path) -> None:
    path = warm
    reference = reference_of(path, "warm")
    seen: list[int] = []
    done = threading.Event()
    between: list[int] = []
    out = {}
    with steady_sampler(lambda: mapped_bytes(path)) as steady:

        def sample() -> None:
            while not done.is_set():
                if (value := steady()) is not None:
                    seen.append(value)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for name, tensor in weightlift.stream(path, max_host_memory=BUDGET):
                between.append(mapped_bytes(path))  # held: this tensor's window and read-ahead
                out[name] = tensor.clone()
                del tensor
        finally:
            done.set()
            sampler.join()
    assert_same(out, reference)
    assert max(between) > 0, "no window was mapped: nothing to check"
    assert max(between) <= BUDGET and max(seen) <= BUDGET, (max(between), max(seen))
    assert mapped_bytes(path) == 0  # every window unmapped once its tensors were dropped
    assert len(seen) > 1


def test_a_kept_tensor_stays_right_after_later_windows_are_unmapped(warm: Path) -> None:
    path = warm
    reference = reference_of(path, "warm")
    kept: dict[str, torch.Tensor] = {}
    mapped_later = []
    for index, (name, tensor) in enumerate(weightlift.stream(path, max_host_memory=BUDGET)):
        if index in (0, 5):
            kept[name] = tensor  # a view of its window, not a copy
        else:
            assert torch.equal(tensor.view(torch.uint8), reference[name].view(torch.uint8))
        mapped_later.append(mapped_bytes(path))
        del tensor
    assert_same(kept, {name: reference[name] for name in kept})
    # Only the windows of the kept tensors stay mapped; the budget bounded the rest.
    assert 0 < mapped_bytes(path) <= BUDGET
    assert max(mapped_later) <= 2 * BUDGET
    kept.clear()
    assert mapped_bytes(path) == 0


def test_a_cpu_load_keeps_its_zero_copy_views_of_the_whole_file(warm: Path) -> None:
    """``load()`` to CPU of a cached checkpoint: the result *is* the page cache (mmap)."""
    path = warm
    reports: list[weightlift.LoadReport] = []
    state = weightlift.load(path, on_report=reports.append)
    assert reports[0].strategy == "mmap"
    assert reports[0].bytes_mapped == reports[0].bytes
    assert mapped_bytes(path) >= path.stat().st_size // 4096 * 4096
    assert_same(state, load_file(path))


def test_residency_is_what_the_tests_set_up(checkpoint: tuple[Path, str]) -> None:
    path, state = checkpoint
    pages = pagecache.pages(path)
    expected = {"cold": 0.0, "warm": 1.0}.get(state, 0.5)
    assert abs(float(np.mean(pages)) - expected) < 0.1


@pytest.mark.parametrize("strategy", ["direct", "stream"])
def test_a_warm_stream_runs_in_the_consumers_thread(warm: Path, strategy: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Windows of cached pages are neither populated nor handed to worker threads: the
    consumer's copy maps their pages (as ``safetensors`` does), and a load that read nothing
    started no thread. Windows with pages to read populate them when handed out."""
    path = warm
    reference = reference_of(path, "warm")
    assert pagecache.pages(path).all()
    populated: list[tuple[int, int]] = []
    populate = Window.populate

    def recorded(self: Window, *args: int) -> None:
        populated.append((self.start, self.end))
        populate(self, *args)

    monkeypatch.setattr(Window, "populate", recorded)
    before = set(threading.enumerate())  # e.g. a read another test left blocked for good
    threads: set[str] = set()
    reports: list[weightlift.LoadReport] = []
    out = {}
    for name, tensor in weightlift.stream(path, strategy=strategy, max_host_memory=BUDGET,
                                          on_report=reports.append):
        threads.update(t.name for t in set(threading.enumerate()) - before)
        out[name] = tensor.clone()
        del tensor
    assert_same(out, reference)
    report = reports[0]
    assert report.bytes_mapped > 0, report.to_dict()
    assert populated == [], "a window of cached pages was populated"
    if report.bytes_read == 0:  # every range mapped (no page was evicted meanwhile)
        assert not threads, threads
