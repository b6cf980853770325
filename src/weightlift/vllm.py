"""weightlift as a vLLM load format: ``--load-format weightlift``.

    vllm serve Llama-3-8B/ --load-format weightlift \\
        --model-loader-extra-config '{"max_host_memory": "1GB", "report": true}'
    LLM(model="Llama-3-8B/", load_format="weightlift")

Installing weightlift is all it takes: its ``vllm.general_plugins`` entry point makes vLLM call
``register`` in every process it starts (front end, engine core, workers), and ``register`` adds
``load_format="weightlift"`` to vLLM's model-loader registry. vLLM is imported only by
``register`` and ``loader_class``, which only vLLM calls: plain ``import weightlift`` (or of this
module) never imports it.

The loader is vLLM's default loader with one part swapped, as vLLM's own ``runai_streamer`` is:
the files are chosen exactly as for ``load_format="safetensors"`` (local directory or hub cache,
index filtering, the multimodal and unused-shard filters, expert-parallel key filtering), and the
weights iterator is ``weightlift.stream``: tensors arrive in file order, read at most the
host-memory budget ahead of the model's ``load_weights``, which copies each into vLLM's own
parameters. Under tensor parallelism the ranks of vLLM's tensor-parallel group read the
checkpoint together (``weightlift.distributed.stream_sharded``): on one host through the page
cache they share (each byte read by one rank, every rank mapping it, within the budget), across
hosts each byte read by one rank and sent to the others over the group's CPU (gloo) communicator.

Options (``model_loader_extra_config``), see ``docs/vllm.md``: ``max_host_memory``, ``strategy``,
``engine``, ``verify``, ``report``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist

from . import api
from .budget import MINIMUM, resolve_budget
from .distributed import RankFailed, ShardReport, stream_sharded
from .errors import CheckpointWarning, WeightliftError
from .report import LoadReport
from .verify import check_verify

LOAD_FORMAT = "weightlift"
#: The strategies a user may ask for. The default reads into a ring of buffers: ``direct``
#: (O_DIRECT where the file system allows it, cached ranges copied out of the page cache; it
#: falls back to ``stream`` where O_DIRECT is refused). ``auto`` may map a warm checkpoint.
STRATEGIES = ("direct", "stream", "auto", "mmap")
ENGINES = ("auto", "uring", "threads")

#: Under "vllm." so that vLLM's logging configuration shows our lines with its own.
logger = logging.getLogger("vllm.weightlift")
#: The index name of a sharded checkpoint (transformers' ``SAFE_WEIGHTS_INDEX_NAME``).
INDEX = "model.safetensors.index.json"


@dataclasses.dataclass(frozen=True)
class Options:
    """``model_loader_extra_config`` of ``load_format="weightlift"``, checked before any read."""

    #: The host memory the load itself may hold (bytes, or "512MB", "1.5GiB"); None: weightlift's
    #: default (half of the available memory, at most 512 MB).
    max_host_memory: int | str | None = None
    strategy: str = "direct"
    engine: str = "auto"
    #: True: each file's SHA-256 against the blob name of the Hugging Face cache; a path: a
    #: ``sha256sum`` file; a mapping: ``{file name: hex digest}``.
    verify: bool | str | Mapping[str, str] = False
    #: Log the LoadReport (strategy and why, GB/s, peak host memory) through vLLM's logger.
    report: bool = False

    @classmethod
    def parse(cls, config: Any) -> Options:
        if not isinstance(config, Mapping):
            raise ValueError(f"weightlift: model_loader_extra_config must be a JSON object, got "
                             f"{type(config).__name__}")
        config = dict(config)
        known = [field.name for field in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(known))
        if unknown:
            raise ValueError(f"weightlift: unknown model_loader_extra_config key(s) "
                             f"{', '.join(map(repr, unknown))}; valid keys: {', '.join(known)}")
        options = cls(**config)
        options.check()
        return options

    def check(self) -> None:
        """Every option, as ``weightlift.stream`` would check it, before any file is read: the
        errors name the key, the value and what is valid."""
        budget = self.max_host_memory
        valid = (f"a number of bytes of at least {MINIMUM} ({MINIMUM >> 20} MiB) or a size such "
                 "as '512MB'")
        if budget is not None and (isinstance(budget, bool)
                                   or not isinstance(budget, (int, str))):
            raise ValueError(f"weightlift: max_host_memory must be {valid}, got {budget!r}")
        if budget is not None:
            try:
                resolve_budget(budget)
            except ValueError as exc:
                raise ValueError(f"weightlift: max_host_memory={budget!r} is not {valid}: "
                                 f"{exc}") from None
        if self.strategy not in STRATEGIES:
            raise ValueError(f"weightlift: unknown strategy {self.strategy!r}; choose one of "
                             f"{', '.join(STRATEGIES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"weightlift: unknown engine {self.engine!r}; choose one of "
                             f"{', '.join(ENGINES)}")
        if not isinstance(self.verify, (bool, str, Mapping)):
            raise ValueError(f"weightlift: verify must be true, the path of a sha256sum file or "
                             f"{{file: sha256}}, got {self.verify!r}")
        try:
            check_verify(self.verify)
        except (ValueError, TypeError) as exc:  # the message names verify and its value
            raise ValueError(f"weightlift: {exc}") from None
        except WeightliftError as exc:  # a digest file or digest: the message names it
            raise ValueError(f"weightlift: verify={self.verify!r}: {exc}") from None
        if not isinstance(self.report, bool):
            raise ValueError(f"weightlift: report must be true or false, got {self.report!r}")


@functools.cache
def loader_class() -> type:
    """``WeightliftModelLoader``, a subclass of vLLM's ``DefaultModelLoader``, built on first use
    so that vLLM is imported only when vLLM asks for the loader."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight
    from vllm.model_executor.model_loader.weight_utils import (
        filter_mm_encoder_only_safetensors_files,
        filter_safetensors_files_by_weight_name,
    )

    class WeightliftModelLoader(DefaultModelLoader):
        """vLLM's default loader, set up as for ``load_format="safetensors"`` (its file
        selection is ours), whose weights come from ``read_weights``."""

        def __init__(self, load_config: Any) -> None:
            self.options = Options.parse(load_config.model_loader_extra_config)
            super().__init__(dataclasses.replace(load_config, load_format="safetensors",
                                                 model_loader_extra_config={}))

        def _get_weights_iterator(self, source: Any) -> Iterator[tuple[str, torch.Tensor]]:
            """The files ``DefaultModelLoader._get_weights_iterator`` picks, read by weightlift
            (that method's selection steps, its weights iterator swapped)."""
            if self.load_config.safetensors_load_strategy == "torchao":
                raise ValueError("weightlift: torchao-serialized checkpoints need vLLM's own "
                                 "loader (load_format='safetensors')")
            check_index(source.model_or_path, source.subfolder, source.allow_patterns_overrides)
            folder, files, _, index_file = self._prepare_weights(
                source.model_or_path, source.subfolder, source.revision, source.fall_back_to_pt,
                source.allow_patterns_overrides)
            if self._encoder_only_lm_prefixes is not None:
                files = filter_mm_encoder_only_safetensors_files(
                    files, folder, index_file, self._encoder_only_lm_prefixes,
                    weights_mapper=self._encoder_only_weights_mapper)
                if not files:
                    raise RuntimeError(f"weightlift: the mm-encoder-only filter removed every "
                                       f"weight file of {source.model_or_path!r}")
            if source.is_unused_weight is not None:
                files = filter_safetensors_files_by_weight_name(files, source.is_unused_weight)
            experts = self.local_expert_ids  # expert parallelism: other ranks' experts skipped
            wanted = None if experts is None else (
                lambda name: not should_skip_weight(name, experts))
            if self.counter_before_loading_weights == 0.0:
                self.counter_before_loading_weights = time.perf_counter()
            weights = read_weights(files, self.options, wanted, _tensor_parallel_group())
            return ((source.prefix + name, tensor) for name, tensor in weights)

    WeightliftModelLoader.__qualname__ = "WeightliftModelLoader"  # as vLLM's log names it
    return WeightliftModelLoader


