"""Verified loads: each file's SHA-256, computed from the bytes as the load reads them.

    state = weightlift.load("hf://org/model", verify=True)              # digests from the HF cache
    state = weightlift.load("model.safetensors", verify={"model.safetensors": "9f86d0…"})
    state = weightlift.load("ckpt/", verify="ckpt/SHA256SUMS")          # sha256sum's output

Where the expected digests come from (``Expected``):

* ``verify=True``: a Hugging Face cache snapshot links each LFS file to ``blobs/<sha256>``; the
  blob's name is the digest the hub published. A file outside such a cache has none: pass digests.
* a mapping ``{file name or path: hex digest}``, or the path of a file of ``sha256sum`` lines.

How it is checked (``Verifier``): the read path hands each block of a file to ``feed`` in file
order, as soon as its bytes are in memory; a thread per file hashes them (hashlib releases the
GIL, so reads and placement go on meanwhile, and the files of a sharded checkpoint are hashed
side by side). The header is hashed first; any byte the plan does
not cover is read and hashed too, so the digest is always of the whole file. Only whole files can
be verified: a load of some of a file's tensors with verification is refused. ``finish`` compares
the digests and raises ``IntegrityError`` naming the file and both digests; ``load`` and
``open`` then return nothing, and ``stream`` raises before finishing (tensors it already yielded
came from a file whose digest was not yet known: do not commit them before the stream ends).
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Union

import torch

from .errors import CheckpointError, IntegrityError
from .io.base import pread_into
from .sources.records import Entry, Layout, Shard

#: ``verify=`` of the public API: True (HF cache digests), {name: hex}, or a sha256sum file.
Verify = Union[bool, Mapping[str, str], str, os.PathLike]
DIGEST = re.compile(r"[0-9a-f]{64}")
#: Bytes read per call when hashing a range the plan did not cover.
FILL = 8 << 20


def hub_digest(path: str) -> str | None:
    """The SHA-256 a Hugging Face cache records for ``path``: the name of the blob it links to."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and DIGEST.fullmatch(real.name) and real != Path(path):
        return real.name
    return None


def read_sums(path: str | os.PathLike) -> dict[str, str]:
    """``{file name: digest}`` from ``sha256sum`` output (``<hex>  <name>`` or ``<hex> *<name>``)."""
    sums: dict[str, str] = {}
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise CheckpointError(f"cannot read the digest file: {exc.strerror}", path=path) from exc
    except UnicodeDecodeError:
        raise CheckpointError("digest file is not text (expected sha256sum lines)",
                              path=path) from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.strip().split(maxsplit=1)
        if len(parts) != 2 or not DIGEST.fullmatch(parts[0].lower()):
            raise CheckpointError(f"line {number} is not '<sha256 hex>  <file name>': "
                                  f"{line[:80]!r}", path=path)
        sums[parts[1].lstrip("*")] = parts[0].lower()
    return sums


def check_verify(verify: Verify | None) -> None:
    """Refuse a ``verify=`` that cannot check anything, before any read: an empty mapping or
    path (which would silently check nothing; ``ValueError``), a digest that is no SHA-256 or
    a digest file that cannot be read or parsed (``CheckpointError``), another type
    (``TypeError``). None and False: no verification."""
    if verify is None or isinstance(verify, bool):
        return
    if isinstance(verify, (str, os.PathLike)):
        if not os.fspath(verify):
            raise ValueError("verify='' names no digest file: pass True (the digests of a "
                             "Hugging Face cache), {file name: sha256} or the path of a "
                             "sha256sum file")
        read_sums(verify)
        return
    if not isinstance(verify, Mapping):
        raise TypeError(f"verify must be True, a mapping of file name to SHA-256, or the path of "
                        f"a sha256sum file, not {type(verify).__name__}")
    if not verify:
        raise ValueError("verify={} names no file, so it would check nothing: pass "
                         "{file name: sha256}, True (the digests of a Hugging Face cache) or "
                         "the path of a sha256sum file")
    for name, digest in verify.items():
        if not isinstance(name, (str, os.PathLike)) or not isinstance(digest, str):
            raise TypeError(f"verify maps {name!r} to {digest!r}: expected a file name and the "
                            "hex digest of its SHA-256")
        if not DIGEST.fullmatch(digest.lower()):
            raise CheckpointError(f"expected digest {digest[:80]!r} is not 64 hex digits of a "
                                  "SHA-256", path=name)


