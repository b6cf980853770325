"""The public loading API: ``load``, ``stream`` and ``open``.

Every call runs the same four steps: resolve the source (parse + validate), choose a strategy and
plan, read, place. ``run_load`` is that path once; the public functions only differ in what they keep.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .budget import resolve_budget
from .errors import CheckpointError, PlacementError
from .formats.ggml import GGMLType
from .formats.records import DTYPES
from .io import NAMES, Strategy, Unavailable, make_strategy
from .io.auto import Choice, choose, gather
from .io.engine import ENGINES, make_engine
from .place import dequantizing, make_sink, parse_device, release_pinned_cache, ring_budget
from .read import read_tensors
from .remote import StorageOptions, as_remote
from .report import LoadReport, Monitor
from .sources import Source, resolve
from .sources.records import Layout, iter_entries
from .verify import Verify, make_verifier

Device = str | torch.device
DType = torch.dtype | str | None
ProgressCallback = Callable[[int, int], None]
ReportCallback = Callable[[LoadReport], None]


def load(source: Source, *, device: Device = "cpu", keys: list[str] | None = None,
         strategy: str = "auto", dtype: DType = None, max_host_memory: int | str | None = None,
         on_progress: ProgressCallback | None = None,
         on_report: ReportCallback | None = None,
         verify: Verify | None = None,
         storage_options: StorageOptions | None = None,
         engine: str = "auto") -> dict[str, torch.Tensor]:
    """Load a checkpoint (file, list of files, or directory) into a state dict.

        state = weightlift.load("Llama-3-8B/", device="cuda", dtype=torch.float16)
        state = weightlift.load("s3://models/llama/", storage_options={"region": "us-east-2"})

    Raises a ``WeightliftError`` on any problem; never returns part of a state dict.
    ``on_progress(done_bytes, total_bytes)`` is called as data arrives and ``on_report`` once with
    the ``LoadReport`` (which also turns on memory sampling). ``verify``: check each file's
    SHA-256 as it is read (``True``: the digests of a Hugging Face cache; or ``{file: hex}``, or
    a ``sha256sum`` file), raising ``IntegrityError`` on a mismatch; see ``weightlift.verify``.
    ``storage_options`` configure object-storage URLs (``s3://``, ``gs://``, ``az://``,
    ``https://``; see docs/remote.md). ``engine``: ``"auto"`` (io_uring where it helps and works,
    else threads), ``"uring"`` or ``"threads"``.
    """
    source = as_remote(source, storage_options)
    return dict(run_load(source, keys=keys, device=device, strategy=strategy, dtype=dtype,
                     max_host_memory=max_host_memory, on_progress=on_progress,
                     on_report=on_report, streaming=False, verify=verify, engine=engine))


def stream(source: Source, *, device: Device = "cpu", keys: list[str] | None = None,
           strategy: str = "auto", dtype: DType = None, max_host_memory: int | str | None = None,
           on_progress: ProgressCallback | None = None,
           on_report: ReportCallback | None = None,
           verify: Verify | None = None,
           storage_options: StorageOptions | None = None,
           engine: str = "auto") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in file order as tensors arrive, reading at most the host-memory
    budget ahead of the consumer, so a checkpoint larger than memory can pass through.

    Tensors of CPU loads may share one buffer with their small neighbours (no copy was made).
    Closing the generator early stops the reads and releases everything at once. With ``verify``,
    a file's digest is known only once its last byte is read: the generator raises
    ``IntegrityError`` before its last tensor, after earlier ones were yielded.
    A tensor's memory is reused for later tensors only once every view of it has been dropped.
    """
    source = as_remote(source, storage_options)
    return run_load(source, keys=keys, device=device, strategy=strategy, dtype=dtype,
                max_host_memory=max_host_memory, on_progress=on_progress, on_report=on_report,
                streaming=True, verify=verify, engine=engine)


