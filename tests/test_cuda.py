"""Device loads on a real CUDA/ROCm device, written to catch races, not to pass.

Without a device these skip: CPU-only torch cannot say anything about pinned rings, side streams
or on-device conversion (the decisions behind them are checked on CPU in test_gpu_logic.py).

How they can fail: the side stream is delayed (``torch.cuda._sleep``) before every copy, so a
missing fence, a slot refilled too early or a tensor handed over before its copy finished shows up
as wrong bytes. Results are compared through ``.cpu()`` on the caller's current stream, never
after a global ``torch.cuda.synchronize()`` that would hide a missing wait.

Run: ``pytest -m cuda`` (two GPUs add the ``cuda:1`` and NCCL tests); once with
``TORCH_CUDA_SANITIZER=1`` (``test_the_sanitizer_finds_no_race`` does a short run itself).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES
from safetensors.torch import load_file, save_file

import weightlift
from conftest import assert_same, bytes_of, random_tensor, write_raw
from weightlift.place import AcceleratorSink

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA/ROCm device in this torch build or on this machine"),
]
two_gpus = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                              reason="needs two CUDA/ROCm devices")

STRATEGIES = ["auto", "mmap", "direct", "stream"]
BUDGET = 4 << 20
#: GPU cycles the side stream sleeps before each copy (~1-5 ms): reads outrun the copies.
DELAY = 2_000_000
FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.fixture(scope="module")
def racy(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """~12 MB: odd offsets, every dtype, bf16 tensors several slots long."""
    gen = torch.Generator().manual_seed(2026)
    tensors: list[tuple[str, torch.Tensor]] = [("head.odd", random_tensor((7,), torch.uint8, gen))]
    for i in range(4):
        tensors.append((f"layers.{i}.big", random_tensor((1_500_001,), torch.bfloat16, gen)))
        tensors.append((f"layers.{i}.odd", random_tensor((3 + i,), torch.int8, gen)))
        tensors.append((f"layers.{i}.f32", random_tensor((65_537,), torch.float32, gen)))
    for k, dtype in enumerate(SAFETENSORS_DTYPES.values()):
        if dtype.itemsize >= 1:  # sub-byte dtypes are not whole elements
            tensors.append((f"dtypes.{k}", random_tensor((1001,), dtype, gen)))
            tensors.append((f"dtypes.{k}.pad", random_tensor((1,), torch.uint8, gen)))
    path = write_raw(tmp_path_factory.mktemp("racy") / "racy.safetensors", tensors)
    return path, load_file(path)


@pytest.fixture()
def delayed_side_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every copy (and conversion) on the side stream starts only after a GPU-side sleep."""
    original = AcceleratorSink._side

    @contextmanager
    def slow(self: AcceleratorSink) -> Iterator[None]:
        with original(self):
            torch.cuda._sleep(DELAY)
            yield

    monkeypatch.setattr(AcceleratorSink, "_side", slow)


def expected(ref: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """What a load with ``dtype`` gives: floating tensors converted (by torch on the CPU)."""
    if dtype is None:
        return ref
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in ref.items()}


def convertible(ref: dict[str, torch.Tensor]) -> list[str]:
    """Names whose conversion the CPU reference does the same way (no float8 corner cases)."""
    return [k for k, v in ref.items() if v.dtype in FLOATS or not v.is_floating_point()]


def same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    if exact or not want.is_floating_point():
        return bytes_of(got) == bytes_of(want)
    # A converted NaN's payload may differ between CPU and device kernels; its place may not.
    nan = want.isnan()
    return torch.equal(got.isnan(), nan) and torch.equal(got[~nan], want[~nan])


def assert_on_device_matches(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                             device: torch.device | None = None, exact: bool = True) -> None:
    """``.cpu()`` on the current stream only: a tensor handed over early shows wrong bytes."""
    assert sorted(state) == sorted(want)
    for name, tensor in state.items():
        assert tensor.device.type == "cuda", name
        if device is not None:
            assert tensor.device == device, name
        assert tensor.dtype == want[name].dtype, name
        assert same(tensor.cpu(), want[name], exact), name


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_delayed_copies_never_hand_over_early_or_reuse_a_busy_slot(
        racy: tuple[Path, dict[str, torch.Tensor]], strategy: str, dtype: torch.dtype | None,
        delayed_side_stream: None) -> None:
    path, ref = racy
    keys = None if dtype is None else convertible(ref)
    state = weightlift.load(path, device="cuda", strategy=strategy, dtype=dtype, keys=keys,
                            max_host_memory=BUDGET)
    want = expected({k: ref[k] for k in keys or ref}, dtype)
    assert_on_device_matches(state, want, exact=dtype is None)


