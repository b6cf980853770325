"""The loaders the benchmark measures: weightlift per strategy, its peers, and a raw-read ceiling.

Each loader is an iterator of ``(name, tensor)`` over a checkpoint, written the way a user of that
library would write it, so the child process can treat them all alike: keep every tensor (the
``to_cpu`` scenario) or copy each into a device destination and drop it (``device``). Loaders
that return a whole state dict hand tensors out with ``popitem`` so a dropped tensor really goes.
Peers are imported only inside their loader: ``weightlift demo`` runs with none installed.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


Tensors = Iterator[tuple[str, torch.Tensor]]


@dataclass(frozen=True)
class Job:
    """What one measured load reads and where it puts it."""

    source: str                    # the checkpoint directory (or file)
    files: tuple[str, ...]         # its shard files, in index order
    scenario: str                  # "to_cpu" or "device"
    device: str                    # where tensors end up: "cpu", or "cuda" in the device scenario
    budget: int | None = None      # weightlift's max_host_memory (None: its default)
    engine: str = "auto"           # weightlift's read engine: auto, uring or threads


@dataclass(frozen=True)
class Loader:
    name: str
    kind: str                      # "weightlift", "peer" or "reference"
    run: Callable[[Job], Tensors]
    modules: tuple[str, ...] = ()  # what must be importable
    check: Callable[[], str | None] | None = None  # why it cannot run here, or None
    #: weightlift only: the strategy a load will use and why, asked before it is timed.
    choice: Callable[[Job], tuple[str, str]] | None = None
    #: references only: read the files, discard the data, return the bytes read.
    raw: Callable[[tuple[str, ...]], int] | None = None

    def unavailable(self) -> str | None:
        """Why this loader cannot run on this machine, or None when it can."""
        for module in self.modules:
            if importlib.util.find_spec(module) is None:
                return f"{module} is not installed (pip install 'weightlift[bench]')"
        return self.check() if self.check is not None else None


def _drain(state: dict[str, torch.Tensor]) -> Tensors:
    while state:
        yield state.popitem()


# ---------------------------------------------------------------------------------------------
# weightlift


def _weightlift(strategy: str) -> Callable[[Job], Tensors]:
    def run(job: Job) -> Tensors:
        import weightlift

        # No on_report: its memory sampling would be a cost peers don't pay (see _choice).
        options = dict(strategy=strategy, max_host_memory=job.budget, engine=job.engine)
        if job.scenario == "to_cpu":
            yield from _drain(weightlift.load(job.source, **options))
        else:
            # A GPU-bound load: tensors pass through host memory one window at a time.
            yield from weightlift.stream(job.source, device=job.device, **options)

    return run


def _choice(strategy: str) -> Callable[[Job], tuple[str, str]]:
    """What ``auto`` decides for this job, from the same facts the load itself gathers; mincore
    and the O_DIRECT probe leave the page cache as it was."""
    def choice(job: Job) -> tuple[str, str]:
        if strategy != "auto":
            return strategy, "requested"
        from ..checkpoint import resolve
        from ..io.auto import choose, gather

        with resolve(job.source) as layout:
            facts = gather(layout.shards, total_bytes=layout.total_bytes, device=job.device,
                           copying=job.device != "cpu")
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
    import mmap

    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    fds = [os.open(path, flags) for path in files]
    try:
        requests = [(fd, offset) for fd in fds
                    for offset in range(0, os.fstat(fd).st_size, block)]
        local = threading.local()

        def read(request: tuple[int, int]) -> int:
            if not hasattr(local, "buffer"):
                local.buffer = memoryview(mmap.mmap(-1, block))  # page aligned, as O_DIRECT needs
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
    import mmap

    from ..io.uring import Read, UringEngine

    ring = UringEngine(depth)
    memory = mmap.mmap(-1, block * depth)  # page aligned, as O_DIRECT needs
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

LOADERS: dict[str, Loader] = {
    **{f"weightlift {s}": Loader(f"weightlift {s}", "weightlift", _weightlift(s),
                                 choice=_choice(s))
       for s in WEIGHTLIFT_STRATEGIES},
    "safetensors load_file": Loader("safetensors load_file", "peer",
                                    _safetensors_load_file("mmap"), ("safetensors",)),
    "safetensors safe_open": Loader("safetensors safe_open", "peer", _safe_open, ("safetensors",)),
    "safetensors pread": Loader("safetensors pread", "peer", _safetensors_load_file("pread"),
                                ("safetensors",), _pread_refused),
    "runai-model-streamer": Loader("runai-model-streamer", "peer", _runai,
                                   ("runai_model_streamer",)),
    "fastsafetensors": Loader("fastsafetensors", "peer", _fastsafetensors, ("fastsafetensors",)),
    RAW: Loader(RAW, "reference", lambda job: iter(()), check=_direct_refused,
                raw=lambda files: raw_read(files, direct=True)),
    RAW_URING: Loader(RAW_URING, "reference", lambda job: iter(()), check=_uring_refused,
                      raw=lambda files: raw_uring_read(files)),
    RAW_BUFFERED: Loader(RAW_BUFFERED, "reference", lambda job: iter(()),
                         raw=lambda files: raw_read(files, direct=False)),
}


def weightlift_loaders() -> list[str]:
    return [name for name, loader in LOADERS.items() if loader.kind == "weightlift"]


def reference_loaders() -> list[str]:
    return [name for name, loader in LOADERS.items() if loader.kind == "reference"]


def peer_loaders() -> list[str]:
    return [name for name, loader in LOADERS.items() if loader.kind == "peer"]
