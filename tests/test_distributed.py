"""Tensor-parallel loading, run for real: 2 and 4 processes on CPU with the gloo backend.

Each group of processes runs every scenario once (starting processes is the slow part) and saves
what each rank got; the tests below compare that with slices of the full tensors as the
safetensors package loads them, and check who read which bytes.
"""

from __future__ import annotations

import itertools
import json
import os
import time
import traceback
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
    "collective": dict(mode="collective"),
    "direct_custom": dict(mode="direct", custom=True),
    "collective_custom": dict(mode="collective", custom=True),
    # Failures last: they leave the group usable, but nothing should depend on that.
    "direct_fails": dict(mode="direct", fail="raise"),
    "collective_fails": dict(mode="collective", fail="raise"),
    # Run alone, in a group of its own: the group is broken afterwards.
    "collective_dies": dict(mode="collective", fail="exit"),
}
#: The scenarios the 2- and 4-rank groups run.
REGULAR = [name for name in SCENARIOS if name != "collective_dies"]


def _worker(rank: int, world: int, init_file: str, source: str, out_dir: str,
            scenarios: list[str], timeout: timedelta) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=timeout)
    try:
        for name in scenarios:
            options = dict(SCENARIOS[name])
            fail = options.pop("fail", None)
            recorder = RecordingStream(fail=fail if rank == 1 else None)
            plan = custom_plan if options.pop("custom", False) else llama_skipping_rotary(world)
            result: dict[str, Any] = {}
            started = time.monotonic()
            try:
                state, report = load_sharded(source, plan, strategy=recorder,
                                             max_host_memory=BUDGET, **options)
                # Small tensors may share one buffer (as in any weightlift CPU load): clone to save.
                result.update(state={k: v.clone() for k, v in state.items()},
                              report=report.to_dict())
            except Exception as exc:
                result.update(error=type(exc).__name__, message=str(exc),
                              failed=getattr(exc, "ranks", None),
                              trace=traceback.format_exc())
            result.update(ranges=recorder.ranges, seconds=time.monotonic() - started)
            torch.save(result, os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


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


@pytest.mark.parametrize("scenario", ["direct", "direct_exact", "collective"])
def test_each_rank_gets_its_llama_slices_bit_exact(results: tuple[int, Path], scenario: str,
                                                   full: dict[str, torch.Tensor]) -> None:
    world, _ = results
    for rank, result in enumerate(outcome(results, scenario)):
        assert "error" not in result, result.get("trace")
        assert_bit_exact(result["state"], expected_llama(full, rank, world))


@pytest.mark.parametrize("scenario", ["direct_custom", "collective_custom"])
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


@pytest.mark.parametrize("scenario", ["direct_fails", "collective_fails"])
def test_a_rank_failing_mid_load_fails_every_rank_cleanly(results: tuple[int, Path],
                                                          scenario: str) -> None:
    per_rank = outcome(results, scenario)
    assert per_rank[1]["error"] == "ReadError", per_rank[1].get("trace")
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
    run_group(2, llama_dir, tmp_path, ["direct", "collective"])
    for scenario in ("direct", "collective"):
        for rank in range(2):
            result = torch.load(tmp_path / f"{scenario}-{rank}.pt", weights_only=False)
            assert "error" not in result, result.get("trace")
            assert_bit_exact(result["state"], expected_llama(full, rank, 2))
            assert result["report"]["checkpoint_bytes"] == nbytes(full)
