"""The records every source produces: an open ``Layout`` of ``Shard``s and every tensor's
``Entry``, and the index checks local files and object storage share.

Local files (``local``), the Hugging Face cache (``hub``) and object storage (``remote``) each
build a ``Layout`` from these; none of them imports another.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from ..errors import CheckpointError, ReadError
from ..formats.gguf import is_gguf
from ..formats.records import Header, TensorInfo

#: An index file larger than this is not a real index (70B models have ~100 KB indexes).
MAX_INDEX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class FileStamp:
    """What identifies a file's content for our purposes: if any of these change, so may the bytes."""

    size: int
    mtime_ns: int
    inode: int
    device: int

    @classmethod
    def of(cls, fd: int) -> "FileStamp":
        st = os.fstat(fd)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass
class Shard:
    """One open file (safetensors or GGUF) of a checkpoint."""

    path: str
    fd: int
    header: Header
    stamp: FileStamp
    #: Object storage shards have no descriptor; only the ``remote`` strategy reads them.
    remote: ClassVar[bool] = False

    @property
    def identity(self) -> object:
        """Equal for two shards that are the same file (a hard link, a path given twice)."""
        return (self.stamp.device, self.stamp.inode)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def check_unchanged(self) -> None:
        """Raise if the file was modified or replaced since its header was read."""
        try:
            now = FileStamp.of(self.fd)
            path_now = os.stat(self.path)
        except OSError as exc:
            raise ReadError(f"file disappeared during the load: {exc.strerror}",
                            path=self.path) from exc
        if now != self.stamp:
            raise ReadError(f"file changed during the load (size {self.stamp.size} → {now.size}, "
                            "or modification time changed); its data may be mixed, load again",
                            path=self.path)
        if (path_now.st_ino, path_now.st_dev) != (self.stamp.inode, self.stamp.device):
            raise ReadError("file was replaced by another during the load; load again",
                            path=self.path)


@dataclass(frozen=True)
class Entry:
    """A tensor of the checkpoint and the shard (by position) that holds it."""

    shard: int
    info: TensorInfo

    @property
    def name(self) -> str:
        return self.info.name


class Layout:
    """The resolved checkpoint: open shards and every tensor's location. Close it when done."""

    def __init__(self, root: str, shards: list[Shard], entries: dict[str, Entry],
                 metadata: Mapping[str, Any] | None, index_path: str | None = None) -> None:
        self.root = root
        self.shards = shards
        self.entries = entries
        self.metadata = metadata
        self.index_path = index_path

    @property
    def total_bytes(self) -> int:
        return sum(e.info.nbytes for e in self.entries.values())

    @property
    def format(self) -> str:
        """``"gguf"`` or ``"safetensors"``."""
        return "gguf" if self.shards and is_gguf(self.shards[0].header) else "safetensors"

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

    def __enter__(self) -> "Layout":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_index_size(size: int, index_path: str | os.PathLike[str]) -> None:
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"index is {size} bytes, over the {MAX_INDEX_BYTES}-byte limit",
                              path=index_path)


def parse_index(raw: bytes, index_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The validated JSON object of an index file's bytes (pure)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON and integers too long for int().
        raise CheckpointError(f"index is not valid JSON: {exc}", path=index_path) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("weight_map"), dict):
        raise CheckpointError("index has no 'weight_map' object", path=index_path)
    if not obj["weight_map"]:
        raise CheckpointError("index 'weight_map' is empty: it lists no tensor", path=index_path)
    metadata = obj.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise CheckpointError("index 'metadata' is not an object", path=index_path)
    return obj


def check_shard_name(name: Any, index_path: str | os.PathLike[str]) -> str:
    """``name`` if it is a relative shard name that stays in the checkpoint directory."""
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"weight_map names shard {name!r}, not a file name", path=index_path)
    if "\x00" in name or os.path.isabs(name) or name.startswith(("/", "\\")):
        raise CheckpointError(f"shard {name!r} is an absolute path; shards must lie in the "
                              "checkpoint directory", path=index_path)
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise CheckpointError(f"shard {name!r} climbs out of the checkpoint directory with '..'",
                              path=index_path)
    return name


def check_index(layout: Layout, obj: dict[str, Any], position: dict[Any, int]) -> Layout:
    """Check ``layout`` (opened from the shards an index names; ``position``: shard name → its
    place in ``layout.shards``) against the index ``obj``; close it and raise on a mismatch."""
    index_path = layout.index_path or layout.root
    weight_map: dict[str, Any] = obj["weight_map"]
    try:
        for tensor, name in weight_map.items():
            entry = layout.entries.get(tensor)
            if entry is None or entry.shard != position[name]:
                found = ("no shard holds it" if entry is None else
                         f"it is in {os.path.basename(layout.shards[entry.shard].path)!r}")
                raise CheckpointError(f"index puts tensor {tensor!r} in {name!r}, which does not "
                                      f"hold it ({found})", path=index_path)
        extra = sorted(set(layout.entries) - set(weight_map))
        if extra:
            count = f"{len(extra)} tensor{'s' if len(extra) > 1 else ''}"
            raise CheckpointError(f"shards hold {count} the index does not list, e.g. "
                                  f"{extra[0]!r}", path=index_path)
        index_meta = obj.get("metadata")
        if index_meta is not None:
            layout.metadata = {str(k): v if isinstance(v, str) else json.dumps(v)
                               for k, v in index_meta.items()}
    except BaseException:
        layout.close()
        raise
    return layout


def open_shards(paths: Iterable[Any], root: str, opener: Callable[[Any], Shard],
                index_path: str | None = None) -> Layout:
    """Open every shard (``opener``: a path or key → ``Shard``) into a ``Layout``; tensors must
    be unique across shards and no shard may be listed twice."""
    shards: list[Shard] = []
    entries: dict[str, Entry] = {}
    layout = Layout(root, shards, entries, None, index_path)
    try:
        seen: dict[object, str] = {}
        for path in paths:
            shard = opener(path)
            shards.append(shard)
            identity = shard.identity
            if identity in seen:
                raise CheckpointError(f"{shard.path} is the same file as {seen[identity]}; list "
                                      "it once", path=root)
            seen[identity] = shard.path
            for info in shard.header.tensors:
                if info.name in entries:
                    first = shards[entries[info.name].shard].path
                    raise CheckpointError(f"tensor {info.name!r} is in two files: {first} and "
                                          f"{shard.path}", path=root)
                entries[info.name] = Entry(len(shards) - 1, info)
        if len(shards) == 1:
            layout.metadata = shards[0].header.metadata
    except BaseException:
        layout.close()
        raise
    return layout


def iter_entries(layout: Layout, keys: Iterable[str] | None = None) -> Iterator[Entry]:
    """Entries in file order (shard, then offset); ``keys`` selects and must all exist."""
    if keys is None:
        chosen = list(layout.entries.values())
    else:
        chosen = []
        for key in dict.fromkeys(keys):
            if key not in layout.entries:
                raise CheckpointError(f"has no tensor named {key!r}", path=layout.root)
            chosen.append(layout.entries[key])
    chosen.sort(key=lambda e: (e.shard, e.info.start, e.info.end, e.name))
    return iter(chosen)
