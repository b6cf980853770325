"""The GPU path's decisions, checked on CPU: ring sizing against torch's pinned allocator, the
side stream drained on every exit, the target device entered around every side-stream call, the
O_DIRECT-into-pinned probe and its fallback, and the NCCL backend/device choice.

``FakeCuda`` stands in for ``torch.cuda`` at the sink's one seam (``runtime=``): it records, for
every stream/event call, which device was current, and in which order calls happened. Tensors stay
on the CPU (destinations given by the test, uploads as host copies), so the bytes are still
checked against what the safetensors package reads.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import weightlift.place as place
from conftest import assert_same, bytes_of, random_tensor, write_raw
from weightlift.api import prepare_strategy
from weightlift.distributed import sync
from weightlift.errors import WeightliftError
from weightlift.io import direct, make_strategy
from weightlift.place import AcceleratorSink, release_pinned_cache
from weightlift.read import (ALIGN, MIN_SLOT, SLACK, pinned_footprint, read_tensors, ring_bytes,
                             ring_shape)
from weightlift.report import LoadReport
from weightlift.sources import resolve
from weightlift.sources.records import Layout, iter_entries

CUDA1 = torch.device("cuda", 1)


# --- ring sizing against the caching host allocator ----------------------------------------------

def test_pinned_footprint_is_the_allocators_power_of_two() -> None:
    # ATen/core/CachingHostAllocator.h: roundSize = c10::llvm::PowerOf2Ceil(size)
    assert [pinned_footprint(n) for n in (1, 2, 3, 4096, 4097, 1 << 20, (1 << 20) + 12288)] == \
        [1, 2, 4, 4096, 8192, 1 << 20, 2 << 20]


def test_the_old_ring_would_have_pinned_almost_twice_the_budget() -> None:
    """What the review measured: power-of-two slots plus slack double in the allocator."""
    strategy = make_strategy("direct", copying=True)
    budget = 4 << 20
    assert ring_bytes(*ring_shape(budget, strategy), pinned=True) > 1.8 * budget
    assert ring_bytes(*ring_shape(budget, strategy, pinned=True), pinned=True) <= budget


@settings(max_examples=200, deadline=None)
@given(budget=st.integers(min_value=4 << 20, max_value=64 << 30),
       name=st.sampled_from(["direct", "stream"]))
def test_pinned_ring_fits_the_budget_as_the_allocator_counts(budget: int, name: str) -> None:
    strategy = make_strategy(name, copying=True)
    slot, count = ring_shape(budget, strategy, pinned=True)
    assert 2 <= count <= 2 * strategy.in_flight
    assert slot % ALIGN == 0 and slot >= MIN_SLOT - SLACK
    assert slot + SLACK == pinned_footprint(slot + SLACK)  # nothing lost to rounding
    assert ring_bytes(slot, count, pinned=True) <= budget
    assert slot <= strategy.read_size


def test_pageable_ring_shape_is_unchanged() -> None:
    strategy = make_strategy("direct", copying=True)
    assert ring_shape(8 << 30, strategy) == (8 << 20, 32)
    assert ring_shape(4 << 20, strategy) == (256 << 10, 15)


def test_releasing_the_pinned_cache_uses_the_public_api(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    monkeypatch.setattr(torch.accelerator, "empty_host_cache", lambda: calls.append("empty"))
    assert release_pinned_cache() is True
    assert calls == ["empty"]


# --- a recording stand-in for torch.cuda ---------------------------------------------------------

class FakeEvent:
    def __init__(self, cuda: FakeCuda, blocking: bool) -> None:
        self.cuda, self.blocking = cuda, blocking

    def record(self, stream: FakeStream) -> None:
        self.cuda.note("event.record", stream.name)

    def synchronize(self) -> None:
        self.cuda.note("event.synchronize")


class FakeStream:
    def __init__(self, cuda: FakeCuda, name: str) -> None:
        self.cuda, self.name = cuda, name

    def wait_stream(self, other: FakeStream) -> None:
        self.cuda.note(f"{self.name}.wait_stream", other.name)

    def synchronize(self) -> None:
        self.cuda.note(f"{self.name}.synchronize")


class FakeCuda:
    """Current device 0, like a process that never called set_device; logs (call, device)."""

    def __init__(self) -> None:
        self.current = 0
        self.stream_now: str | None = None
        self.log: list[tuple[str, int, object]] = []
        self.events: list[FakeEvent] = []

    def note(self, what: str, arg: object = None) -> None:
        self.log.append((what, self.current, arg))

    @contextmanager
    def device(self, dev: torch.device) -> Iterator[None]:
        before, self.current = self.current, torch.device(dev).index
        try:
            yield
        finally:
            self.current = before

    @contextmanager
    def stream(self, stream: FakeStream) -> Iterator[None]:
        self.note("stream.enter", stream.name)
        before, self.stream_now = self.stream_now, stream.name
        try:
            yield
        finally:
            self.stream_now = before

    def Stream(self, device: torch.device) -> FakeStream:  # noqa: N802 - torch's name
        self.note("Stream", device)
        return FakeStream(self, "side")

    def current_stream(self, device: torch.device | None = None) -> FakeStream:
        self.note("current_stream", device)
        return FakeStream(self, "caller")

    def Event(self, blocking: bool = False) -> FakeEvent:  # noqa: N802 - torch's name
        event = FakeEvent(self, blocking)
        self.events.append(event)
        return event

    def calls(self, what: str) -> list[int]:
        return [i for i, (name, _, _) in enumerate(self.log) if name == what]


class RecordingSink(AcceleratorSink):
    """An AcceleratorSink for ``cuda:1`` over ``FakeCuda``, placing into CPU destinations."""

    def __init__(self, destinations: dict[str, torch.Tensor], fail_at: int | None = None) -> None:
        self.fake = FakeCuda()
        super().__init__(CUDA1, None, destinations, runtime=self.fake)
        self.fail_at = fail_at
        self.placed = 0

    def place(self, piece, src):  # type: ignore[no-untyped-def]
        if self.fail_at is not None and self.placed == self.fail_at:
            self.fake.note("place.raise")
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        self.placed += 1
        super().place(piece, src)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._side():
            self.fake.note("copy", self.fake.stream_now)
            dst.copy_(src)

    def _upload(self, raw: torch.Tensor) -> torch.Tensor:
        self.fake.note("upload", self.fake.stream_now)
        return raw.clone()  # a fresh (aligned) buffer, as a device upload gives

    @property
    def released(self) -> list[int]:
        return self.fake.calls("release_slots")


@pytest.fixture()
def odd_checkpoint(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Every kind of piece: odd offsets, a bf16 tensor spanning several 256 KiB slots, ints."""
    gen = torch.Generator().manual_seed(15)
    tensors = [("odd", random_tensor((3,), torch.uint8, gen)),
               ("big", random_tensor((300_001,), torch.bfloat16, gen)),
               ("odd2", random_tensor((5,), torch.int8, gen)),
               ("f32", random_tensor((70_000,), torch.float32, gen)),
               ("i64", random_tensor((9, 7), torch.int64, gen)),
               ("empty", torch.empty((0, 4), dtype=torch.float16))]
    path = write_raw(tmp_path / "odd.safetensors", tensors)
    return path, load_file(path)


