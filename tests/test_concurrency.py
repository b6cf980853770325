"""Concurrency and interruption: many threads loading at once get exactly the right bytes, and a
load interrupted by KeyboardInterrupt or a ``stream()`` abandoned midway releases its reader
threads and descriptors at once."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift
from conftest import assert_same, random_tensor
from pagecache import evict
from test_faults import make_tensors, no_leaks, open_fds
from weightlift.io import STRATEGIES

STRATEGY_NAMES = ["mmap", "direct", "stream", "auto"]


@pytest.fixture(autouse=True)
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many blocks per file, so interruptions land mid-load."""
    for strategy in STRATEGIES.values():
        monkeypatch.setattr(strategy, "read_size", 256 << 10)


@pytest.fixture
def checkpoints(tmp_path: Path, llama_dir: Path, minilm_path: Path) -> dict[str, Path]:
    """Three different checkpoints: random bits, a sharded Llama, the real MiniLM model."""
    mixed = tmp_path / "mixed.safetensors"
    g = torch.Generator().manual_seed(3)
    save_file({"a": random_tensor((300, 301), torch.bfloat16, g),
               "b": random_tensor((1000,), torch.int64, g),
               "c": random_tensor((77, 3, 9), torch.float16, g),
               **make_tensors(5)}, mixed)
    return {"mixed": mixed, "llama": llama_dir, "minilm": minilm_path}


def expected_of(source: Path) -> dict[str, torch.Tensor]:
    if source.is_dir():
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(source.glob("*.safetensors")):
            state.update(load_file(shard))
        return state
    return load_file(source)


def test_many_threads_loading_the_same_and_different_checkpoints(checkpoints: dict[str, Path]
                                                                 ) -> None:
    expected = {name: expected_of(path) for name, path in checkpoints.items()}
    jobs = [(name, strategy, how) for name in checkpoints for strategy in STRATEGY_NAMES
            for how in ("load", "stream", "copy")]

    def run(job: tuple[str, str, str]) -> dict[str, torch.Tensor]:
        name, strategy, how = job
        source = checkpoints[name]
        if how == "load":
            return weightlift.load(source, strategy=strategy)
        if how == "stream":
            return dict(weightlift.stream(source, strategy=strategy, max_host_memory="4MiB"))
        # Copying through the ring of reused slots; float64 keeps every value exactly.
        return weightlift.load(source, strategy=strategy, dtype=torch.float64,
                               max_host_memory="4MiB")

    with no_leaks():  # once the results are dropped (mmap'ed tensors hold their mapping)
        with ThreadPoolExecutor(max_workers=12) as pool:
            results = list(pool.map(run, jobs))
        for (name, _, how), state in zip(jobs, results):
            want = expected[name]
            if how == "copy":
                want = {k: v.to(torch.float64) if v.is_floating_point() else v
                        for k, v in want.items()}
            assert_same(state, want)
        del results, state


def test_threads_sharing_one_open_checkpoint(checkpoints: dict[str, Path]) -> None:
    expected = expected_of(checkpoints["llama"])
    with weightlift.open(checkpoints["llama"]) as checkpoint:
        names = checkpoint.keys()
        work = [(name, strategy) for name in names for strategy in STRATEGY_NAMES]
        with ThreadPoolExecutor(max_workers=8) as pool:
            tensors = list(pool.map(lambda job: checkpoint.get_tensor(job[0], strategy=job[1]),
                                    work))
    for (name, _), tensor in zip(work, tensors):
        assert_same({name: tensor}, {name: expected[name]})


def reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("weightlift-read")]


@pytest.mark.parametrize("how", ["load", "stream", "copy"])
@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_keyboard_interrupt_from_progress_cleans_up(checkpoints: dict[str, Path], strategy: str,
                                                    how: str) -> None:
    source = checkpoints["mixed"]
    # Cold, so that every strategy has reads on the engine's threads (a cached checkpoint is
    # handed out from windows in the consumer's own thread, with no read in flight to interrupt).
    evict(source)
    calls = 0

    def interrupt(done: int, total: int) -> None:
        nonlocal calls
        calls += 1
        assert reader_threads(), "reads should be in flight when the user presses ^C"
        raise KeyboardInterrupt

    # Reader threads are the thread engine's; test_engines.py covers the io_uring engine's reads.
    options = {"strategy": strategy, "on_progress": interrupt, "engine": "threads"}
    with no_leaks():
        with pytest.raises(KeyboardInterrupt):
            if how == "load":
                weightlift.load(source, **options)
            elif how == "stream":
                for _ in weightlift.stream(source, max_host_memory="4MiB", **options):
                    pass
            else:
                weightlift.load(source, dtype=torch.float64, max_host_memory="4MiB", **options)
        assert reader_threads() == []  # gone when the exception arrives, not later
    assert calls == 1
    assert_same(weightlift.load(source, strategy=strategy), expected_of(source))


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_abandoning_a_stream_releases_everything_at_once(checkpoints: dict[str, Path],
                                                         strategy: str) -> None:
    source = checkpoints["llama"]
    expected = expected_of(source)
    fds_before = open_fds()
    with no_leaks():
        tensors = weightlift.stream(source, strategy=strategy, max_host_memory="4MiB",
                                    engine="threads")  # io_uring's: see test_engines.py
        name, tensor = next(tensors)
        assert_same({name: tensor}, {name: expected[name]})
        assert reader_threads() and len(open_fds()) > len(fds_before)
        tensors.close()
        assert reader_threads() == []
        del tensor  # a zero-copy (mmap) tensor holds its file's mapping while it lives
        assert open_fds() == fds_before


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_a_consumer_that_breaks_out_of_a_stream(checkpoints: dict[str, Path],
                                                strategy: str) -> None:
    source = checkpoints["llama"]
    fds_before = open_fds()
    with no_leaks():
        for index, (_, tensor) in enumerate(weightlift.stream(source, strategy=strategy)):
            if index == 2:
                break  # the for loop drops the generator: CPython closes it right here
        assert reader_threads() == []
        del tensor  # a zero-copy (mmap) tensor holds its file's mapping while it lives
        assert open_fds() == fds_before
