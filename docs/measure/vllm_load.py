"""Weight loading inside vLLM, side by side: vLLM's ``safetensors``, ``runai_streamer`` and
``weightlift`` (docs/vllm.md).

    .ci/vllm/bin/pip install runai-model-streamer==0.17.0      # the runai_streamer peer
    PYTHONPATH=src .ci/vllm/bin/python docs/measure/vllm_load.py --size 3 --reps 3 \\
        --formats safetensors,runai_streamer,weightlift,weightlift-128MiB,weightlift-auto \\
        --out docs/bench-vllm-3gb.json
    # tensor parallel: two workers, one core each
    PYTHONPATH=src .ci/vllm/bin/python docs/measure/vllm_load.py --size 3 --reps 1 --tp 2 \\
        --formats safetensors,weightlift --caches cold --out docs/bench-vllm-3gb-tp2.json

Writes once a random Llama of about ``--size`` GB with transformers' ``save_pretrained`` (bf16,
1 GB shards) under ``bench-out/``. Then, per repetition, per cache state, per load format (the
order rotated each repetition): cold runs drop the files' pages first (posix_fadvise DONTNEED,
and ``echo 1 > /proc/sys/vm/drop_caches`` when root) and check with mincore that none is left;
warm runs read the files first and check all is cached. Each run is a fresh process that starts
vLLM (``LLM``, with its engine core and worker in processes of their own, as ``vllm serve`` runs
them); in the worker, which imports this file as ``__mp_main__``, the loader's ``load_weights``
is wrapped: wall seconds, the worker's RSS before, after, and at its peak during the call
(VmHWM after a clear_refs reset, plus anonymous and file-backed RSS sampled every 5 ms), the
bytes of the model's parameters, the CPUs the worker may run on (vLLM pins it to one core), and
the checkpoint's page cache afterwards. Between runs freed memory is left to go
back to the hypervisor (``settle_reported_memory``).

``transient`` = peak RSS - RSS before - parameter bytes: what the load held at its peak besides
the model it filled (vLLM allocates the parameters untouched; loading writes them).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

FORMATS = {
    "safetensors": ("safetensors", {}),
    "runai_streamer": ("runai_streamer", {}),
    "weightlift": ("weightlift", {}),
    "weightlift-stream": ("weightlift", {"strategy": "stream"}),
    "weightlift-auto": ("weightlift", {"strategy": "auto"}),
    "weightlift-64MiB": ("weightlift", {"max_host_memory": "64MiB"}),
    "weightlift-128MiB": ("weightlift", {"max_host_memory": "128MiB"}),
}
CACHES = ("cold", "warm")


def write_model(directory: Path, size_gb: float) -> None:
    """A Llama with hidden 2048, intermediate 8192, vocab 32000 and as many layers as make
    ``size_gb``; random bf16 weights, saved by save_pretrained in 1 GB shards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    per_layer = 4 * 2048 * 2048 + 3 * 2048 * 8192 + 2 * 2048
    embeddings = 2 * 32000 * 2048
    layers = max(1, round((size_gb * 1e9 / 2 - embeddings) / per_layer))
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=layers,
                         num_attention_heads=16, num_key_value_heads=16, vocab_size=32000,
                         max_position_embeddings=2048, tie_word_embeddings=False,
                         dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    state = {name: (torch.randn(p.shape, generator=generator) * 0.02).to(torch.bfloat16)
             for name, p in model.state_dict().items()}
    model.save_pretrained(directory, state_dict=state, max_shard_size="1GB")
    os.sync()