@pytest.mark.parametrize("strategy", ["direct", "stream"])
def test_streamed_tensors_dropped_at_once_are_not_overwritten_under_the_consumer(
        racy: tuple[Path, dict[str, torch.Tensor]], strategy: str,
        delayed_side_stream: None) -> None:
    """The consumer queues a (delayed) read of each tensor, drops it, allocates and fills a
    same-size tensor: the loader must not write into the dropped tensor's memory meanwhile."""
    path, ref = racy
    sums: dict[str, torch.Tensor] = {}
    for name, tensor in weightlift.stream(path, device="cuda", strategy=strategy,
                                          max_host_memory=BUDGET):
        torch.cuda._sleep(DELAY)  # the consumer's stream is busy; its read below comes later
        sums[name] = tensor.view(-1).view(torch.uint8).to(torch.int64).sum()
        like = torch.empty_like(tensor)
        del tensor
        like.view(torch.uint8).fill_(0xA5)
        del like
    for name, total in sums.items():
        want = ref[name].reshape(-1).view(torch.uint8).to(torch.int64).sum()
        assert total.cpu() == want, name


@pytest.mark.parametrize("strategy", ["direct", "stream", "mmap"])
@pytest.mark.parametrize("nth", [1, 5])
def test_oom_at_the_nth_destination_leaves_no_copy_in_flight(
        racy: tuple[Path, dict[str, torch.Tensor]], strategy: str, nth: int,
        delayed_side_stream: None, monkeypatch: pytest.MonkeyPatch) -> None:
    path, ref = racy
    made = 0
    original = AcceleratorSink._make

    def make(self: AcceleratorSink, entry: Any) -> torch.Tensor:
        nonlocal made
        made += 1
        if made == nth:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return original(self, entry)

    monkeypatch.setattr(AcceleratorSink, "_make", make)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected"):
        weightlift.load(path, device="cuda", strategy=strategy, max_host_memory=BUDGET)
    # Memory the failed load freed goes to the next allocations: none may change under us.
    sentinels = [torch.full((t.numel() * t.element_size(),), 0x5A, dtype=torch.uint8,
                            device="cuda") for t in ref.values()]
    torch.cuda._sleep(4 * DELAY)
    for sentinel in sentinels:
        assert bool((sentinel == 0x5A).all().cpu()), "a late copy wrote into freed memory"


def test_closing_a_stream_mid_tensor_stops_cleanly(
        racy: tuple[Path, dict[str, torch.Tensor]], delayed_side_stream: None) -> None:
    path, ref = racy
    tensors = weightlift.stream(path, device="cuda", strategy="direct", max_host_memory=BUDGET)
    name, first = next(tensors)  # the next tensor spans several slots: it is partly placed now
    tensors.close()
    assert bytes_of(first.cpu()) == bytes_of(ref[name])
    sentinel = torch.full((8 << 20,), 0x3C, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(4 * DELAY)
    assert bool((sentinel == 0x3C).all().cpu())


@pytest.mark.parametrize("strategy", ["direct", "stream"])
def test_a_load_inside_the_callers_stream_is_ordered_on_it(
        racy: tuple[Path, dict[str, torch.Tensor]], strategy: str,
        delayed_side_stream: None) -> None:
    path, ref = racy
    mine = torch.cuda.Stream()
    with torch.cuda.stream(mine):
        torch.cuda._sleep(DELAY)
        state = weightlift.load(path, device="cuda", strategy=strategy, max_host_memory=BUDGET)
        assert_on_device_matches(state, ref)


@pytest.mark.parametrize("strategy", ["direct", "stream"])
def test_pinned_memory_stays_within_the_budget_and_is_given_back(
        racy: tuple[Path, dict[str, torch.Tensor]], strategy: str) -> None:
    path, _ = racy
    torch.accelerator.empty_host_cache()
    torch.cuda.reset_peak_host_memory_stats()
    weightlift.load(path, device="cuda", strategy=strategy, max_host_memory=BUDGET)
    stats = torch.cuda.host_memory_stats()
    probe = 64 << 10  # direct's one-block probe into page-locked memory
    assert stats["allocated_bytes.peak"] <= BUDGET + probe
    assert stats["allocated_bytes.current"] == 0  # released after the load


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_bf16_larger_than_a_slot_converts_on_the_device(
        racy: tuple[Path, dict[str, torch.Tensor]], dtype: torch.dtype) -> None:
    path, ref = racy
    keys = [name for name in ref if name.endswith(".big")]
    state = weightlift.load(path, device="cuda", dtype=dtype, keys=keys, strategy="direct",
                            max_host_memory=BUDGET)
    assert_on_device_matches(state, {k: ref[k].to(dtype) for k in keys}, exact=False)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_minilm_device_load_is_bit_exact(minilm_path: Path, strategy: str) -> None:
    state = weightlift.load(minilm_path, device="cuda", strategy=strategy, max_host_memory="8MB")
    assert_same({k: v.cpu() for k, v in state.items()}, load_file(minilm_path))


def test_load_into_a_meta_model_on_the_device(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32),
                                torch.nn.Linear(32, 8, dtype=torch.bfloat16))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    with torch.device("meta"):
        empty = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32),
                                    torch.nn.Linear(32, 8, dtype=torch.bfloat16))
    weightlift.load_into(empty, path, device="cuda")
    for name, tensor in empty.state_dict().items():
        assert tensor.device.type == "cuda", name
        assert bytes_of(tensor.cpu()) == bytes_of(model.state_dict()[name]), name


