"""Checkpoint sources: whatever the user names → an open, validated ``Layout``.

    with resolve("hf://org/name") as layout: ...   # also paths, lists, s3:// gs:// az:// URLs

Each kind of source is a module building the same records (``records``: ``Layout``, ``Shard``,
``Entry``): local files (``local``), the Hugging Face cache (``hub``, which turns a reference
into a local path) and object storage (``remote``). None imports another; ``resolve`` picks one.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Union

from ..remote import RemoteSource, as_remote, is_remote
from ..errors import CheckpointWarning
from .hub import resolve_source
from .local import resolve_local
from .records import Layout

Source = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], RemoteSource]


def resolve(source: Source) -> Layout:
    """Turn a user's source into an open, validated ``Layout``; warn (``CheckpointWarning``)
    of what was accepted from an index and files that disagree (``Layout.accepted``)."""
    if is_remote(source):
        from .remote import resolve_remote  # imports the object-storage client

        layout = resolve_remote(as_remote(source))  # type: ignore[arg-type]
    else:
        local = resolve_source(source) or source  # hf://org/name, models--org--name directories
        layout = resolve_local(local)  # type: ignore[arg-type]
    for message in layout.accepted:
        warnings.warn(message, CheckpointWarning, stacklevel=2)
    return layout


__all__ = ["Source", "resolve"]
