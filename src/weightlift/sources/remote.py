"""Object storage sources: a remote checkpoint → ``Layout``, shards found through the index,
headers by ranged GETs (the client and ``RemoteSource`` live in ``weightlift.remote``).

``s3://bucket/prefix/`` (a "directory") is looked up as ``model.safetensors.index.json``, then
``model.safetensors``, and only then listed; a URL ending in ``.safetensors`` is one file and one
ending in ``.json`` an index. Each shard's header comes from one speculative ranged GET of
``HEADER_GUESS`` bytes, and a second when the header is longer.
"""

from __future__ import annotations

import posixpath
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import CheckpointError, FormatError, WeightliftError
from ..formats.safetensors import check_header_length, parse_header
from ..remote import RemoteSource
from ..remote.store import (HEADER_GUESS, Client, RemoteObject, connect, fetch, head,
                            head_existing, list_keys, missing)
from .records import (FileStamp, Layout, Shard, check_index, check_index_size, check_shard_name,
                      open_shards, parse_index)

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class RemoteShard(Shard):
    """A safetensors object in object storage: no descriptor, ranged reads through ``obj``.

    Every read is conditional on the version (ETag) whose header was parsed, so a replaced object
    fails the read instead of mixing versions; ``check_unchanged`` has nothing left to check."""

    obj: RemoteObject | None = None
    remote: ClassVar[bool] = True

    @property
    def identity(self) -> object:
        return self.path

    def check_unchanged(self) -> None:
        if self.obj is None:
            raise WeightliftError("the remote checkpoint was closed", path=self.path)

    def close(self) -> None:
        self.obj = None  # the last reference to the client closes its connections


def resolve_remote(source: RemoteSource) -> Layout:
    """Open the checkpoint at ``source.url``: every shard's header read and validated."""
    client = connect(source.url, source.storage_options)
    key = client.key
    name = posixpath.basename(key)
    if name.endswith(".json"):
        return _from_index(client, key)
    if name.endswith(".safetensors"):
        return _files(client, [key], posixpath.dirname(key))
    prefix = key.rstrip("/") + "/" if key.strip("/") else ""
    index = head(client, prefix + INDEX, HEADER_GUESS)
    if index is not None:
        return _from_index(client, prefix + INDEX, index)
    single = head(client, prefix + SINGLE, HEADER_GUESS)
    if single is not None:
        return open_shards([single], root=client.url(prefix), opener=_open)
    return _listed(client, prefix)


def _listed(client: Client, prefix: str) -> Layout:
    keys = sorted(key for key, _ in list_keys(client, prefix))
    indexes = [k for k in keys if k.endswith(".safetensors.index.json")]
    if len(indexes) > 1:
        names = ", ".join(posixpath.basename(k) for k in indexes)
        raise CheckpointError(f"holds several index files ({names}); pass the one to load",
                              path=client.url(prefix))
    if indexes:
        return _from_index(client, indexes[0])
    loose = [k for k in keys if k.endswith(".safetensors")]
    if not loose:
        raise CheckpointError("holds no *.safetensors object and no *.safetensors.index.json",
                              path=client.url(prefix))
    return _files(client, loose, prefix)


def _files(client: Client, keys: list[str], prefix: str) -> Layout:
    firsts = _first_gets(client, keys)

    def opener(key: str) -> Shard:
        found = firsts[key]
        if found is None:
            raise missing(client, key)
        return _open(found)

    return open_shards(keys, root=client.url(prefix), opener=opener)


def _first_gets(client: Client, keys: list[str]) -> dict[str, tuple[RemoteObject, bytes] | None]:
    """Every shard's first GET, several at once: a 30-shard checkpoint waits one round trip,
    not thirty. The pool is gone (every GET finished) when this returns or raises."""
    workers = max(1, min(client.tuning.concurrency, len(keys)))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="weightlift-head") as pool:
        return dict(zip(keys, pool.map(lambda key: head(client, key, HEADER_GUESS), keys)))


def _from_index(client: Client, key: str, got: tuple[RemoteObject, bytes] | None = None
                ) -> Layout:
    index_url = client.url(key)
    obj, raw = got if got is not None else head_existing(client, key, HEADER_GUESS)
    check_index_size(obj.size, index_url)
    if len(raw) < obj.size:
        raw += fetch(obj, len(raw), obj.size, CheckpointError)
    index = parse_index(raw, index_url)
    directory = posixpath.dirname(key)
    names: dict[Any, str] = {}
    for name in index["weight_map"].values():
        if not isinstance(name, str) or name not in names:
            check_shard_name(name, index_url)
            names[name] = posixpath.normpath(posixpath.join(directory, name))
    unique = list(dict.fromkeys(names.values()))
    firsts = _first_gets(client, unique)

    def opener(shard_key: str) -> Shard:
        found = firsts[shard_key]
        if found is None:
            raise CheckpointError(f"shard {posixpath.basename(shard_key)!r} listed in the index "
                                  f"is missing ({client.url(shard_key)})", path=index_url)
        return _open(found)

    layout = open_shards(unique, root=client.url(directory), index_path=index_url, opener=opener)
    return check_index(layout, index, {name: unique.index(k) for name, k in names.items()})


def _open(found: tuple[RemoteObject, bytes]) -> RemoteShard:
    """Read and validate one shard's header from its first GET's answer."""
    obj, first = found
    url = obj.url
    if len(first) < 8:
        raise FormatError(f"object is {obj.size} bytes, too short for the 8-byte header length",
                          path=url)
    (header_len,) = struct.unpack("<Q", first[:8])
    check_header_length(header_len, obj.size, url)
    raw = first[8:8 + header_len]
    if len(raw) < header_len:  # a header longer than the first guess: one more GET
        raw += fetch(obj, 8 + len(raw), 8 + header_len, CheckpointError)
    header = parse_header(raw, file_size=obj.size, path=url)
    stamp = FileStamp(obj.size, 0, 0, 0)
    return RemoteShard(url, header, stamp, obj=obj)


__all__ = ["RemoteShard", "resolve_remote"]
