"""``weightlift info SOURCE``: what a checkpoint holds, without reading its tensors."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from collections.abc import Mapping
from typing import Any

from rich.table import Table

from ..formats.gguf import GGUFMetadata
from ..sources import resolve
from ..sources.records import iter_entries
from ..units import format_bytes
from .output import console as stdout, label, number
from .storage import add_storage_flags, source_of


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("info", help="describe a checkpoint: tensors, bytes, dtypes, shards")
    parser.add_argument("source", help="a .safetensors or .gguf file, an index .json or a directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--tensors", action="store_true", help="list every tensor")
    add_storage_flags(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    with resolve(source_of(args)) as layout:
        entries = list(iter_entries(layout))
        dtypes: Counter[str] = Counter()
        dtype_bytes: defaultdict[str, int] = defaultdict(int)
        for entry in entries:
            kind = entry.info.ggml.name if entry.info.ggml else entry.info.dtype.name
            dtypes[kind] += 1
            dtype_bytes[kind] += entry.info.nbytes
        shards = [{"path": s.path, "file_bytes": s.header.file_size,
                   "tensors": len(s.header.tensors)} for s in layout.shards]
        info = {
            "source": args.source,
            "index": layout.index_path,
            "tensors": len(entries),
            "bytes": layout.total_bytes,
            "dtypes": {name: {"tensors": n, "bytes": dtype_bytes[name]}
                       for name, n in sorted(dtypes.items())},
            "shards": shards,
            "format": layout.format,
            "metadata": _metadata(layout.metadata),
        }
        if args.tensors:
            info["tensor_list"] = [
                {"name": e.name, "dtype": e.info.dtype.name, "shape": list(e.info.shape),
                 "bytes": e.info.nbytes, "file": layout.shards[e.shard].path,
                 "offset": e.info.start,
                 **({"ggml_type": e.info.ggml.name, "ggml_shape": list(e.info.ggml_shape or ())}
                    if e.info.ggml else {})} for e in entries]
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    _print(info)
    return 0


def _metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Metadata for display: GGUF values as short texts that never decode a big array."""
    if isinstance(metadata, GGUFMetadata):
        return {key: metadata.describe(key) for key in metadata}
    return None if metadata is None else dict(metadata)


def table(title: str, *columns: tuple[str, bool]) -> Table:
    """A table of ``(header, holds numbers)`` columns."""
    out = Table(title=title)
    for header, numeric in columns:
        (number if numeric else label)(out, header)
    return out


def _print(info: dict) -> None:
    console = stdout()
    console.print(f"[bold]{info['source']}[/]: {info['tensors']} tensors, "
                  f"{format_bytes(info['bytes'])} in {len(info['shards'])} file(s)")
    dtypes = table("dtypes", ("dtype", False), ("tensors", True), ("bytes", True))
    for name, d in info["dtypes"].items():
        dtypes.add_row(name, str(d["tensors"]), format_bytes(d["bytes"]))
    console.print(dtypes)
    shards = table("files", ("file", False), ("tensors", True), ("size", True))
    for shard in info["shards"]:
        shards.add_row(shard["path"], str(shard["tensors"]), format_bytes(shard["file_bytes"]))
    console.print(shards)
    if info["metadata"]:
        meta = table("metadata", ("key", False), ("value", False))
        for key, value in info["metadata"].items():
            value = str(value)
            meta.add_row(key, value if len(value) < 80 else value[:77] + "...")
        console.print(meta)
    if "tensor_list" in info:
        tensors = table("tensors", ("name", False), ("dtype", False), ("shape", False),
                        ("bytes", True))
        for t in info["tensor_list"]:
            tensors.add_row(t["name"], t["dtype"], str(t["shape"]), format_bytes(t["bytes"]))
        console.print(tensors)
