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

from .budget import MINIMUM_DEFAULT, available_memory, default_budget, resolve_budget
from .errors import CheckpointError, PlacementError
from .formats.ggml import GGMLType
from .formats.records import DTYPES
from .io import NAMES, Strategy, Unavailable, make_strategy
from .io.auto import Choice, choose, gather, small
from .io.engine import ENGINES, Engine, InlineEngine, make_engine
from .io.mapped import MmapStrategy
from .place import (as_tensor, dequantizing, make_sink, parse_device, release_pinned_cache,
                    ring_budget)
from .read import read_tensors
from .remote import StorageOptions, as_remote
from .report import SAMPLED_FROM, LoadReport, Monitor
from .sources import Source, resolve
from .sources.records import Entry, Layout, iter_entries
from .verify import Verify, check_verify, make_verifier

Device = str | torch.device
_CPU_DEVICE = torch.device("cpu")
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
    tensors = run_load(source, keys=keys, device=device, strategy=strategy, dtype=dtype,
                       max_host_memory=max_host_memory, on_progress=on_progress,
                       on_report=on_report, streaming=False, verify=verify, engine=engine)
    try:
        return dict(tensors)
    finally:
        # Closed here, not by the garbage collector: an interrupt that lands while the load
        # winds down is then raised to the caller instead of printed and dropped ("Exception
        # ignored in: <generator object run_load>", seen in the real-signal test).
        tensors.close()


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
        check_verify(verify)
        self.layout = resolve(as_remote(source, storage_options))  # type: ignore[arg-type]
        self._choices: dict[tuple[str, bool, bool], Choice] = {}
        self._pinned = False
        #: The small path's mapped files for ``get_tensor`` (None: not asked yet; False: the
        #: checkpoint does not take that path).
        self._mapped: MmapStrategy | bool | None = None
        if verify:  # checked above: None, False, or something to check
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
        if strategy == "auto" and engine == "auto" and dtype is None and (
                device == "cpu" or parse_device(device) == _CPU_DEVICE):
            tensor = self._mapped_tensor(name)
            if tensor is not None:
                return tensor
        # Reading tensor by tensor, keep torch's pinned blocks cached between calls (one
        # allocation, not one per tensor); ``close()`` gives them back.
        self._pinned = self._pinned or torch.device(device).type == "cuda"
        for _, tensor in run_load(self.layout, keys=[name], device=device, strategy=strategy,
                              dtype=dtype, streaming=False, choices=self._choices,
                              keep_pinned=True, engine=engine):
            return tensor
        raise AssertionError("unreachable: a selected tensor is always yielded")

    def _mapped_tensor(self, name: str) -> torch.Tensor | None:
        """``name`` as the small-file path loads it (``io/auto.small``: files within the
        budget, mapped), without a load's set-up per tensor: the files are mapped once, at the
        first call, and kept until ``close``; each call checks the file is unchanged (before and
        after), maps in
        the tensor's pages unless every one is cached (counted then, not at the first call: a
        page read by its first touch could fail with SIGBUS) and returns a zero-copy view.
        None where the checkpoint does not take that path."""
        if self._mapped is None:
            if small(self.layout.shards, device="cpu", copying=False, budget=None) is None:
                self._mapped = False
            else:
                reader = MmapStrategy(skip_cached=True, known_cached=True)  # ``cover`` counts
                try:
                    reader.prepare(self.layout.shards)
                except BaseException:
                    reader.close()
                    raise
                self._mapped = reader
        if self._mapped is False:
            return None
        reader = self._mapped
        entry = next(iter_entries(self.layout, [name]))
        info = entry.info
        shard = self.layout.shards[entry.shard]
        shard.check_unchanged()  # e.g. edited since it was opened: said before any page is read
        reader.cover(entry.shard, info.start, info.end)
        shard.check_unchanged()
        return as_tensor(reader.view(entry.shard, info.start, info.end), info)

    def __contains__(self, name: object) -> bool:
        return name in self.layout.entries

    def __len__(self) -> int:
        return len(self.layout.entries)

    def close(self) -> None:
        if isinstance(self._mapped, MmapStrategy):
            self._mapped.close()  # tensors handed out keep their mapping alive
        self._mapped = None
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
         choices: dict[tuple[str, bool, bool], Choice] | None = None, keep_pinned: bool = False,
         verify: Verify | None = None, engine: str = "auto"
         ) -> Iterator[tuple[str, torch.Tensor]]:
    if strategy not in NAMES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(NAMES)}")
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    check_verify(verify)
    owned = not isinstance(source, Layout)
    layout = resolve(source, _read_ahead(strategy, engine, verify, device, dtype, destinations,
                                         max_host_memory)) if owned else source
    try:
        # Parse (done by resolve) → plan → read → place.
        entries = list(iter_entries(layout, keys))
        target = parse_device(device)
        to_dtype = parse_dtype(dtype)
        budget = None if max_host_memory is None else resolve_budget(max_host_memory)
        unpacking = dequantizing(entries, to_dtype)
        copying = unpacking or destinations is not None or target.type != "cpu" or any(
            e.info.dtype.torch.is_floating_point and e.info.dtype.torch != to_dtype
            for e in entries if to_dtype is not None)
        total = sum(e.info.nbytes for e in entries)
        quick = strategy == "auto" and engine == "auto" and verify in (None, False)
        budget_of = _Budget(budget)
        choice = _decide(strategy, layout, total, target.type, copying, streaming, budget_of,
                         choices, quick)
        if not choice.small or on_report is not None:
            budget = budget_of()  # the small path needs none: only its report shows it
        if choice.warning:
            warnings.warn(choice.warning, ResourceWarning, stacklevel=3)
        report = LoadReport(source=layout.index_path or layout.shards[0].path if layout.shards
                            else layout.root, device=str(target), strategy=choice.strategy,
                            reason=choice.reason, budget=budget or 0, tensors=len(entries),
                            bytes=total)
        report.fallbacks.extend(layout.notes)  # e.g. files re-opened under a low descriptor limit
        report.missing.extend(layout.missing)
        report.notes.extend(layout.accepted)
        sink = make_sink(target, to_dtype, destinations) if copying else None
        if sink is not None:
            sink.keep_slots = keep_pinned
        if strategy == "auto" and choice.strategy == "mmap" and not copying:
            # Files wholly in the page cache are mapped as they are: no page to read, none to
            # populate (6 GB: ~0.5 s of page-table work otherwise). A named mmap populates.
            facts = choice.facts
            reader: Strategy = MmapStrategy(skip_cached=True, known_cached=facts is not None
                                            and facts.resident_bytes >= facts.file_bytes > 0)
        else:
            # Where the consumer copies and drops (a stream, a copying load), ranges in the page
            # cache are handed out as views of mapped windows, at most the budget mapped at once.
            reader = make_strategy(choice.strategy, copying=copying,
                                   windows=copying or streaming)
        if sink is not None and sink.pinned:
            reader.pin_device = target  # probe O_DIRECT with the page-locked memory it will get
        reader = prepare_strategy(reader, layout, report)
        if choice.small:
            _expect(reader, entries)  # type: ignore[arg-type]
        elif streaming and isinstance(reader, MmapStrategy) and reader.skip_cached and entries:
            # A stream's consumer touches every tensor: map the cached pages ahead of it on the
            # engine's threads (2 cores: 1.0-1.2 s against 1.4-2.1 s for a warm 3 GB stream
            # copied out), all but the first tensor's, which is handed out at once.
            reader.map_ahead = True
            reader.lazy_until = (entries[0].shard, entries[0].info.end)
        monitor = (Monitor([s.path for s in layout.shards], sample=total >= SAMPLED_FROM)
                   if on_report is not None else None)
        progress = _progress(on_progress, total)
        started = time.perf_counter()
        verifier = None
        try:
            verifier = make_verifier(layout, entries, verify, every_file=keys is None)
            runner: Engine
            if choice.small or (engine == "auto" and _maps_cached_pages(reader)
                                and not streaming):
                # A few mappings, or pages mostly cached: less work than a thread's start and
                # its hand-offs (~0.15 ms each, milliseconds on a busy machine).
                runner, fallback = InlineEngine(), None
            else:
                runner, fallback = make_engine(engine, reader)
            report.engine = runner.name
            if fallback is not None:
                report.fallbacks.append(fallback)
            # The small path's files fit in the budget: a window could never bind there.
            window = budget if streaming and not choice.small else None
            tensors = read_tensors(layout, entries, reader, sink=sink,
                                   budget=ring_budget(budget or 0, unpacking, target),
                                   window=window, progress=progress,
                                   verifier=verifier, engine=runner)
            try:
                for entry, tensor in tensors:
                    if report.time_to_first_tensor is None:
                        report.time_to_first_tensor = time.perf_counter() - started
                    yield entry.name, tensor
                    del tensor  # once the consumer drops it, its memory can take the next
            finally:
                try:
                    tensors.close()  # every read reaped before the engine and the files go
                finally:
                    runner.close()  # also when an interrupt during the reaping is raised
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
        # Here, not only in ``Layout.close``: an interrupt as that call starts would skip it.
        interrupted: BaseException | None = None
        while owned:
            try:
                layout.close()  # closing again is safe
                break
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted


