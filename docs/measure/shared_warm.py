"""Two ranks on one host loading a warm checkpoint, each copying its half of every tensor (the
rows a tensor-parallel rank keeps), as vLLM's loaders do under TP=2: weightlift's
``stream_sharded(share="page_cache")`` against ``safe_open`` + ``get_tensor`` on each rank.

    PYTHONPATH=src python docs/measure/shared_warm.py /work/scratch/q/vllm-llama-2gb 7 [FOLIOS]

Two gloo processes, each pinned to one core (as ``VLLM_CPU_OMP_THREADS_BIND="0|1"``), one torch
thread; the destinations are allocated and touched first (only the loading differs). The
checkpoint is read once into the page cache first; the two loaders then alternate, each run
between barriers, and rank 0's time of each run is printed (min / median).

``FOLIOS``: how the page cache holds the checkpoint, ``as-is`` (default), ``large`` or ``small``
(``weightlift.bench.runner.set_folios``). The time of one ``cachestat`` over every file is
printed before and after (``cachestat_seconds``): ~8 ms a GB over 4 KiB folios, ~0.1 ms over
2 MiB ones.
"""

from __future__ import annotations

import glob
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from weightlift.bench.runner import cachestat_seconds, set_folios


def worker(rank: int, world: int, source: str, init: str, reps: int, out: str) -> None:
    from safetensors import safe_open

    from weightlift.distributed import stream_sharded

    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {rank % os.cpu_count()})
    files = sorted(glob.glob(os.path.join(source, "*.safetensors")))
    dest: dict[str, torch.Tensor] = {}
    for path in files:
        with safe_open(path, "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                rows = t.shape[0] // world if t.dim() and t.shape[0] >= world else None
                dest[name] = torch.zeros_like(t if rows is None else t[:rows])

    def copy(name: str, tensor: torch.Tensor) -> None:
        target = dest[name]
        if tensor.dim() and tensor.shape[0] >= world:
            n = target.shape[0]
            tensor = tensor[rank * n:(rank + 1) * n]
        target.copy_(tensor)

    def with_safe_open() -> None:
        for path in files:
            with safe_open(path, "pt") as f:
                for name in f.keys():
                    copy(name, f.get_tensor(name))

    def with_weightlift() -> None:
        for name, tensor in stream_sharded(source, share="page_cache"):
            copy(name, tensor)
            del tensor

    times: dict[str, list[float]] = {"safe_open": [], "weightlift": []}
    for _ in range(reps):
        for name, load in (("safe_open", with_safe_open), ("weightlift", with_weightlift)):
            dist.barrier()
            started = time.perf_counter()
            load()
            times[name].append(time.perf_counter() - started)
            dist.barrier()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)
    dist.destroy_process_group()


def main() -> None:
    source, reps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5
    folios = sys.argv[3] if len(sys.argv) > 3 else "as-is"
    files = glob.glob(os.path.join(source, "*.safetensors"))
    set_folios(files, folios)
    print(f"folios {folios}: cachestat over the files {cachestat_seconds(files) * 1e3:.2f} ms")
    init = f"/tmp/shared-warm-{os.getpid()}"
    out = init + ".json"
    mp.start_processes(worker, args=(2, source, init, reps, out), nprocs=2, start_method="spawn")
    with open(out) as f:
        times = json.load(f)
    for name, runs in times.items():
        runs = sorted(runs)
        print(f"{name:>10}: min {runs[0]:.3f} s, median {runs[len(runs) // 2]:.3f} s")
    print(f"after: cachestat over the files {cachestat_seconds(files) * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
