"""The records every source produces: an open ``Layout`` of ``Shard``s and every tensor's
``Entry``, and the index checks local files and object storage share.

Local files (``local``), the Hugging Face cache (``hub``) and object storage (``remote``) each
build a ``Layout`` from these; none of them imports another.
"""

from __future__ import annotations

import errno
import json
import os
import time
from collections.abc import Collection, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

from ..errors import CheckpointError, ReadError
from ..formats.gguf import is_gguf
from ..formats.records import Header, TensorInfo
from .descriptors import POOL, close_all, is_limit, limit_error

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


#: Kinds of descriptor a shard's file is read through: buffered, O_DIRECT, and buffered with no
#: read-ahead (cached runs of a file otherwise read with O_DIRECT); kind → extra open flags.
PLAIN, DIRECT, RANDOM = "plain", "direct", "random"
KINDS: dict[str, int] = {PLAIN: 0, DIRECT: getattr(os, "O_DIRECT", 0), RANDOM: 0}


class OpenRefused(ReadError):
    """The file could not be opened this way (e.g. the file system refuses O_DIRECT)."""


#: How long the decision's residency estimate serves the strategy prepared after it.
HINT_SECONDS = 0.05


@dataclass
class Shard:
    """One file (safetensors or GGUF) of a checkpoint: its validated header and the stamp of the
    file it was read from.

    Its descriptors live in a bounded pool (``descriptors.POOL``) and are reached through one
    accessor: ``pin(kind)`` opens one (re-opening the path if it was closed to make room,
    checking it is still the file whose header was validated) and holds it until ``unpin``;
    ``descriptor(kind)`` is the pinned number. Reads in flight keep their descriptor pinned."""

    path: str
    header: Header
    stamp: FileStamp
    #: Object storage shards have no descriptor; only the ``remote`` strategy reads them.
    remote: ClassVar[bool] = False
    closed: bool = field(default=False, compare=False)
    #: Resolving found the file cold and asked the kernel for all of it (``local``'s
    #: ``read_ahead_if_cold``): its pages may still be arriving, which mincore counts as cached.
    read_ahead: bool = field(default=False, compare=False)
    #: (when, bytes): the page-cache estimate (``probes.sampled_resident_bytes``) the load's
    #: decision just took (``io.auto.gather``), for the strategy it prepares next (``hint``);
    #: cleared once that is prepared (``api.prepare_strategy``).
    resident_hint: tuple[float, int] | None = field(default=None, compare=False)

    def hint(self) -> int | None:
        """``resident_hint``'s bytes if taken within ``HINT_SECONDS``: never a past load's (one
        that failed between its decision and its strategy's preparation)."""
        taken = self.resident_hint
        if taken is None or time.monotonic() - taken[0] > HINT_SECONDS:
            return None
        return taken[1]

    @property
    def identity(self) -> object:
        """Equal for two shards that are the same file (a hard link, a path given twice)."""
        return (self.stamp.device, self.stamp.inode)

    def pin(self, kind: str = PLAIN, token: object = None) -> int:
        """Hold the descriptor of ``kind`` open (opening it if needed) until ``unpin`` (with the
        same ``token``, if any: ``Pool``).

        Raises ``ReadError``: the file changed or was replaced since its header was read, the
        descriptor limit is reached (naming it and how to raise it), the checkpoint was closed,
        or ``OpenRefused``."""
        if self.closed:
            raise ReadError("the checkpoint was closed", path=self.path)
        try:
            fd = POOL.pin(self, kind, self._open, token)
        except OSError as exc:
            if is_limit(exc):
                raise limit_error(ReadError, self.path, exc) from exc
            if exc.errno == errno.ENOENT:
                raise ReadError("file disappeared during the load", path=self.path) from exc
            raise OpenRefused(f"cannot open ({kind}): {exc.strerror or exc}",
                              path=self.path) from exc
        if self.closed:
            # Closed while the pool waited for a descriptor (EMFILE): ``close`` found nothing
            # to release then, so this descriptor is given back here.
            POOL.release(self, (kind,))
            POOL.unpin(self, kind, token)
            raise ReadError("the checkpoint was closed", path=self.path)
        return fd

    def unpin(self, kind: str = PLAIN, token: object = None) -> None:
        POOL.unpin(self, kind, token)

    def descriptor(self, kind: str = PLAIN) -> int:
        """The descriptor of ``kind``, which the caller (or a read it waits for) has pinned."""
        return POOL.descriptor(self, kind)

    @contextmanager
    def opened(self, kind: str = PLAIN) -> Iterator[int]:
        """``with shard.opened() as fd``: the descriptor pinned for the block.

        The pin carries a token recorded before pinning, so an interrupt anywhere in ``pin`` or
        ``unpin`` (a signal's handler raising) leaves no pin behind: the unpin is asked again
        until it is through, and the interrupt raised after that."""
        token = object()
        try:
            yield self.pin(kind, token)
        finally:
            interrupted: BaseException | None = None
            while True:
                try:
                    self.unpin(kind, token)  # once pinned, once unpinned: asking again is safe
                    break
                except (KeyboardInterrupt, SystemExit) as exc:  # raised once unpinned
                    interrupted = interrupted or exc
            if interrupted is not None:
                raise interrupted

    def _open(self, kind: str, opened: list[int]) -> int:
        """A new descriptor of ``kind`` of this shard's file, appended to ``opened`` as ``open``
        returns it (from C: an interrupt right after the open cannot lose it; the pool closes
        what ``opened`` holds if one comes before it lists the descriptor)."""
        flags = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | KINDS[kind]
        # Non-blocking: a FIFO put in the file's place must not hang the open (the stamp below
        # refuses it); reads are blocking again.
        opened.extend(map(os.open, (self.path,), (flags | getattr(os, "O_NONBLOCK", 0),)))
        fd = opened[-1]
        try:
            os.set_blocking(fd, True)
            stale = self._stale(FileStamp.of(fd))
            if stale is not None:
                raise stale
            if kind == RANDOM:
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                except OSError:
                    pass  # advice only: reads stay correct, the kernel may read ahead
        except BaseException:
            close_all(opened)
            raise
        return fd

    def pinned(self, kind: str = PLAIN) -> bool:
        return POOL.is_pinned(self, kind)

    def release(self, *kinds: str) -> None:
        """Close its descriptors of ``kinds`` (a pinned one when its last pin goes)."""
        POOL.release(self, kinds)

    def close(self) -> None:
        """Close its descriptors (a pinned one when its read is done); later pins fail."""
        self.closed = True
        POOL.release(self)

    def check_unchanged(self) -> None:
        """Raise if the file was modified or replaced since its header was read."""
        try:
            path_now = os.stat(self.path)
        except OSError as exc:
            raise ReadError(f"file disappeared during the load: {exc.strerror}",
                            path=self.path) from exc
        stale = self._stale(FileStamp(path_now.st_size, path_now.st_mtime_ns, path_now.st_ino,
                                      path_now.st_dev))
        if stale is not None:
            raise stale

    def _stale(self, now: FileStamp) -> ReadError | None:
        """The error for a file whose stamp is now ``now``, None if it is the validated one."""
        if (now.inode, now.device) != (self.stamp.inode, self.stamp.device):
            return ReadError("file was replaced by another during the load; load again",
                             path=self.path)
        if now != self.stamp:
            return ReadError(f"file changed during the load (size {self.stamp.size} → "
                             f"{now.size}, or modification time changed); its data may be mixed, "
                             "load again", path=self.path)
        return None


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
        #: What resolving did about the descriptor limit (``LoadReport.fallbacks`` shows it).
        self.notes: list[str] = []
        #: Tensors the index lists that no shard stores → the shard it names (``LoadReport
        #: .missing``): not loaded; asking for one by name raises.
        self.missing: dict[str, str] = {}
        #: Tensors stored in more than one shard → those shards (positions); ``entries`` holds
        #: the copy that loads.
        self.copies: dict[str, list[int]] = {}
        #: What was accepted of a checkpoint its index or files disagree on, as vLLM's and
        #: transformers' loaders accept it (``LoadReport.notes``; ``resolve`` warns each).
        self.accepted: list[str] = []
        #: ``entries`` are in file order (shard, then offset) as they stand: ``iter_entries``
        #: need not sort them. Set by ``open_shards`` for files holding no tensor twice.
        self.ordered = False

    @property
    def total_bytes(self) -> int:
        return sum(e.info.nbytes for e in self.entries.values())

    @property
    def format(self) -> str:
        """``"gguf"`` or ``"safetensors"``."""
        return "gguf" if self.shards and is_gguf(self.shards[0].header) else "safetensors"

    def close(self) -> None:
        """Close every shard's descriptors. An interrupt (a signal's handler raising) while they
        close is raised once all are closed: closing again is safe, and a shard skipped would
        keep its descriptor open for the rest of the process."""
        interrupted: BaseException | None = None
        while True:
            try:
                for shard in self.shards:
                    shard.close()
                break
            except (KeyboardInterrupt, SystemExit) as exc:
                interrupted = interrupted or exc
        if interrupted is not None:
            raise interrupted

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
    place in ``layout.shards``) against the index ``obj``, and take its metadata.

    What vLLM's and transformers' loaders accept is accepted and noted in ``layout.accepted``
    (``resolve`` warns): a tensor the index lists that no shard stores (not loaded), a tensor
    stored in another shard than the index says (loaded from where it is), tensors the index
    does not list (loaded), and a tensor stored twice (the copy the index names loads)."""
    index_path = layout.index_path or layout.root
    weight_map: dict[str, Any] = obj["weight_map"]
    try:
        misplaced: list[str] = []
        by_index: set[str] = set()
        for tensor, name in weight_map.items():
            entry = layout.entries.get(tensor)
            if entry is None:
                layout.missing[tensor] = name
                continue
            named = position[name]
            if named in layout.copies.get(tensor, ()):
                layout.entries[tensor] = Entry(named, _info(layout.shards[named], tensor))
                layout.ordered = False
                by_index.add(tensor)
            elif entry.shard != named:
                held = os.path.basename(layout.shards[entry.shard].path)
                misplaced.append(f"{tensor!r} (index: {name!r}, stored in {held!r})")
        if layout.missing:
            listed = [f"{t!r} (in {n!r})" for t, n in layout.missing.items()]
            layout.accepted.append(
                f"{index_path}: the index lists {_count(listed, 'tensor')} that no shard stores, "
                f"{_some(listed)}; not loaded (as vLLM's and transformers' loaders skip them: a "
                "tied weight saved once, or a stale index)")
        if misplaced:
            layout.accepted.append(
                f"{index_path}: the index puts {_count(misplaced, 'tensor')} in a shard that "
                f"does not hold it, {_some(misplaced)}; each loads from the shard holding it")
        unlisted = sorted(set(layout.entries) - set(weight_map))
        if unlisted:
            layout.accepted.append(
                f"{index_path}: the shards hold {_count(unlisted, 'tensor')} the index does not "
                f"list, {_some([repr(t) for t in unlisted])}; they load too")
        note_copies(layout, by_index)
        index_meta = obj.get("metadata")
        if index_meta is not None:
            layout.metadata = {str(k): v if isinstance(v, str) else json.dumps(v)
                               for k, v in index_meta.items()}
    except BaseException:
        layout.close()
        raise
    return layout


def note_copies(layout: Layout, by_index: Collection[str] = ()) -> None:
    """Note in ``layout.accepted`` which copy of each tensor stored twice loads (``by_index``:
    those the index chose; the others come from the last of their files in load order)."""
    if not layout.copies:
        return
    parts = []
    for tensor, holders in layout.copies.items():
        chosen = layout.entries[tensor].shard
        others = ", ".join(os.path.basename(layout.shards[i].path) for i in holders if i != chosen)
        rule = "the index names it" if tensor in by_index else "the last of its files"
        parts.append(f"{tensor!r} from {os.path.basename(layout.shards[chosen].path)} ({rule}; "
                     f"also in {others})")
    layout.accepted.append(f"{layout.index_path or layout.root}: "
                           f"{_count(parts, 'tensor')} stored in more than one file, "
                           f"{_some(parts)}; one copy of each loads")


def _info(shard: Shard, tensor: str) -> TensorInfo:
    return next(info for info in shard.header.tensors if info.name == tensor)


def _count(items: list[str], noun: str) -> str:
    return f"{len(items)} {noun}{'s' if len(items) != 1 else ''}"


def _some(items: list[str], shown: int = 3) -> str:
    """``'a', 'b', 'c' and 5 more``."""
    head = ", ".join(items[:shown])
    return head if len(items) <= shown else f"{head} and {len(items) - shown} more"


def open_shards(paths: Iterable[Any], root: str, opener: Callable[[Any], Shard],
                index_path: str | None = None) -> Layout:
    """Open every shard (``opener``: a path or key → ``Shard``) into a ``Layout``. No file may
    be listed twice; a tensor stored in several files loads from the last of them (as vLLM's
    loader, which reads them all in order, ends up with it), unless an index says otherwise
    (``check_index``)."""
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
            held = _entries(shard.header.tensors, len(shards) - 1)
            if entries.keys().isdisjoint(held):
                entries.update(held)
                continue
            for name, entry in held.items():
                if name in entries:
                    layout.copies.setdefault(name, [entries[name].shard])
                    layout.copies[name].append(entry.shard)
                entries[name] = entry
        if len(shards) == 1:
            layout.metadata = shards[0].header.metadata
        layout.ordered = not layout.copies  # each file's tensors, in order, one file after another
        if index_path is None:
            note_copies(layout)
    except BaseException:
        layout.close()
        raise
    return layout


#: A file's entries by the tensors of its header (validated headers are shared: see
#: ``formats.safetensors.parse_header``) and its place in the checkpoint → (tensors, entries):
#: a file loaded again makes no ``Entry`` again (~1.2 µs each). The most recent ``ENTRY_SETS``.
_ENTRY_SETS: dict[tuple[int, int], tuple[tuple[TensorInfo, ...], dict[str, Entry]]] = {}
ENTRY_SETS = 64


def _entries(tensors: tuple[TensorInfo, ...], shard: int) -> dict[str, Entry]:
    """``{name: Entry(shard, info)}`` for ``tensors`` (in their order); do not change it."""
    key = (id(tensors), shard)
    known = _ENTRY_SETS.get(key)
    if known is not None and known[0] is tensors:
        return known[1]
    made = {info.name: Entry(shard, info) for info in tensors}
    while len(_ENTRY_SETS) >= ENTRY_SETS:
        try:
            del _ENTRY_SETS[next(iter(_ENTRY_SETS))]
        except (KeyError, RuntimeError, StopIteration):  # another thread changed it meanwhile
            break
    _ENTRY_SETS[key] = (tensors, made)
    return made


def iter_entries(layout: Layout, keys: Iterable[str] | None = None) -> Iterator[Entry]:
    """Entries in file order (shard, then offset); ``keys`` selects and must all exist."""
    if keys is None:
        chosen = list(layout.entries.values())
        if layout.ordered:
            return iter(chosen)
    else:
        chosen = []
        for key in dict.fromkeys(keys):
            if key in layout.missing:
                raise CheckpointError(f"the index lists tensor {key!r} in "
                                      f"{layout.missing[key]!r}, but no shard stores it",
                                      path=layout.index_path or layout.root)
            if key not in layout.entries:
                raise CheckpointError(f"has no tensor named {key!r}", path=layout.root)
            chosen.append(layout.entries[key])
    chosen.sort(key=lambda e: (e.shard, e.info.start, e.info.end, e.name))
    return iter(chosen)
