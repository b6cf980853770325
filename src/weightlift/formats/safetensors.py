"""The safetensors format: bytes → validated, immutable tensor records (``records.Header``).

A file is ``u64 header length (little endian) | JSON header | data section``. The header maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data section,
plus an optional ``"__metadata__"`` of string → string. Everything here is pure: ``parse_header``
takes bytes and numbers, never a file handle, so every rule is testable with hand-made bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from operator import attrgetter
from typing import Any

from ..errors import FormatError
from .records import DTYPES, DType, Header, TensorInfo, open_regular, pread_exact

#: Headers larger than this are refused before any allocation (the reference uses the same cap).
MAX_HEADER_BYTES = 100_000_000
#: Any sane tensor has far fewer dimensions; a cap keeps a hostile shape list cheap to check.
MAX_DIMS = 64
#: numel × itemsize must fit in the reference implementation's usize.
MAX_TENSOR_BYTES = 2**64 - 1
#: torch sizes and strides are int64.
TORCH_INDEX_MAX = 2**63 - 1
#: The reference parser (serde_json) refuses JSON nested deeper than this, even in ignored fields.
MAX_JSON_DEPTH = 127
#: Where a JSON string may hold a UTF-16 surrogate escape; a header without one needs no check.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
#: Integers the reference parser reads as integers; others become floats (so invalid as sizes).
_INT_RANGE = range(-(2**63), 2**64)
#: Every byte → b"9" for a digit, b" " otherwise: a run of 19 digits is then a substring search.
_DIGITS = bytes(ord("9") if ord("0") <= value <= ord("9") else ord(" ") for value in range(256))
_NINETEEN_DIGITS = b"9" * 19


def _careful_integers(raw: bytes) -> bool:
    """Whether an integer literal may need ``_decode_json``'s care: 19 digits or more (perhaps
    outside i64/u64) or ``-0``. A header without one parses its integers with plain ``int``, in
    C. Two scans in C: a regular expression took ~0.1 ms per KB of header."""
    return b"-0" in raw or _NINETEEN_DIGITS in raw.translate(_DIGITS)
#: Tensors in file order: by start, then end, then name.
_FILE_ORDER = attrgetter("start", "end", "name")
#: Names the format defines whose elements are smaller than a byte: torch has no faithful type.
SUBBYTE_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"}) - set(DTYPES)


def read_header(path: str | os.PathLike[str], fd: int | None = None) -> Header:
    """Read and validate the header of the file at ``path`` (or of the already open ``fd``)."""
    path = os.fspath(path)
    own = fd is None
    if fd is None:
        fd = open_regular(path)
    try:
        file_size = os.fstat(fd).st_size
        prefix = pread_exact(fd, 8, 0)
        if len(prefix) < 8:
            raise FormatError(f"file is {file_size} bytes, too short for the 8-byte header length",
                              path=path)
        (header_len,) = struct.unpack("<Q", prefix)
        check_header_length(header_len, file_size, path)
        raw = pread_exact(fd, header_len, 8)
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


#: Headers validated before (``parse_header`` is a pure function of the bytes and the file's
#: size): (raw, file_size) → (tensors, metadata), the most recently used last, at most
#: ``MEMO_BYTES`` of header bytes held. Loading the same file again, or files of one shape
#: (LoRA adapters of one configuration), validates its header once per process: a header of
#: 200 tensors costs ~1 ms of Python to decode and check, a lookup ~2 µs.
_MEMO: dict[tuple[bytes, int], tuple[tuple[TensorInfo, ...], dict[str, str] | None]] = {}
MEMO_BYTES = 8 << 20
_memo_held = 0
_MEMO_LOCK = threading.Lock()


def parse_header(raw: bytes, *, file_size: int, path: str) -> Header:
    """Validate header bytes ``raw`` of a file of ``file_size`` bytes; pure, no I/O. A header
    seen before (the same bytes, a file of the same size) is not validated again."""
    global _memo_held
    key = (raw, file_size)
    with _MEMO_LOCK:
        known = _MEMO.pop(key, None)
        if known is not None:
            _MEMO[key] = known  # the most recently used last
    if known is None:
        header = _parse_header(raw, file_size=file_size, path=path)
        if len(raw) <= MEMO_BYTES // 4:
            kept = dict(header.metadata) if header.metadata is not None else None
            with _MEMO_LOCK:
                while _MEMO and _memo_held + len(raw) > MEMO_BYTES:
                    oldest = next(iter(_MEMO))
                    del _MEMO[oldest]
                    _memo_held -= len(oldest[0])
                if key not in _MEMO:
                    _MEMO[key] = (header.tensors, kept)
                    _memo_held += len(raw)
        return header
    tensors, metadata = known
    return Header(path=path, file_size=file_size, data_start=8 + len(raw), tensors=tensors,
                  metadata=dict(metadata) if metadata is not None else None)


def _parse_header(raw: bytes, *, file_size: int, path: str) -> Header:
    check_header_length(len(raw), file_size, path)
    data_start = 8 + len(raw)
    obj = _decode_json(raw, path)
    meta = obj.pop("__metadata__", None)
    # One pass: entries well-formed with exactly their three keys nest three deep and hold only
    # ASCII strings, so the nesting walk (needed only where there are brackets enough to nest
    # ``MAX_JSON_DEPTH`` deep) visits the rest alone; a surrogate escape anywhere: all of it.
    texts = b"\\u" in raw and _SURROGATE_ESCAPE.search(raw) is not None
    deep = raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH
    tensors: list[TensorInfo] = []
    rest: list[tuple[str, Any]] = []
    for name, entry in obj.items():
        info = _well_formed(name, entry, data_start)
        if info is not None and not texts and (not deep or len(entry) == 3):
            tensors.append(info)
        else:
            rest.append((name, entry))
    if texts:
        obj["__metadata__"] = meta
        _check_json_values([(obj, 1)], True, path)
    elif deep:
        _check_json_values([(entry, 2) for _, entry in rest] + [(meta, 2)], False, path)
    metadata = _parse_metadata(meta, path)
    tensors.extend(_parse_entry(name, entry, data_start, path) for name, entry in rest)
    tensors.sort(key=_FILE_ORDER)
    _check_tiling(tensors, data_start, file_size - data_start, path)
    return Header(path=path, file_size=file_size, data_start=data_start,
                  tensors=tuple(tensors), metadata=metadata)


def _decode_json(raw: bytes, path: str) -> dict[str, Any]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise FormatError(f"header is not valid UTF-8 (byte {exc.start})", path=path) from None

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            seen: set[str] = set()
            for key, _ in pairs:
                if key in seen:
                    raise FormatError(f"header has the key {key!r} twice", path=path)
                seen.add(key)
        return out

    def integer(literal: str) -> int | float:
        # As serde_json: integers outside i64/u64 (and "-0") are floats, so never a valid size;
        # and Python's int() would refuse literals over 4300 digits with a bare ValueError.
        if len(literal) < 19 and literal != "-0":  # the common case, inside i64 for sure
            return int(literal)
        if len(literal) <= 21:
            value = int(literal)
            if value in _INT_RANGE and literal != "-0":
                return value
        return number(literal)

    def number(literal: str) -> float:
        value = float(literal)
        if math.isinf(value):
            raise FormatError(f"header has the number {_shorten(literal)}, out of range for a "
                              "64-bit float", path=path)
        return value

    careful = _careful_integers(raw)
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicates,
                         parse_int=integer if careful else None,
                         parse_float=number, parse_constant=lambda c: _reject_constant(c, path))
    except json.JSONDecodeError as exc:
        raise FormatError(f"header is not valid JSON: {exc.msg} at character {exc.pos}",
                          path=path) from None
    except RecursionError:
        raise FormatError("header JSON is nested too deeply", path=path) from None
    if not isinstance(obj, dict):
        raise FormatError(f"header is {_json_kind(obj)}, not a JSON object", path=path)
    return obj


def _reject_constant(name: str, path: str) -> None:
    raise FormatError(f"header contains the non-standard JSON constant {name}", path=path)


def _check_json_values(roots: list[tuple[Any, int]], texts: bool, path: str) -> None:
    """Refuse what the reference parser refuses anywhere in the header, ignored fields included:
    nesting deeper than ``MAX_JSON_DEPTH`` and (``texts``) strings with an unpaired
    ``\\uD800``-style escape (not text, so not encodable as UTF-8). ``roots``: (value, its depth)
    to walk; only containers are visited."""
    stack = list(roots)
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, (dict, list)):
            if texts and isinstance(value, str):
                _check_text(value, path)
            continue
        if depth > MAX_JSON_DEPTH:
            raise FormatError(f"header JSON is nested more than {MAX_JSON_DEPTH} levels deep",
                              path=path)
        if isinstance(value, dict):
            if texts:
                for key in value:
                    _check_text(key, path)
            items = value.values()
        else:
            items = value
        for item in items:
            if isinstance(item, (dict, list)):
                stack.append((item, depth + 1))
            elif texts and isinstance(item, str):
                _check_text(item, path)


def _check_text(value: str, path: str) -> None:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FormatError(f"header string {_shorten(repr(value))} holds an unpaired UTF-16 "
                          f"surrogate escape at character {exc.start}", path=path) from None


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _json_kind(value: Any) -> str:
    """A decoded value's JSON type with its article, for messages ("an array", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _parse_metadata(value: Any, path: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise FormatError(f"__metadata__ is {_json_kind(value)}, not an object of strings",
                          path=path)
    for key, item in value.items():
        if not isinstance(item, str):
            raise FormatError(f"__metadata__[{key!r}] is {_json_kind(item)}, not a string",
                              path=path)
    return dict(value)


