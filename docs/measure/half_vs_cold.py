"""A partly cached load against the same load cold (``auto``, which picks ``direct`` for both).

    PYTHONPATH=src python docs/measure/half_vs_cold.py 3      # repetitions, 1 GB synthetic

"half": every other 8 MiB of each shard evicted (the tests' ``pagecache.evict_every_other``).
"""

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

import pagecache  # noqa: E402

import weightlift  # noqa: E402
from weightlift.bench.synthetic import synthetic_checkpoint  # noqa: E402

directory = synthetic_checkpoint(10**9)
files = sorted(directory.glob("*.safetensors"))
results: dict[str, list[float]] = {"cold": [], "half": []}
for _ in range(int(sys.argv[1])):
    for mode in results:
        for path in files:
            if mode == "cold":
                pagecache.evict(path)
            else:
                pagecache.evict_every_other(path, 8 << 20)
        reports: list[weightlift.LoadReport] = []
        wall, cpu = time.perf_counter(), time.process_time()
        state = weightlift.load(directory, on_report=reports.append)
        results[mode].append(time.perf_counter() - wall)
        print(f"{mode} {reports[0].strategy} {results[mode][-1]:.3f} s "
              f"(cpu {time.process_time() - cpu:.3f} s): {reports[0].reason}", flush=True)
        del state
for mode, times in results.items():
    print(f"{mode}: min {min(times):.3f} med {statistics.median(times):.3f} s")