def read_weights(files: list[str], options: Options, wanted: Callable[[str], bool] | None = None,
                 group: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` of ``files`` (the tensors ``wanted`` accepts), read by weightlift.

    Alone (``group`` None): ``weightlift.stream`` in file order, at most the budget ahead of the
    consumer. In a tensor-parallel ``group`` of several ranks: every rank gets every tensor it
    wants, the group reading each byte once (``collective``).
    """
    files = sorted(files, key=_natural)  # the order vLLM's own iterator reads them in
    if group is not None:
        yield from collective(files, wanted, options, group)
        return
    keys = None
    if wanted is not None:
        with api.open(files) as checkpoint:
            keys = [name for name in checkpoint.keys() if wanted(name)]
    verify = options.verify or None
    if verify is not None and keys is not None:
        _verify(files, options)  # weightlift verifies whole files only: do it before
        verify = None
    yield from api.stream(files, keys=keys, strategy=options.strategy,
                                 max_host_memory=options.max_host_memory, engine=options.engine,
                                 verify=verify, on_report=_log_report if options.report else None)


def collective(files: list[str], wanted: Callable[[str], bool] | None, options: Options,
               group: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """Every rank of ``group`` gets the whole tensors it wants (``wanted``: with expert
    parallelism, each rank its own experts), the group reading each byte once.

    vLLM's weight loaders cut each rank's shard out of the full tensors.
    ``weightlift.distributed.stream_sharded`` plans once over the union of what the ranks want:
    on one host the ranks share the page cache (each byte read from storage by one rank, every
    rank handed zero-copy views, at most ``max_host_memory`` of the checkpoint mapped or cached
    by the load); across hosts each byte is read by one rank and sent to the others over the
    group's CPU (gloo) communicator. Any rank failing — a read, or vLLM's weight loader raising
    on one rank — makes every rank raise.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if options.verify:
        _verify_together(files, options, group, rank, world)
    yield from stream_sharded(files, wanted=wanted, group=group, strategy=options.strategy,
                              max_host_memory=options.max_host_memory,
                              on_report=_log_shard_report if options.report else None)


def _log_shard_report(report: ShardReport) -> None:
    logger.info("weightlift: rank %d of %d: %d tensors, read %.1f of %.1f MB (the group: "
                "%.1f MB) sharing through %s, in %.2f s (slowest rank %.2f s), %.2f GB/s for "
                "the group", report.rank, report.world_size, report.tensors,
                report.bytes_read / 1e6, report.checkpoint_bytes / 1e6,
                report.total_bytes_read / 1e6, report.share, report.seconds,
                report.slowest_seconds, report.checkpoint_bytes / report.slowest_seconds / 1e9
                if report.slowest_seconds else 0.0)


def _tensor_parallel_group() -> Any:
    """vLLM's tensor-parallel CPU (gloo) group when it has more than one rank, else None."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    if get_tensor_model_parallel_world_size() <= 1:
        return None
    return get_tp_group().cpu_group


def _verify_together(files: list[str], options: Options, group: Any, rank: int, world: int
                     ) -> None:
    """Each rank checks the SHA-256 of its share of the files; if any fails, all raise."""
    error: Exception | None = None
    try:
        _verify(files[rank::world], options)
    except Exception as exc:  # noqa: BLE001 - every rank must reach the all_gather
        error = exc
    failures: list[str | None] = [None] * world
    dist.all_gather_object(failures, None if error is None else f"{type(error).__name__}: "
                           f"{error}", group=group)
    if error is not None:
        raise error
    failed = [r for r, failure in enumerate(failures) if failure is not None]
    if failed:
        raise RankFailed(failed, [failures[r] for r in failed])  # type: ignore[misc]


def check_index(model: str, subfolder: str | None, patterns: list[str] | None) -> None:
    """A local checkpoint's index and every shard it lists, checked with weightlift's messages
    (a missing or truncated shard, a bad header) before vLLM's file selection trips over them.
    Only where vLLM filters by the index (no model-specific file patterns)."""
    index = os.path.join(model, subfolder or "", INDEX)
    if patterns is None and os.path.isfile(index):
        with warnings.catch_warnings():
            # What the index says of a tensor stored twice is not vLLM's rule (the last file's
            # copy), which the load of the files follows; tensors it lists that no shard
            # stores are said here.
            warnings.simplefilter("ignore", CheckpointWarning)
            with api.open(index) as checkpoint:  # headers only
                missing = sorted(checkpoint.layout.missing)
        if missing:
            logger.warning("weightlift: %s lists %d tensor(s) that no shard stores (%s); they "
                           "are not loaded, as with load_format='safetensors'", index,
                           len(missing), ", ".join(missing[:5]))


def _verify(files: list[str], options: Options) -> None:
    """Check whole files' SHA-256 in one streamed pass with the load's strategy, engine and
    budget (the tensors are dropped as they come); raise on a mismatch."""
    if files:
        for _ in api.stream(files, verify=options.verify, strategy=options.strategy,
                            max_host_memory=options.max_host_memory, engine=options.engine,
                            on_report=_log_verified if options.report else None):
            pass


def _natural(path: str) -> list[int | str]:
    """model-00002-of-00010 before model-00010-of-00010."""
    return [int(part) if part.isdigit() else part
            for part in re.split(r"(\d+)", os.path.basename(path))]


def _log_verified(report: LoadReport) -> None:
    logger.info("weightlift: verified the SHA-256 of %s: %.1f MB in %.2f s, strategy %s (%s), "
                "engine %s, budget %d MiB", report.source, report.bytes / 1e6, report.seconds,
                report.strategy, report.reason, report.engine, report.budget >> 20)


def _log_report(report: LoadReport) -> None:
    peak = f"{report.peak_rss / 2**30:.2f} GiB" if report.peak_rss is not None else "-"
    logger.info("weightlift: %d tensors, %.1f MB in %.2f s (%.2f GB/s, including vLLM's copies "
                "into its parameters; %.1f MB mapped from the page cache, %.1f MB read, at most "
                "%d MiB mapped at once), strategy %s (%s), engine %s, budget %d MiB, peak RSS "
                "%s%s", report.tensors, report.bytes / 1e6, report.seconds, report.gbps,
                report.bytes_mapped / 1e6, report.bytes_read / 1e6, report.mapped_peak >> 20,
                report.strategy, report.reason, report.engine, report.budget >> 20, peak,
                f", fallbacks: {'; '.join(report.fallbacks)}" if report.fallbacks else "")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: ``load_format="weightlift"`` for vLLM."""
    from vllm.model_executor.model_loader import register_model_loader

    register_model_loader(LOAD_FORMAT)(loader_class())


__all__ = ["LOAD_FORMAT", "Options", "collective", "loader_class", "read_weights", "register"]