def expected_digests(layout: Layout, verify: Verify, shards: Iterable[int]) -> dict[int, str]:
    """The expected digest of each of ``shards`` (positions in ``layout.shards``)."""
    check_verify(verify)
    given: Mapping[str, str] | None = None
    if isinstance(verify, (str, os.PathLike)):
        given = read_sums(verify)
    elif isinstance(verify, Mapping):
        given = verify
    out: dict[int, str] = {}
    missing: list[str] = []
    for index in shards:
        shard = layout.shards[index]
        digest = hub_digest(shard.path) if given is None else _lookup(given, shard, layout.root)
        if digest is None:
            missing.append(shard.path)
            continue
        out[index] = digest.lower()  # a SHA-256: checked by check_verify, or a blob's name
    if missing:
        where = ("is not a file of a Hugging Face cache snapshot (no blob named by its SHA-256)"
                 if given is None else "has no digest in the ones given")
        raise CheckpointError(f"{missing[0]} {where}; pass the expected digests, e.g. verify="
                              f"{{{os.path.basename(missing[0])!r}: '<sha256 hex>'}} or "
                              "verify='SHA256SUMS' (sha256sum's output)"
                              + (f" ({len(missing)} files lack one)" if len(missing) > 1 else ""))
    return out


def _lookup(given: Mapping[str, str], shard: Shard, root: str) -> str | None:
    for key in (shard.path, os.path.relpath(shard.path, root), os.path.basename(shard.path),
                os.path.abspath(shard.path), os.path.realpath(shard.path)):
        if key in given:
            return given[key]
    return None


def whole_shards(layout: Layout, entries: Iterable[Entry], every_file: bool = False
                 ) -> list[int]:
    """The shards ``entries`` cover (``every_file``: every shard, for a load of the whole
    checkpoint); refuses a shard of which only some tensors are selected."""
    chosen = Counter(entry.shard for entry in entries)
    # What a full load takes from each file: all its tensors, but for copies loaded from another.
    held = Counter(entry.shard for entry in layout.entries.values())
    for index, count in chosen.items():
        shard = layout.shards[index]
        if count != held[index]:
            raise CheckpointError(f"verification hashes whole files, but only {count} of the "
                                  f"{held[index]} tensors of this file are loaded; "
                                  "load all of them, or check the files with `weightlift verify`",
                                  path=shard.path)
    if every_file:  # also a file whose tensors all load from copies in other files
        return list(range(len(layout.shards)))
    return sorted(chosen)


Ticket = tuple[int, int]  # (shard, how many of its blocks must be hashed)


