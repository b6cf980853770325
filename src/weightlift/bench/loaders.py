"""The loaders the benchmark measures: weightlift per strategy, its peers, and a raw-read ceiling.

Each loader is an iterator of ``(name, tensor)`` over a checkpoint, written the way a user of that
library would write it, so the child process can treat them all alike: keep every tensor (the
``to_cpu`` scenario) or copy each into a device destination and drop it (``device``). Loaders
that return a whole state dict hand tensors out with ``popitem`` so a dropped tensor really goes.
Peers are imported only inside their loader: ``weightlift demo`` runs with none installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io.base import anonymous_mapping
from . import models

Tensors = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Job:
    """What one measured load reads and where it puts it."""

    source: str                    # the checkpoint directory (or file)
    files: tuple[str, ...]         # its shard files, in index order
    scenario: str                  # "to_cpu", "device" or "model" (a whole transformers model)
    device: str                    # where tensors end up: "cpu", or "cuda" in the device scenario
    budget: int | None = None      # weightlift's max_host_memory (None: its default)
    engine: str = "auto"           # weightlift's read engine: auto, uring or threads


@dataclass(frozen=True)
class Loader:
    name: str
    kind: str                      # "weightlift", "peer", "reference" or "model"
    run: Callable[[Job], Tensors]
    modules: tuple[str, ...] = ()  # what must be importable
    check: Callable[[], str | None] | None = None  # why it cannot run here, or None
    #: weightlift only: the strategy a load will use and why, asked before it is timed.
    choice: Callable[[Job], tuple[str, str]] | None = None
    #: references only: read the files, discard the data, return the bytes read.
    raw: Callable[[tuple[str, ...]], int] | None = None
    #: the scenarios this loader runs in.
    scenarios: tuple[str, ...] = ("to_cpu", "device")
    #: run before the clock and the memory baseline (e.g. importing a large library).
    prepare: Callable[[], None] | None = None
    #: the checkpoint formats it reads.
    formats: tuple[str, ...] = ("safetensors",)
    #: whether its tensors can be checked bit for bit against the format's reference reader
    #: (not so for loaders that dequantize).
    verifiable: bool = True

    def unavailable(self) -> str | None:
        """Why this loader cannot run on this machine, or None when it can."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                extra = "transformers" if self.kind == "model" else "bench"
                return f"{module} is not installed (pip install 'weightlift[{extra}]')"
        return self.check() if self.check is not None else None


def _drain(state: dict[str, torch.Tensor]) -> Tensors:
    while state:
        yield state.popitem()


# ---------------------------------------------------------------------------------------------
# weightlift


def _weightlift(strategy: str, sha256: bool = False, engine: str | None = None
                ) -> Callable[[Job], Tensors]:
    """``engine`` forces a read engine (rows that compare engines); else the bench's own."""
    def run(job: Job) -> Tensors:
        import weightlift

        # No on_report: its memory sampling would be a cost peers don't pay (see _choice).
        options: dict[str, object] = dict(strategy=strategy, max_host_memory=job.budget,
                                          engine=engine or job.engine)
        if sha256:
            # The HF cache's blob names, else digests `weightlift bench --sha256` computed before
            # timing (called on its own, the loader computes them first).
            from ..verify import hub_digest

            in_cache = all(hub_digest(path) for path in job.files)
            options["verify"] = True if in_cache else str(write_digests(job.files))
        if job.scenario == "to_cpu":
            yield from _drain(weightlift.load(job.source, **options))
        else:
            # A GPU-bound load: tensors pass through host memory one window at a time.
            yield from weightlift.stream(job.source, device=job.device, **options)

    return run


def _mmap_path(job: Job) -> Tensors:
    """weightlift's ``mmap`` strategy used the way safetensors' ``load_file`` and llama.cpp use a
    mapping by default: CPU tensors are views of the mapped files, and a device copy is made from
    them by the caller, so the page cache fills with the checkpoint and stays when the load ends
    (``stream(device=...)`` with ``mmap`` would drop each range once copied)."""
    import weightlift

    options = dict(strategy="mmap", max_host_memory=job.budget, engine=job.engine)
    if job.scenario == "to_cpu":
        yield from _drain(weightlift.load(job.source, **options))
    else:
        for name, tensor in weightlift.stream(job.source, device="cpu", **options):
            yield name, _to_device(tensor, job)


