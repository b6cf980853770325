"""``load_sharded`` from an HTTP object URL with 2 gloo ranks: the server's own log of ranged GETs
shows that direct mode fetches only each rank's slices and collective mode each byte once."""

from __future__ import annotations

import json
import os
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

pytest.importorskip("obstore", reason="object-storage support is the optional [remote] extra")

from remote_servers import fault_server  # noqa: E402
from test_distributed import (  # noqa: E402
    BUDGET,
    assert_bit_exact,
    expected_llama,
    llama_skipping_rotary,
    llama_tensors,
    merged,
    nbytes,
)

from weightlift.distributed import load_sharded  # noqa: E402

WORLD = 2
MODES = {"direct": {"mode": "direct", "max_gap": 0}, "collective": {"mode": "collective"}}


def _worker(rank: int, base: str, init_file: str, out_dir: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=30))
    try:
        for name, options in MODES.items():
            state, report = load_sharded(f"{base}/{name}/", llama_skipping_rotary(WORLD),
                                         max_host_memory=BUDGET,
                                         storage_options={"request_size": "256KiB"}, **options)
            torch.save({"state": {k: v.clone() for k, v in state.items()},
                        "report": report.to_dict()}, os.path.join(out_dir, f"{name}-{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    directory = tmp_path_factory.mktemp("remote-tp")
    full = llama_tensors()
    names = list(full)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, keys in enumerate(halves):
        file = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({k: full[k] for k in keys}, str(directory / file))
        weight_map.update(dict.fromkeys(keys, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    out_dir = tmp_path_factory.mktemp("remote-tp-out")
    with fault_server() as server:
        for name in MODES:
            server.put_dir(directory, name)
        ctx = mp.start_processes(_worker, args=(server.url, str(out_dir / "init"), str(out_dir)),
                                 nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + 120
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for process in ctx.processes:
                    process.kill()
                pytest.fail("the ranks did not finish in 120 s")
        reference: dict[str, torch.Tensor] = {}
        for file in sorted(directory.glob("*.safetensors")):
            reference.update(load_file(str(file)))
        yield server, out_dir, reference


def results(out_dir: Path, name: str) -> list[dict[str, Any]]:
    return [torch.load(out_dir / f"{name}-{rank}.pt", weights_only=False) for rank in range(WORLD)]


def test_direct_mode_fetches_exactly_each_ranks_slices(served: Any) -> None:
    server, out_dir, full = served
    per_rank = results(out_dir, "direct")
    for rank, result in enumerate(per_rank):
        assert_bit_exact(result["state"], expected_llama(full, rank, WORLD))
        assert result["report"]["strategy"] == "remote"
    needed = sum(nbytes(expected_llama(full, rank, WORLD)) for rank in range(WORLD))
    # The server saw exactly the slices' bytes, coalesced into ranged GETs of at most 256 KiB.
    assert server.data_bytes("direct/") == needed == per_rank[0]["report"]["total_bytes_read"]
    assert all(end - start <= 256 << 10 for _, start, end in server.data_gets("direct/"))
    for rank, result in enumerate(per_rank):  # each rank about half, not the whole checkpoint
        mine = nbytes(expected_llama(full, rank, WORLD))
        assert result["report"]["bytes_read"] == mine < 0.6 * nbytes(full)


def test_collective_mode_fetches_every_byte_once_in_the_group(served: Any) -> None:
    server, out_dir, full = served
    for rank, result in enumerate(results(out_dir, "collective")):
        assert_bit_exact(result["state"], expected_llama(full, rank, WORLD))
    wanted = {name: t for name, t in full.items() if "rotary_emb" not in name}
    gets = server.data_gets("collective/")
    merged(gets)  # raises if any byte was fetched twice, by any rank
    assert sum(end - start for _, start, end in gets) == nbytes(wanted)
