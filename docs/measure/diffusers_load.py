"""Time to a usable diffusers model and the host memory it takes: diffusers' own
``from_pretrained`` (default, ``disable_mmap=True``) against ``weightlift.diffusers.load_model``
(defaults, a 512 MB budget, ``strategy="mmap"``), each in a fresh process, cold and warm.

    PYTHONPATH=src python docs/measure/diffusers_load.py /work/scratch/diffusers/flux 3
    PYTHONPATH=src python docs/measure/diffusers_load.py DIR 5 warm diffusers,weightlift-mmap
    PYTHONPATH=src python docs/measure/diffusers_load.py DIR 3 cold,warm safetensors,weightlift.load-mmap

makes (once) a Flux-style ``FluxTransformer2DModel`` of ~2 GB (hidden size 3072 as FLUX.1, two
double and two single blocks) with random bf16 weights, saved by ``save_pretrained``; then, per
repetition, cold (the file evicted with ``posix_fadvise(DONTNEED)``) then warm (read into the page
cache first), runs every loader in turn (interleaved) in a fresh process, after freed memory has
settled (``--table DIR/results.json`` prints the table again). Each child imports diffusers before the clock, loads with ``torch_dtype=torch.bfloat16``,
then reads one byte of every page of every parameter and buffer (diffusers' default maps the
file, so its load alone defers the reading to the first use): that is "usable". It samples its
RSS (anonymous and file-backed, ``/proc/self/status``) and the file's page cache (mincore) every
20-50 ms, and reports the page cache left behind once the model is loaded. Prints one table of
medians and writes every run to ``<dir>/results-<caches>-<number of loaders>.json``.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

LOADERS = ("diffusers", "diffusers-nommap", "weightlift", "weightlift-512MB", "weightlift-mmap")
#: Not run unless named: the same file as a state dict, no model (what diffusers' default and
#: ``strategy="mmap"`` do underneath).
STATE_DICTS = ("safetensors", "weightlift.load-mmap")
CONFIG = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
              attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
              pooled_projection_dim=768, guidance_embeds=True)


def make(directory: Path) -> None:
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    if (directory / "diffusion_pytorch_model.safetensors").is_file():
        return
    with init_empty_weights():
        model = FluxTransformer2DModel(**CONFIG)
    model.to_empty(device="cpu").to(torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02, generator=generator)
    model.save_pretrained(directory)
    for path in directory.glob("*.safetensors"):
        with open(path, "rb") as f:
            os.fsync(f.fileno())


# ---- the child: one load, measured -----------------------------------------------------------

def status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(("RssAnon:", "RssFile:", "RssShmem:")):
                key, value = line.split(":")
                values[key] = int(value.split()[0]) * 1024
    return values


def child(loader: str, directory: Path) -> None:
    import torch
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    import weightlift
    from weightlift import probes
    from weightlift.bench.child import touch
    from weightlift.diffusers import load_model

    # The touch below is the measuring device: one thread, so torch's thread pool waking up on a
    # busy machine is not counted (it cost up to 3 s for 112 tensors whose pages were all in).
    torch.set_num_threads(1)
    file = directory / "diffusion_pytorch_model.safetensors"
    runs = {
        "diffusers": lambda: FluxTransformer2DModel.from_pretrained(
            directory, torch_dtype=torch.bfloat16),
        "diffusers-nommap": lambda: FluxTransformer2DModel.from_pretrained(
            directory, torch_dtype=torch.bfloat16, disable_mmap=True),
        "weightlift": lambda: load_model(FluxTransformer2DModel, directory,
                                         torch_dtype=torch.bfloat16),
        "weightlift-512MB": lambda: load_model(FluxTransformer2DModel, directory,
                                               torch_dtype=torch.bfloat16,
                                               max_host_memory="512MB"),
        "weightlift-mmap": lambda: load_model(FluxTransformer2DModel, directory,
                                              torch_dtype=torch.bfloat16, strategy="mmap"),
        "safetensors": lambda: load_file(file),
        "weightlift.load-mmap": lambda: weightlift.load(file, strategy="mmap"),
    }
    start = status()
    cache_start = probes.resident_bytes(file)
    peaks = {"anon": 0, "file": 0, "total": 0}
    stop = threading.Event()

    def sample() -> float:
        began = time.perf_counter()
        now = status()
        anon = now["RssAnon"] + now["RssShmem"] - start["RssAnon"] - start["RssShmem"]
        cache = probes.resident_bytes(file) - cache_start
        peaks["anon"] = max(peaks["anon"], anon)
        peaks["file"] = max(peaks["file"], now["RssFile"] - start["RssFile"])
        peaks["total"] = max(peaks["total"], anon + cache)
        return time.perf_counter() - began

    def sampler() -> None:
        wait = 0.02
        while not stop.wait(wait):
            wait = max(0.02, 9 * sample())

    thread = threading.Thread(target=sampler, daemon=True)
    if not os.environ.get("NOSAMPLE"):
        thread.start()
    began = time.perf_counter()
    model = runs[loader]()
    loaded = time.perf_counter() - began
    # The touch allocates nothing and only brings file pages in (as RssFile and page cache, both
    # still there at the sample after it), so the sampler stops first: its mincore of the whole
    # file stays out of the timed reading.
    stop.set()
    if thread.is_alive():
        thread.join()
    tensors = (list(model.values()) if isinstance(model, dict)
               else [*model.parameters(), *model.buffers()])
    faults = resource.getrusage(resource.RUSAGE_SELF)
    touching = time.perf_counter()
    for tensor in tensors:
        touch(tensor.data)
    usable = time.perf_counter() - began
    touched = time.perf_counter() - touching
    after = resource.getrusage(resource.RUSAGE_SELF)
    again = time.perf_counter()
    for tensor in tensors:  # a second pass: what touching costs once every page is in memory
        touch(tensor.data)
    again = time.perf_counter() - again
    sample()
    model_bytes = sum(t.nbytes for t in tensors)
    print(json.dumps({"loader": loader, "load": loaded, "usable": usable,
                      "model_bytes": model_bytes, "peak_anon": peaks["anon"],
                      "peak_file": peaks["file"], "peak_total": peaks["total"],
                      "cache_left": probes.resident_bytes(file) - cache_start,
                      "cache_start": cache_start,
                      "touch": touched, "touch_cpu": after.ru_utime + after.ru_stime
                      - faults.ru_utime - faults.ru_stime,
                      "touch_again": again, "touch_faults": [after.ru_minflt - faults.ru_minflt,
                                       after.ru_majflt - faults.ru_majflt]}))


# ---- the parent: fresh processes, interleaved ------------------------------------------------

def run_child(loader: str, directory: Path, files: list[str], cache: str) -> dict:
    from weightlift.bench.runner import set_cache, settle_reported_memory

    set_cache(files, "cold")
    settle_reported_memory()
    set_cache(files, cache)
    done = subprocess.run([sys.executable, __file__, "--child", loader, str(directory)],
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if done.returncode != 0:
        raise SystemExit(f"{loader} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parent(directory: Path, repetitions: int, caches: list[str], loaders: list[str]) -> None:
    make(directory)
    files = [str(directory / "diffusion_pytorch_model.safetensors")]
    size = os.path.getsize(files[0])
    load_before = open("/proc/loadavg").read().split()[:3]
    results = []
    for repetition in range(repetitions):
        for cache in caches:
            for loader in loaders:
                for _ in range(3):  # again if a neighbour evicted the file (drop_caches)
                    result = run_child(loader, directory, files, cache)
                    if cache == "cold" or result["cache_start"] >= 0.98 * size:
                        break
                    print(f"(warm run of {loader} started with the file "
                          f"{result['cache_start'] / size:.0%} cached: again)", flush=True)
                result.update(cache=cache, repetition=repetition)
                results.append(result)
                print(f"{repetition} {cache:4s} {loader:17s} usable {result['usable']:6.2f} s "
                      f"(load {result['load']:5.2f}) anon {result['peak_anon'] / 1e9:5.2f} GB "
                      f"file {result['peak_file'] / 1e9:5.2f} GB "
                      f"beyond model {(held(result) - result['model_bytes']) / 1e9:5.2f} "
                      f"GB cache left {result['cache_left'] / 1e9:5.2f} GB; first read "
                      f"{result['touch']:5.2f} s ({result['touch_cpu']:5.2f} s CPU, faults "
                      f"{result['touch_faults']})", flush=True)
    load_after = open("/proc/loadavg").read().split()[:3]
    (directory / f"results-{'-'.join(caches)}-{len(loaders)}.json").write_text(json.dumps(
        {"file_bytes": size, "loadavg_before": load_before, "loadavg_after": load_after,
         "runs": results}, indent=1))
    table(directory / f"results-{'-'.join(caches)}-{len(loaders)}.json")


def held(run: dict) -> int:
    """Host memory the load holds at its peak: anonymous RSS plus the larger of the file's
    page-cache growth and file-backed RSS (a warm mapping is the model, already cached)."""
    return max(run["peak_total"], run["peak_anon"] + run["peak_file"])


def table(path: Path) -> None:
    """The table of medians, from a results.json (``--table DIR/results.json``)."""
    saved = json.loads(path.read_text())
    results = saved["runs"]
    repetitions = 1 + max(r["repetition"] for r in results)
    print(f"\nfile {saved['file_bytes'] / 1e9:.2f} GB; load average before "
          f"{' '.join(saved['loadavg_before'])}, after {' '.join(saved['loadavg_after'])}; "
          f"medians of {repetitions}:\n")
    print("| loader | cache | to usable (s) | of which load (s) | first read (s) | its CPU (s) | "
          "peak anon RSS (GB) | peak file-backed RSS (GB) | held beyond the model (GB) | "
          "page cache left (GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for cache in ("cold", "warm"):
        for loader in (*LOADERS, *STATE_DICTS):
            runs = [r for r in results if r["loader"] == loader and r["cache"] == cache]
            if not runs:
                continue

            def median(key: str, scale: float = 1e9) -> str:
                if any(key not in r for r in runs):
                    return "-"  # a results file from before the script measured it
                return f"{statistics.median(r[key] for r in runs) / scale:.2f}"

            beyond = statistics.median(held(r) - r["model_bytes"] for r in runs)
            print(f"| {loader} | {cache} | {median('usable', 1)} | {median('load', 1)} | "
                  f"{median('touch', 1)} | {median('touch_cpu', 1)} | {median('peak_anon')} | {median('peak_file')} | {beyond / 1e9:.2f} | "
                  f"{median('cache_left')} |")


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        child(sys.argv[2], Path(sys.argv[3]))
    elif sys.argv[1] == "--table":
        table(Path(sys.argv[2]))
    else:
        parent(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3,
               sys.argv[3].split(",") if len(sys.argv) > 3 else ["cold", "warm"],
               sys.argv[4].split(",") if len(sys.argv) > 4 else list(LOADERS))