def _run(path: Path, sink: RecordingSink, strategy_name: str, budget: int = 4 << 20,
         pin_refused: str | None = None, stop_after: int | None = None
         ) -> dict[str, torch.Tensor]:
    layout: Layout = resolve(path)
    strategy = make_strategy(strategy_name, copying=True)
    try:
        strategy.prepare(layout.shards)
        strategy.pin_refused = pin_refused
        out: dict[str, torch.Tensor] = {}
        tensors = read_tensors(layout, list(iter_entries(layout)), strategy, budget=budget,
                               sink=sink)
        for entry, tensor in tensors:
            out[entry.name] = tensor
            if stop_after is not None and len(out) == stop_after:
                tensors.close()  # like closing a stream() mid-load
                break
        return out
    finally:
        strategy.close()
        layout.close()


def _destinations(ref: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                  ) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(t, 0, dtype=dtype if dtype and t.is_floating_point()
                                  else t.dtype) for name, t in ref.items()}


@pytest.fixture(autouse=True)
def pageable_pins(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool, int]]:
    """CPU torch cannot pin: record what the sink asks for (size, pinned, device) instead."""
    asked: list[tuple[int, bool, int]] = []
    fakes: list[FakeCuda] = []
    real = place.host_buffer

    def host_buffer(nbytes: int, pin: bool = False) -> torch.Tensor:
        asked.append((nbytes, pin, fakes[-1].current if fakes else -1))
        return real(nbytes)

    monkeypatch.setattr(place, "host_buffer", host_buffer)
    monkeypatch.setattr(place, "release_pinned_cache", lambda: fakes[-1].note("release_slots"))
    original = FakeCuda.__init__

    def init(self: FakeCuda) -> None:
        original(self)
        fakes.append(self)

    monkeypatch.setattr(FakeCuda, "__init__", init)
    return asked


@pytest.mark.parametrize("strategy", ["direct", "stream", "mmap"])
def test_every_side_stream_call_runs_with_the_target_device_current(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]], strategy: str,
        pageable_pins: list[tuple[int, bool, int]]) -> None:
    path, ref = odd_checkpoint
    sink = RecordingSink(_destinations(ref))
    got = _run(path, sink, strategy)
    assert_same(got, ref)
    fake = sink.fake
    assert fake.current == 0  # restored
    assert fake.log and all(device == 1 for _, device, _ in fake.log), \
        [entry for entry in fake.log if entry[1] != 1]
    assert all(stream == "side" for what, _, stream in fake.log if what in ("copy", "upload"))
    assert all(device == 1 for _, _, device in pageable_pins)