def files_of(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def cached_fraction(files: list[Path]) -> float:
    from weightlift.probes import resident_bytes

    total = sum(f.stat().st_size for f in files)
    return sum(resident_bytes(f) for f in files) / total


def make_cold(files: list[Path]) -> None:
    from weightlift.probes import evict

    for f in files:
        evict(f)
    if os.geteuid() == 0 and not os.environ.get("WEIGHTLIFT_BENCH_EVICT_ONLY"):
        Path("/proc/sys/vm/drop_caches").write_text("1\n")
    left = cached_fraction(files)
    assert left < 0.01, f"{left:.1%} of the checkpoint still cached"


def make_warm(files: list[Path]) -> None:
    buffer = bytearray(16 << 20)
    for _ in range(3):  # on a shared machine reclaim may take pages meanwhile: read again
        for f in files:
            with open(f, "rb", buffering=0) as handle:
                while handle.readinto(buffer):
                    pass
        if cached_fraction(files) > 0.99:
            break
    held = cached_fraction(files)
    assert held > 0.99, f"only {held:.1%} of the checkpoint cached"


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def storage_reads() -> int:
    """Bytes this process (all its threads) had read from storage: /proc/self/io read_bytes."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def child(load_format: str, extra: dict, model: str, out: Path) -> None:
    """One run: start vLLM as ``vllm serve`` does (engine core and worker in processes of their
    own); the worker, importing this module as ``__mp_main__``, measures (``measure``)."""
    os.environ["WEIGHTLIFT_BENCH_OUT"] = str(out)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    tp = int(os.environ.get("WEIGHTLIFT_BENCH_TP", "1"))
    if tp > 1:  # one core per worker: vLLM's automatic binding wants a NUMA node per worker
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(map(str, range(tp))))
    from vllm import LLM

    llm = LLM(model=model, load_format=load_format, model_loader_extra_config=extra,
              dtype="bfloat16", max_model_len=128, max_num_seqs=1, enforce_eager=True,
              skip_tokenizer_init=True, tensor_parallel_size=tp)
    del llm


def measure(out: Path) -> None:
    """In vLLM's worker: wrap the loaders' ``load_weights`` to measure the call."""
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.runai_streamer_loader import RunaiModelStreamerLoader

    from weightlift.probes import reset_peak_rss

    def measured(original):  # type: ignore[no-untyped-def]
        def load_weights(self, module, model_config):  # type: ignore[no-untyped-def]
            result: dict = {"params": sum(p.numel() * p.element_size()
                                          for p in module.parameters()),
                            "affinity": sorted(os.sched_getaffinity(0))}
            peaks = {"RssAnon": 0, "RssFile": 0}
            stop = threading.Event()

            def sample() -> None:
                while not stop.is_set():
                    now = status()
                    for key in peaks:
                        peaks[key] = max(peaks[key], now[key])
                    stop.wait(0.005)

            if os.environ.get("WEIGHTLIFT_BENCH_REWARM"):
                # Warm again right before the load: on a machine others measure on, someone's
                # drop_caches during vLLM's start would make a warm run cold.
                make_warm(files_of(Path(model_config.model)))
            if os.environ.get("WEIGHTLIFT_BENCH_TOUCH") == "1":
                # The parameters' pages written before the clock: the VM's slow first touch of
                # fresh memory (~4 s/GB here) would otherwise dominate every loader's time.
                for param in module.parameters():
                    param.data.zero_()
                result["touched"] = True
            # What the page cache held as the load began (another process's drop_caches on a
            # shared machine can make a warm run partly cold).
            result["cached_before"] = cached_fraction(files_of(Path(model_config.model)))
            reset_peak_rss()
            reads = storage_reads()
            result["before"] = status()
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            from vllm.distributed import get_tensor_model_parallel_world_size, get_tp_group

            if get_tensor_model_parallel_world_size() > 1:
                # The ranks start the clock together: what comes before (the re-warm, the touch,
                # the residency count) ends at a different moment on each, and a loader whose
                # ranks wait for each other would count the gap as its own time.
                import torch.distributed as dist

                waited = time.perf_counter()
                dist.barrier(group=get_tp_group().cpu_group)
                result["barrier_wait"] = time.perf_counter() - waited
            started = time.perf_counter()
            original(self, module, model_config)
            result["seconds"] = time.perf_counter() - started
            result["read_bytes"] = storage_reads() - reads
            stop.set()
            sampler.join()
            result["after"] = status()
            result["peak"] = result["after"]["VmHWM"]
            result["peak_anon"], result["peak_file"] = peaks["RssAnon"], peaks["RssFile"]
            # Touched parameters are in the RSS before the load already.
            params = 0 if result.get("touched") else result["params"]
            result["transient"] = result["peak"] - result["before"]["VmRSS"] - params
            result["cached_after"] = cached_fraction(files_of(Path(model_config.model)))
            from vllm.distributed import get_tensor_model_parallel_rank

            rank = get_tensor_model_parallel_rank()
            out.with_name(f"{out.stem}.rank{rank}.json").write_text(json.dumps(result))
        return load_weights

    DefaultModelLoader.load_weights = measured(DefaultModelLoader.load_weights)
    RunaiModelStreamerLoader.load_weights = measured(RunaiModelStreamerLoader.load_weights)


def run_one(name: str, cache: str, model: Path, scratch: Path) -> dict:
    from weightlift.bench.runner import settle_reported_memory

    load_format, extra = FORMATS[name]
    files = files_of(model)
    settle_reported_memory()
    (make_cold if cache == "cold" else make_warm)(files)
    if os.environ.get("WEIGHTLIFT_BENCH_WARM_IN_WORKER"):
        os.environ["WEIGHTLIFT_BENCH_REWARM"] = "1" if cache == "warm" else ""
    loadavg = Path("/proc/loadavg").read_text().split()[:3]  # how busy the shared machine was
    out = scratch / f"{name}-{cache}.json"
    for old in scratch.glob(f"{out.stem}.rank*.json"):
        old.unlink()
    done = subprocess.run([sys.executable, __file__, "--child", load_format, json.dumps(extra),
                           str(model), str(out)], capture_output=True, text=True, timeout=1800)
    ranks = [json.loads(p.read_text()) for p in sorted(scratch.glob(f"{out.stem}.rank*.json"))]
    if done.returncode != 0 or not ranks:
        raise SystemExit(f"{name} {cache} failed:\n{done.stderr[-6000:]}")
    # Tensor parallel: the load is done when the slowest rank is; memory is per worker.
    slowest = max(ranks, key=lambda r: r["seconds"])
    return {**slowest, "loadavg": loadavg, "transient": max(r["transient"] for r in ranks),
            "peak_file": max(r["peak_file"] for r in ranks), "ranks": ranks,
            # One host: what its workers read from storage together.
            "read_bytes_host": sum(r.get("read_bytes", 0) for r in ranks)}


def skew(result: dict) -> str:
    """How far apart the ranks came to the load (the longest wait at the barrier before it)."""
    if len(result["ranks"]) < 2:
        return ""
    return f"  ranks started {max(r.get('barrier_wait', 0) for r in result['ranks']):.2f} s apart"


def summary(runs: list[dict], size: int) -> dict:
    seconds = [r["seconds"] for r in runs]
    return {"runs": len(runs), "seconds_median": statistics.median(seconds),
            "seconds_min": min(seconds), "seconds_max": max(seconds),
            "gbps_median": size / statistics.median(seconds) / 1e9,
            "transient_max": max(r["transient"] for r in runs),
            "transient_median": statistics.median(r["transient"] for r in runs),
            "peak_file_max": max(r["peak_file"] for r in runs),
            "cached_after_median": statistics.median(r["cached_after"] for r in runs),
            "cached_after_max": max(r["cached_after"] for r in runs),
            "read_bytes_host_max": max(r.get("read_bytes_host", 0) for r in runs),
            "affinity": runs[0]["affinity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=float, default=3.0, help="checkpoint size in GB")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--formats", default="safetensors,runai_streamer,weightlift",
                        help=f"comma-separated, of: {', '.join(FORMATS)}")
    parser.add_argument("--caches", default=",".join(CACHES))
    parser.add_argument("--tp", type=int, default=1, help="tensor_parallel_size (one core each)")
    parser.add_argument("--dir", type=Path, default=Path("bench-out"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--evict-only", action="store_true",
                        help="cold: drop only the checkpoint's pages, not the whole page cache "
                             "(drop_caches), on a machine others measure on")
    parser.add_argument("--warm-in-worker", action="store_true",
                        help="warm: read the files again in each worker right before the load "
                             "(others' drop_caches during vLLM's start made warm runs cold)")
    parser.add_argument("--touch-params", action="store_true",
                        help="write the parameters' pages before timing the load (the VM's "
                        "slow first touch of fresh memory then counts for no loader)")
    parser.add_argument("--folios", default="as-is",
                        help="warm: how the page cache holds the checkpoint, set once before the "
                             "runs (weightlift.bench.runner.set_folios): as-is, large, small")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.evict_only:
        os.environ["WEIGHTLIFT_BENCH_EVICT_ONLY"] = "1"
    if args.warm_in_worker:
        os.environ["WEIGHTLIFT_BENCH_WARM_IN_WORKER"] = "1"
    if args.child:
        load_format, extra, model, out = args.child
        child(load_format, json.loads(extra), model, Path(out))
        return
    os.environ["WEIGHTLIFT_BENCH_TP"] = str(args.tp)
    if args.touch_params:
        os.environ["WEIGHTLIFT_BENCH_TOUCH"] = "1"
    model = args.dir / f"vllm-llama-{args.size:g}gb"
    if not (model / "config.json").exists():
        write_model(model, args.size)
    size = sum(f.stat().st_size for f in files_of(model))
    names = args.formats.split(",")
    scratch = args.dir / "vllm-runs"
    scratch.mkdir(parents=True, exist_ok=True)
    caches = args.caches.split(",")
    runs: dict[str, list[dict]] = {f"{n}/{c}": [] for n in names for c in caches}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    from weightlift.bench.runner import cachestat_seconds, set_folios

    set_folios([str(f) for f in files_of(model)], args.folios)
    folios = {"folios": args.folios,
              "cachestat_ms_before": cachestat_seconds([str(f) for f in files_of(model)]) * 1e3}
    print(f"folios {args.folios}: cachestat over the files "
          f"{folios['cachestat_ms_before']:.2f} ms", flush=True)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for cache in caches:
            for name in order:
                result = run_one(name, cache, model, scratch)
                runs[f"{name}/{cache}"].append(result)
                print(f"rep {rep} {cache:4s} {name:18s} {result['seconds']:7.2f} s  transient "
                      f"{result['transient'] / 2**20:7.0f} MiB  peak file-backed "
                      f"{result['peak_file'] / 2**20:6.0f} MiB  cached after "
                      f"{result['cached_after']:.0%} (before {result.get('cached_before', 0):.0%})  "
                      f"read from storage (host) {result['read_bytes_host'] / size:.2f}x  "
                      f"load {' '.join(result['loadavg'])}{skew(result)}", flush=True)
    table = {key: summary(value, size) for key, value in runs.items()}
    folios["cachestat_ms_after"] = cachestat_seconds([str(f) for f in files_of(model)]) * 1e3
    print(f"after: cachestat over the files {folios['cachestat_ms_after']:.2f} ms")
    print(f"\n{size / 1e9:.2f} GB, {args.reps} repetitions, tensor_parallel_size {args.tp}, "
          f"started {started}")
    print(f"{'format/cache':28s} {'median s':>9s} {'min':>7s} {'max':>7s} {'GB/s':>6s} "
          f"{'transient MiB (max)':>20s} {'cached after':>13s}")
    for key, row in table.items():
        print(f"{key:28s} {row['seconds_median']:9.2f} {row['seconds_min']:7.2f} "
              f"{row['seconds_max']:7.2f} {row['gbps_median']:6.2f} "
              f"{row['transient_max'] / 2**20:20.0f} {row['cached_after_median']:13.0%}")
    if args.out:
        args.out.write_text(json.dumps({"started": started, "bytes": size, "reps": args.reps,
                                        "tensor_parallel_size": args.tp, **folios,
                                        "summary": table, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
elif os.environ.get("WEIGHTLIFT_BENCH_OUT"):  # vLLM's engine or worker process of a run
    measure(Path(os.environ["WEIGHTLIFT_BENCH_OUT"]))