@dataclass(frozen=True)
class TensorDescription:
    """Where a tensor lives and what it is, without reading it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: str
    offset: int
    #: GGUF only: the GGML type name (``"Q4_K"``, ``"F32"``) and the logical shape; ``shape``
    #: is the stored one (``uint8`` rows of packed bytes for quantized types).
    ggml_type: str | None = None
    ggml_shape: tuple[int, ...] | None = None


class Checkpoint:
    """An open checkpoint: headers parsed and validated, files held open, nothing read yet."""

    def __init__(self, source: Source, verify: Verify | None = None,
                 storage_options: StorageOptions | None = None) -> None:
        self.layout = resolve(as_remote(source, storage_options))  # type: ignore[arg-type]
        self._choices: dict[tuple[str, bool], Choice] = {}
        self._pinned = False
        if verify is not None and verify is not False:
            try:  # one streamed pass, bounded by the budget, before any tensor is handed out
                for _ in run_load(self.layout, keys=None, device="cpu", strategy="auto",
                                  dtype=None, streaming=True, verify=verify):
                    pass
            except BaseException:
                self.layout.close()
                raise

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return [entry.name for entry in iter_entries(self.layout)]

    def metadata(self) -> Mapping[str, Any] | None:
        """safetensors: ``__metadata__`` (str → str). GGUF: key → Python value (int, float, bool,
        str, list), a ``GGUFMetadata`` mapping that decodes big arrays only when read."""
        return self.layout.metadata

    def info(self, name: str) -> TensorDescription:
        entry = next(iter_entries(self.layout, [name]))
        shard = self.layout.shards[entry.shard]
        ggml = entry.info.ggml
        return TensorDescription(name, entry.info.dtype.name, entry.info.shape, entry.info.nbytes,
                                 shard.path, entry.info.start, ggml.name if ggml else None,
                                 entry.info.ggml_shape)

    def ggml_type(self, name: str) -> GGMLType | None:
        """The GGML type of a GGUF tensor (id, block and type sizes), None for safetensors; for
        kernels that consume packed weights::

            with weightlift.open("m.gguf") as ckpt:
                kind = ckpt.ggml_type("blk.0.attn_q.weight")   # GGMLType(id=12, name='Q4_K', ...)
        """
        return next(iter_entries(self.layout, [name])).info.ggml

    @property
    def total_bytes(self) -> int:
        return self.layout.total_bytes

    def get_tensor(self, name: str, *, device: Device = "cpu", strategy: str = "auto",
                   dtype: DType = None, engine: str = "auto") -> torch.Tensor:
        # Reading tensor by tensor, keep torch's pinned blocks cached between calls (one
        # allocation, not one per tensor); ``close()`` gives them back.
        self._pinned = self._pinned or torch.device(device).type == "cuda"
        for _, tensor in run_load(self.layout, keys=[name], device=device, strategy=strategy,
                              dtype=dtype, streaming=False, choices=self._choices,
                              keep_pinned=True, engine=engine):
            return tensor
        raise AssertionError("unreachable: a selected tensor is always yielded")

    def __contains__(self, name: object) -> bool:
        return name in self.layout.entries

    def __len__(self) -> int:
        return len(self.layout.entries)

    def close(self) -> None:
        self.layout.close()
        if self._pinned:
            self._pinned = False
            release_pinned_cache()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(source: Source, *, verify: Verify | None = None,  # noqa: A001 - the name users expect
         storage_options: StorageOptions | None = None) -> Checkpoint:
    """Open a checkpoint to inspect it or read single tensors: ``with weightlift.open(p) as ckpt``.

    ``verify`` (as for ``load``) reads every file once at open to check its SHA-256, since single
    tensors read later never cover a whole file. ``storage_options`` as for ``load``.
    """
    return Checkpoint(source, verify=verify, storage_options=storage_options)


def parse_dtype(dtype: DType) -> torch.dtype | None:
    """``torch.float16``, ``"float16"`` or a safetensors name like ``"BF16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype.upper() in DTYPES:
        return DTYPES[dtype.upper()].torch
    found = getattr(torch, dtype, None)
    if isinstance(found, torch.dtype):
        return found
    raise PlacementError(f"unknown dtype {dtype!r}")