@pytest.mark.parametrize("strategy", ["direct", "stream"])
def test_one_blocking_fence_per_chunk_and_the_side_stream_drained_last(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]], strategy: str) -> None:
    path, ref = odd_checkpoint
    sink = RecordingSink(_destinations(ref))
    _run(path, sink, strategy)
    fake = sink.fake
    records = fake.calls("event.record")
    assert len(records) == len(fake.events) >= 3  # the 600 KB bf16 tensor spans several slots
    assert all(event.blocking for event in fake.events)
    drains = fake.calls("side.synchronize")
    assert drains and drains[-1] > max(fake.calls("copy"))
    assert sink.released and sink.released[0] > drains[-1]  # slots go only after the drain


@pytest.mark.parametrize("strategy", ["direct", "stream"])
@pytest.mark.parametrize("fail_at", [0, 1, 3])
def test_a_failure_placing_piece_k_still_drains_the_side_stream(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]], strategy: str,
        fail_at: int) -> None:
    path, ref = odd_checkpoint
    sink = RecordingSink(_destinations(ref), fail_at=fail_at)
    with pytest.raises(torch.cuda.OutOfMemoryError, match="injected"):
        _run(path, sink, strategy)
    fake = sink.fake
    failed = fake.calls("place.raise")[0]
    drains = [i for i in fake.calls("side.synchronize") if i > failed]
    assert drains, "pieces placed before the failure may still be copying"
    assert sink.released and sink.released[0] > drains[0]


def test_closing_mid_load_drains_the_side_stream(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, ref = odd_checkpoint
    sink = RecordingSink(_destinations(ref))
    got = _run(path, sink, "direct", stop_after=1)
    assert list(got) == ["odd"]
    fake = sink.fake
    assert fake.calls("side.synchronize")
    assert fake.calls("side.synchronize")[-1] > max(fake.calls("copy"))


def test_converting_odd_offsets_uploads_raw_bytes(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """bf16 → fp32 across slots and odd offsets: bytes go up as they are, converted there."""
    path, ref = odd_checkpoint
    sink = RecordingSink(_destinations(ref, torch.float32))
    got = _run(path, sink, "stream")
    for name, tensor in ref.items():
        want = tensor.to(torch.float32) if tensor.is_floating_point() else tensor
        assert got[name].dtype == want.dtype
        assert bytes_of(got[name]) == bytes_of(want), name  # NaN payloads included
    assert sink.fake.calls("upload")


def test_pinned_slots_are_sized_for_the_allocator(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]],
        pageable_pins: list[tuple[int, bool, int]]) -> None:
    path, ref = odd_checkpoint
    budget = 4 << 20
    _run(path, RecordingSink(_destinations(ref)), "direct", budget=budget)
    assert pageable_pins and all(pinned for _, pinned, _ in pageable_pins)
    assert sum(pinned_footprint(n) for n, _, _ in pageable_pins) <= budget


def test_a_strategy_that_cannot_read_into_pinned_memory_gets_pageable_slots(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]],
        pageable_pins: list[tuple[int, bool, int]]) -> None:
    path, ref = odd_checkpoint
    got = _run(path, RecordingSink(_destinations(ref)), "direct", pin_refused="EFAULT here")
    assert_same(got, ref)
    assert pageable_pins and not any(pinned for _, pinned, _ in pageable_pins)


