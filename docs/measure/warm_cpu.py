"""Warm loads in one process: weightlift vs safetensors, CPU and wall time.

    PYTHONPATH=src python docs/measure/warm_cpu.py 1 15     # size in GB, repetitions

Per repetition: ``weightlift.load(dir)`` and ``load_file`` per shard, each followed by touching
every page of every tensor (as the bench's ``to_cpu`` scenario does), and the time to the first
tensor of ``weightlift.stream(dir)``. The checkpoint must be page-cached (run twice).
"""

import gc
import statistics
import sys
import time

from safetensors.torch import load_file

import weightlift
from weightlift.bench.child import touch
from weightlift.bench.synthetic import shard_paths, synthetic_checkpoint

directory = synthetic_checkpoint(int(float(sys.argv[1]) * 1e9))
files = [str(p) for p in shard_paths(directory)]
reps = int(sys.argv[2])


def with_weightlift() -> dict:
    return weightlift.load(str(directory))


def with_safetensors() -> dict:
    state = {}
    for path in files:
        state.update(load_file(path))
    return state


def first_tensor() -> dict:
    for name, tensor in weightlift.stream(str(directory)):
        return {name: tensor}
    return {}


loaders = {"weightlift": with_weightlift, "safetensors": with_safetensors,
           "stream-first": first_tensor}
results: dict[str, list[tuple[float, float]]] = {name: [] for name in loaders}
gc.collect()
gc.freeze()  # no full collection of the imported world inside a timing
for _ in range(reps):
    for name, run in loaders.items():
        wall, cpu = time.perf_counter(), time.process_time()
        state = run()
        if name != "stream-first":
            for tensor in state.values():
                touch(tensor)
        results[name].append((time.perf_counter() - wall, time.process_time() - cpu))
        del state
for name, times in results.items():
    wall_ms = [t[0] * 1e3 for t in times]
    cpu_ms = [t[1] * 1e3 for t in times]
    print(f"{name:13s} wall min {min(wall_ms):7.2f} med {statistics.median(wall_ms):7.2f} | "
          f"cpu min {min(cpu_ms):7.2f} med {statistics.median(cpu_ms):7.2f} ms")
