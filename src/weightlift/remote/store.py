"""The object-storage client: URL → store, conditional ranged GETs, and errors that name the URL.

Everything that touches ``obstore`` (``pip install 'weightlift[remote]'``) lives here. Options come
from the standard places the client reads (``AWS_*``, ``GOOGLE_*``, ``AZURE_*`` environment
variables) plus a ``storage_options`` mapping whose keys are listed in ``docs/remote.md``.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import CheckpointError, ReadError, WeightliftError
from ..units import parse_size
from . import SCHEMES, scrub, scrub_url

#: The first ranged GET of a shard: most headers fit (a 70B shard's is ~100 KB).
HEADER_GUESS = 1 << 20
#: Bodies are copied into their destination in pieces of this size as they arrive.
CHUNK = 1 << 20
T = TypeVar("T")


@dataclass(frozen=True)
class Tuning:
    """How a load reads: requests in flight, bytes per request, and the retry deadline."""

    concurrency: int = 16
    request_size: int = 8 << 20
    #: A ranged GET whose body fails mid-way (reset, truncated) is sent again this many times …
    retries: int = 3
    #: … within this many seconds from the first attempt.
    deadline: float = 60.0


@dataclass
class Client:
    """One store (bucket, container or HTTP host) and the key of the URL inside it."""

    store: Any
    key: str
    base: str                # "s3://bucket" or "https://host": what display URLs start with
    tuning: Tuning = field(default_factory=Tuning)

    def url(self, key: str) -> str:
        """The scrubbed URL of ``key``, for messages and reports."""
        return scrub_url(f"{self.base}/{key}")


@dataclass
class RemoteObject:
    """A remote object as seen at its first GET: every later GET must see the same version."""

    client: Client
    key: str
    size: int
    etag: str | None
    last_modified: datetime | None

    @property
    def url(self) -> str:
        return self.client.url(self.key)


#: Keys of ``storage_options`` weightlift interprets itself; the others go to the store config.
_TUNING = {"concurrency", "request_size", "retries", "retry_timeout"}
_CLIENT = {"timeout", "connect_timeout", "pool_idle_timeout", "allow_http", "allow_invalid_certificates",
           "proxy_url", "user_agent"}
_TRUE = {"1", "true", "yes", "on"}


def _flag(value: object) -> bool:
    return value is True or str(value).lower() in _TRUE


def _obstore() -> Any:
    try:
        import obstore
    except ImportError:
        raise WeightliftError("loading from object storage needs obstore: "
                              "pip install 'weightlift[remote]'") from None
    return obstore


def connect(url: str, options: Mapping[str, object] | None = None,
            environ: Mapping[str, str] | None = None) -> Client:
    """A client for ``url`` (``s3://bucket/key``, ``gs://``, ``az://``, ``http(s)://host/key``).

        client = connect("s3://models/llama/", {"endpoint": "http://127.0.0.1:9000",
                                                "path_style": "true", "anonymous": "true"})
    """
    env = os.environ if environ is None else environ
    options = dict(options or {})
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    kind = SCHEMES.get(scheme)
    if kind is None or not parts.netloc:
        raise CheckpointError(f"{scrub_url(url)!r} is not an object-storage URL like "
                              "s3://bucket/key, gs://, az:// or https://host/path")
    if parts.query and kind != "HTTP":
        raise CheckpointError("has a query string; object URLs name a bucket and a key",
                              path=scrub_url(url))
    tuning = _tuning(options, url)
    # Idle connections close soon after a load, even while an error's traceback holds the client.
    client_options: dict[str, object] = {"timeout": "60s", "connect_timeout": "10s",
                                         "pool_idle_timeout": "2s"}
    for key in _CLIENT & options.keys():
        value = options.pop(key)
        client_options[key] = _flag(value) if key.startswith("allow") else str(value)
    retry = {"max_retries": tuning.retries, "retry_timeout": timedelta(seconds=tuning.deadline),
             "backoff": {"init_backoff": timedelta(milliseconds=100),
                         "max_backoff": timedelta(seconds=5), "base": 2}}
    config: dict[str, object] = {}
    provider = None
    base = f"{scheme}://{parts.netloc}"
    key = parts.path.lstrip("/")
    obstore = _obstore()
    from obstore.store import HTTPStore, from_url

    if kind == "HTTP":
        client_options.setdefault("allow_http", scheme == "http")
        if options:
            raise ValueError(f"unknown storage_options for {scheme}:// URLs: "
                             f"{', '.join(sorted(options))}")
        store = HTTPStore.from_url(base, client_options=client_options, retry_config=retry)
        return Client(store, key, base, tuning)
    if _flag(options.pop("anonymous", False)):
        config["skip_signature"] = True
    endpoint = _endpoint(kind, options, env)
    if endpoint.startswith("http://"):
        client_options.setdefault("allow_http", True)  # the user named a plain-HTTP endpoint
    emulator = options.get("use_emulator", env.get("AZURE_STORAGE_USE_EMULATOR", False))
    if kind == "Azure" and endpoint and _flag(emulator):
        _emulator_at(endpoint, options, env)
    if kind == "S3":
        if "path_style" in options:
            config["virtual_hosted_style_request"] = not _flag(options.pop("path_style"))
        profile = options.pop("profile", None) or (
            None if env.get("AWS_ACCESS_KEY_ID") else env.get("AWS_PROFILE"))
        if profile and not config.get("skip_signature"):
            provider = _profile_provider(str(profile))
        base = f"s3://{parts.netloc}"
    config.update({k: v if isinstance(v, bool) else str(v) for k, v in options.items()})
    try:
        store = from_url(f"{scheme}://{parts.netloc}", config=config,
                         client_options=client_options, retry_config=retry,
                         credential_provider=provider)
    except obstore.exceptions.BaseError as exc:
        raise CheckpointError(f"cannot set up the {kind} client: {_reason(exc)} (check "
                              "storage_options and the environment)", path=scrub_url(url)) from None
    return Client(store, key, base, tuning)


#: Each store's own name for a custom endpoint, and the environment variables it reads it from.
_ENDPOINTS = {"S3": ("endpoint", ("AWS_ENDPOINT_URL", "AWS_ENDPOINT")),
              "GCS": ("base_url", ("GOOGLE_BASE_URL",)),
              "Azure": ("endpoint", ("AZURE_STORAGE_ENDPOINT", "AZURE_ENDPOINT"))}
#: Azurite's published development account (the Azure emulator's default; not a secret).
EMULATOR_ACCOUNT = "devstoreaccount1"
EMULATOR_KEY = ("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/"
                "K1SZFPTOtr/KBHBeksoGMGw==")


def _endpoint(kind: str, options: dict[str, object], env: Mapping[str, str]) -> str:
    """The custom endpoint of the store, if any; ``endpoint`` and ``endpoint_url`` in
    ``options`` become the store's own key (``base_url`` for GCS).

        _endpoint("GCS", {"endpoint": "http://127.0.0.1:4443"}, {})  # -> "http://127.0.0.1:4443"
    """
    key, names = _ENDPOINTS[kind]
    for alias in ("endpoint_url", "endpoint"):
        if alias != key and alias in options:
            options[key] = options.pop(alias)
    found = options.get(key) or next((env[name] for name in names if env.get(name)), "")
    return str(found)


def _emulator_at(endpoint: str, options: dict[str, object], env: Mapping[str, str]) -> None:
    """Point ``use_emulator`` at ``endpoint``: object_store takes the emulator's address only from
    ``AZURITE_BLOB_STORAGE_URL`` and would silently ignore the endpoint, so address the emulator
    as a custom endpoint instead (path-style ``{endpoint}/{account}``, the published development
    account and key unless others are given).

        options = {"use_emulator": "true"}
        _emulator_at("http://127.0.0.1:10001", options, {})
        options["endpoint"]  # -> "http://127.0.0.1:10001/devstoreaccount1"
    """
    account = str(options.get("account_name") or env.get("AZURE_STORAGE_ACCOUNT_NAME")
                  or EMULATOR_ACCOUNT)
    options["use_emulator"] = False
    options["account_name"] = account
    if not urlsplit(endpoint).path.strip("/"):  # the emulator's URLs start with the account
        options["endpoint"] = f"{endpoint.rstrip('/')}/{account}"
    else:
        options["endpoint"] = endpoint
    credentials = ("account_key", "sas_key", "token", "bearer_token")
    given = any(options.get(key) for key in credentials) or any(
        env.get(name) for name in ("AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_ACCESS_KEY",
                                   "AZURE_STORAGE_MASTER_KEY", "AZURE_STORAGE_SAS_KEY",
                                   "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_TOKEN"))
    if not given and account == EMULATOR_ACCOUNT:
        options["account_key"] = EMULATOR_KEY


def _tuning(options: dict[str, object], url: str) -> Tuning:
    default = Tuning()
    try:
        concurrency = int(options.pop("concurrency", default.concurrency))  # type: ignore[call-overload]
        size = options.pop("request_size", default.request_size)
        request_size = size if isinstance(size, int) else parse_size(str(size))
        retries = int(options.pop("retries", default.retries))  # type: ignore[call-overload]
        deadline = _seconds(options.pop("retry_timeout", default.deadline))
    except ValueError as exc:
        raise ValueError(f"bad storage_options for {scrub_url(url)}: {exc}") from None
    if concurrency < 1 or request_size < 4096 or retries < 0 or deadline <= 0:
        raise ValueError("storage_options need concurrency ≥ 1, request_size ≥ 4KiB, "
                         "retries ≥ 0 and retry_timeout > 0")
    return Tuning(concurrency, request_size // 4096 * 4096, retries, deadline)


def _seconds(value: object) -> float:
    """``30``, ``"30"``, ``"30s"``, ``"500ms"``, ``"2m"`` → seconds."""
    if isinstance(value, (int, float)):
        return float(value)
    text = str(value).strip().lower()
    for suffix, scale in (("ms", 1e-3), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return float(text[:-len(suffix)]) * scale
    return float(text)


def _profile_provider(profile: str) -> Any:
    try:
        import boto3
        from obstore.auth.boto3 import Boto3CredentialProvider
    except ImportError:
        raise WeightliftError(f"the AWS profile {profile!r} is read through boto3: pip install "
                              "boto3, or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY") from None
    import botocore.exceptions

    try:
        return Boto3CredentialProvider(boto3.Session(profile_name=profile))
    except botocore.exceptions.BotoCoreError as exc:
        raise CheckpointError(f"cannot use the AWS profile {profile!r}: {exc} (check "
                              "~/.aws/config and ~/.aws/credentials, or AWS_PROFILE)") from None


# ---------------------------------------------------------------------------------------- reads


def head(client: Client, key: str, nbytes: int) -> tuple[RemoteObject, bytes] | None:
    """The object at ``key`` and its first ``nbytes`` (fewer if it is smaller), in one GET;
    None when there is no such object."""
    obstore = _obstore()
    url = client.url(key)

    def attempt() -> tuple[RemoteObject, bytes] | None:
        try:
            result = obstore.get(client.store, key, options={"range": (0, nbytes)})
        except FileNotFoundError:
            return None
        meta = result.meta
        data = bytes(result.bytes())
        obj = RemoteObject(client, key, int(meta["size"]), meta.get("e_tag"),
                           meta.get("last_modified"))
        if len(data) != min(nbytes, obj.size):
            raise _Short(f"the server sent {len(data)} of the first {min(nbytes, obj.size)} "
                         "bytes requested")
        return obj, data

    return _retrying(attempt, client.tuning, url, CheckpointError)


def head_existing(client: Client, key: str, nbytes: int) -> tuple[RemoteObject, bytes]:
    """``head`` of an object that must exist."""
    found = head(client, key, nbytes)
    if found is None:
        raise missing(client, key)
    return found


def missing(client: Client, key: str) -> CheckpointError:
    return CheckpointError("not found (404): check the bucket, the key and the endpoint",
                           path=client.url(key))


def fetch(obj: RemoteObject, start: int, end: int, error: type[WeightliftError] = ReadError
          ) -> bytes:
    """Bytes ``[start, end)`` of ``obj`` (small reads: headers, indexes)."""
    buf = bytearray(end - start)
    fetch_into(obj, start, memoryview(buf), error)
    return bytes(buf)


def fetch_into(obj: RemoteObject, start: int, buf: memoryview,
               error: type[WeightliftError] = ReadError) -> None:
    """Fill ``buf`` with bytes from ``start`` on, by one ranged GET conditional on the version
    seen first; a body that is short, long or of another version is an error, never data."""
    obstore = _obstore()
    end = start + len(buf)
    if end > obj.size:
        raise error(f"read of [{start}, {end}) runs past the end of the object ({obj.size} bytes)",
                    path=obj.url)
    options: dict[str, object] = {"range": (start, end)}
    if obj.etag:
        options["if_match"] = obj.etag
    elif obj.last_modified is not None:
        options["if_unmodified_since"] = obj.last_modified

    def attempt() -> None:
        result = obstore.get(obj.client.store, obj.key, options=options)
        try:
            _same_version(obj, result.meta, error)
            if tuple(result.range) != (start, end):
                got = result.range
                raise _Short(f"the server answered bytes [{got[0]}, {got[1]}) for "
                             f"[{start}, {end})")
            done = 0
            for chunk in result.stream(min_chunk_size=CHUNK):
                if done + len(chunk) > len(buf):
                    raise error(f"the server sent more than the {len(buf)} bytes asked at "
                                f"{start}", path=obj.url)
                buf[done:done + len(chunk)] = chunk
                done += len(chunk)
        except BaseException:
            del result  # an unread body holds its connection: a traceback must not keep it
            raise
        if done != len(buf):
            raise _Short(f"the body ended after {done} of {len(buf)} bytes at offset {start}")

    _retrying(attempt, obj.client.tuning, obj.url, error)


def _same_version(obj: RemoteObject, meta: Mapping[str, Any], error: type[WeightliftError]
                  ) -> None:
    """Servers that ignore conditional headers still say which version they sent."""
    etag = meta.get("e_tag")
    changed = (int(meta["size"]) != obj.size or (obj.etag is not None and etag != obj.etag)
               or (obj.etag is None and obj.last_modified is not None
                   and meta.get("last_modified") not in (None, obj.last_modified)))
    if changed:
        raise error("the object changed during the load (its ETag, size or modification time "
                    "differs from when its header was read); load again", path=obj.url)


class _Short(Exception):
    """A body that ended early or covered other bytes: retried, then a ``ReadError``."""


def _retrying(attempt: Callable[[], T], tuning: Tuning, url: str,
              error: type[WeightliftError]) -> T:
    """``attempt()``, again with backoff when the body broke off (the client retries failed
    requests itself; a response that fails mid-body is retried here), within the deadline."""
    obstore = _obstore()
    exceptions = obstore.exceptions
    started = time.monotonic()
    for tries in range(tuning.retries + 1):
        try:
            return attempt()
        except WeightliftError:
            raise
        except FileNotFoundError:
            raise error("not found (404): check the bucket, the key and the endpoint",
                        path=url) from None
        except (PermissionError, exceptions.PermissionDeniedError,
                exceptions.UnauthenticatedError) as exc:
            raise error(f"access denied ({_status(exc) or '403'}): check the credentials "
                        "(AWS_ACCESS_KEY_ID/AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS, "
                        "AZURE_STORAGE_*) or pass storage_options={'anonymous': 'true'} for a "
                        "public bucket", path=url) from None
        except exceptions.PreconditionError:
            raise error("the object changed during the load (its ETag no longer matches the one "
                        "read with its header); load again", path=url) from None
        except (exceptions.BaseError, _Short, OSError) as exc:
            reason = str(exc) if isinstance(exc, _Short) else _reason(exc)
            elapsed = time.monotonic() - started
            # An HTTP status error was already retried by the client (5xx, 429) or is final.
            if tries == tuning.retries or elapsed > tuning.deadline or _status(exc) is not None:
                raise error(f"GET failed ({tries + 1} attempt(s) over {elapsed:.1f} s): "
                            f"{reason}", path=url) from None
        time.sleep(min(5.0, 0.1 * 2 ** tries) * (0.5 + random.random() / 2))
    raise AssertionError("unreachable")


def _status(exc: BaseException) -> str | None:
    text = str(exc)
    marker = "status code: "
    at = text.find(marker)
    if at < 0:
        return None
    return text[at + len(marker):at + len(marker) + 3]


def _reason(exc: BaseException) -> str:
    """A short, scrubbed reason from a client error (its first line, no response body)."""
    text = str(exc).split("\n", 1)[0]
    status = _status(exc)
    if status is not None:
        text = text[:text.find("status code: ") + len("status code: ") + 3]
        text = f"server returned HTTP {status} ({text})"
    if "timed out" in str(exc).lower() or "TimedOut" in str(exc):
        text = f"timed out ({text})"
    return scrub(text)[:400]


def list_keys(client: Client, prefix: str) -> Iterator[tuple[str, int]]:
    """``(key, size)`` of the objects directly under ``prefix``."""
    obstore = _obstore()
    try:
        listing = obstore.list_with_delimiter(client.store, prefix or None)
    except (obstore.exceptions.BaseError, OSError) as exc:
        raise CheckpointError(f"cannot list the objects (no index to name the shards): "
                              f"{_reason(exc)}; put a model.safetensors.index.json next to the "
                              "shards or name the file", path=client.url(prefix)) from None
    for meta in listing["objects"]:
        yield str(meta["path"]), int(meta["size"])