def run_load(source: Source | Layout, *, keys: list[str] | None, device: Device, strategy: str,
         dtype: DType, streaming: bool, max_host_memory: int | str | None = None,
         on_progress: ProgressCallback | None = None, on_report: ReportCallback | None = None,
         destinations: Mapping[str, torch.Tensor] | None = None,
         choices: dict[tuple[str, bool], Choice] | None = None, keep_pinned: bool = False,
         verify: Verify | None = None, engine: str = "auto"
         ) -> Iterator[tuple[str, torch.Tensor]]:
    if strategy not in NAMES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(NAMES)}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    owned = not isinstance(source, Layout)
    layout = resolve(source) if owned else source
    try:
        # Parse (done by resolve) → plan → read → place.
        entries = list(iter_entries(layout, keys))
        target = parse_device(device)
        to_dtype = parse_dtype(dtype)
        budget = resolve_budget(max_host_memory)
        unpacking = dequantizing(entries, to_dtype)
        copying = unpacking or destinations is not None or target.type != "cpu" or any(
            e.info.dtype.torch.is_floating_point and e.info.dtype.torch != to_dtype
            for e in entries if to_dtype is not None)
        total = sum(e.info.nbytes for e in entries)
        choice = _decide(strategy, layout, total, target.type, copying, streaming, budget,
                         choices)
        if choice.warning:
            warnings.warn(choice.warning, ResourceWarning, stacklevel=3)
        report = LoadReport(source=layout.index_path or layout.shards[0].path if layout.shards
                            else layout.root, device=str(target), strategy=choice.strategy,
                            reason=choice.reason, budget=budget, tensors=len(entries), bytes=total)
        report.fallbacks.extend(layout.notes)  # e.g. files re-opened under a low descriptor limit
        sink = make_sink(target, to_dtype, destinations) if copying else None
        if sink is not None:
            sink.keep_slots = keep_pinned
        # Where the consumer copies and drops (a stream, a copying load), ranges in the page
        # cache are handed out as views of mapped windows, at most the budget mapped at once.
        reader = make_strategy(choice.strategy, copying=copying, windows=copying or streaming)
        if sink is not None and sink.pinned:
            reader.pin_device = target  # probe O_DIRECT with the page-locked memory it will get
        reader = prepare_strategy(reader, layout, report)
        monitor = Monitor([s.path for s in layout.shards]) if on_report is not None else None
        progress = _progress(on_progress, total)
        started = time.perf_counter()
        verifier = None
        try:
            verifier = make_verifier(layout, entries, verify)
            runner, fallback = make_engine(engine, reader)
            report.engine = runner.name
            if fallback is not None:
                report.fallbacks.append(fallback)
            tensors = read_tensors(layout, entries, reader, sink=sink,
                                   budget=ring_budget(budget, unpacking, target),
                                   window=budget if streaming else None, progress=progress,
                                   verifier=verifier, engine=runner)
            try:
                for entry, tensor in tensors:
                    if report.time_to_first_tensor is None:
                        report.time_to_first_tensor = time.perf_counter() - started
                    yield entry.name, tensor
                    del tensor  # once the consumer drops it, its memory can take the next
            finally:
                tensors.close()  # every read reaped before the engine and the files go
                runner.close()
            report.seconds = time.perf_counter() - started
        finally:
            report.bytes_mapped = reader.viewed
            report.bytes_read = max(0, total - reader.viewed)
            report.mapped_peak = reader.mapped_peak()
            reader.close()
            if verifier is not None:
                verifier.close()
            if monitor is not None:
                monitor.finish(report)
        if on_report is not None:
            on_report(report)
    finally:
        if owned:
            layout.close()


def _decide(strategy: str, layout: Layout, total: int, device: str, copying: bool,
            streaming: bool, budget: int, choices: dict[tuple[str, bool], Choice] | None
            ) -> Choice:
    if strategy != "auto":
        return Choice(strategy, "requested", None)
    key = (device, copying)
    if choices is not None and key in choices:
        return choices[key]
    choice = choose(gather(layout.shards, total_bytes=total, device=device, copying=copying,
                           streaming=streaming, budget=budget, probe_direct=False))
    if choices is not None:
        choices[key] = choice
    return choice


def prepare_strategy(strategy: Strategy, layout: Layout, report: LoadReport) -> Strategy:
    """Prepare ``strategy``; where the file system refuses O_DIRECT, fall back to ``stream``."""
    if strategy.name != "remote" and any(shard.remote for shard in layout.shards):
        raise CheckpointError(f"is in object storage and strategy {strategy.name!r} reads local "
                              "files: use strategy='auto' or 'remote'", path=layout.root)
    try:
        strategy.prepare(layout.shards)
    except Unavailable as exc:
        message = f"{strategy.name} is unavailable ({exc}); falling back to stream"
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        report.fallbacks.append(message)
        report.strategy = "stream"
        fallback = make_strategy("stream", windows=strategy.windows is not None)
        fallback.pin_device = strategy.pin_device
        fallback.prepare(layout.shards)
        return fallback
    if strategy.pin_refused is not None:
        report.fallbacks.append(strategy.pin_refused)
    return strategy


def _progress(callback: ProgressCallback | None, total: int) -> Callable[[int], None] | None:
    if callback is None:
        return None
    done = 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        callback(done, total)

    return advance


__all__ = ["Checkpoint", "TensorDescription", "load", "open", "stream"]
