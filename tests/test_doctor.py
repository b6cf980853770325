"""weightlift doctor through the CLI entry point: a checkpoint on tmpfs vs. one on a disk file
system.

Oracles are independent of the code under test: /proc/self/mounts read here, an O_DIRECT open
and read done here, getrlimit, and the page cache state the test sets up (written to tmpfs,
evicted on disk).
"""

from __future__ import annotations

import json
import mmap
import os
import resource
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightlift import probes
from weightlift.cli import main


def mount_type(path: Path) -> str:
    real, best, kind = os.path.realpath(path), -1, ""
    with open("/proc/self/mounts", encoding="utf-8") as f:
        for line in f:
            _, mount, fstype = line.split()[:3]
            if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) > best:
                best, kind = len(mount), fstype
    return kind


def o_direct_reads(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        buf = mmap.mmap(-1, 4096)  # page aligned
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_checkpoint(directory: Path) -> Path:
    path = directory / "model.safetensors"
    save_file({"w": torch.randn(256, 256), "b": torch.zeros(256)}, path)
    return path


@pytest.fixture
def tmpfs_checkpoint() -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK) and mount_type(shm) == "tmpfs"):
        pytest.skip("no writable tmpfs at /dev/shm")
    with tempfile.TemporaryDirectory(dir=shm, prefix="weightlift-doctor-") as d:
        yield write_checkpoint(Path(d))


@pytest.fixture
def disk_checkpoint(tmp_path: Path) -> Iterator[Path]:
    for candidate in (tmp_path, Path("/var/tmp"), Path(__file__).parent):
        if mount_type(candidate) not in ("tmpfs", "ramfs", "overlay", ""):
            break
    else:
        pytest.skip("no disk-backed file system to write to")
    with tempfile.TemporaryDirectory(dir=candidate, prefix="weightlift-doctor-") as d:
        yield write_checkpoint(Path(d))


def doctor_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    assert main(["doctor", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_system_findings_match_the_machine(capsys: pytest.CaptureFixture[str]) -> None:
    report = doctor_json(capsys)
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    system = report["system"]
    assert system["memlock_soft"] == (None if soft == resource.RLIM_INFINITY else soft)
    assert system["memlock_hard"] == (None if hard == resource.RLIM_INFINITY else hard)
    assert system["mem_total"] == probes.meminfo()["MemTotal"]
    assert 0 < system["mem_available"] <= system["mem_total"]
    assert system["swap_total"] == probes.meminfo()["SwapTotal"]
    assert system["cgroup_memory_limit"] == probes.cgroup_memory_limit()
    assert report["accelerators"]["cuda"] == torch.cuda.is_available()
    assert "source" not in report


def test_tmpfs_checkpoint(capsys: pytest.CaptureFixture[str], tmpfs_checkpoint: Path) -> None:
    source = doctor_json(capsys, str(tmpfs_checkpoint))["source"]
    assert source["file_system_type"] == "tmpfs"
    assert source["o_direct"] == o_direct_reads(tmpfs_checkpoint)
    assert source["bytes"] == (256 * 256 + 256) * 4
    # tmpfs pages are the file: all of it is resident, so auto maps it.
    assert source["residency"] == pytest.approx(1.0)
    assert source["auto"]["cpu"]["strategy"] == "mmap"
    assert "100% of the checkpoint is in the page cache" in source["auto"]["cpu"]["reason"]


def test_disk_checkpoint_after_eviction(capsys: pytest.CaptureFixture[str],
                                        disk_checkpoint: Path) -> None:
    os.sync()
    probes.evict(disk_checkpoint)
    source = doctor_json(capsys, str(disk_checkpoint))["source"]
    assert source["file_system_type"] == mount_type(disk_checkpoint) != "tmpfs"
    assert source["o_direct"] == o_direct_reads(disk_checkpoint)
    assert source["residency"] < 0.25
    expected = "direct" if source["o_direct"] else "stream"
    assert source["auto"]["cpu"]["strategy"] == expected


def test_text_report_names_the_choice(capsys: pytest.CaptureFixture[str],
                                      tmpfs_checkpoint: Path) -> None:
    assert main(["doctor", str(tmpfs_checkpoint)]) == 0
    out = capsys.readouterr().out
    for expected in ("memory available", "memlock (ulimit -l)", "O_DIRECT", "page cache",
                     "auto → cpu", "mmap", "tmpfs", "files live in memory"):
        assert expected in out, expected


def test_missing_source_is_one_line_error(capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path) -> None:
    assert main(["doctor", str(tmp_path / "absent.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("weightlift: error:") and "absent.safetensors" in err
    assert len(err.strip().splitlines()) == 1
