"""The safetensors format: the dtype table, and bytes → validated, immutable tensor records.

A file is ``u64 header length (little endian) | JSON header | data section``. The header maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data section,
plus an optional ``"__metadata__"`` of string → string. Everything here is pure: ``parse_header``
takes bytes and numbers, never a file handle, so every rule is testable with hand-made bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import FormatError

#: Headers larger than this are refused before any allocation (the reference uses the same cap).
MAX_HEADER_BYTES = 100_000_000
#: Any sane tensor has far fewer dimensions; a cap keeps a hostile shape list cheap to check.
MAX_DIMS = 64
#: numel × itemsize must fit in the reference implementation's usize.
MAX_TENSOR_BYTES = 2**64 - 1


@dataclass(frozen=True)
class DType:
    """A safetensors dtype: its name in headers, its torch dtype, and its size in bytes."""

    name: str
    torch: torch.dtype
    itemsize: int


def _dtype_table() -> dict[str, DType]:
    # name → torch attribute; dtypes this torch build lacks are left out (and reported as such).
    names = {
        "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
        "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32",
        "F32": "float32", "F64": "float64", "I64": "int64", "U64": "uint64",
        "C64": "complex64",
        "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
        "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz",
        "F8_E8M0": "float8_e8m0fnu",
    }
    table = {}
    for name, attr in names.items():
        dt = getattr(torch, attr, None)
        if dt is not None:
            table[name] = DType(name, dt, torch.empty((), dtype=dt).element_size())
    return table


#: Every safetensors dtype this torch can represent, by header name.
DTYPES: dict[str, DType] = _dtype_table()
#: torch dtype → safetensors dtype, for writers and for error messages.
DTYPE_OF_TORCH: dict[torch.dtype, DType] = {d.torch: d for d in DTYPES.values()}
#: Names the format defines whose elements are smaller than a byte: torch has no faithful type.
SUBBYTE_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range ``[start, end)`` in its file."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A validated header. ``tensors`` is in file order (by start offset, then name)."""

    path: str
    file_size: int
    data_start: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None = field(default=None, hash=False)

    @property
    def data_size(self) -> int:
        return self.file_size - self.data_start

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    """Read up to ``n`` bytes at ``offset``, retrying short reads; shorter only at end of file."""
    chunks = []
    while n > 0:
        chunk = os.pread(fd, min(n, 1 << 26), offset)
        if not chunk:
            break
        chunks.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read_header(path: str | os.PathLike[str], fd: int | None = None) -> Header:
    """Read and validate the header of the file at ``path`` (or of the already open ``fd``)."""
    path = os.fspath(path)
    own = fd is None
    try:
        if own:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise FormatError(f"cannot open: {exc.strerror}", path=path) from exc
    assert fd is not None
    try:
        file_size = os.fstat(fd).st_size
        prefix = _pread_exact(fd, 8, 0)
        if len(prefix) < 8:
            raise FormatError(f"file is {file_size} bytes, too short for the 8-byte header length",
                              path=path)
        (header_len,) = struct.unpack("<Q", prefix)
        check_header_length(header_len, file_size, path)
        raw = _pread_exact(fd, header_len, 8)
        if len(raw) < header_len:
            raise FormatError(f"file ended inside the header ({len(raw)} of {header_len} bytes)",
                              path=path)
        return parse_header(raw, file_size=file_size, path=path)
    except OSError as exc:
        raise FormatError(f"cannot read the header: {exc.strerror}", path=path) from exc
    finally:
        if own:
            os.close(fd)


def check_header_length(header_len: int, file_size: int, path: str) -> None:
    if header_len > MAX_HEADER_BYTES:
        raise FormatError(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit",
                          path=path)
    if 8 + header_len > file_size:
        raise FormatError(f"header length {header_len} runs past the end of the file "
                          f"({file_size} bytes)", path=path)
    if header_len < 2:
        raise FormatError(f"header length {header_len} is too small for a JSON object", path=path)


def parse_header(raw: bytes, *, file_size: int, path: str) -> Header:
    """Validate header bytes ``raw`` of a file of ``file_size`` bytes; pure, no I/O."""
    check_header_length(len(raw), file_size, path)
    data_start = 8 + len(raw)
    obj = _decode_json(raw, path)
    metadata = _parse_metadata(obj.pop("__metadata__", None), path)
    tensors = [_parse_entry(name, entry, data_start, path) for name, entry in obj.items()]
    tensors.sort(key=lambda t: (t.start, t.end, t.name))
    _check_tiling(tensors, data_start, file_size - data_start, path)
    return Header(path=path, file_size=file_size, data_start=data_start,
                  tensors=tuple(tensors), metadata=metadata)


