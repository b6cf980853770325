"""``weightlift.torch.load_file`` against ``safetensors.torch.load_file``, warm, with weightlift's
header memo cleared before each call (a file whose header was never seen), interleaved, medians
(docs/benchmarks.md, issue 25):

    PYTHONPATH=src python docs/measure/first_seen.py DIR [REPS]

writes four files into DIR once (1 MiB of 16 tensors, 8 MiB of 50, 64 MiB of 200 and of 16,
bf16, by ``safetensors``), then times each.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file as safetensors_load_file
from safetensors.torch import save_file

import weightlift.torch
from weightlift.formats import safetensors as header_memo

#: name → (bytes, tensors)
CASES = {"1MiB/16": (1 << 20, 16), "8MiB/50": (8 << 20, 50), "64MiB/200": (64 << 20, 200),
         "64MiB/16": (64 << 20, 16)}


def first_seen_load(path: Path) -> dict[str, torch.Tensor]:
    header_memo._MEMO.clear()
    return weightlift.torch.load_file(path)


def main(directory: Path, reps: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    for name, (size, count) in CASES.items():
        path = directory / (name.replace("/", "-") + ".safetensors")
        if not path.exists():
            per = size // count // 2
            save_file({f"model.layers.{i}.weight":
                       torch.randn(per, generator=generator).to(torch.bfloat16)
                       for i in range(count)}, path)
        loaders = (first_seen_load, safetensors_load_file)
        for _ in range(3):  # warm: the file cached, both loaders' code paths run once
            for load in loaders:
                load(path)
        times: dict[object, list[float]] = {load: [] for load in loaders}
        for rep in range(reps):
            for load in loaders if rep % 2 else loaders[::-1]:
                started = time.perf_counter()
                tensors = load(path)
                times[load].append(time.perf_counter() - started)
                del tensors
        ours, theirs = (statistics.median(times[load]) * 1e3 for load in loaders)
        print(f"{name:10s} weightlift (header never seen) {ours:7.3f} ms  safetensors "
              f"{theirs:7.3f} ms  ratio {ours / theirs:.2f}x", flush=True)
    with open("/proc/loadavg") as f:
        print("load average", f.read().strip())


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 15)
