"""Object storage: ``s3://``, ``gs://``, ``az://`` and ``http(s)://`` URLs, and their client.

A remote shard is "something with a size, a header and ranged reads", like a local file: the
source resolves to the same ``Layout`` (``sources.remote``), and the ``remote`` strategy
(``io/remote.py``) fills destination buffers with conditional ranged GETs, so planning, the
budget, ``LoadReport``, ``stream()``, ``load_into`` and ``load_sharded`` work unchanged.

This module is pure (no client import), so local loading never imports ``obstore``:

    state = weightlift.load("s3://models/llama/", storage_options={"region": "eu-west-1"})
    src = weightlift.remote.RemoteSource("s3://models/llama/", {"anonymous": "true"})
    with weightlift.safe_open(src, framework="pt") as f: ...
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

#: URL schemes read through object storage, and the store each stands for.
SCHEMES = {"s3": "S3", "s3a": "S3", "gs": "GCS", "az": "Azure", "abfs": "Azure", "abfss": "Azure",
           "azure": "Azure", "http": "HTTP", "https": "HTTP"}

StorageOptions = Mapping[str, object]


@dataclass(frozen=True)
class RemoteSource:
    """A checkpoint URL and the options to reach it (see ``docs/remote.md`` for the keys)."""

    url: str
    storage_options: Mapping[str, object] = field(default_factory=dict)

    def __str__(self) -> str:
        return scrub_url(self.url)


def is_remote(source: object) -> bool:
    """True for a ``RemoteSource`` or a string URL whose scheme is an object store's."""
    if isinstance(source, RemoteSource):
        return True
    if not isinstance(source, str) or "://" not in source:
        return False
    return source.split("://", 1)[0].lower() in SCHEMES


def as_remote(source: object, storage_options: StorageOptions | None = None) -> object:
    """``source`` as a ``RemoteSource`` when it names object storage; anything else unchanged.

    ``storage_options`` given with a local source is a mistake worth saying."""
    if isinstance(source, RemoteSource):
        if storage_options:
            merged = {**source.storage_options, **storage_options}
            return RemoteSource(source.url, merged)
        return source
    if is_remote(source):
        return RemoteSource(str(source), dict(storage_options or {}))
    if storage_options:
        raise ValueError(f"storage_options apply to object-storage URLs (s3://, gs://, az://, "
                         f"https://), not to the local source {source!r}")
    return source


#: Query parameters and user info may carry signatures and keys: never show them.
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^\s/?#@]*@)?([^\s?#'\"<>]*)(\?[^\s#'\"<>]*)?",
                  re.IGNORECASE)
_SECRET_FIELDS = re.compile(r"(?i)\b(signature|x-amz-[a-z-]*|sig|sv|se|sp|token|"
                            r"access_key_id|secret_access_key|session_token|account_key|"
                            r"sas_token|password)=([^&\s]+)")


def scrub_url(url: str) -> str:
    """``url`` without credentials or query string: what errors and reports may show."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return scrub(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host if parts.netloc else parts.netloc, parts.path, "", ""))


def scrub(text: str) -> str:
    """``text`` with every URL's user info and query string removed and ``key=secret`` pairs
    masked, for messages built from a client's errors."""
    text = _URL.sub(lambda m: m.group(1) + m.group(3), text)
    return _SECRET_FIELDS.sub(lambda m: f"{m.group(1)}=***", text)


__all__ = ["SCHEMES", "RemoteSource", "as_remote", "is_remote", "scrub", "scrub_url"]