def _decode_json(raw: bytes, path: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"header is not valid UTF-8 (byte {exc.start})", path=path) from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise FormatError(f"header has the key {key!r} twice", path=path)
            out[key] = value
        return out

    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates,
                         parse_constant=lambda c: _reject_constant(c, path))
    except json.JSONDecodeError as exc:
        raise FormatError(f"header is not valid JSON: {exc.msg} at character {exc.pos}",
                          path=path) from None
    except RecursionError:
        raise FormatError("header JSON is nested too deeply", path=path) from None
    if not isinstance(obj, dict):
        raise FormatError(f"header is a JSON {type(obj).__name__}, not an object", path=path)
    return obj


def _reject_constant(name: str, path: str) -> None:
    raise FormatError(f"header contains the non-standard JSON constant {name}", path=path)


def _parse_metadata(value: Any, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FormatError(f"__metadata__ is a {type(value).__name__}, not an object of strings",
                          path=path)
    for key, item in value.items():
        if not isinstance(item, str):
            raise FormatError(f"__metadata__[{key!r}] is a {type(item).__name__}, not a string",
                              path=path)
    return dict(value)


def _parse_entry(name: str, entry: Any, data_start: int, path: str) -> TensorInfo:
    if not isinstance(entry, dict):
        raise FormatError(f"entry is a {type(entry).__name__}, not an object", path=path,
                          tensor=name)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise FormatError(f"entry has no {key!r}", path=path, tensor=name)
    dtype = _parse_dtype(entry["dtype"], name, path)
    shape = _parse_shape(entry["shape"], name, path)
    begin, end = _parse_offsets(entry["data_offsets"], name, path)
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > MAX_TENSOR_BYTES:
        raise FormatError(f"shape {list(shape)} × {dtype.itemsize} bytes overflows", path=path,
                          tensor=name)
    if end - begin != nbytes:
        raise FormatError(f"data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
                          f"{list(shape)} of {dtype.name} needs {nbytes}", path=path, tensor=name)
    return TensorInfo(name, dtype, shape, data_start + begin, data_start + end)


def _parse_dtype(value: Any, name: str, path: str) -> DType:
    if not isinstance(value, str):
        raise FormatError(f"dtype is a {type(value).__name__}, not a string", path=path,
                          tensor=name)
    if value in DTYPES:
        return DTYPES[value]
    if value in SUBBYTE_DTYPES:
        raise FormatError(f"dtype {value} packs elements smaller than a byte, which torch cannot "
                          "represent element by element", path=path, tensor=name)
    known = ", ".join(sorted(DTYPES))
    raise FormatError(f"unknown dtype {value!r} (known: {known})", path=path, tensor=name)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_shape(value: Any, name: str, path: str) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise FormatError(f"shape is a {type(value).__name__}, not a list", path=path, tensor=name)
    if len(value) > MAX_DIMS:
        raise FormatError(f"shape has {len(value)} dimensions (at most {MAX_DIMS})", path=path,
                          tensor=name)
    for dim in value:
        if not _is_int(dim) or dim < 0:
            raise FormatError(f"shape {value} has {dim!r}, not a non-negative integer", path=path,
                              tensor=name)
    return tuple(value)


def _parse_offsets(value: Any, name: str, path: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise FormatError(f"data_offsets {value!r} is not a list of two integers", path=path,
                          tensor=name)
    begin, end = value
    if not (_is_int(begin) and _is_int(end)) or begin < 0 or end < 0:
        raise FormatError(f"data_offsets {value!r} are not non-negative integers", path=path,
                          tensor=name)
    if end < begin:
        raise FormatError(f"data_offsets [{begin}, {end}] end before they begin", path=path,
                          tensor=name)
    return begin, end


def _check_tiling(tensors: list[TensorInfo], data_start: int, data_size: int, path: str) -> None:
    """The data section must be covered exactly: no overlap, no hole, nothing past or after it."""
    position = 0  # relative to the data section
    for t in tensors:
        begin, end = t.start - data_start, t.end - data_start
        if end > data_size:
            raise FormatError(f"data_offsets [{begin}, {end}] run past the end of the data section "
                              f"({data_size} bytes; the file may be truncated)", path=path,
                              tensor=t.name)
        if begin < position:
            raise FormatError(f"data_offsets [{begin}, {end}] overlap the previous tensor, which "
                              f"ends at {position}", path=path, tensor=t.name)
        if begin > position:
            raise FormatError(f"data_offsets [{begin}, {end}] leave a hole of {begin - position} "
                              f"bytes after offset {position}", path=path, tensor=t.name)
        position = end
    if position != data_size:
        raise FormatError(f"the tensors cover {position} bytes but the data section holds "
                          f"{data_size}: {data_size - position} bytes are not any tensor's",
                          path=path)