def digest_file(files: tuple[str, ...]) -> Path:
    """Where ``write_digests`` keeps the SHA-256 of ``files`` (named by their paths, sizes and
    modification times, so a changed file gets new digests)."""
    stamps = [(os.path.realpath(f), os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"weightlift-sha256-{key}.txt"


def write_digests(files: tuple[str, ...]) -> Path:
    """``sha256sum`` lines for ``files`` (computed once, before any timed run), for the
    ``+sha256`` row of checkpoints outside a Hugging Face cache."""
    path = digest_file(files)
    if not path.is_file():
        lines = []
        for name in files:
            digest = hashlib.sha256()
            with open(name, "rb") as f:
                while block := f.read(16 << 20):
                    digest.update(block)
            lines.append(f"{digest.hexdigest()}  {os.path.realpath(name)}\n")
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text("".join(lines))
        os.replace(temporary, path)
    return path


def _choice(strategy: str) -> Callable[[Job], tuple[str, str]]:
    """What ``auto`` decides for this job, from the same facts the load itself gathers; mincore
    and the O_DIRECT probe leave the page cache as it was."""
    def choice(job: Job) -> tuple[str, str]:
        if strategy != "auto":
            return strategy, "requested"
        from ..sources import resolve
        from ..budget import resolve_budget
        from ..io.auto import choose, gather

        with resolve(job.source) as layout:
            facts = gather(layout.shards, total_bytes=layout.total_bytes, device=job.device,
                           copying=job.device != "cpu", streaming=job.scenario != "to_cpu",
                           budget=resolve_budget(job.budget), probe_direct=False)
        decided = choose(facts)
        return decided.strategy, decided.reason

    return choice


# ---------------------------------------------------------------------------------------------
# peers


def _safetensors_load_file(backend: str) -> Callable[[Job], Tensors]:
    def run(job: Job) -> Tensors:
        from safetensors.torch import load_file

        kwargs = {} if backend == "mmap" else {"backend": backend}
        if job.scenario == "to_cpu":
            state: dict[str, torch.Tensor] = {}
            for path in job.files:
                state.update(load_file(path, device=job.device, **kwargs))
            yield from _drain(state)
        else:
            for path in job.files:  # one shard's state dict at a time, as HF loaders do
                yield from _drain(load_file(path, device=job.device, **kwargs))

    return run


def _pread_refused() -> str | None:
    if importlib.util.find_spec("safetensors") is None:
        return None  # reported as not installed
    from safetensors.torch import load_file

    if "backend" not in inspect.signature(load_file).parameters:
        return "this safetensors has no backend='pread' (needs a newer release)"
    return None


def _safe_open(job: Job) -> Tensors:
    from safetensors import safe_open

    for path in job.files:
        with safe_open(path, framework="pt", device=job.device) as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def _runai(job: Job) -> Tensors:
    from runai_model_streamer import SafetensorsStreamer

    with SafetensorsStreamer() as streamer:
        # In the device scenario each tensor is copied before the next arrives, so borrowed views
        # of the streamer's buffers (owned=False) are safe and how GPU loaders use it.
        streamer.stream_files(list(job.files), owned=job.scenario == "to_cpu")
        yield from streamer.get_tensors()


def _fastsafetensors(job: Job) -> Tensors:
    from fastsafetensors import SafeTensorsFileLoader

    device = "cpu" if job.device == "cpu" else "cuda:0"
    loader = SafeTensorsFileLoader(None, device, nogds=True)
    try:
        loader.add_filenames({0: list(job.files)})
        buffers = loader.copy_files_to_device()
        try:
            for name in list(buffers.key_to_rank_lidx):
                yield name, buffers.get_tensor(name)
        finally:
            buffers.close()
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------
# GGUF peers


def _gguf_reader(copy: bool) -> Callable[[Job], Tensors]:
    """gguf-py's ``GGUFReader`` (memory-maps the file) + ``torch.from_numpy``: views of the
    mapping (the child touches every page), or with a copy into fresh memory."""
    def run(job: Job) -> Tensors:
        import warnings

        import numpy as np
        from gguf import GGUFReader

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # from_numpy of a read-only mapping
            for path in job.files:
                for t in GGUFReader(path).tensors:
                    data = np.array(t.data) if copy else t.data
                    yield t.name, _to_device(torch.from_numpy(data), job)

    return run


def _to_device(tensor: torch.Tensor, job: Job) -> torch.Tensor:
    return tensor if job.device == "cpu" else tensor.to(job.device)


def _transformers_gguf(job: Job) -> Tensors:
    """transformers' GGUF path: every tensor dequantized to float32 with numpy, names mapped."""
    import logging

    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    logging.getLogger("transformers").setLevel(logging.ERROR)
    path = job.files[0]
    config = AutoConfig.from_pretrained(os.path.dirname(path) or ".",
                                        gguf_file=os.path.basename(path))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=model)["tensors"]
    for name in list(state):
        yield name, _to_device(state.pop(name), job)


def _weightlift_bf16(job: Job) -> Tensors:
    """weightlift dequantizing inside the load (``dtype=torch.bfloat16``)."""
    import weightlift

    options = dict(max_host_memory=job.budget, dtype=torch.bfloat16)
    if job.scenario == "to_cpu":
        yield from _drain(weightlift.load(job.source, **options))
    else:
        yield from weightlift.stream(job.source, device=job.device, **options)


def _dequant_missing() -> str | None:
    if importlib.util.find_spec("weightlift.dequant") is None:
        return "this weightlift has no weightlift.dequant (GGML dequantization)"
    return None


# ---------------------------------------------------------------------------------------------
# the storage ceiling

RAW_BLOCK = 16 << 20
RAW_IN_FLIGHT = 16


def raw_read(files: tuple[str, ...], *, direct: bool = True, block: int = RAW_BLOCK,
             in_flight: int = RAW_IN_FLIGHT) -> int:
    """Read ``files``, ``in_flight`` requests of ``block`` bytes at a time, and discard the data:
    what this storage delivers with nothing else in the way. Returns the bytes read.

    ``direct`` reads with O_DIRECT (the storage itself); otherwise buffered reads through the
    page cache, which on some machines (VMs whose host caches the disk) beat O_DIRECT.
    """
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = [os.open(path, flags) for path in files]
    try:
        requests = [(fd, offset) for fd in fds
                    for offset in range(0, os.fstat(fd).st_size, block)]
        local = threading.local()

        def read(request: tuple[int, int]) -> int:
            if not hasattr(local, "buffer"):
                local.buffer = memoryview(anonymous_mapping(block))  # page aligned, as O_DIRECT needs
            return os.preadv(request[0], [local.buffer], request[1])

        with ThreadPoolExecutor(in_flight) as pool:
            return sum(pool.map(read, requests))
    finally:
        for fd in fds:
            os.close(fd)


RAW_URING_BLOCK = 4 << 20
RAW_URING_DEPTH = 64


def raw_uring_read(files: tuple[str, ...], *, block: int = RAW_URING_BLOCK,
                   depth: int = RAW_URING_DEPTH) -> int:
    """Read ``files`` with O_DIRECT through one io_uring, ``depth`` reads of ``block`` bytes in
    flight (what fio's best engine and runai-model-streamer do), and discard the data."""
    from ..io.uring import Read, UringEngine

    ring = UringEngine(depth)
    memory = anonymous_mapping(block * depth)  # page aligned, as O_DIRECT needs
    address = torch.frombuffer(memory, dtype=torch.uint8).data_ptr()
    fds = [os.open(path, os.O_RDONLY | os.O_DIRECT) for path in files]
    total = 0
    try:
        requests = [(fd, path, offset, min(block, os.fstat(fd).st_size - offset))
                    for fd, path in zip(fds, files)
                    for offset in range(0, os.fstat(fd).st_size, block)]
        slots: list = [None] * depth
        for index, (fd, path, offset, size) in enumerate(requests):
            slot = index % depth
            if slots[slot] is not None:
                slots[slot].result()  # this slot's previous read is done: reuse its memory
            length = -(-size // 4096) * 4096
            slots[slot] = ring.submit(Read(fd, address + slot * block, offset, length, size,
                                           4096, path, direct=True))
            total += size
        for ticket in slots:
            if ticket is not None:
                ticket.result()
    finally:
        ring.close()
        for fd in fds:
            os.close(fd)
    return total


def _direct_refused() -> str | None:
    return None if hasattr(os, "O_DIRECT") else "this platform has no O_DIRECT"


def _uring_refused() -> str | None:
    from ..io.uring import probe

    return _direct_refused() or probe()


RAW = "raw O_DIRECT read"
RAW_URING = "raw io_uring O_DIRECT read (depth 64)"
RAW_BUFFERED = "raw buffered read"

#: weightlift's strategies, in the order tables list them.
WEIGHTLIFT_STRATEGIES = ("auto", "direct", "stream", "mmap")
BOTH = ("safetensors", "gguf")
TRANSFORMERS_GGUF = "transformers load_gguf_checkpoint (fp32)"
WEIGHTLIFT_BF16 = "weightlift auto → bf16"
#: weightlift's ``mmap`` strategy as safetensors and llama.cpp map files by default (``weightlift
#: demo``'s contrast on an install without safetensors).
MMAP_PATH = "weightlift mmap path"
#: ``weightlift auto`` with ``verify=``: the cost of checking every file's SHA-256 (``--sha256``).
VERIFIED = "weightlift auto +sha256"
#: ``weightlift <strategy>`` on the io_uring engine, next to the same rows on the bench's engine
#: (``--compare-engines``).
URING_ROWS = {f"weightlift {s} +io_uring": s for s in ("direct", "stream")}

LOADERS: dict[str, Loader] = {
    **{f"weightlift {s}": Loader(f"weightlift {s}", "weightlift", _weightlift(s),
                                 choice=_choice(s), formats=BOTH)
       for s in WEIGHTLIFT_STRATEGIES},
    **{name: Loader(name, "weightlift", _weightlift(s, engine="uring"), check=_uring_refused,
                    choice=_choice(s), formats=BOTH)
       for name, s in URING_ROWS.items()},
    MMAP_PATH: Loader(MMAP_PATH, "weightlift", _mmap_path, choice=_choice("mmap"), formats=BOTH),
    VERIFIED: Loader(VERIFIED, "weightlift", _weightlift("auto", sha256=True),
                     choice=_choice("auto")),
    "safetensors load_file": Loader("safetensors load_file", "peer",
                                    _safetensors_load_file("mmap"), ("safetensors",)),
    "safetensors safe_open": Loader("safetensors safe_open", "peer", _safe_open, ("safetensors",)),
    "safetensors pread": Loader("safetensors pread", "peer", _safetensors_load_file("pread"),
                                ("safetensors",), _pread_refused),
    "runai-model-streamer": Loader("runai-model-streamer", "peer", _runai,
                                   ("runai_model_streamer",)),
    "fastsafetensors": Loader("fastsafetensors", "peer", _fastsafetensors, ("fastsafetensors",)),
    "gguf-py GGUFReader": Loader("gguf-py GGUFReader", "peer", _gguf_reader(False), ("gguf",),
                                 formats=("gguf",)),
    "gguf-py GGUFReader + copy": Loader("gguf-py GGUFReader + copy", "peer", _gguf_reader(True),
                                        ("gguf",), formats=("gguf",)),
    TRANSFORMERS_GGUF: Loader(TRANSFORMERS_GGUF, "peer", _transformers_gguf,
                              ("gguf", "transformers", "accelerate"), formats=("gguf",),
                              verifiable=False),
    WEIGHTLIFT_BF16: Loader(WEIGHTLIFT_BF16, "weightlift", _weightlift_bf16,
                            check=_dequant_missing, formats=("gguf",), verifiable=False),
    RAW: Loader(RAW, "reference", lambda job: iter(()), check=_direct_refused,
                raw=lambda files: raw_read(files, direct=True), formats=BOTH),
    RAW_URING: Loader(RAW_URING, "reference", lambda job: iter(()), check=_uring_refused,
                      raw=lambda files: raw_uring_read(files), formats=BOTH),
    RAW_BUFFERED: Loader(RAW_BUFFERED, "reference", lambda job: iter(()),
                         raw=lambda files: raw_read(files, direct=False), formats=BOTH),
}


#: Time to a usable transformers model (the ``model`` scenario, see bench/models.py).
LOADERS.update({
    "weightlift from_pretrained": Loader("weightlift from_pretrained", "model",
                                         models.weightlift_model, ("transformers",),
                                         scenarios=(models.SCENARIO,), prepare=models.prepare),
    "transformers from_pretrained": Loader("transformers from_pretrained", "model",
                                           models.transformers_model, ("transformers",),
                                           scenarios=(models.SCENARIO,), prepare=models.prepare),
})


def model_loaders() -> list[str]:
    return [name for name, loader in LOADERS.items() if loader.kind == "model"]


def weightlift_loaders(fmt: str = "safetensors") -> list[str]:
    return [name for name, loader in LOADERS.items()
            if loader.kind == "weightlift" and fmt in loader.formats]



def reference_loaders() -> list[str]:
    return [name for name, loader in LOADERS.items() if loader.kind == "reference"]


def peer_loaders(fmt: str = "safetensors") -> list[str]:
    """The peers that read ``fmt`` ("safetensors" or "gguf")."""
    return [name for name, loader in LOADERS.items()
            if loader.kind == "peer" and fmt in loader.formats]
