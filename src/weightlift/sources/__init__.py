"""Checkpoint sources: whatever the user names → an open, validated ``Layout``.

    with resolve("hf://org/name") as layout: ...   # also paths, lists, s3:// gs:// az:// URLs

Each kind of source is a module building the same records (``records``: ``Layout``, ``Shard``,
``Entry``): local files (``local``), the Hugging Face cache (``hub``, which turns a reference
into a local path) and object storage (``remote``). None imports another; ``resolve`` picks one.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

from ..remote import RemoteSource, as_remote, is_remote
from .hub import resolve_source, trusted_root
from .local import resolve_local
from .records import Layout

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], RemoteSource]


def resolve(source: Source, read_ahead: int = 0) -> Layout:
    """Turn a user's source into an open, validated ``Layout``. ``read_ahead``: the caller will
    read every byte of a local file up to that size, so one found cold is read ahead whole while
    its header is read (``local.read_ahead_if_cold``)."""
    if is_remote(source):
        from .remote import resolve_remote  # imports the object-storage client

        return resolve_remote(as_remote(source))  # type: ignore[arg-type]
    local = resolve_source(source) or source  # hf://org/name, models--org--name directories
    return resolve_local(local, trusted_root, read_ahead)  # type: ignore[arg-type]


__all__ = ["Source", "resolve"]
