"""The first tensor of a warm ``weightlift.stream()``, in a loop in one process.

    PYTHONPATH=src python docs/measure/first_tensor.py DIR [REPS]

Reads every file of ``DIR`` once (warm), runs five streams to take imports and first-use costs
out of the way, then times ``it = weightlift.stream(DIR); next(it)`` ``REPS`` times (default 15),
closing each stream after the clock; prints the minimum and median in milliseconds.
"""

from __future__ import annotations

import glob
import os
import sys
import time

import weightlift
from weightlift.bench.runner import set_cache


def main() -> None:
    source, reps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 15
    set_cache(glob.glob(os.path.join(source, "*.safetensors")), "warm")  # the bench's own
    for _ in range(5):
        stream = weightlift.stream(source)
        next(stream)
        stream.close()
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        stream = weightlift.stream(source)
        _, tensor = next(stream)
        times.append((time.perf_counter() - started) * 1e3)
        stream.close()
        del tensor
    times.sort()
    print(f"first tensor: min {times[0]:.2f} ms, median {times[len(times) // 2]:.2f} ms")


if __name__ == "__main__":
    main()