def _decide(strategy: str, layout: Layout, total: int, device: str, copying: bool,
            streaming: bool, budget: _Budget,
            choices: dict[tuple[str, bool, bool], Choice] | None,
            quick: bool = False) -> Choice:
    """The strategy: as named, else the small-file path where it applies (``quick``: nothing
    rules it out, such as a named engine or ``verify``), else ``auto``'s general rules."""
    if strategy != "auto":
        return Choice(strategy, "requested", None)
    key = (device, copying, quick)
    if choices is not None and key in choices:
        return choices[key]
    choice = (small(layout.shards, device=device, copying=copying, budget=budget.explicit,
                    default=budget) if quick else None)
    if choice is None:
        choice = choose(gather(layout.shards, total_bytes=total, device=device, copying=copying,
                               streaming=streaming, budget=budget(), probe_direct=False,
                               available=budget.available))
    if choices is not None:
        choices[key] = choice
    return choice


def _read_ahead(strategy: str, engine: str, verify: Verify | None, device: Device,
                dtype: DType, destinations: Mapping[str, torch.Tensor] | None,
                max_host_memory: int | str | None) -> int:
    """Up to what size a single file this load opens may be read ahead whole as its header is
    read (``sources.resolve``): where the small path will map it (a CPU load, nothing named),
    within the smallest default budget or the one set. 0: not at all."""
    if (strategy != "auto" or engine != "auto" or verify not in (None, False) or dtype is not None
            or destinations is not None or str(device) != "cpu"):
        return 0
    if max_host_memory is None:
        return MINIMUM_DEFAULT
    try:
        return min(MINIMUM_DEFAULT, resolve_budget(max_host_memory))
    except ValueError:
        return 0  # raised with the load's other checks