def _parse_entry(name: str, entry: Any, data_start: int, path: str) -> TensorInfo:
    found = _well_formed(name, entry, data_start)
    if found is not None:
        return found
    if not isinstance(entry, dict):
        raise FormatError(f"entry is {_json_kind(entry)}, not an object", path=path,
                          tensor=name)
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise FormatError(f"entry has no {key!r}", path=path, tensor=name)
    dtype = _parse_dtype(entry["dtype"], name, path)
    shape = _parse_shape(entry["shape"], name, path)
    begin, end = _parse_offsets(entry["data_offsets"], name, path)
    nbytes = _checked_nbytes(shape, dtype, name, path)
    _check_torch_strides(shape, name, path)
    if end - begin != nbytes:
        raise FormatError(f"data_offsets [{begin}, {end}] hold {end - begin} bytes but shape "
                          f"{list(shape)} of {dtype.name} needs {nbytes}", path=path, tensor=name)
    return TensorInfo(name, dtype, shape, data_start + begin, data_start + end)


def _well_formed(name: str, entry: Any, data_start: int) -> TensorInfo | None:
    """The entry of a non-empty tensor of a whole-byte dtype passing every check below, with
    the fewest operations (a header is parsed on every load); None sends it through them."""
    if type(entry) is not dict:
        return None
    kind, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if type(kind) is not str or type(shape) is not list or type(offsets) is not list:
        return None
    dtype = DTYPES.get(kind)
    if dtype is None or dtype.pack != 1 or len(offsets) != 2 or len(shape) > MAX_DIMS:
        return None
    begin, end = offsets
    if type(begin) is not int or type(end) is not int or not 0 <= begin <= end:
        return None
    count = 1
    for dim in shape:
        if type(dim) is not int or dim <= 0:  # not bool, not negative; empty: the long way
            return None
        count *= dim
    # Dimensions of at least 1: the product only grows, so a final size within 64 bits (in bits,
    # as ``_checked_nbytes`` counts) never left them on the way, and no stride exceeds it.
    if count * dtype.itemsize * 8 > MAX_TENSOR_BYTES or count * dtype.itemsize != end - begin:
        return None
    return TensorInfo(name, dtype, tuple(shape), data_start + begin, data_start + end)


