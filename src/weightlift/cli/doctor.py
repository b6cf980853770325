"""``weightlift doctor [SOURCE]``: what this machine offers a load, and what ``auto`` would do.

Everything a slow or killed load usually comes down to, in one place: memory (available, swap,
cgroup limit), the memlock limit that caps pinned memory, accelerators, and for SOURCE its file
system, whether O_DIRECT works there, how much of it is already in the page cache, and the
strategy ``auto`` would pick with its reason, and whether io_uring works here (and why not). ``collect`` gathers, ``render`` prints.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
from typing import Any

import torch
from rich.table import Table

from .. import probes
from ..io import uring
from ..io.auto import choose, gather
from ..sources import resolve
from ..units import format_bytes
from .output import console as stdout, label

#: File systems whose files already live in memory.
IN_MEMORY = ("tmpfs", "ramfs")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("doctor", help="check memory, limits, devices and what auto would "
                                           "pick for a checkpoint")
    parser.add_argument("source", nargs="?", help="a checkpoint to check (file, directory, hf://)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = collect(args.source)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        render(report)
    return 0


def collect(source: str | None = None) -> dict[str, Any]:
    """The doctor's findings as plain data (what ``--json`` prints)."""
    report: dict[str, Any] = {"system": system(), "accelerators": accelerators()}
    if source is not None:
        report["source"] = checkpoint(source, report["accelerators"]["cuda"])
    return report


def system() -> dict[str, Any]:
    info = probes.meminfo()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return {
        "kernel": os.uname().release,
        "cpus": os.cpu_count(),
        "mem_total": info.get("MemTotal"),
        "mem_available": info.get("MemAvailable"),
        "swap_total": info.get("SwapTotal"),
        "swap_free": info.get("SwapFree"),
        "cgroup_memory_limit": probes.cgroup_memory_limit(),
        # RLIM_INFINITY (-1) → None: no limit on pinned (page-locked) memory.
        "memlock_soft": None if soft == resource.RLIM_INFINITY else soft,
        "memlock_hard": None if hard == resource.RLIM_INFINITY else hard,
        # None when an io_uring can be set up here, else why not (loads then use threads).
        "io_uring_refused": uring.probe(),
    }


def accelerators() -> dict[str, Any]:
    cuda = torch.cuda.is_available()
    return {
        "cuda": cuda,
        "cuda_version": torch.version.cuda,
        "rocm_version": getattr(torch.version, "hip", None),
        "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        if cuda else [],
    }


def checkpoint(source: str, cuda: bool) -> dict[str, Any]:
    with resolve(source) as layout:
        first = layout.shards[0].path
        auto = {}
        facts = None
        for device, copying in [("cpu", False)] + ([("cuda", True)] if cuda else []):
            facts = gather(layout.shards, total_bytes=layout.total_bytes, device=device,
                           copying=copying)
            choice = choose(facts)
            auto[device] = {"strategy": choice.strategy, "reason": choice.reason,
                            "warning": choice.warning}
        assert facts is not None
        where = "object storage" if layout.shards[0].remote else probes.file_system(first)
        return {
            "path": layout.index_path or first,
            "files": len(layout.shards),
            "tensors": len(layout.entries),
            "bytes": layout.total_bytes,
            "file_bytes": facts.file_bytes,
            "file_system": where,
            "file_system_type": _fstype(where),
            "o_direct": facts.direct_refused is None,
            "o_direct_refused": facts.direct_refused,
            "resident_bytes": facts.resident_bytes,
            "residency": facts.residency,
            "auto": auto,
        }


def _fstype(where: str | None) -> str | None:
    """``/dev/vda (ext4) at /`` → ``ext4``."""
    if where is None or "(" not in where:
        return None
    return where.split("(", 1)[1].split(")", 1)[0]


def render(report: dict[str, Any]) -> None:
    console = stdout()
    sys_, acc = report["system"], report["accelerators"]
    table = Table(title="weightlift doctor", show_lines=False)
    for header in ("check", "value", "note"):
        label(table, header)
    size = report["source"]["bytes"] if "source" in report else None
    available = sys_["mem_available"]
    fits = ""
    if size is not None and available is not None:
        fits = "fits" if size <= available else "[red]checkpoint is larger: CPU loads may swap " \
                                                "or be killed; stream or load to a device[/]"
    table.add_row("memory available", f"{format_bytes(available)} of "
                  f"{format_bytes(sys_['mem_total'])}", fits)
    table.add_row("swap", f"{format_bytes(sys_['swap_free'])} free of "
                  f"{format_bytes(sys_['swap_total'])}", "")
    limit = sys_["cgroup_memory_limit"]
    table.add_row("cgroup memory limit", "none" if limit is None else format_bytes(limit),
                  "" if limit is None else "loads count page cache against it")
    memlock = sys_["memlock_soft"]
    note = ""
    if memlock is not None and acc["cuda"]:
        note = "[yellow]pinned host buffers may fail above this; raise `ulimit -l`[/]"
    table.add_row("memlock (ulimit -l)", "unlimited" if memlock is None else
                  format_bytes(memlock), note)
    refused = sys_["io_uring_refused"]
    table.add_row("io_uring", "works" if refused is None else "unavailable",
                  "--engine uring reads 64 at a time through one ring" if refused is None
                  else f"[yellow]{refused}; loads use the thread engine[/]")
    devices = ", ".join(acc["devices"]) or "none"
    kind = "ROCm " + acc["rocm_version"] if acc["rocm_version"] else (
        "CUDA " + acc["cuda_version"] if acc["cuda_version"] else "CPU-only torch")
    table.add_row("accelerators", devices, kind)
    if "source" in report:
        _source_rows(table, report["source"])
    console.print(table)


def _source_rows(table: Table, src: dict[str, Any]) -> None:
    table.add_section()
    table.add_row("checkpoint", src["path"], f"{src['tensors']} tensors, "
                  f"{format_bytes(src['bytes'])} in {src['files']} file(s)")
    memory = src["file_system_type"] in IN_MEMORY
    table.add_row("file system", src["file_system"] or "unknown",
                  "files live in memory: mmap is zero-copy" if memory else "")
    table.add_row("O_DIRECT", "works" if src["o_direct"] else "refused",
                  src["o_direct_refused"] or "")
    table.add_row("page cache", f"{src['residency']:.0%} resident",
                  format_bytes(src["resident_bytes"]))
    for device, choice in src["auto"].items():
        note = choice["reason"] + (f" [red]({choice['warning']})[/]" if choice["warning"] else "")
        table.add_row(f"auto → {device}", f"[bold]{choice['strategy']}[/]", note)
