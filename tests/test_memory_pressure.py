"""Memory pressure: ``stream()`` passes a checkpoint several times larger than a cgroup's memory
limit through a child process in that group (``stream`` and ``direct`` strategies), and ``auto``
never picks a strategy that fills memory with the checkpoint."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import pagecache
from weightlift import probes
from weightlift.io.auto import WARM, Facts, choose

MiB, GiB = 1 << 20, 1 << 30
#: The group's limit: a Python with torch imported needs ~230 MiB of it.
LIMIT = 400 * MiB
BUDGET = 64 * MiB
TENSOR_INTS = 4 * MiB          # 16 MiB per tensor
TENSORS = 80                   # 1.25 GiB in all: over three times the limit
STEP = 7919                    # tensor i holds arange(n) + i * STEP


def pattern(i: int) -> np.ndarray:
    return np.arange(TENSOR_INTS, dtype=np.int32) + np.int32(i * STEP)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A checkpoint of recognisable int32 ranges, written tensor by tensor, not in the cache."""
    path = tmp_path_factory.mktemp("pressure") / "big.safetensors"
    nbytes = TENSOR_INTS * 4
    header = {f"t{i}": {"dtype": "I32", "shape": [TENSOR_INTS],
                        "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(TENSORS)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for i in range(TENSORS):
            f.write(pattern(i).tobytes())
        f.flush()
        os.fsync(f.fileno())
    pagecache.evict(path)  # so the child's reads are charged to its group
    yield path
    path.unlink()


CHILD = """
import json, sys, torch, weightlift
from weightlift import probes
path, strategy, budget, step = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
reports, count, expected = [], 0, None
probes.reset_peak_rss()
baseline = probes.rss_bytes()
for name, tensor in weightlift.stream(path, strategy=strategy, max_host_memory=budget,
                                      on_report=reports.append):
    # Compare in place: fresh 16 MiB temporaries would grow malloc's heap, not weightlift's use.
    if expected is None:
        expected = torch.empty(tensor.numel(), dtype=torch.int32)
    torch.arange(tensor.numel(), dtype=torch.int32, out=expected).add_(int(name[1:]) * step)
    assert torch.equal(tensor, expected), name
    count += 1
print(json.dumps({"count": count, "strategy": reports[0].strategy,
                  "rss_growth": probes.peak_rss() - baseline}))
"""


@pytest.mark.cgroup
@pytest.mark.parametrize("strategy", ["stream", "direct"])
def test_stream_passes_a_checkpoint_larger_than_the_memory_limit(big_checkpoint: Path,
                                                                 strategy: str) -> None:
    usable, why = probes.MemoryGroup.available()
    if not usable:
        pytest.skip(f"cannot create a memory cgroup: {why}")
    assert big_checkpoint.stat().st_size > 3 * LIMIT
    pagecache.evict(big_checkpoint)  # waits until none of it is cached
    with probes.MemoryGroup(limit=LIMIT) as group:
        done = subprocess.run(group.command([sys.executable, "-c", CHILD, str(big_checkpoint),
                                             strategy, str(BUDGET), str(STEP)]),
                              capture_output=True, text=True, timeout=300)
        peak, kills = group.peak(), group.oom_kills()
    assert done.returncode == 0, done.stderr[-2000:]
    assert kills == 0
    result = json.loads(done.stdout)
    assert result["count"] == TENSORS
    assert result["strategy"] == strategy or strategy == "direct"  # direct may fall back
    assert peak is not None and peak <= LIMIT
    # The page cache may fill the group's headroom (it is reclaimable); the process itself grows
    # by the budget plus about three tensors (the one the consumer holds, its comparison buffer,
    # reader threads' stacks and arenas), not with the checkpoint.
    assert result["rss_growth"] <= BUDGET + 3 * TENSOR_INTS * 4


@pytest.mark.cgroup
def test_default_budget_is_half_of_what_the_group_has_left() -> None:
    """Under a limit, the default budget counts what the group already holds (this Python and
    torch), so budget + the tensor being consumed fit in what is left."""
    usable, why = probes.MemoryGroup.available()
    if not usable:
        pytest.skip(f"cannot create a memory cgroup: {why}")
    child = ("import json, torch, weightlift.budget as b, weightlift.probes as p\n"
             "available = b.available_memory()\n"
             "print(json.dumps({'available': available, 'usage': p.cgroup_usage(),"
             " 'budget': b.default_budget(available)}))")
    with probes.MemoryGroup(limit=LIMIT) as group:
        done = subprocess.run(group.command([sys.executable, "-c", child]), capture_output=True,
                              text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    # Usage only grew between the two reads: what was left then is at least what is left now.
    assert result["available"] + result["usage"] >= LIMIT - 4 * MiB
    assert result["available"] <= LIMIT - 100 * MiB  # a Python with torch holds more than that
    assert result["budget"] == max(64 * MiB, result["available"] // 2)


# ---------------------------------------------------------------------------------------------
# auto's choice under a budget


facts_strategy = st.builds(
    Facts,
    device=st.sampled_from(["cpu", "cuda"]),
    copying=st.booleans(),
    total_bytes=st.integers(0, 1 << 42),
    resident_bytes=st.integers(0, 1 << 42),
    file_bytes=st.integers(0, 1 << 42),
    available=st.integers(0, 1 << 42),
    direct_refused=st.sampled_from([None, "tmpfs refuses O_DIRECT"]),
)


@given(facts_strategy)
def test_auto_maps_only_what_is_already_cached(facts: Facts) -> None:
    """mmap faults in every page it maps and leaves it in the page cache: only when (nearly) all
    of it is there already may it be chosen; otherwise the reads bypass or drop the cache."""
    choice = choose(facts)
    assert choice.strategy in ("mmap", "direct", "stream")
    uncached = max(0, facts.file_bytes - facts.resident_bytes)
    if choice.strategy == "mmap":
        assert uncached <= (1 - WARM) * facts.file_bytes
    if choice.strategy == "direct":
        assert facts.direct_refused is None
        # Partly cached: direct copies the cached runs out of the cache and reads the rest.
        assert facts.residency < WARM or facts.streaming
    if choice.strategy == "stream":
        # Else direct reads around the cache; a cached checkpoint whose consumer copies is
        # mapped in windows, at most the budget at a time, with no O_DIRECT needed.
        assert facts.direct_refused is not None or (
            facts.residency >= WARM and (facts.copying or facts.streaming))
    assert choice.reason


@given(facts_strategy)
def test_auto_warns_whenever_the_result_cannot_fit(facts: Facts) -> None:
    """A CPU load's result is the checkpoint itself: no strategy fits it in less memory, so the
    caller is told up front instead of finding out from the OOM killer."""
    choice = choose(facts)
    if not facts.copying and facts.total_bytes > facts.available:
        assert choice.warning is not None and "larger than available memory" in choice.warning
    if facts.copying:
        assert choice.warning is None  # copies go through the budget-sized ring


def test_auto_on_a_cold_checkpoint_far_larger_than_memory_does_not_map_it() -> None:
    facts = Facts(device="cuda", copying=True, total_bytes=140 * GiB, resident_bytes=2 * GiB,
                  file_bytes=140 * GiB, available=8 * GiB, direct_refused=None)
    assert choose(facts).strategy == "direct"
    refused = Facts(**{**facts.__dict__, "direct_refused": "no O_DIRECT"})
    assert choose(refused).strategy == "stream"