def _checked_nbytes(shape: tuple[int, ...], dtype: DType, name: str, path: str) -> int:
    """numel × itemsize, multiplied left to right as the reference does: a product that leaves
    64 bits on the way is refused even if a later 0 dimension would bring it back."""
    count = 1
    for dim in shape:
        count *= dim
        if count > MAX_TENSOR_BYTES:
            break
    nbits = count * dtype.itemsize * 8 // dtype.pack
    if nbits > MAX_TENSOR_BYTES:
        raise FormatError(f"shape {list(shape)} of {dtype.name} is too large: numel × element "
                          "size overflows 64 bits", path=path, tensor=name)
    if dtype.pack > 1 and (not shape or shape[-1] % dtype.pack):
        raise FormatError(f"shape {list(shape)} of {dtype.name}: torch packs {dtype.pack} "
                          f"elements per {dtype.torch}, so the last dimension must be a multiple "
                          f"of {dtype.pack}", path=path, tensor=name)
    return count * dtype.itemsize // dtype.pack


def _check_torch_strides(shape: tuple[int, ...], name: str, path: str) -> None:
    """torch keeps sizes and contiguous strides in int64: an empty tensor such as
    ``[0, 2**40, 2**40]`` is valid safetensors but no torch tensor, so refuse it here rather than
    fail in the middle of a load."""
    stride = 1
    for dim in reversed(shape):
        if dim > TORCH_INDEX_MAX or stride > TORCH_INDEX_MAX:
            raise FormatError(f"shape {list(shape)} cannot be a torch tensor: a size or stride "
                              f"exceeds 2**63 - 1", path=path, tensor=name)
        stride *= max(dim, 1)


