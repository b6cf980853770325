"""Warm loads pay only for what their choice needs: no O_DIRECT probe (a disk read) when the
checkpoint is cached enough to be mapped (whole, or in windows)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import pagecache
import weightlift
from conftest import assert_same, random_tensor
from weightlift.io import auto
from weightlift.sources import resolve


@pytest.fixture
def cached(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(5)
    tensors = {f"w{i}": random_tensor((256, 1024), torch.float32, gen) for i in range(24)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, path)  # 24 MiB of tensors
    pagecache.sync(path)
    pagecache.warm(path, 0, path.stat().st_size)
    return path


@pytest.fixture
def probes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    real = auto.direct_refusal

    def counted(shards: list[object]) -> str | None:
        calls.append("probe")
        return real(shards)  # type: ignore[arg-type]

    monkeypatch.setattr(auto, "direct_refusal", counted)
    return calls


def gather(path: Path, **options: object) -> auto.Facts:
    with resolve(path) as layout:
        return auto.gather(layout.shards, total_bytes=layout.total_bytes, device="cpu",
                           copying=False, probe_direct=False, **options)  # type: ignore[arg-type]


def test_a_cached_stream_is_mapped_without_probing_o_direct(cached: Path,
                                                            probes: list[str]) -> None:
    facts = gather(cached, streaming=True, budget=64 << 20)
    assert probes == []
    assert facts.direct_refused is not None and facts.direct_refused.startswith("not probed")
    assert auto.choose(facts).strategy == "stream"  # in windows of the file
    state = {name: tensor.clone() for name, tensor in weightlift.stream(cached)}
    assert probes == []
    assert_same(state, load_file(cached))


def test_a_stream_whose_uncached_rest_exceeds_the_budget_still_probes(cached: Path,
                                                                      probes: list[str]) -> None:
    # Evict from 23 MiB on (~96% stays cached). The page cache keeps files in folios of up to
    # a few MiB and evicts whole folios only: start at a 1 MiB boundary.
    tail = 23 << 20
    fd = os.open(cached, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, tail, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    pagecache.wait_for(cached, lambda now: not now[tail // pagecache.PAGE:].any(),
                       "the tail evicted")
    facts = gather(cached, streaming=True, budget=64 << 10)
    assert facts.residency >= auto.WARM
    assert probes == ["probe"]
    assert auto.choose(facts).strategy in ("direct", "stream")


def test_a_partly_cached_load_probes(cached: Path, probes: list[str]) -> None:
    pagecache.evict(cached)
    gather(cached)
    assert probes == ["probe"]
