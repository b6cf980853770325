"""Checkpoint sources: one file, a list of files, or a directory (single file, HF index, loose shards).

Resolving a source opens every shard once and keeps the descriptor, so the bytes read later come
from the same inode whose header was validated, even if the path is replaced meanwhile.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Union

from .errors import CheckpointError, MissingFileError, ReadError
from .format import Header, TensorInfo, open_regular
from .formats import read_any_header
from .formats.gguf import check_split, is_gguf, split_parts
from .hub import resolve_source, trusted_root
from .remote import RemoteSource, as_remote, is_remote

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], RemoteSource]

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
    """One open safetensors file of a checkpoint."""

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


def resolve(source: Source) -> Layout:
    """Turn a user's source into an open, validated ``Layout``."""
    if is_remote(source):
        from .remote.layout import resolve_remote  # imports the object-storage client

        return resolve_remote(as_remote(source))  # type: ignore[arg-type]
    source = resolve_source(source) or source  # hf://org/name, models--org--name directories
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source):
            raise CheckpointError("the checkpoint path is empty")
        path = Path(source)
        if path.is_dir():
            return _resolve_dir(path)
        if not path.exists():
            raise MissingFileError("no such file or directory", path=path)
        if path.name.endswith(".index.json"):
            return _resolve_index(path)
        if path.name.endswith(".gguf"):
            return _resolve_gguf(path)
        return open_shards([path], root=str(path.parent))
    files = [Path(p) for p in source]
    if not files:
        raise CheckpointError("the list of checkpoint files is empty")
    return open_shards(files, root=os.path.commonpath([str(f.parent.resolve()) for f in files]))


def _resolve_dir(directory: Path) -> Layout:
    indexes = sorted(directory.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        preferred = directory / "model.safetensors.index.json"
        if preferred not in indexes:
            names = ", ".join(i.name for i in indexes)
            raise CheckpointError(f"holds several index files ({names}); pass the one to load",
                                  path=directory)
        indexes = [preferred]
    if indexes:
        return _resolve_index(indexes[0])
    single = directory / "model.safetensors"
    if single.is_file():
        return open_shards([single], root=str(directory))
    loose = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if loose:
        return open_shards(loose, root=str(directory))
    ggufs = sorted(p for p in directory.glob("*.gguf") if p.is_file())
    firsts = [p for p in ggufs if (split_parts(str(p)) or [str(p)])[0] == str(p)]
    if len(firsts) == 1:
        return _resolve_gguf(firsts[0])
    if firsts:
        names = ", ".join(p.name for p in firsts)
        raise CheckpointError(f"holds several GGUF checkpoints ({names}); pass the one to load",
                              path=directory)
    raise CheckpointError("holds no *.safetensors file, no *.safetensors.index.json and no "
                          "*.gguf file", path=directory)


def _resolve_gguf(path: Path) -> Layout:
    """A GGUF file, or the whole split set (``x-00001-of-00003.gguf``) any part of it names."""
    parts = split_parts(str(path))
    if parts is None:
        layout = open_shards([path], root=str(path.parent))
        meta = layout.metadata
        if meta is not None and meta.get("split.count", 1) != 1:
            layout.close()
            raise CheckpointError(f"is one part of a split set of {meta['split.count']} files "
                                  "but is not named like one (name-00001-of-0000N.gguf); "
                                  "restore the part names", path=path)
        return layout
    missing = [p for p in parts if not os.path.isfile(p)]
    if missing:
        raise CheckpointError(f"split set of {len(parts)} files lacks "
                              f"{', '.join(os.path.basename(p) for p in missing)}; download the "
                              "missing part(s)", path=path)
    layout = open_shards([Path(p) for p in parts], root=str(path.parent))
    try:
        check_split([s.header for s in layout.shards])
        layout.metadata = layout.shards[0].header.metadata
    except BaseException:
        layout.close()
        raise
    return layout


def _read_index(index_path: Path) -> dict[str, Any]:
    try:
        info = index_path.stat()
        if not stat.S_ISREG(info.st_mode):  # reading a FIFO would wait for a writer
            raise CheckpointError("index is not a regular file", path=index_path)
        check_index_size(info.st_size, index_path)
        raw = index_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(f"cannot read the index: {exc.strerror}", path=index_path) from exc
    return parse_index(raw, index_path)


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


def shard_path(directory: Path, name: Any, index_path: Path) -> Path:
    """The path of shard ``name`` of an index, refusing anything that leaves ``directory``."""
    check_shard_name(name, index_path)
    candidate = directory / os.path.normpath(name)  # "./a" and "a" are one shard
    real_root = os.path.realpath(trusted_root(directory))  # an HF snapshot links into its repo
    real = os.path.realpath(candidate)
    if os.path.commonpath([real_root, real]) != real_root:
        raise CheckpointError(f"shard {name!r} resolves to {real}, outside the checkpoint "
                              f"directory {real_root} (a symlink leaves it)", path=index_path)
    return candidate


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


def _resolve_index(index_path: Path) -> Layout:
    obj = _read_index(index_path)
    directory = index_path.parent
    weight_map: dict[str, Any] = obj["weight_map"]
    shard_names: dict[str, Path] = {}
    for tensor, name in weight_map.items():
        if not isinstance(name, str) or name not in shard_names:  # a list is no dict key
            shard_names[name] = shard_path(directory, name, index_path)
    for name, path in shard_names.items():
        if not path.is_file():
            error = CheckpointError if path.exists() else MissingFileError
            raise error(f"shard {name!r} listed in the index is missing"
                        f"{'' if not path.exists() else ' (not a file)'}", path=index_path)
    unique = list(dict.fromkeys(shard_names.values()))
    layout = open_shards(unique, root=str(directory), index_path=str(index_path))
    return check_index(layout, obj, {name: unique.index(p) for name, p in shard_names.items()})


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


def open_shards(paths: Iterable[Any], root: str, index_path: str | None = None,
                opener: Callable[[Any], Shard] | None = None) -> Layout:
    """Open every shard (``opener``: local files by default) into a ``Layout``; tensors must be
    unique across shards and no shard may be listed twice."""
    opener = opener or _open_shard
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


def _open_shard(path: Path) -> Shard:
    spath = os.fspath(path)
    fd = open_regular(spath, CheckpointError)
    try:
        stamp = FileStamp.of(fd)  # before the header: a change after it is then detected
        return Shard(spath, fd, read_any_header(spath, fd), stamp)
    except BaseException:
        os.close(fd)
        raise


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