def _parse_dtype(value: Any, name: str, path: str) -> DType:
    if not isinstance(value, str):
        raise FormatError(f"dtype is {_json_kind(value)}, not a string", path=path,
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
        raise FormatError(f"shape is {_json_kind(value)}, not an array", path=path, tensor=name)
    if len(value) > MAX_DIMS:
        raise FormatError(f"shape has {len(value)} dimensions (at most {MAX_DIMS})", path=path,
                          tensor=name)
    for dim in value:
        if not _is_int(dim) or dim < 0:
            raise FormatError(f"shape {value} has {dim!r}, not an integer in [0, 2**64)",
                              path=path, tensor=name)
    return tuple(value)


def _parse_offsets(value: Any, name: str, path: str) -> tuple[int, int]:
    if not isinstance(value, list) or len(value) != 2:
        raise FormatError(f"data_offsets {_shorten(repr(value))} is not an array of two integers",
                          path=path, tensor=name)
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
    previous = None
    for t in tensors:
        begin, end = t.start - data_start, t.end - data_start
        if end > data_size:
            raise FormatError(f"data_offsets [{begin}, {end}] run past the end of the data section "
                              f"({data_size} bytes; the file may be truncated)", path=path,
                              tensor=t.name)
        if begin < position:
            raise FormatError(f"data_offsets [{begin}, {end}] overlap tensor {previous!r}, which "
                              f"ends at {position}", path=path, tensor=t.name)
        if begin > position:
            raise FormatError(f"data_offsets [{begin}, {end}] leave a hole of {begin - position} "
                              f"bytes after offset {position}", path=path, tensor=t.name)
        position = end
        previous = t.name
    if position != data_size:
        raise FormatError(f"the tensors end at offset {position} but the data section holds "
                          f"{data_size} bytes: the last {data_size - position} belong to no tensor",
                          path=path)
