"""Probes whose answer cannot change within a process are measured once, with a rule that
measures again when it could have changed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightlift import probes
from weightlift.io import direct
from weightlift.io.base import Unavailable
from weightlift.sources import resolve


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, path)
    return path


def test_the_o_direct_probe_runs_once_per_file_system(small_file: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[int] = []
    real = direct._probe_read

    def counted(fd: int, buf: torch.Tensor) -> None:
        probed.append(fd)
        real(fd, buf)

    monkeypatch.setattr(direct, "_probe_read", counted)
    monkeypatch.setattr(direct, "_READS_WORK", set())
    with resolve(small_file) as layout:
        for _ in range(3):
            strategy = direct.DirectStrategy(per_range=False)
            try:
                strategy.prepare(layout.shards)
            except Unavailable:
                pytest.skip("this file system refuses O_DIRECT")
            finally:
                strategy.close()
        assert len(probed) == 1
        # Another file system (or one mounted in an unmounted one's place) is probed anew.
        monkeypatch.setattr(direct, "_file_system", lambda fd: (-1, -1))
        strategy = direct.DirectStrategy(per_range=False)
        strategy.prepare(layout.shards)
        strategy.close()
        assert len(probed) == 2


def test_a_refused_probe_is_not_remembered(small_file: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "_READS_WORK", set())
    monkeypatch.setattr(direct, "_probe_read", lambda fd, buf: (_ for _ in ()).throw(
        OSError(22, "Invalid argument")))
    with resolve(small_file) as layout:
        strategy = direct.DirectStrategy(per_range=False)
        with pytest.raises(Unavailable, match="O_DIRECT"):
            strategy.prepare(layout.shards)
        strategy.close()
    assert direct._READS_WORK == set()


def test_the_cgroup_limit_is_measured_again_after_its_ttl(
        monkeypatch: pytest.MonkeyPatch) -> None:
    measured: list[int] = []

    def measure() -> int:
        measured.append(1)
        return 123 << 20

    clock = [1000.0]
    monkeypatch.setattr(probes, "_measure_memory_limit", measure)
    monkeypatch.setattr(probes, "_limit_cache", None)
    monkeypatch.setattr(probes.time, "monotonic", lambda: clock[0])
    assert probes.cgroup_memory_limit() == 123 << 20
    clock[0] += probes.LIMIT_TTL / 2
    assert probes.cgroup_memory_limit() == 123 << 20
    assert len(measured) == 1
    clock[0] += probes.LIMIT_TTL
    probes.cgroup_memory_limit()
    assert len(measured) == 2
