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
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from weightlift import probes
from weightlift.cli import main
from weightlift.cli.doctor import descriptors


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


#: In a child under a chosen descriptor limit: the doctor's findings, then a load of the same
#: checkpoint and what it did about the limit (its report's fallbacks), as JSON.
DESCRIPTOR_CHILD = """
import json, resource, sys
import weightlift
from weightlift.cli.doctor import collect
limits = resource.getrlimit(resource.RLIMIT_NOFILE)
found = collect(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, limits)  # as the doctor found it (it resolved too)
reports = []
try:
    weightlift.load(sys.argv[1], on_report=reports.append)
    did = reports[0].fallbacks
except weightlift.CheckpointError as exc:
    did = [str(exc)]
print(json.dumps({"doctor": found, "load": did}))
"""


def descriptor_child(source: Path, soft: int, hard: int) -> dict:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    done = subprocess.run([sys.executable, "-c", DESCRIPTOR_CHILD, str(source)],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def forty_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("forty")
    for number in range(40):
        save_file({f"w{number}": torch.full((4,), float(number))},
                  directory / f"model-{number:05d}.safetensors")
    return directory


@pytest.mark.parametrize("soft, hard, action, load_note", [
    (64, 4096, "raise", "the soft descriptor limit (64) left too few free for the 40 files of "
                        "the checkpoint; raised it to "),
    (64, 64, "pool", "files are closed and re-opened during the load"),
    (64, 100, "pool", "raised it to 100 (hard limit 100); the descriptor limit (soft 100, hard "
                      "100) leaves room for "),
])
def test_the_descriptor_limit_and_what_a_load_does_under_it(
        forty_shards: Path, soft: int, hard: int, action: str, load_note: str) -> None:
    """The doctor shows the limit a process runs under and says what a load will do there;
    a load in the same process then does that."""
    result = descriptor_child(forty_shards, soft, hard)
    system, plan = result["doctor"]["system"], result["doctor"]["source"]["descriptors"]
    assert (system["nofile_soft"], system["nofile_hard"]) == (soft, hard)
    assert 3 <= system["open_descriptors"] < soft
    assert system["files_open_soft"] == max(0, (soft - system["open_descriptors"]
                                                - max(4, soft // 8)) // 3)
    assert plan["action"] == action, plan
    assert len(result["load"]) == 1 and load_note in result["load"][0], result["load"]
    if action == "raise":
        assert f"raised it to {plan['soft_limit']} " in result["load"][0]


def test_the_text_report_shows_the_descriptor_limit(capsys: pytest.CaptureFixture[str],
                                                    tmpfs_checkpoint: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert main(["doctor", str(tmpfs_checkpoint)]) == 0
    out = capsys.readouterr().out
    shown = [line for line in out.splitlines() if "descriptors (ulimit -n)" in line]
    assert len(shown) == 1 and f"soft {soft}, hard {hard}" in shown[0], out
    assert "1 file(s): open" in out


def test_a_limit_too_low_for_one_file_is_refused_and_said_so() -> None:
    """Resolving refuses such a checkpoint (the doctor's SOURCE too, with the same message)."""
    plan = descriptors(40, 10, 10, 3)
    assert plan["action"] == "refuse" and plan["capacity"] == 3
    assert plan["note"].startswith("too low to load it; raise the limit to at least 153")
    assert descriptors(40, None, None, 3)["action"] == "open"
    assert descriptors(40, 64, None, 3) == {
        "action": "raise", "soft_limit": 153, "wanted": 153, "capacity": 153 - 3 - 19,
        "note": "a load raises the soft limit from 64 to 153 (the hard limit allows it) and "
                "keeps every file open"}
