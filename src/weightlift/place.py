"""Place: turn raw bytes into tensors where the user wants them.

``as_tensor`` makes a tensor of the right dtype and shape out of bytes we own (a view when the
address allows it). ``Sink`` receives pieces of tensors from ring slots and copies them into
destination tensors — fresh ones on a device, ones of another dtype, or a module's parameters —
converting dtype piece by piece, on the device for accelerator targets, never as a second host copy.
Packed GGML tensors loaded with a floating ``dtype`` are dequantized the same way: each piece holds
whole blocks, and only packed bytes travel to a device, where the kernels run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch

from .dequant import check_supported, dequantize, packed_type, unpacked_shape
from .errors import PlacementError
from .formats.ggml import GGMLType
from .formats.records import TensorInfo
from .io.base import Prefaulter, host_buffer
from .plan import Piece
from .sources.records import Entry

#: Host bytes a dequantizing CPU load keeps out of the read ring: float32 intermediates of one
#: batch (2**18 elements: ~4 MiB at once) and the allocator's slack around them.
DEQUANT_WORKSPACE = 16 << 20


def as_tensor(raw: torch.Tensor, info: TensorInfo) -> torch.Tensor:
    """The tensor ``info`` describes, over ``raw`` (uint8 bytes of exactly ``info.nbytes``)."""
    if info.nbytes == 0:
        return torch.empty(info.torch_shape, dtype=info.dtype.torch)
    return typed_view(raw, info.dtype.torch).view(info.torch_shape)


def as_tensors(raw: torch.Tensor, start: int, entries: Sequence[Entry]) -> list[torch.Tensor]:
    """``as_tensor`` of each of ``entries`` (adjacent, in file order) over ``raw``, the bytes
    from file offset ``start``, in bulk: each run of one dtype is one typed view cut with one
    ``split`` (two torch calls per tensor, a shape view and its share of the split, instead
    of a slice, a dtype view and a shape view: ~5 against ~3 µs a tensor here)."""
    out: list[torch.Tensor] = []
    count = len(entries)
    i = 0
    while i < count:
        info = entries[i].info
        dtype = info.dtype
        j = i + 1
        if info.nbytes and dtype.pack == 1:
            while (j < count and entries[j].info.dtype is dtype and entries[j].info.nbytes
                   and entries[j].info.start == entries[j - 1].info.end):
                j += 1
        lo = info.start - start
        if j - i == 1:
            out.append(as_tensor(raw[lo:lo + info.nbytes], info))
            i = j
            continue
        try:
            typed = raw[lo:entries[j - 1].info.end - start].view(dtype.torch)
        except RuntimeError:  # an offset the dtype cannot be viewed at: one by one (copies)
            out.extend(as_tensor(raw[e.info.start - start:e.info.end - start], e.info)
                       for e in entries[i:j])
            i = j
            continue
        size = dtype.itemsize
        pieces = typed.split([e.info.nbytes // size for e in entries[i:j]])
        out.extend(piece if len(e.info.shape) == 1 else piece.view(e.info.shape)
                   for e, piece in zip(entries[i:j], pieces))
        i = j
    return out


def typed_view(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``raw`` (uint8) seen as ``dtype``; copied only when its offset cannot hold that dtype."""
    try:
        return raw.view(dtype)
    except RuntimeError:
        # Bytes at an offset the dtype cannot be viewed at (after an odd-sized tensor).
        return raw.clone().view(dtype)


_CPU = torch.device("cpu")


def parse_device(device: str | torch.device) -> torch.device:
    if device == "cpu":  # the common case, without torch parsing the string (~10 µs)
        return _CPU
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise PlacementError(f"unknown device {device!r}: {exc}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise PlacementError(f"device {device!r} requested but this torch has no usable "
                                 "CUDA/ROCm device")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    elif dev.type not in ("cpu", "meta") and not hasattr(torch, dev.type):
        raise PlacementError(f"unsupported device {device!r}")
    return dev


Allocate = Callable[[Entry], torch.Tensor]