class Verifier:
    """Hash files from the blocks a load reads: each file in order on a thread of its own, so
    the files of a sharded checkpoint are hashed side by side (SHA-256 itself is sequential).

    Queues are not bounded: a ``load`` keeps every block anyway (they are its tensors), and the
    copying and streaming paths wait for each block's hash before reusing or yielding it.
    """

    def __init__(self, layout: Layout, expected: Mapping[int, str]) -> None:
        self.layout = layout
        self.expected = dict(expected)
        self.hashes = {index: hashlib.sha256() for index in self.expected}
        self.position = {index: 0 for index in self.expected}
        self.fed = {index: 0 for index in self.expected}
        self.hashed = {index: 0 for index in self.expected}
        self.done: dict[int, str] = {}
        self.error: BaseException | None = None
        self.changed = threading.Condition()
        #: At most one hashing thread per core runs at a time.
        self.cores = threading.BoundedSemaphore(max(1, os.cpu_count() or 1))
        self.work: dict[int, queue.SimpleQueue[tuple[int, torch.Tensor] | None]] = {}
        self.threads: list[threading.Thread] = []

    def feed(self, shard: int, start: int, data: torch.Tensor) -> Ticket | None:
        """Queue ``data`` (uint8, the file's bytes from ``start``); returns a ticket for ``wait``.

        ``data`` must stay unchanged until ``wait(ticket)`` returns."""
        self.check()
        if shard not in self.expected:
            return None
        if shard not in self.work:
            self.work[shard] = queue.SimpleQueue()
            thread = threading.Thread(target=self._run, args=(shard,), daemon=True,
                                      name="weightlift-verify")
            self.threads.append(thread)
            thread.start()
        self.fed[shard] += 1
        self.work[shard].put((start, data))
        return shard, self.fed[shard]

    def wait(self, ticket: Ticket | None = None) -> None:
        """Block until the block of ``ticket`` (default: everything fed) is hashed."""
        wanted = [ticket] if ticket is not None else list(self.fed.items())
        with self.changed:
            self.changed.wait_for(lambda: self.error is not None or all(
                self.hashed[shard] >= count for shard, count in wanted))
        self.check()

    def finish(self) -> dict[int, str]:
        """Hash what the plan left out, compare every digest; raise ``IntegrityError`` on a
        mismatch. Returns ``{shard: digest}``."""
        self.wait()
        for index in self.expected:
            size = self.layout.shards[index].header.file_size
            if self.position[index] < size:
                self._fill(index, size)
            self._compare(index)
        self.check()
        return dict(self.done)

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        for work in self.work.values():
            work.put(None)
        for thread in self.threads:
            thread.join()
        self.threads = []

    # -- the hashing threads -------------------------------------------------------------------

    def _run(self, shard: int) -> None:
        work = self.work[shard]
        while True:
            item = work.get()
            if item is None:
                return
            start, data = item
            try:
                if self.error is None:
                    with self.cores:
                        self._take(shard, start, data)
            except BaseException as exc:  # reported to the loading thread by wait/check
                self.error = exc
            with self.changed:
                self.hashed[shard] += 1
                self.changed.notify_all()

    def _take(self, shard: int, start: int, data: torch.Tensor) -> None:
        self._fill(shard, start)  # the header, or bytes no block covered
        end = start + data.numel()
        if end > self.position[shard]:
            skip = self.position[shard] - start
            self.hashes[shard].update(memoryview(data.numpy()).cast("B")[skip:])
            self.position[shard] = end
        if end >= self.layout.shards[shard].header.file_size:
            self._compare(shard)

    def _fill(self, shard: int, until: int) -> None:
        """Read and hash ``[position, until)`` of ``shard`` from its file (header, holes)."""
        s = self.layout.shards[shard]
        if self.position[shard] >= until:
            return
        with s.opened() as fd:
            while self.position[shard] < until:
                data = bytearray(min(FILL, until - self.position[shard]))
                # Short reads continued, EINTR/EAGAIN asked again (io/retry.py), as every read.
                pread_into(fd, memoryview(data), self.position[shard], s.path)
                self.hashes[shard].update(data)
                self.position[shard] += len(data)

    def _compare(self, shard: int) -> None:
        if shard in self.done:
            return
        actual = self.hashes[shard].hexdigest()
        self.done[shard] = actual
        expected = self.expected[shard]
        if actual != expected:
            self.error = IntegrityError(
                f"SHA-256 mismatch: expected {expected}, the file has {actual}; it is corrupted "
                "or was not fully downloaded: delete it and download it again",
                path=self.layout.shards[shard].path, expected=expected, actual=actual)
            raise self.error


def make_verifier(layout: Layout, entries: Iterable[Entry], verify: Verify | None,
                  every_file: bool = False) -> Verifier | None:
    """A ``Verifier`` for the files ``entries`` cover (``every_file``: all of them, for a load
    of the whole checkpoint), or None when ``verify`` is off."""
    if verify is None or verify is False:
        return None
    remote = [shard.path for shard in layout.shards if shard.remote]
    if remote:
        raise CheckpointError("verify= checks files as the local read path streams them; it does "
                              "not support object-storage sources yet (an ETag is no SHA-256): "
                              "download the files, or load without verify=", path=remote[0])
    entries = list(entries)
    return Verifier(layout, expected_digests(layout, verify,
                                             whole_shards(layout, entries, every_file)))


__all__ = ["Verifier", "Verify", "check_verify", "expected_digests", "hub_digest", "make_verifier", "read_sums",
           "whole_shards"]
