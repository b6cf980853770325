"""``weightlift doctor [SOURCE]``: what this machine offers a load, and what ``auto`` would do.

Everything a slow or killed load usually comes down to, in one place: memory (available, swap,
cgroup limit), the memlock limit that caps pinned memory, the descriptor limit (``ulimit -n``) and
what a load does under it, accelerators, whether io_uring works here (and why not), and for
SOURCE its file system, whether O_DIRECT works there, how much of it is already in the page
cache, and the strategy ``auto`` would pick with its reason. ``collect`` gathers, ``render``
prints.
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
from ..sources.descriptors import (MIN_CAPACITY, PER_SHARD, advice, headroom, open_count,
                                   wanted_limit)
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
    if source is not None:  # limits as found: resolving may raise the soft one, as a load does
        report["source"] = checkpoint(source, report["accelerators"]["cuda"])
        if report["source"]["local"]:
            nofile = report["system"]
            report["source"]["descriptors"] = descriptors(
                report["source"]["files"], nofile["nofile_soft"], nofile["nofile_hard"],
                nofile["open_descriptors"])
    return report


def _limit(value: int) -> int | None:
    """RLIM_INFINITY (-1) → None: no limit."""
    return None if value == resource.RLIM_INFINITY else value


def files_open(limit: int | None, others: int) -> int | None:
    """Files a load keeps open at once under a soft descriptor limit of ``limit`` (None: no
    bound), with ``others`` descriptors open besides."""
    if limit is None:
        return None
    return max(0, (limit - others - headroom(limit)) // PER_SHARD)


def descriptors(files: int, soft: int | None, hard: int | None, others: int
                ) -> dict[str, Any]:
    """What a load of ``files`` local files does under this descriptor limit (as
    ``sources.descriptors.reserve`` decides it): ``action`` is ``open`` (every file stays open),
    ``raise`` (the soft limit is raised to ``soft_limit``), ``pool`` (files share ``capacity``
    descriptors, closed and re-opened as needed) or ``refuse`` (too low even for one file)."""
    wanted = wanted_limit(files, 0, others)
    limit = soft if soft is None or soft >= wanted else (
        wanted if hard is None else max(soft, min(wanted, hard)))
    capacity = None if limit is None else limit - others - headroom(limit)
    if capacity is not None and capacity < MIN_CAPACITY:
        action = "refuse"
        note = f"too low to load it; {advice(wanted)}"
    elif capacity is not None and capacity < PER_SHARD * files:
        action = "pool"
        raised = f"a load raises the soft limit to {limit}; " if limit != soft else ""
        note = (f"{raised}the files share {capacity} descriptors and are re-opened during a "
                f"load; to keep them open, {advice(wanted)}")
    elif limit != soft:
        action = "raise"
        note = (f"a load raises the soft limit from {soft} to {limit} (the hard limit "
                "allows it) and keeps every file open")
    else:
        action, note = "open", "every file stays open during a load"
    return {"action": action, "soft_limit": limit, "wanted": wanted, "capacity": capacity,
            "note": note}


def system() -> dict[str, Any]:
    info = probes.meminfo()
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    nofile_soft, nofile_hard = map(_limit, resource.getrlimit(resource.RLIMIT_NOFILE))
    others = open_count()
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
        # The descriptor limit (None: unlimited), descriptors open now, and how many files a
        # load keeps open at once under the soft limit, and under the hard one once a load
        # raised the soft limit to it (None: no bound); beyond, files share descriptors.
        "nofile_soft": nofile_soft,
        "nofile_hard": nofile_hard,
        "open_descriptors": others,
        "files_open_soft": files_open(nofile_soft, others),
        "files_open_hard": files_open(nofile_hard, others),
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
            "local": not layout.shards[0].remote,
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
    table.add_row("descriptors (ulimit -n)", f"soft {_shown(sys_['nofile_soft'])}, hard "
                  f"{_shown(sys_['nofile_hard'])}", _descriptor_note(sys_))
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


def _shown(limit: int | None) -> str:
    return "unlimited" if limit is None else str(limit)


def _descriptor_note(sys_: dict[str, Any]) -> str:
    at_soft, at_hard = sys_["files_open_soft"], sys_["files_open_hard"]
    if at_soft is None:
        return f"{sys_['open_descriptors']} open; no bound on the files a load keeps open"
    if sys_["nofile_hard"] == sys_["nofile_soft"]:
        more = "no more under the hard limit"
    elif at_hard is None:
        more = "any number once a load raises the soft limit"
    else:
        more = f"{at_hard} once a load raises the soft limit to the hard one"
    return (f"{sys_['open_descriptors']} open; a load keeps {at_soft} files open at once "
            f"({PER_SHARD} descriptors each), {more}; beyond, files share descriptors and are "
            "re-opened")


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
    if "descriptors" in src:
        plan = src["descriptors"]
        colour = {"pool": "yellow", "refuse": "red"}.get(plan["action"])
        table.add_row("descriptors", f"{src['files']} file(s): {plan['action']}",
                      f"[{colour}]{plan['note']}[/]" if colour else plan["note"])
    for device, choice in src["auto"].items():
        note = choice["reason"] + (f" [red]({choice['warning']})[/]" if choice["warning"] else "")
        table.add_row(f"auto → {device}", f"[bold]{choice['strategy']}[/]", note)
