"""weightlift as a vLLM load format: ``--load-format weightlift``.

    vllm serve Llama-3-8B/ --load-format weightlift \\
        --model-loader-extra-config '{"max_host_memory": "1GB", "report": true}'
    LLM(model="Llama-3-8B/", load_format="weightlift")

Installing weightlift is all it takes: its ``vllm.general_plugins`` entry point makes vLLM call
``register`` in every process it starts (front end, engine core, workers), and ``register`` adds
``load_format="weightlift"`` to vLLM's model-loader registry. Nothing else imports this module, so
plain ``import weightlift`` never imports vLLM.

The loader is vLLM's default loader with one part swapped, as vLLM's own ``runai_streamer`` is:
the files are chosen exactly as for ``load_format="safetensors"`` (local directory or hub cache,
index filtering, the multimodal and unused-shard filters, expert-parallel key filtering), and the
weights iterator is ``weightlift.stream``: tensors arrive in file order, read at most the
host-memory budget ahead of the model's ``load_weights``, which copies each into vLLM's own
parameters. Under tensor parallelism the ranks of vLLM's tensor-parallel group read the
checkpoint together (``weightlift.distributed``, collective mode): each byte is read from storage
by one rank and broadcast to the others over the group's CPU (gloo) communicator.

Options (``model_loader_extra_config``), see ``docs/vllm.md``: ``max_host_memory``, ``strategy``,
``engine``, ``verify``, ``report``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME
from vllm.config.load import LoadConfig
from vllm.logger import init_logger
from vllm.model_executor.model_loader import register_model_loader
from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
from vllm.model_executor.model_loader.ep_weight_filter import should_skip_weight
from vllm.model_executor.model_loader.weight_utils import (
    filter_mm_encoder_only_safetensors_files,
    filter_safetensors_files_by_weight_name,
)

import weightlift
from weightlift.distributed import RankFailed, load_sharded

LOAD_FORMAT = "weightlift"
#: The strategies a user may ask for. The default reads into a ring of buffers: ``direct``
#: (O_DIRECT where the file system allows it, cached ranges copied out of the page cache; it
#: falls back to ``stream`` where O_DIRECT is refused). ``auto`` may map a warm checkpoint.
STRATEGIES = ("direct", "stream", "auto", "mmap")
ENGINES = ("auto", "uring", "threads")
#: Under tensor parallelism, the bytes of full tensors each rank holds at once besides the budget.
BATCH = 128 << 20

#: Under "vllm." so that vLLM's logging configuration shows our lines with its own.
logger = init_logger("vllm.weightlift")


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
        budget = self.max_host_memory
        if budget is not None and (isinstance(budget, bool)
                                   or not isinstance(budget, (int, str))):
            raise ValueError(f"weightlift: max_host_memory must be a number of bytes or a size "
                             f"such as '512MB', got {budget!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"weightlift: unknown strategy {self.strategy!r}; choose one of "
                             f"{', '.join(STRATEGIES)}")
        if self.engine not in ENGINES:
            raise ValueError(f"weightlift: unknown engine {self.engine!r}; choose one of "
                             f"{', '.join(ENGINES)}")
        if not isinstance(self.verify, (bool, str, Mapping)):
            raise ValueError(f"weightlift: verify must be true, the path of a sha256sum file or "
                             f"{{file: sha256}}, got {self.verify!r}")
        if not isinstance(self.report, bool):
            raise ValueError(f"weightlift: report must be true or false, got {self.report!r}")


class WeightliftModelLoader(DefaultModelLoader):
    """vLLM's default safetensors loader whose weights come from ``weightlift.stream``."""

    def __init__(self, load_config: LoadConfig) -> None:
        self.options = Options.parse(load_config.model_loader_extra_config)
        # The default loader set up as for load_format="safetensors": its file selection is ours.
        super().__init__(dataclasses.replace(load_config, load_format="safetensors",
                                             model_loader_extra_config={}))

    def _get_weights_iterator(self, source: DefaultModelLoader.Source
                              ) -> Iterator[tuple[str, torch.Tensor]]:
        """The files ``DefaultModelLoader._get_weights_iterator`` picks, read by weightlift."""
        if self.load_config.safetensors_load_strategy == "torchao":
            raise ValueError("weightlift: torchao-serialized checkpoints need vLLM's own "
                             "loader (load_format='safetensors')")
        _check_index(source)
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
        if self.counter_before_loading_weights == 0.0:
            self.counter_before_loading_weights = time.perf_counter()
        return ((source.prefix + name, tensor) for name, tensor in self._weights(files))

    def _weights(self, files: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        files = sorted(files, key=_natural)  # the order vLLM's own iterator reads them in
        keys = None
        if self.local_expert_ids is not None:  # expert parallelism: skip other ranks' experts
            with weightlift.open(files) as checkpoint:
                keys = [name for name in checkpoint.keys()
                        if not should_skip_weight(name, self.local_expert_ids)]
        group = _tensor_parallel_group()
        if group is not None:
            yield from self._collective(files, keys, group)
            return
        options = self.options
        verify = options.verify or None
        if verify is not None and keys is not None:
            _verify(files, verify)  # weightlift verifies whole files only: do it before
            verify = None
        yield from weightlift.stream(files, keys=keys, strategy=options.strategy,
                                     max_host_memory=options.max_host_memory,
                                     engine=options.engine, verify=verify,
                                     on_report=_log_report if options.report else None)

    def _collective(self, files: list[str], keys: list[str] | None, group: Any
                    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Every rank gets every tensor, each byte read from storage by one rank of ``group``.

        vLLM's weight loaders cut each rank's shard out of the full tensors, so every rank needs
        them all; ``load_sharded`` in collective mode deals the bytes out to the ranks to read and
        broadcasts what each read, within ``max_host_memory``. It returns a state dict, so the
        tensors go through it in batches of ``BATCH`` bytes (or one larger tensor).
        """
        options = self.options
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        if options.verify:
            _verify_together(files, options.verify, group, rank, world)
        with weightlift.open(files) as checkpoint:
            wanted = keys if keys is not None else checkpoint.keys()
            sizes = [(name, checkpoint.info(name).nbytes) for name in wanted]
        started = time.perf_counter()
        bytes_read = 0
        for batch in _batches(sizes, BATCH):
            names = set(batch)
            state, report = load_sharded(
                files, lambda name, info, r, w: () if name in names else None, group=group,
                mode="collective", strategy=options.strategy,
                max_host_memory=options.max_host_memory)
            bytes_read += report.bytes_read
            for name in batch:
                yield name, state.pop(name)
            del state
        if options.report:
            seconds = time.perf_counter() - started
            total = sum(size for _, size in sizes)
            logger.info("weightlift: rank %d of %d read %.1f of %.1f MB (collective over the "
                        "tensor-parallel group, strategy %s) in %.2f s, %.2f GB/s for the group",
                        rank, world, bytes_read / 1e6, total / 1e6, options.strategy, seconds,
                        total / seconds / 1e9 if seconds else 0.0)


def _tensor_parallel_group() -> Any:
    """vLLM's tensor-parallel CPU (gloo) group when it has more than one rank, else None."""
    from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

    if get_tensor_model_parallel_world_size() <= 1:
        return None
    return get_tp_group().cpu_group


def _verify_together(files: list[str], verify: Any, group: Any, rank: int, world: int) -> None:
    """Each rank checks the SHA-256 of its share of the files; if any fails, all raise."""
    error: Exception | None = None
    try:
        _verify(files[rank::world], verify)
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


def _check_index(source: DefaultModelLoader.Source) -> None:
    """A local checkpoint's index and every shard it lists, checked with weightlift's messages
    (a missing or truncated shard, a bad header) before vLLM's file selection trips over them."""
    folder = os.path.join(source.model_or_path, source.subfolder or "")
    index = os.path.join(folder, SAFE_WEIGHTS_INDEX_NAME)
    if source.allow_patterns_overrides is None and os.path.isfile(index):
        weightlift.open(index).close()  # headers only


def _verify(files: list[str], verify: Any) -> None:
    """Check whole files' SHA-256 (one streamed pass within the budget); raise on a mismatch."""
    if files:
        weightlift.open(files, verify=verify).close()


def _batches(sizes: list[tuple[str, int]], limit: int) -> Iterator[list[str]]:
    """Consecutive names whose bytes add up to at most ``limit`` (one tensor may exceed it)."""
    batch: list[str] = []
    total = 0
    for name, size in sizes:
        if batch and total + size > limit:
            yield batch
            batch, total = [], 0
        batch.append(name)
        total += size
    if batch:
        yield batch


def _natural(path: str) -> list[int | str]:
    """model-00002-of-00010 before model-00010-of-00010."""
    return [int(part) if part.isdigit() else part
            for part in re.split(r"(\d+)", os.path.basename(path))]


def _log_report(report: weightlift.LoadReport) -> None:
    peak = f"{report.peak_rss / 2**30:.2f} GiB" if report.peak_rss is not None else "-"
    logger.info("weightlift: %d tensors, %.1f MB in %.2f s (%.2f GB/s, including vLLM's copies "
                "into its parameters), strategy %s (%s), engine %s, budget %d MiB, peak RSS "
                "%s%s", report.tensors, report.bytes / 1e6, report.seconds, report.gbps,
                report.strategy, report.reason, report.engine, report.budget >> 20, peak,
                f", fallbacks: {'; '.join(report.fallbacks)}" if report.fallbacks else "")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: ``load_format="weightlift"`` for vLLM."""
    register_model_loader(LOAD_FORMAT)(WeightliftModelLoader)


__all__ = ["LOAD_FORMAT", "Options", "WeightliftModelLoader", "register"]