@two_gpus
def test_loading_to_cuda_1_creates_no_context_on_gpu_0(tmp_path: Path) -> None:
    """A fresh process (no context yet) loads to cuda:1 with device 0 current."""
    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(1 << 20), "b": torch.randn(3, dtype=torch.float64).half()}, path)
    code = textwrap.dedent(f"""
        import torch, weightlift
        for strategy in ("direct", "stream", "mmap"):
            state = weightlift.load({str(path)!r}, device="cuda:1", strategy=strategy,
                                    dtype=torch.float32, max_host_memory="4MiB")
            assert all(t.device == torch.device("cuda", 1) for t in state.values())
            for t in weightlift.stream({str(path)!r}, device="cuda:1", strategy=strategy):
                t.cpu()
        assert torch.cuda.current_device() == 0
        print("gpu0", torch._C._cuda_hasPrimaryContext(0))
        print("gpu1", torch._C._cuda_hasPrimaryContext(1))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert "gpu1 True" in out.stdout
    assert "gpu0 False" in out.stdout, "a context was created on GPU 0"


def test_the_sanitizer_finds_no_race(racy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """CUDA Sanitizer (CSAN) checks every kernel's stream ordering of tensor accesses."""
    path, _ = racy
    code = textwrap.dedent(f"""
        import torch, weightlift
        for strategy in ("direct", "stream", "mmap"):
            for dtype in (None, torch.float32):
                state = weightlift.load({str(path)!r}, device="cuda", strategy=strategy,
                                        dtype=dtype, max_host_memory="4MiB")
                for t in state.values():
                    t.float().sum().item() if t.is_floating_point() else t.sum().item()
                for name, t in weightlift.stream({str(path)!r}, device="cuda",
                                                 strategy=strategy, max_host_memory="4MiB"):
                    t.view(-1)[:1].clone()
        print("clean")
    """)
    env = dict(os.environ, TORCH_CUDA_SANITIZER="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0 and "clean" in out.stdout, out.stderr[-4000:]
    assert "CSAN" not in out.stderr, out.stderr[-4000:]


# --- NCCL, two ranks on two GPUs ------------------------------------------------------------------

def _nccl_worker(rank: int, world: int, init_file: str, source: str, out_dir: str) -> None:
    from test_distributed import llama_skipping_rotary

    from weightlift.distributed import load_sharded

    os.environ["LOCAL_RANK"] = str(rank)
    # torch's default backend string for a device-bound group: "cpu:gloo,cuda:nccl".
    dist.init_process_group(init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60), device_id=torch.device("cuda", rank))
    try:
        result: dict[str, Any] = {"backend": str(dist.get_backend())}
        for mode in ("direct", "collective"):
            state, report = load_sharded(source, llama_skipping_rotary(world), mode=mode,
                                         device=f"cuda:{rank}", max_host_memory=4 << 20)
            result[mode] = {k: v.cpu() for k, v in state.items()}
            result[f"{mode}.devices"] = sorted({str(v.device) for v in state.values()})
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@two_gpus
def test_sharded_loads_over_nccl_on_two_gpus(tmp_path: Path) -> None:
    from test_distributed import expected_llama, llama_tensors

    full = llama_tensors()
    source = tmp_path / "model.safetensors"
    save_file(full, source)
    ctx = mp.start_processes(_nccl_worker, args=(2, str(tmp_path / "init"), str(source),
                                                 str(tmp_path)),
                             nprocs=2, join=False, start_method="spawn")
    while not ctx.join(timeout=240):
        for process in ctx.processes:
            process.kill()
        pytest.fail("NCCL ranks still running after 240 s: a rank hung")
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "nccl" in result["backend"]
        want = expected_llama(full, rank, 2)
        for mode in ("direct", "collective"):
            assert result[f"{mode}.devices"] == [f"cuda:{rank}"]
            assert_same(result[mode], {k: v.contiguous() for k, v in want.items()})


def test_tensor_by_tensor_reads_reuse_pinned_blocks_and_close_returns_them(
        racy: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ref = racy
    torch.accelerator.empty_host_cache()
    allocs = torch.cuda.host_memory_stats()["num_host_alloc"]
    with weightlift.open(path) as ckpt:
        for name in list(ref)[:6]:
            assert bytes_of(ckpt.get_tensor(name, device="cuda").cpu()) == bytes_of(ref[name])
        stats = torch.cuda.host_memory_stats()
        assert stats["allocated_bytes.current"] > 0  # cached for the next get_tensor
        assert stats["num_host_alloc"] - allocs < 6 * 2  # reused, not a new ring per tensor
    assert torch.cuda.host_memory_stats()["allocated_bytes.current"] == 0
