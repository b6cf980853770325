"""Tensor-parallel loading, run for real: 2 and 4 processes on CPU with the gloo backend.

Each group of processes runs every scenario once (starting processes is the slow part) and saves
what each rank got; the tests below compare that with slices of the full tensors as the
safetensors package loads them, and check who read which bytes.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import threading
import json
import os
import time
import traceback
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from weightlift.distributed import (
    Plan,
    RankFailed,
    Replicate,
    Skip,
    Split,
    llama_plan,
    load_sharded,
    stream_sharded,
)
from weightlift.distributed.direct import extents, gather
from weightlift.distributed.parts import normalize, part_in_rows
from weightlift.errors import PlacementError, ReadError
from weightlift.formats.records import DTYPES, TensorInfo
from weightlift.io.stream import StreamStrategy

#: The group's collective timeout: a hang would end here; a clean failure comes long before.
GROUP_TIMEOUT = timedelta(seconds=30)
#: The watchdog: every rank must have finished all scenarios by then.
DEADLINE = 150.0
#: 4 MiB, the smallest budget: collective chunks of ~800 KiB, so the 2 MiB tensors move in pieces.
BUDGET = 4 << 20

LAYERS = 2
HIDDEN, INTER, VOCAB, KV = 128, 256, 4096, 64


def llama_tensors() -> dict[str, torch.Tensor]:
    """Llama names and shapes (GQA: k/v narrower than q), mixed dtypes, random bits."""
    g = torch.Generator().manual_seed(7)

    def rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN),
               "lm_head.weight": rand(VOCAB, HIDDEN, dtype=torch.bfloat16),
               "model.norm.weight": rand(HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}"
        tensors.update({
            f"{p}.self_attn.q_proj.weight": rand(HIDDEN, HIDDEN, dtype=torch.float16),
            f"{p}.self_attn.k_proj.weight": rand(KV, HIDDEN, dtype=torch.float16),
            f"{p}.self_attn.v_proj.weight": rand(KV, HIDDEN, dtype=torch.float16),
            f"{p}.self_attn.o_proj.weight": rand(HIDDEN, HIDDEN, dtype=torch.float16),
            f"{p}.mlp.gate_proj.weight": rand(INTER, HIDDEN, dtype=torch.bfloat16),
            f"{p}.mlp.up_proj.weight": rand(INTER, HIDDEN, dtype=torch.bfloat16),
            f"{p}.mlp.down_proj.weight": rand(HIDDEN, INTER, dtype=torch.bfloat16),
            f"{p}.input_layernorm.weight": rand(HIDDEN),
            f"{p}.post_attention_layernorm.weight": rand(HIDDEN),
            f"{p}.self_attn.rotary_emb.inv_freq": rand(HIDDEN // 8),
        })
    tensors["model.step"] = torch.tensor(12345, dtype=torch.int64)  # 0-d, replicated
    return tensors


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two shards and an index, written by the safetensors package."""
    path = tmp_path_factory.mktemp("tp-llama")
    tensors = llama_tensors()
    names = list(tensors)
    halves = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(path / file))
        weight_map.update(dict.fromkeys(keys, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.fixture(scope="module")
def full(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The oracle: every tensor as the safetensors package loads it."""
    out: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


def llama_skipping_rotary(world: int) -> Plan:
    plan = llama_plan(world)
    plan.rules.insert(0, ("*.rotary_emb.inv_freq", Skip()))
    return plan


def custom_plan(name: str, info: TensorInfo, rank: int, world: int) -> Any:
    """A hand-written plan with everything a basic index can do: steps, ints, uneven parts."""
    if name.endswith("up_proj.weight"):
        return (slice(rank, None, world), slice(1, None, 3))   # interleaved rows, strided columns
    if name.endswith("input_layernorm.weight"):
        return (rank,)                                         # one element, a 0-d result
    if name.endswith("post_attention_layernorm.weight"):
        return () if rank == 0 else None                       # only rank 0
    if name == "lm_head.weight":
        return (slice(-100 * (rank + 1), None), slice(3, 70))  # overlapping tails
    if name.endswith("k_proj.weight"):
        return Split(0, uneven=True).index(info, rank, 3) if rank < 3 else None  # thirds
    return llama_skipping_rotary(world)(name, info, rank, world)


def expected_llama(full: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s part under the Llama plan, cut by torch itself."""
    out = {}
    for name, tensor in full.items():
        if "rotary_emb" in name:
            continue
        dim = None
        if any(p in name for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj",
                                   "embed_tokens", "lm_head")):
            dim = 0
        elif "o_proj" in name or "down_proj" in name:
            dim = 1
        out[name] = tensor if dim is None else torch.tensor_split(tensor, world, dim)[rank]
    return out


def expected_custom(full: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, tensor in full.items():
        info = TensorInfo(name, DTYPES["F32"], tuple(tensor.shape), 0, 0)
        index = custom_plan(name, info, rank, world)
        if index is not None:
            out[name] = tensor[index]
    return out


class RecordingStream(StreamStrategy):
    """``stream`` that notes every range it reads. With ``fail``, every read after the first
    raises (``"raise"``) or ends the process on the spot (``"exit"``).

    Reads are small, so every rank issues several, several at once."""

    read_size = 256 << 10

    def __init__(self, fail: str | None = None) -> None:
        super().__init__()
        self.fail = fail
        self.ranges: list[tuple[str, int, int]] = []
        self.calls = itertools.count()  # next() is atomic: reads run on several threads

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        first = next(self.calls) == 0
        if self.fail == "exit" and not first:
            os._exit(0)
        if self.fail == "raise" and not first:
            raise ReadError("injected failure", path=self.shards[shard].path)
        self.ranges.append((os.path.basename(self.shards[shard].path), start,
                            start + dest.numel()))
        super().read(shard, start, dest)


SCENARIOS: dict[str, dict[str, Any]] = {
    "direct": dict(mode="direct"),
    "direct_exact": dict(mode="direct", max_gap=0),
    "collective": dict(mode="collective", share="exchange"),
    "direct_custom": dict(mode="direct", custom=True),
    "collective_custom": dict(mode="collective", share="exchange", custom=True),
    # The ranks share one host's page cache (the default there): no strategy reads.
    "collective_page_cache": dict(mode="collective"),
    "collective_page_cache_custom": dict(mode="collective", custom=True),
    # Every page cached first: the exchanges over the group are counted.
    "collective_page_cache_warm": dict(mode="collective", warm=True),
    # Failures last: they leave the group usable, but nothing should depend on that.
    "direct_fails": dict(mode="direct", fail="raise"),
    "collective_fails": dict(mode="collective", share="exchange", fail="raise"),
    # Rank 1 fails copying its part of the third tensor out of a view of the page cache.
    "collective_page_cache_fails": dict(mode="collective", fail="copy"),
    # Run alone, in a group of its own: the group is broken afterwards.
    "collective_dies": dict(mode="collective", share="exchange", fail="exit"),
}
#: The scenarios the 2- and 4-rank groups run.
REGULAR = [name for name in SCENARIOS if name != "collective_dies"]


def _worker(rank: int, world: int, init_file: str, source: str, out_dir: str,
            scenarios: list[str], timeout: timedelta) -> None:
    import weightlift.distributed.load as loading

    calls = count_exchanges()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timeout)
    files = sorted(str(p) for p in Path(source).glob("*.safetensors"))
    try:
        for name in scenarios:
            options = dict(SCENARIOS[name])
            fail = options.pop("fail", None)
            fail = fail if rank == 1 else None
            recorder = RecordingStream(fail=None if fail == "copy" else fail)
            plan = custom_plan if options.pop("custom", False) else llama_skipping_rotary(world)
            if options.pop("warm", False):
                _cache(rank, files, tail=False)
            result: dict[str, Any] = {}
            calls.update(dict.fromkeys(calls, 0))
            started = time.monotonic()
            try:
                with _failing_copy(loading, fail == "copy"):
                    state, report = load_sharded(source, plan, strategy=recorder,
                                                 max_host_memory=BUDGET, **options)
                # Small tensors may share one buffer (as in any weightlift CPU load): clone to save.
                result.update(state={k: v.clone() for k, v in state.items()},
                              report=report.to_dict())
            except Exception as exc:
                result.update(error=type(exc).__name__, message=str(exc),
                              failed=getattr(exc, "ranks", None),
                              trace=traceback.format_exc())
            result.update(ranges=recorder.ranges, seconds=time.monotonic() - started,
                          calls=dict(calls))
            torch.save(result, os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


def count_exchanges() -> dict[str, int]:
    """Count, in this process from now on, every exchange over the group (``exchanges``) and
    the agreements among them (``agreements``)."""
    from weightlift.distributed.sync import Peers

    calls = {"agreements": 0, "exchanges": 0}

    def counted(names: tuple[str, ...], function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            for name in names:
                calls[name] += 1
            return function(*args, **kwargs)
        return call

    for method in ("post", "gather", "sum", "max", "totals"):
        names = ("agreements", "exchanges") if method == "post" else ("exchanges",)
        setattr(Peers, method, counted(names, getattr(Peers, method)))
    return calls


@contextlib.contextmanager
def _failing_copy(loading: Any, on: bool) -> Iterator[None]:
    """While on, the shared path's copy of this rank's part of the third tensor raises."""
    real = loading.part_in_rows
    seen = itertools.count()

    def failing(*args: Any, **kwargs: Any) -> Any:
        if next(seen) == 2:
            raise PlacementError("injected failure copying a part")
        return real(*args, **kwargs)

    if on:
        loading.part_in_rows = failing
    try:
        yield
    finally:
        loading.part_in_rows = real


def run_group(world: int, source: Path, out_dir: Path, scenarios: list[str],
              timeout: timedelta = GROUP_TIMEOUT) -> None:
    """Start ``world`` ranks and wait for them, killing them all if the deadline passes."""
    ctx = mp.start_processes(_worker, args=(world, str(out_dir / "init"), str(source),
                                            str(out_dir), scenarios, timeout),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"{world} ranks still running after {DEADLINE:.0f}s: a rank hung")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def results(request: pytest.FixtureRequest, checkpoint: Path,
            tmp_path_factory: pytest.TempPathFactory) -> tuple[int, Path]:
    world = request.param
    out_dir = tmp_path_factory.mktemp(f"tp{world}")
    run_group(world, checkpoint, out_dir, REGULAR)
    return world, out_dir


def outcome(results: tuple[int, Path], scenario: str) -> list[dict[str, Any]]:
    world, out_dir = results
    return [torch.load(out_dir / f"{scenario}-{rank}.pt", weights_only=False)
            for rank in range(world)]


def assert_bit_exact(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert list(got) == [name for name in got if name in want] and sorted(got) == sorted(want)
    for name, expected in want.items():
        actual = got[name]
        assert actual.dtype == expected.dtype, name
        assert actual.shape == expected.shape, name
        assert torch.equal(actual.contiguous().view(-1).view(torch.uint8) if actual.dim() else
                           actual.reshape(1).view(torch.uint8),
                           expected.contiguous().view(-1).view(torch.uint8) if expected.dim() else
                           expected.reshape(1).view(torch.uint8)), name


def nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def merged(ranges: list[tuple[str, int, int]]) -> list[tuple[str, int, int]]:
    """Sorted, with touching ranges joined; raises if two overlap (a byte read twice)."""
    out: list[tuple[str, int, int]] = []
    for file, start, end in sorted(ranges):
        if out and out[-1][0] == file:
            assert start >= out[-1][2], f"{file}: bytes {start}..{out[-1][2]} read twice"
            if start == out[-1][2]:
                out[-1] = (file, out[-1][1], end)
                continue
        out.append((file, start, end))
    return out


@pytest.mark.parametrize("scenario", ["direct", "direct_exact", "collective",
                                      "collective_page_cache"])
def test_each_rank_gets_its_llama_slices_bit_exact(results: tuple[int, Path], scenario: str,
                                                   full: dict[str, torch.Tensor]) -> None:
    world, _ = results
    for rank, result in enumerate(outcome(results, scenario)):
        assert "error" not in result, result.get("trace")
        assert_bit_exact(result["state"], expected_llama(full, rank, world))


@pytest.mark.parametrize("scenario", ["direct_custom", "collective_custom",
                                      "collective_page_cache_custom"])
def test_custom_plans_with_steps_ints_and_overlaps_are_bit_exact(
        results: tuple[int, Path], scenario: str, full: dict[str, torch.Tensor]) -> None:
    world, _ = results
    for rank, result in enumerate(outcome(results, scenario)):
        assert "error" not in result, result.get("trace")
        assert_bit_exact(result["state"], expected_custom(full, rank, world))


def test_direct_mode_reads_exactly_each_ranks_slices_without_gaps(
        results: tuple[int, Path], full: dict[str, torch.Tensor]) -> None:
    world, _ = results
    per_rank = outcome(results, "direct_exact")
    for rank, result in enumerate(per_rank):
        needed = nbytes(expected_llama(full, rank, world))
        report = result["report"]
        assert report["bytes_needed"] == needed
        assert report["bytes_read"] == needed
        assert sum(end - start for _, start, end in result["ranges"]) == needed
        merged(result["ranges"])  # no byte read twice by one rank
    total = sum(nbytes(expected_llama(full, rank, world)) for rank in range(world))
    assert all(r["report"]["total_bytes_read"] == total for r in per_rank)


def test_direct_mode_reads_at_most_twice_the_slices_when_it_bridges_gaps(
        results: tuple[int, Path], full: dict[str, torch.Tensor]) -> None:
    world, _ = results
    for rank, result in enumerate(outcome(results, "direct")):
        needed = nbytes(expected_llama(full, rank, world))
        read = result["report"]["bytes_read"]
        assert read == sum(end - start for _, start, end in result["ranges"])
        assert needed <= read <= 2 * needed


def test_collective_mode_reads_every_needed_byte_exactly_once(
        results: tuple[int, Path], checkpoint: Path, full: dict[str, torch.Tensor]) -> None:
    world, _ = results
    per_rank = outcome(results, "collective")
    everything = merged([r for result in per_rank for r in result["ranges"]])
    # The union is every tensor but the skipped rotary caches, each in one piece or adjacent ones.
    wanted = {name: t for name, t in full.items() if "rotary_emb" not in name}
    assert sum(end - start for _, start, end in everything) == nbytes(wanted)
    for result in per_rank:
        report = result["report"]
        assert report["bytes_read"] == sum(end - start for _, start, end in result["ranges"])
        assert report["total_bytes_read"] == nbytes(wanted)
        assert report["checkpoint_bytes"] == nbytes(full)
        # Byte-balanced: no rank reads more than its share plus one ~800 KiB chunk.
        assert report["bytes_read"] <= nbytes(wanted) / world + BUDGET // 5
        assert report["bytes_received"] > 0 and report["bytes_sent"] > 0


def test_ranks_on_one_host_share_the_page_cache_and_send_no_weight_bytes(
        results: tuple[int, Path]) -> None:
    """The default of collective mode on one host: no rank reads through a strategy or sends
    a byte; the parts come from views of the page cache (checked bit for bit above)."""
    for result in outcome(results, "collective_page_cache"):
        report = result["report"]
        assert report["share"] == "page_cache" and report["strategy"] == "page_cache"
        assert result["ranges"] == []
        assert report["bytes_sent"] == report["bytes_received"] == 0


def test_ranks_sharing_a_cached_checkpoint_exchange_three_messages_in_all(
        results: tuple[int, Path], full: dict[str, torch.Tensor]) -> None:
    """``load_sharded`` on one host with every page cached: one exchange to start (each rank's
    plan checked, its host and whether its part of the files was cached), the shared path's
    agreement at its end, the report's totals; nothing read, every part exact."""
    world, _ = results
    for rank, result in enumerate(outcome(results, "collective_page_cache_warm")):
        assert "error" not in result, result.get("trace")
        assert_bit_exact(result["state"], expected_llama(full, rank, world))
        assert result["report"]["share"] == "page_cache"
        assert result["report"]["bytes_read"] == 0
        assert result["calls"] == {"agreements": 1, "exchanges": 3}, result["calls"]


@pytest.mark.parametrize(("scenario", "error"), [("direct_fails", "ReadError"),
                                               ("collective_fails", "ReadError"),
                                               ("collective_page_cache_fails", "PlacementError")])
def test_a_rank_failing_mid_load_fails_every_rank_cleanly(results: tuple[int, Path],
                                                          scenario: str, error: str) -> None:
    per_rank = outcome(results, scenario)
    assert per_rank[1]["error"] == error, per_rank[1].get("trace")
    assert "injected failure" in per_rank[1]["message"]
    for rank, result in enumerate(per_rank):
        if rank != 1:
            assert result["error"] == "RankFailed", result.get("trace")
            assert result["failed"] == [1]
            assert "injected failure" in result["message"]
            # Stopped by agreement, not by the group's timeout.
            assert result["seconds"] < GROUP_TIMEOUT.total_seconds()


def test_llama_plan_splits_column_and_row_parallel_layers() -> None:
    plan = llama_plan(4)

    def info(name: str, *shape: int) -> TensorInfo:
        return TensorInfo(name, DTYPES["BF16"], shape, 0, 0)

    q = info("model.layers.0.self_attn.q_proj.weight", 64, 32)
    o = info("model.layers.0.self_attn.o_proj.weight", 32, 64)
    norm = info("model.layers.0.input_layernorm.weight", 32)
    assert plan(q.name, q, 1, 4) == (slice(16, 32),)
    assert plan(o.name, o, 3, 4) == (slice(None), slice(48, 64))
    assert plan(norm.name, norm, 2, 4) == ()
    with pytest.raises(PlacementError, match="made for 4 ranks"):
        plan(q.name, q, 0, 2)
    odd = info("model.embed_tokens.weight", 10, 4)
    with pytest.raises(PlacementError, match="equal parts"):
        plan(odd.name, odd, 0, 4)
    assert Plan([("*", Split(0, uneven=True))])(odd.name, odd, 3, 4) == (slice(8, 10),)
    assert Plan({"*norm*": Skip()}, default=Replicate())(norm.name, norm, 0, 4) is None


def test_bad_indices_are_refused_with_the_tensor_named() -> None:
    info = TensorInfo("w", DTYPES["F32"], (4, 6), 0, 96)
    with pytest.raises(PlacementError, match="w: slice step must be greater than zero"):
        normalize((slice(None, None, -1),), info)
    with pytest.raises(PlacementError, match="out of bounds"):
        normalize((4,), info)
    with pytest.raises(PlacementError, match="too many indices"):
        normalize((0, 0, 0), info)
    with pytest.raises(PlacementError, match="adds an axis"):
        normalize((None, 0), info)
    assert normalize(..., info) == normalize((slice(None), slice(None)), info)


def test_pieces_of_row_runs_reassemble_every_rank_part() -> None:
    """What the collective mode sends for each run of rows, put where it says, is the part."""
    g = torch.Generator().manual_seed(3)
    full_tensor = torch.arange(9 * 7 * 5).reshape(9, 7, 5)
    info = TensorInfo("t", DTYPES["I64"], (9, 7, 5), 0, 9 * 7 * 5 * 8)
    indices = [(), (slice(1, None, 2), slice(2, 5)), (4, slice(None, None, 3)), (slice(-3, None),),
               (slice(None), 6, slice(1, 2)), (slice(5, 2),)]
    for index in indices:
        want = full_tensor[index]
        got = torch.full_like(want, -1)
        per = int(torch.randint(1, 5, (), generator=g))
        for r0 in range(0, 9, per):
            part = part_in_rows(normalize(index, info), info, r0, min(r0 + per, 9))
            if part is not None:
                got[part.dst] = full_tensor[r0:r0 + per][part.src]
        assert torch.equal(got, want), index


def test_strided_ranges_bridge_gaps_up_to_a_page_or_their_length() -> None:
    ranges = [(0, 100), (200, 300), (10_000, 10_100), (30_000, 50_000), (60_000, 80_000)]
    merged_reads = extents("w", ranges, None, cap=1 << 20)
    assert [(e.start, e.end, e.offset) for e in merged_reads] == [
        (0, 300, 0), (10_000, 10_100, 200), (30_000, 80_000, 300)]
    exact = extents("w", ranges, 0, cap=1 << 20)
    assert [(e.start, e.end) for e in exact] == ranges
    capped = extents("w", ranges, 1 << 20, cap=40_000)
    assert [(e.start, e.end) for e in capped] == [(0, 10_100), (30_000, 50_000), (60_000, 80_000)]


def test_a_rank_dying_mid_load_stops_the_others_by_the_group_timeout(
        checkpoint: Path, tmp_path: Path) -> None:
    """No agreement is possible with a process that is gone: the backend's error or the group's
    timeout ends the survivors' wait (the watchdog would catch a hang)."""
    timeout = timedelta(seconds=5)
    try:
        run_group(2, checkpoint, tmp_path, ["collective_dies"], timeout=timeout)
    except mp.ProcessExitedException as exc:
        # gloo may tear the survivor down itself ("terminate called without an active
        # exception", SIGABRT) once its peer's socket closes: that ends the wait too, which is
        # the guarantee here; anything else (a Python error, another signal) is a failure.
        assert exc.error_index == 0 and exc.signal_name == "SIGABRT", exc
        return
    assert not (tmp_path / "collective_dies-1.pt").exists()  # rank 1 died before saving
    survivor = torch.load(tmp_path / "collective_dies-0.pt", weights_only=False)
    assert survivor.get("error") is not None, "rank 0 finished a load its peer left"
    assert survivor["seconds"] < timeout.total_seconds() + 10


@pytest.mark.parametrize("ranges", [
    [(110, 114), (120, 124), (130, 134)],          # evenly spaced: one strided copy
    [(110, 114), (116, 120), (150, 154)],          # one length, uneven spacing: one gather
    [(100, 101), (105, 120), (190, 200)],          # mixed lengths: range by range
])
def test_gather_copies_ranges_in_order(ranges: list[tuple[int, int]]) -> None:
    src = torch.randint(0, 256, (100,), dtype=torch.uint8)  # holds file bytes 100..199
    want = torch.cat([src[a - 100:b - 100] for a, b in ranges])
    dest = torch.empty_like(want)
    gather(src, 100, ranges, dest)
    assert torch.equal(dest, want)


def test_a_transformers_checkpoint_loads_sharded_in_both_modes(llama_dir: Path,
                                                               tmp_path: Path) -> None:
    """The shards and index ``save_pretrained`` writes, names and layout as real models have."""
    full: dict[str, torch.Tensor] = {}
    for file in sorted(llama_dir.glob("*.safetensors")):
        full.update(load_file(str(file)))
    run_group(2, llama_dir, tmp_path, ["direct", "collective", "collective_page_cache"])
    for scenario in ("direct", "collective", "collective_page_cache"):
        for rank in range(2):
            result = torch.load(tmp_path / f"{scenario}-{rank}.pt", weights_only=False)
            assert "error" not in result, result.get("trace")
            assert_bit_exact(result["state"], expected_llama(full, rank, 2))
            assert result["report"]["checkpoint_bytes"] == nbytes(full)


# ---------------------------------------------------------------------------------------------
# stream_sharded: whole tensors per rank, each rank its own set (expert parallelism), the page
# cache shared on one host, failures anywhere posted to every rank.

EXPERTS = 3
#: Windows of 2 MiB; the 4 MiB embedding is mapped whole, with the window the consumer holds.
MOE_BUDGET = 8 << 20
#: Cold loads tried at most this many times: another process dropping every page cache
#: (drop_caches) or memory pressure mid-load makes pages be read again; undisturbed, they are not.
COLD_TRIES = 3


def moe_tensors() -> dict[str, torch.Tensor]:
    """A Mixtral-style MoE: dense attention, EXPERTS experts per layer, a 4 MiB embedding."""
    g = torch.Generator().manual_seed(11)

    def rand(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    tensors = {"model.embed_tokens.weight": rand(4096, 256, dtype=torch.float32)}
    for i in range(2):
        p = f"model.layers.{i}"
        tensors[f"{p}.self_attn.qkv_proj.weight"] = rand(768, 256)
        tensors[f"{p}.self_attn.o_proj.weight"] = rand(256, 256)
        tensors[f"{p}.input_layernorm.weight"] = rand(255, dtype=torch.float16)  # odd sizes
        tensors[f"{p}.mlp.gate.weight"] = rand(EXPERTS, 256)
        for e in range(EXPERTS):
            for proj, shape in (("w1", (512, 256)), ("w3", (512, 256)), ("w2", (256, 512))):
                tensors[f"{p}.block_sparse_moe.experts.{e}.{proj}.weight"] = rand(*shape)
    tensors["lm_head.weight"] = rand(4096, 256)
    tensors["model.norm.weight"] = rand(256, dtype=torch.float32)
    return tensors


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tp-moe")
    tensors = moe_tensors()
    names = list(tensors)
    cut = len(names) // 2
    weight_map = {}
    for file, keys in (("model-00001-of-00002.safetensors", names[:cut]),
                       ("model-00002-of-00002.safetensors", names[cut:])):
        save_file({k: tensors[k] for k in keys}, str(path / file))
        weight_map.update(dict.fromkeys(keys, file))
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def local_experts(rank: int, world: int) -> set[int]:
    """vLLM's linear placement: 3 experts over 2 ranks → {0, 1} and {2}."""
    base, extra = divmod(EXPERTS, world)
    start = rank * base + min(rank, extra)
    return set(range(start, start + base + (rank < extra)))


def expert_filter(rank: int, world: int) -> Any:
    mine = local_experts(rank, world)

    def wanted(name: str) -> bool:
        if ".experts." not in name:
            return True
        return int(name.split(".experts.")[1].split(".")[0]) in mine
    return wanted


STREAMS: dict[str, dict[str, Any]] = {
    # Every page cached first: the ranks hand out windows with no agreement between them.
    "ep_page_cache": dict(share="page_cache", warm=True),
    # Small batches: many rounds of exchange over one resolved checkpoint.
    "ep_exchange": dict(share="exchange", strategy="stream", batch=256 << 10),
    "ep_two_hosts": dict(hosts=True),                      # auto → exchange between "hosts"
    "ep_two_hosts_page_cache": dict(hosts=True, share="page_cache"),
    "consumer_fails_page_cache": dict(share="page_cache", consumer_fails=True, warm=True),
    "consumer_fails_partly_cached": dict(share="page_cache", consumer_fails=True, warm="tail"),
    # Cached but for the last file's last page: in rank 1's share of the last window only.
    "tail_uncached_page_cache": dict(share="page_cache", warm="tail"),
    # The same, and reading that page fails on rank 1 (EIO): both ranks raise.
    "tail_read_fails": dict(share="page_cache", warm="tail", read_fails=True),
    "consumer_fails_exchange": dict(share="exchange", strategy="stream", consumer_fails=True),
    "open_fails": dict(share="page_cache", open_fails=True),
    # Last: the files evicted first; mappings sampled, storage reads and page cache measured.
    "cold_page_cache": dict(share="page_cache", cold=True),
}


def mapped_bytes(paths: list[str]) -> dict[str, int]:
    """Bytes of each of ``paths`` mapped into this process now (/proc/self/maps)."""
    out = dict.fromkeys(paths, 0)
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() in out:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                out[fields[5].strip()] += hi - lo
    return out


def read_bytes() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def _stream_worker(rank: int, world: int, init_file: str, source: str, out_dir: str,
                   scenarios: list[str]) -> None:
    import weightlift.distributed.shared as sharing
    import weightlift.distributed.stream as streaming

    calls = count_exchanges()
    calls.update(resolve=0, strategy=0, windows=0)

    def counted(name: str, function: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return function(*args, **kwargs)
        return call

    streaming.resolve = counted("resolve", streaming.resolve)
    streaming._strategy = counted("strategy", streaming._strategy)
    sharing.map_window = counted("windows", sharing.map_window)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=GROUP_TIMEOUT)
    files = sorted(str(p) for p in Path(source).glob("*.safetensors"))
    try:
        for name in scenarios:
            options = dict(STREAMS[name])
            cold = options.pop("cold", False)
            warm = options.pop("warm", False)
            fails = options.pop("consumer_fails", False) and rank == 1
            target = source
            if options.pop("open_fails", False) and rank == 1:
                target = os.path.join(source, "missing.safetensors")
            if options.pop("hosts", False):
                options["host"] = f"host{rank}"
            if warm:
                _cache(rank, files, tail=warm == "tail")
            tries = COLD_TRIES if cold else 1
            read_fails = options.pop("read_fails", False) and rank == 1
            for attempt in range(tries):
                with _eio_at_the_tail(files[-1], read_fails):
                    result = _stream_once(rank, world, target, files, options, cold, fails, calls)
                reads = torch.tensor([result["read_bytes"]])
                dist.all_reduce(reads)
                result["attempts"] = attempt + 1
                if int(reads) <= 1.05 * sum(os.path.getsize(p) for p in files):
                    break
            torch.save(result, os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def _eio_at_the_tail(path: str, on: bool) -> Iterator[None]:
    """While on, every read of ``path``'s last page through weightlift's one ``preadv`` fails
    with EIO, as a bad sector would."""
    from weightlift.io import base

    real = base.preadv
    last = (os.path.getsize(path) - 1) // 4096 * 4096

    def failing(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset + sum(len(b) for b in buffers) > last and \
                os.readlink(f"/proc/self/fd/{fd}") == os.path.realpath(path):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, buffers, offset)

    if on:
        base.preadv = failing
    try:
        yield
    finally:
        base.preadv = real


def _cache(rank: int, files: list[str], tail: bool) -> None:
    """Rank 0 brings every page of ``files`` into the page cache (``tail``: all but the last
    file's last page, which it evicts) and waits until mincore shows it; then both go on."""
    from pagecache import PAGE, evict, pages, wait_for, warm

    if rank == 0:
        for path in map(Path, files):
            size = path.stat().st_size
            if tail and path == Path(files[-1]):
                evict(path)
                warm(path, 0, (size - 1) // PAGE * PAGE)
                wait_for(path, lambda now: now[:-1].all() and not now[-1], "all but the last page")
            else:
                warm(path, 0, size)
        assert all(pages(Path(p)).all() for p in files[:-1])
    dist.barrier()


def _stream_once(rank: int, world: int, target: str, files: list[str],
                 options: dict[str, Any], cold: bool, fails: bool, calls: dict[str, int]
                 ) -> dict[str, Any]:
    """One ``stream_sharded`` load as a consumer would run it; what it got and what it cost."""
    from pagecache import evict, settled_bytes

    result: dict[str, Any] = {"state": {}}
    calls.update(resolve=0, strategy=0, agreements=0, exchanges=0, windows=0)
    if cold:
        if rank == 0:
            for path in files:
                evict(Path(path))
        dist.barrier()
    from test_window import steady_sampler

    peaks = dict.fromkeys(files, 0)
    stop = threading.Event()
    sampling = steady_sampler(lambda: mapped_bytes(files))
    steady = sampling.__enter__()

    def sample_once(until_steady: bool = False) -> None:
        while (sizes := steady()) is None and until_steady:
            time.sleep(0.0005)  # a read-ahead is mapping a window: read once it has
        for path, size in (sizes or {}).items():
            peaks[path] = max(peaks[path], size)

    def sample() -> None:
        while not stop.is_set():
            sample_once()
            stop.wait(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    before = read_bytes()
    started = time.monotonic()
    try:
        for i, (key, tensor) in enumerate(stream_sharded(
                target, wanted=expert_filter(rank, world), max_host_memory=MOE_BUDGET,
                on_report=lambda report: result.update(report=report.to_dict()),
                **options)):
            if fails and i == 3:
                raise ValueError("the consumer failed on purpose")
            sample_once(until_steady=True)  # each tensor's window is mapped now: seen on a busy machine
            result["state"][key] = tensor.clone()
            del tensor
    except Exception as exc:
        result.update(error=type(exc).__name__, message=str(exc),
                      failed=getattr(exc, "ranks", None), trace=traceback.format_exc())
    result["seconds"] = time.monotonic() - started
    result["read_bytes"] = read_bytes() - before
    result["calls"] = dict(calls)
    stop.set()
    sampler.join()
    sampling.__exit__(None, None, None)
    result["mapped_peak"] = peaks
    if cold:
        dist.barrier()
        if rank == 0:
            result["cached_after"] = sum(settled_bytes(Path(p)) for p in files)
    return result


@pytest.fixture(scope="module")
def streams(moe_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("streams")
    ctx = mp.start_processes(_stream_worker, args=(2, str(out_dir / "init"), str(moe_checkpoint),
                                                   str(out_dir), list(STREAMS)),
                             nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"2 ranks still running after {DEADLINE:.0f}s: a rank hung")
    return out_dir


def streamed(out_dir: Path, scenario: str) -> list[dict[str, Any]]:
    return [torch.load(out_dir / f"{scenario}-{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("scenario", ["ep_page_cache", "ep_exchange", "ep_two_hosts",
                                      "ep_two_hosts_page_cache", "cold_page_cache",
                                      "tail_uncached_page_cache"])
def test_ranks_wanting_different_experts_each_get_theirs_bit_exact(
        streams: Path, scenario: str) -> None:
    """Expert parallelism under TP: rank 0 wants experts 0 and 1, rank 1 expert 2 (and both the
    dense tensors); the group plans over the union, so nobody gets another expert's bytes and
    the plans line up (with 3 experts over 2 ranks the counts differ)."""
    full = moe_tensors()
    for rank, result in enumerate(streamed(streams, scenario)):
        assert "error" not in result, result.get("trace")
        wanted = expert_filter(rank, 2)
        want = {name: t for name, t in full.items() if wanted(name)}
        assert list(result["state"]) == [n for n in full if n in want] or \
            sorted(result["state"]) == sorted(want)
        assert_bit_exact(result["state"], want)
        report = result["report"]
        assert report["tensors"] == len(want)
    shares = {r["report"]["share"] for r in streamed(streams, scenario)}
    expected = {"ep_exchange": "exchange", "ep_two_hosts": "exchange"}.get(scenario, "page_cache")
    assert shares == {expected}


def test_ranks_sharing_a_cached_checkpoint_agree_only_at_the_start_and_end(
        streams: Path) -> None:
    """Every page cached: nothing is read or dropped, so the ranks map window after window with
    no agreement between them, and exchange three messages in all: one to start (each rank's
    checkpoint, wants, host and what it found cached), the agreement at the end, and the
    report's totals. No rank maps more than the budget. One page missing, in one rank's share
    only: both ranks agree at that window (else their collectives would not line up), and only
    there, after one more exchange counting what is cached. Cold: at the windows with pages
    to read."""
    for result in streamed(streams, "ep_page_cache"):
        assert "error" not in result, result.get("trace")
        assert result["calls"]["windows"] >= 4  # enough windows for agreements to show
        assert result["calls"]["agreements"] == 1, result["calls"]
        assert result["calls"]["exchanges"] == 3, result["calls"]
        for path, peak in result["mapped_peak"].items():
            assert 0 < peak <= MOE_BUDGET, (path, peak)
        assert result["report"]["bytes_read"] == 0
    tail = streamed(streams, "tail_uncached_page_cache")
    for result in tail:
        # At the last window (its last page was read) and at the end; the count of what is
        # cached is one more exchange.
        assert "error" not in result, result.get("trace")
        assert result["calls"]["agreements"] == 2, result["calls"]
        assert result["calls"]["exchanges"] == 5, result["calls"]
    # Rank 1, whose share held the page, read it; rank 0 read nothing.
    assert tail[0]["report"]["bytes_read"] == 0
    assert 0 < tail[1]["report"]["bytes_read"] <= 64 << 10, tail[1]["report"]
    for result in streamed(streams, "cold_page_cache"):
        # At the windows with pages to read (not those the header's read-ahead brought in).
        calls = result["calls"]
        assert 2 <= calls["agreements"] <= calls["windows"] + 1, calls


def test_the_exchange_opens_the_checkpoint_once_for_all_its_batches(streams: Path) -> None:
    """Headers, strategy, O_DIRECT probe and residency once per load, not once per batch."""
    for result in streamed(streams, "ep_exchange"):
        assert result["report"]["bytes_read"] > 0
        assert (result["calls"]["resolve"], result["calls"]["strategy"]) == (1, 1)
    total = sum(t.numel() * t.element_size() for t in moe_tensors().values())
    assert total > 20 * (256 << 10)  # so the load ran in many batches


@pytest.mark.parametrize("scenario", ["consumer_fails_page_cache", "consumer_fails_partly_cached",
                                      "consumer_fails_exchange"])
def test_a_consumer_raising_on_one_rank_fails_every_rank_promptly(streams: Path,
                                                                   scenario: str) -> None:
    failed, other = streamed(streams, scenario)[1], streamed(streams, scenario)[0]
    assert failed["error"] == "ValueError" and "on purpose" in failed["message"]
    assert other["error"] == "RankFailed", other.get("trace")
    assert other["failed"] == [1] and "stopped taking tensors" in other["message"]
    # Stopped by the posted failure, not by the group's timeout (30 s).
    assert other["seconds"] < GROUP_TIMEOUT.total_seconds() / 3


def test_a_failed_read_of_a_few_missing_pages_fails_every_rank(streams: Path) -> None:
    """A warm restart with the last page evicted: rank 1, whose share holds it, reads it at
    once (``shared.fetch``) and the read fails (EIO): it raises ``ReadError`` naming the file,
    the other rank ``RankFailed``, both promptly."""
    failed, other = streamed(streams, "tail_read_fails")[1], streamed(streams, "tail_read_fails")[0]
    assert failed["error"] == "ReadError", failed.get("trace")
    assert ".safetensors" in failed["message"] and "Input/output error" in failed["message"]
    assert other["error"] == "RankFailed" and other["failed"] == [1], other.get("trace")
    assert other["seconds"] < GROUP_TIMEOUT.total_seconds() / 3


def test_a_rank_failing_to_open_the_checkpoint_fails_every_rank(streams: Path) -> None:
    failed, other = streamed(streams, "open_fails")[1], streamed(streams, "open_fails")[0]
    assert failed["error"] == "MissingFileError", failed.get("trace")
    assert "missing.safetensors" in failed["message"]
    assert other["error"] == "RankFailed" and "missing.safetensors" in other["message"]


def test_a_cold_shared_load_reads_once_maps_and_leaves_at_most_the_budget(
        streams: Path, moe_checkpoint: Path) -> None:
    """Two ranks on one host, the checkpoint evicted first: together they read it from storage
    once (/proc/self/io read_bytes), no rank ever maps more than the budget of any file, and the
    page cache the load leaves is within the budget."""
    results = streamed(streams, "cold_page_cache")
    files = sum(p.stat().st_size for p in moe_checkpoint.glob("*.safetensors"))
    total = sum(r["read_bytes"] for r in results)
    assert total <= 1.05 * files, (total, files)
    assert all(r["report"]["bytes_read"] > 0 for r in results)  # both ranks warmed their share
    assert sum(r["report"]["bytes_read"] for r in results) <= files
    for result in results:
        for path, peak in result["mapped_peak"].items():
            assert 0 < peak <= MOE_BUDGET, (path, peak)
    assert results[0]["cached_after"] <= MOE_BUDGET, results[0]["cached_after"]
