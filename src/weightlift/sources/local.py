"""Local sources: one file, a list of files, or a directory (single file, HF index, loose shards,
a GGUF file or split set).

Resolving opens every shard once, reads its header and stamps the file (inode, device, size,
modification time); the bytes read later come from a descriptor of that same file: the one kept
open, or one re-opened (where the descriptor limit made room for it) and checked against the
stamp. Before the shards are opened, ``reserve`` makes room under the descriptor limit.
"""

from __future__ import annotations

import errno
import functools
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

from ..errors import CheckpointError, MissingFileError
from ..formats import read_any_header
from ..formats.gguf import check_split, split_parts
from ..formats.records import open_regular
from .descriptors import POOL, is_limit, limit_error, reserve
from .records import (PLAIN, FileStamp, Layout, Shard, check_index, check_index_size,
                      check_shard_name, open_shards, parse_index)

LocalSource = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


def resolve_local(source: LocalSource, read_ahead: int = 0) -> Layout:
    """Open a local file, directory or list of files into a validated ``Layout``."""
    if isinstance(source, (str, os.PathLike)):
        if not os.fspath(source):
            raise CheckpointError("the checkpoint path is empty")
        path = Path(source)
        mode = _mode(path)  # one stat, where is_dir() and exists() took two
        if mode is not None and stat.S_ISDIR(mode):
            return _resolve_dir(path)
        if mode is None:
            raise MissingFileError("no such file or directory", path=path)
        if is_index_name(path.name):
            return _resolve_index(path)
        if path.name.endswith(".gguf"):
            return _resolve_gguf(path)
        opener = functools.partial(_open_shard, read_ahead=read_ahead)
        return _open_local([path], root=str(path.parent), opener=opener)
    files = [Path(p) for p in source]
    if not files:
        raise CheckpointError("the list of checkpoint files is empty")
    return _open_local(files, root=os.path.commonpath([str(f.parent.resolve()) for f in files]),
                       opener=_open_shard)


def _mode(path: Path) -> int | None:
    """``st_mode`` of ``path`` (symlinks followed), None where it does not exist; other errors
    raise, as ``Path.exists()`` raises them."""
    try:
        return os.stat(path).st_mode
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EBADF, errno.ELOOP):
            return None
        raise


def is_index_name(name: str) -> bool:
    """``*.index.json``, or a variant's index as transformers and diffusers name it
    (``diffusion_pytorch_model.safetensors.index.fp16.json``)."""
    return name.endswith(".index.json") or re.search(r"\.safetensors\.index\.[^.]+\.json$",
                                                     name) is not None


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
        return _open_local([single], root=str(directory), opener=_open_shard)
    loose = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    if loose:
        return _open_local(loose, root=str(directory), opener=_open_shard)
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
        layout = _open_local([path], root=str(path.parent), opener=_open_shard)
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
    layout = _open_local([Path(p) for p in parts], root=str(path.parent), opener=_open_shard)
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
        if is_limit(exc):
            raise limit_error(CheckpointError, os.fspath(index_path), exc) from exc
        raise CheckpointError(f"cannot read the index: {exc.strerror}", path=index_path) from exc
    return parse_index(raw, index_path)


def shard_path(directory: Path, name: Any, index_path: Path) -> Path:
    """The path of shard ``name`` of an index: a name that climbs out of ``directory`` (``..``,
    an absolute path) is refused; symlinks the directory holds are followed wherever they lead,
    as every loader does (model stores and the Hugging Face cache are built of them)."""
    check_shard_name(name, index_path)
    return directory / os.path.normpath(name)  # "./a" and "a" are one shard


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
    layout = _open_local(unique, root=str(directory), index_path=str(index_path),
                         opener=_open_shard)
    place = {path: index for index, path in enumerate(unique)}
    return check_index(layout, obj, {name: place[p] for name, p in shard_names.items()})


def _open_local(paths: Sequence[Path], root: str, opener: Callable[[Path], Shard],
                index_path: str | None = None) -> Layout:
    """``open_shards`` for local files, once ``reserve`` made room for their descriptors."""
    room = reserve(len(paths), POOL.held, root)
    POOL.capacity = room.capacity
    layout = open_shards(paths, root=root, opener=opener, index_path=index_path)
    if room.note is not None:
        layout.notes.append(room.note)
    return layout


def _open_shard(path: Path, read_ahead: int = 0) -> Shard:
    spath = os.fspath(path)
    # The descriptor as ``open`` returns it (``open_regular``): an interrupt anywhere before the
    # pool holds it (a signal's handler raising) finds it here and closes it.
    opened: list[int] = []
    try:
        try:
            POOL.opening(lambda: _open_regular(spath, opened))
        except OSError as exc:
            if not is_limit(exc) or isinstance(exc, MissingFileError):
                raise
            # EMFILE/ENFILE, and no idle descriptor was left to close
            raise limit_error(CheckpointError, spath, exc) from exc
        fd = opened[0]
        stamp = FileStamp.of(fd)  # before the header: a change after it is then detected
        cold = bool(read_ahead) and stamp.size <= read_ahead and read_ahead_if_cold(fd, stamp.size)
        shard = Shard(spath, read_any_header(spath, fd), stamp, read_ahead=cold)
        POOL.adopt(shard, PLAIN, fd)
    except BaseException:
        if opened:
            if POOL.holds(opened[0]):
                shard.close()  # adopted, but never handed to the layout that would close it
            else:
                os.close(opened[0])
        raise
    return shard


def read_ahead_if_cold(fd: int, size: int) -> bool:
    """Ask the kernel for the whole file at once (``POSIX_FADV_WILLNEED``) where its first page
    is not cached (a read with ``RWF_NOWAIT`` says so without waiting): the header's read and the
    data's then share one trip to the disk instead of two (a cold 1 MiB file: ~2 ms each here).
    A cached file costs one non-blocking read of a byte. Advice only: nothing fails here. True
    when it asked."""
    nowait = getattr(os, "RWF_NOWAIT", None)
    if nowait is None or size == 0:
        return False
    try:
        os.preadv(fd, [bytearray(1)], 0, nowait)
        return False  # cached: nothing to ask for
    except BlockingIOError:
        pass
    except OSError:
        return False  # RWF_NOWAIT not supported here: the loads read as before
    try:
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
    except OSError:
        return False
    return True


def _open_regular(path: str, opened: list[int] | None = None) -> int:
    """``open_regular``, letting an open refused for want of descriptors through as OSError."""
    try:
        return open_regular(path, CheckpointError, opened)
    except CheckpointError as exc:
        cause = exc.__cause__
        if isinstance(cause, OSError) and is_limit(cause):
            raise cause from None
        raise


__all__ = ["LocalSource", "is_index_name", "resolve_local", "shard_path"]