class _Budget:
    """A load's budget: the one set, else the default, measured on first use and only once (it
    reads available memory and the cgroup limit, which ``gather`` then reuses)."""

    def __init__(self, explicit: int | None) -> None:
        self.explicit = explicit
        self.available: int | None = None
        self._value = explicit

    def __call__(self) -> int:
        if self._value is None:
            self.available = available_memory()
            self._value = default_budget(self.available)
        return self._value


def _maps_cached_pages(reader: Strategy) -> bool:
    """Whether ``reader`` leaves cached pages as they are (auto's mmap: the checkpoint is at
    least ``auto.WARM`` cached), so it populates at most the few missing ones."""
    return isinstance(reader, MmapStrategy) and reader.skip_cached and not reader.release


def _expect(reader: MmapStrategy, entries: list[Entry]) -> None:
    """Tell a mapped reader which span of each file the load wants, so uncached ones are read
    in large requests at once (``MmapStrategy.expect``)."""
    spans: dict[int, tuple[int, int]] = {}
    for entry in entries:
        lo, hi = spans.get(entry.shard, (entry.info.start, entry.info.end))
        spans[entry.shard] = (min(lo, entry.info.start), max(hi, entry.info.end))
    for shard, (lo, hi) in spans.items():
        if hi > lo:
            reader.expect(shard, lo, hi)


def prepare_strategy(strategy: Strategy, layout: Layout, report: LoadReport) -> Strategy:
    """Prepare ``strategy``; where the file system refuses O_DIRECT, fall back to ``stream``."""
    if strategy.name != "remote" and any(shard.remote for shard in layout.shards):
        raise CheckpointError(f"is in object storage and strategy {strategy.name!r} reads local "
                              "files: use strategy='auto' or 'remote'", path=layout.root)
    try:
        try:
            strategy.prepare(layout.shards)
        finally:
            for shard in layout.shards:
                if not shard.remote:
                    shard.resident_hint = None  # the decision's estimate: for this load only
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