def test_caller_destinations_are_waited_for_once(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Work the caller queued on its stream before the load comes first; nothing per tensor."""
    path, ref = odd_checkpoint
    sink = RecordingSink(_destinations(ref))
    _run(path, sink, "direct")
    waits = sink.fake.calls("side.wait_stream")
    assert len(waits) == 1 and waits[0] < min(sink.fake.calls("copy"))
    # Each finished tensor makes the consumer's stream wait for the side stream.
    assert len(sink.fake.calls("caller.wait_stream")) == len(ref)


# --- O_DIRECT into page-locked memory -------------------------------------------------------------

@pytest.fixture()
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "small.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    return path


def _refuse_pinned(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The stack some vendors ship: O_DIRECT into page-locked memory → EFAULT."""
    asked: list[torch.device] = []
    pinned: list[int] = []

    def probe_buffer(device: torch.device) -> torch.Tensor:
        asked.append(device)
        buf = direct.aligned_buffer(direct.ALIGN, 0, direct.ALIGN)
        pinned.append(buf.data_ptr())
        return buf

    real = direct._probe_read

    def probe_read(fd: int, buf: torch.Tensor) -> None:
        if buf.data_ptr() in pinned:
            raise OSError(errno.EFAULT, "Bad address")
        real(fd, buf)

    monkeypatch.setattr(direct, "pinned_probe_buffer", probe_buffer)
    monkeypatch.setattr(direct, "_probe_read", probe_read)
    return asked


def test_direct_probes_pinned_memory_for_device_loads_and_reports_the_fallback(
        small_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _refuse_pinned(monkeypatch)
    layout = resolve(small_file)
    strategy = make_strategy("direct", copying=True)
    strategy.pin_device = CUDA1
    report = LoadReport(source=str(small_file), device="cuda:1", strategy="direct",
                        reason="requested", budget=4 << 20)
    try:
        try:
            prepared = prepare_strategy(strategy, layout, report)
        except Exception as exc:  # the file system here refuses O_DIRECT altogether
            pytest.skip(f"O_DIRECT unavailable on this file system: {exc}")
        if report.strategy == "stream":
            pytest.skip("O_DIRECT unavailable on this file system")
        assert prepared is strategy and asked == [CUDA1]
        assert strategy.pin_refused is not None
        assert "Bad address" in strategy.pin_refused and str(small_file) in strategy.pin_refused
        assert report.fallbacks == [strategy.pin_refused]
    finally:
        strategy.close()
        layout.close()


def test_cpu_loads_never_probe_pinned_memory(small_file: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    asked = _refuse_pinned(monkeypatch)
    layout = resolve(small_file)
    strategy = make_strategy("direct", copying=True)
    try:
        try:
            strategy.prepare(layout.shards)
        except direct.Unavailable as exc:
            pytest.skip(f"O_DIRECT unavailable on this file system: {exc}")
        assert asked == [] and strategy.pin_refused is None
    finally:
        strategy.close()
        layout.close()


# --- NCCL backend strings and the rank's device ---------------------------------------------------

@pytest.mark.parametrize(("backend", "expected"), [
    ("cpu:gloo,cuda:nccl", {"cpu": "gloo", "cuda": "nccl"}),
    ("nccl", {"cuda": "nccl"}),
    ("gloo", {"cpu": "gloo"}),
    ("cuda:nccl", {"cuda": "nccl"}),
    ("cpu:gloo, cuda:gloo", {"cpu": "gloo", "cuda": "gloo"}),
    ("NCCL", {"cuda": "nccl"}),
])
def test_backend_strings(backend: str, expected: dict[str, str]) -> None:
    assert sync.backends(backend) == expected


def test_the_bound_device_wins() -> None:
    assert sync.nccl_device(torch.device("cuda", 2), 0, 5, rank=5) == torch.device("cuda", 2)


def test_the_current_device_is_used_when_it_matches_the_launcher() -> None:
    assert sync.nccl_device(None, 3, 3, rank=3) == torch.device("cuda", 3)
    assert sync.nccl_device(None, 1, None, rank=1) == torch.device("cuda", 1)


def test_every_rank_on_gpu_0_is_refused_with_what_to_do() -> None:
    with pytest.raises(WeightliftError, match=r"torch.cuda.set_device\(2\)") as info:
        sync.nccl_device(None, 0, 2, rank=2)
    assert "device_id=torch.device('cuda', 2)" in str(info.value)


class FakeGroup:
    bound_device_id = torch.device("cuda", 1)


@pytest.mark.parametrize(("backend", "device"), [
    ("cpu:gloo,cuda:nccl", torch.device("cuda", 1)),  # torch's default: NCCL, not host memory
    ("nccl", torch.device("cuda", 1)),
    ("gloo", torch.device("cpu")),
    ("cpu:gloo,cuda:gloo", torch.device("cpu")),
])
def test_peers_use_nccl_on_the_bound_device(monkeypatch: pytest.MonkeyPatch, backend: str,
                                            device: torch.device) -> None:
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setenv("LOCAL_RANK", "1")
    peers = sync.Peers.of(FakeGroup())  # type: ignore[arg-type]
    assert peers.device == device


def test_tensor_by_tensor_reads_keep_the_pinned_cache_until_close(
        odd_checkpoint: tuple[Path, dict[str, torch.Tensor]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """``Checkpoint.get_tensor`` reuses the cached slots between calls; ``close`` returns them."""
    path, ref = odd_checkpoint
    sink = RecordingSink(_destinations(ref))
    sink.keep_slots = True
    _run(path, sink, "direct")
    assert sink.fake.calls("side.synchronize") and not sink.released

    import weightlift.api as api
    released: list[bool] = []
    monkeypatch.setattr(api, "release_pinned_cache", lambda: released.append(True))
    with api.open(path) as ckpt:
        ckpt.get_tensor("odd")  # a CPU read pins nothing
    assert released == []
    with api.open(path) as ckpt:
        ckpt._pinned = True  # as after get_tensor(device="cuda")
    assert released == [True]