class Sink:
    """Destinations of a copying load; copies are synchronous on the CPU."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None,
                 destinations: Mapping[str, torch.Tensor] | None = None) -> None:
        self.device = device
        self.dtype = dtype
        self.destinations = destinations
        self.targets: dict[str, torch.Tensor] = {}
        self.unpacking: dict[str, GGMLType] = {}  # targets filled by dequantizing packed pieces
        self.prefault = Prefaulter()  # fresh CPU targets are faulted in on a second core

    def target_dtype(self, info: TensorInfo) -> torch.dtype:
        if self.dtype is not None and self.dtype.is_floating_point and packed_type(info):
            return self.dtype  # dequantized
        if self.dtype is not None and info.dtype.torch.is_floating_point and info.dtype.pack == 1:
            # like .to(dtype) on a state dict: integer and bool tensors keep theirs, and so do
            # packed F4 tensors, which torch cannot convert
            return self.dtype
        return info.dtype.torch

    def target(self, entry: Entry) -> torch.Tensor:
        dst = self.targets.get(entry.name)
        if dst is None:
            dst = self._make(entry)
            self.targets[entry.name] = dst
        return dst

    def _make(self, entry: Entry) -> torch.Tensor:
        info = entry.info
        shape = info.torch_shape
        kind = packed_type(info)
        dtype = self.target_dtype(info) if self.destinations is None else (
            self.destinations[entry.name].dtype)
        if kind is not None and dtype.is_floating_point:
            self.unpacking[entry.name] = check_supported(kind, tensor=entry.name)
            shape = unpacked_shape(shape, kind)
        if self.destinations is None:
            if self.device.type != "cpu":
                return torch.empty(shape, dtype=dtype, device=self.device)
            numel = 1
            for size in shape:
                numel *= size
            itemsize = torch.empty((), dtype=dtype).element_size()
            return self.prefault.buffer(numel * itemsize).view(dtype).view(shape)
        dst = self.destinations[entry.name]
        if tuple(dst.shape) != shape:
            raise PlacementError(f"checkpoint shape {list(shape)} does not match the "
                                 f"destination's {list(dst.shape)}", tensor=entry.name)
        if not dst.is_contiguous():
            raise PlacementError("destination is not contiguous", tensor=entry.name)
        return dst

    def place(self, piece: Piece, src: torch.Tensor) -> None:
        """Copy ``src`` (host uint8, the piece's bytes) into the piece's place in its target."""
        if piece.end == piece.begin:
            self.target(piece.entry)
            return
        dst = self.target(piece.entry).view(-1)
        info = piece.entry.info
        kind = self.unpacking.get(piece.entry.name)
        if kind is not None:  # pieces of packed tensors are whole blocks (plan_chunks)
            lo = piece.begin // kind.type_size * kind.block_size
            hi = piece.end // kind.type_size * kind.block_size
            self._dequantize(dst[lo:hi], src, kind)
            return
        if dst.dtype == info.dtype.torch:
            self._copy(dst.view(torch.uint8)[piece.begin:piece.end], src)
            return
        size = info.dtype.itemsize
        self._convert(dst[piece.begin // size:piece.end // size], src, info.dtype.torch)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        dst.copy_(src)

    def _convert(self, dst: torch.Tensor, raw: torch.Tensor, dtype: torch.dtype) -> None:
        """Fill ``dst`` from ``raw`` (uint8 bytes of ``dtype`` values), converting."""
        dst.copy_(typed_view(raw, dtype))

    #: Ring slots are page-locked, so copies out of them can run asynchronously.
    pinned = False
    #: Keep what the allocator cached for the slots after the load (the next one reuses it).
    keep_slots = False

    def slot(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        """A host buffer for the ring (page-locked if ``pinned``)."""
        return host_buffer(nbytes, pin=pinned)

    def _dequantize(self, dst: torch.Tensor, src: torch.Tensor, kind: GGMLType) -> None:
        dequantize(src, kind, dst.dtype, out=dst)

    def fence(self) -> object | None:
        """Something to wait on before the source slot may be reused (None: already safe)."""
        return None

    def wait(self, fence: object | None) -> None:
        """Block until ``fence`` (from ``fence()``) has passed."""
        if fence is not None:
            fence.synchronize()  # type: ignore[attr-defined]

    def drain(self) -> None:
        """Wait for every copy queued so far, fenced or not (copies here are synchronous), and
        for the prefaulting thread."""
        self.prefault.close()

    def release_slots(self) -> None:
        """The ring's slots are gone; give back what an allocator cached for them."""

    def finish(self, entry: Entry) -> torch.Tensor:
        self.unpacking.pop(entry.name, None)
        return self.targets.pop(entry.name)


class AcceleratorSink(Sink):
    """CUDA/ROCm: copies from pinned slots run on a side stream and overlap the next reads.

    Everything touching the side stream runs with the target device current, so a load to
    ``cuda:1`` never creates a context on GPU 0. New destinations are allocated on the side stream
    (the caching allocator then orders their reuse on it, so the copies never wait for work queued
    on the caller's stream) and handed over with ``record_stream`` on the consumer's stream.
    Destinations given by the caller are written only after work already queued on its stream.

        sink = AcceleratorSink(torch.device("cuda", 1), torch.float16)

    ``runtime`` is the ``torch.cuda`` module (tests pass a recording stand-in).
    """

    pinned = True

    def __init__(self, device: torch.device, dtype: torch.dtype | None = None,
                 destinations: Mapping[str, torch.Tensor] | None = None, *,
                 runtime: ModuleType | Any | None = None) -> None:
        super().__init__(device, dtype, destinations)
        self.cuda = torch.cuda if runtime is None else runtime
        with self.cuda.device(device):
            self.stream = self.cuda.Stream(device=device)
            if destinations is not None:
                # The caller's tensors may still be in use by work queued on its stream: once.
                self.stream.wait_stream(self.cuda.current_stream(device))

    @contextmanager
    def _side(self) -> Iterator[None]:
        with self.cuda.device(self.device), self.cuda.stream(self.stream):
            yield

    def _make(self, entry: Entry) -> torch.Tensor:
        if self.destinations is not None:
            return super()._make(entry)
        with self._side():
            return super()._make(entry)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        with self._side():
            dst.copy_(src, non_blocking=True)

    def _convert(self, dst: torch.Tensor, raw: torch.Tensor, dtype: torch.dtype) -> None:
        with self._side():
            # Move the bytes as they are, then view and convert on the device: a fresh device
            # buffer is aligned for any dtype, so odd source offsets need no host copy.
            dst.copy_(self._upload(raw).view(dtype))

    def _upload(self, raw: torch.Tensor) -> torch.Tensor:
        """``raw``'s bytes in a fresh device buffer, copied on the current (side) stream."""
        return raw.to(self.device, non_blocking=True)

    def slot(self, nbytes: int, *, pinned: bool) -> torch.Tensor:
        # Page-locked memory is registered with the current device's context: the target's.
        with self.cuda.device(self.device):
            return host_buffer(nbytes, pin=pinned)

    def _dequantize(self, dst: torch.Tensor, src: torch.Tensor, kind: GGMLType) -> None:
        with self._side():
            # Only the packed bytes cross the bus; the kernels run on the device.
            dequantize(self._upload(src), kind, dst.dtype, out=dst)

    def fence(self) -> object | None:
        with self.cuda.device(self.device):
            event = self.cuda.Event(blocking=True)  # waiting on it sleeps instead of spinning
            event.record(self.stream)
        return event

    def wait(self, fence: object | None) -> None:
        with self.cuda.device(self.device):  # no runtime call may touch GPU 0's context
            super().wait(fence)

    def drain(self) -> None:
        with self.cuda.device(self.device):
            self.stream.synchronize()

    def release_slots(self) -> None:
        if self.keep_slots:
            return
        with self.cuda.device(self.device):
            release_pinned_cache()

    def finish(self, entry: Entry) -> torch.Tensor:
        dst = super().finish(entry)
        with self.cuda.device(self.device):
            consumer = self.cuda.current_stream(self.device)
            consumer.wait_stream(self.stream)
            if self.destinations is None:
                # Freed by the consumer, the block must not return to the side stream's pool
                # while the consumer's queued work may still read it.
                dst.record_stream(consumer)
        return dst


def release_pinned_cache() -> bool:
    """Return torch's cached, unused page-locked host blocks to the OS; False if this torch
    cannot. Blocks still in use (another load's ring, the caller's tensors) are kept."""
    empty = getattr(getattr(torch, "accelerator", None), "empty_host_cache", None)
    if empty is None:
        return False
    empty()
    return True


def dequantizing(entries: Iterable[Entry], dtype: torch.dtype | None) -> bool:
    """Whether a load into ``dtype`` dequantizes some of ``entries`` (packed GGML tensors and a
    floating dtype). Raises ``UnsupportedQuantization`` before any read for a type it cannot."""
    if dtype is None or not dtype.is_floating_point:
        return False
    found = False
    for entry in entries:
        kind = packed_type(entry.info)
        if kind is not None:
            check_supported(kind, tensor=entry.name)
            found = True
    return found


def ring_budget(budget: int, unpacking: bool, device: torch.device) -> int:
    """The part of the host budget the read ring may use: all of it, except that a CPU load that
    dequantizes leaves ``DEQUANT_WORKSPACE`` (at most a quarter) for the kernels' intermediates."""
    if unpacking and device.type == "cpu":
        return budget - min(DEQUANT_WORKSPACE, budget // 4)
    return budget


def make_sink(device: torch.device, dtype: torch.dtype | None,
              destinations: Mapping[str, torch.Tensor] | None = None) -> Sink:
    if device.type == "cuda":
        return AcceleratorSink(device, dtype, destinations)
    return Sink(device, dtype, destinations)
