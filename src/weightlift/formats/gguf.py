"""The GGUF format (llama.cpp): bytes → validated, immutable tensor records and lazy metadata.

A GGUF file is::

    "GGUF" | u32 version | u64 tensor count | u64 metadata count
    metadata: (string key, u32 value type, value) × count
    tensor infos: (string name, u32 n_dims, u64 ne[n_dims], u32 ggml type, u64 offset) × count
    padding to ``general.alignment`` (default 32) | data section

Strings are ``u64 length | UTF-8 bytes``; arrays are ``u32 element type | u64 count | elements``
(arrays of arrays allowed). Version 1 (u32 counts) is refused; big-endian files are refused.

``parse_gguf`` is pure: it takes the file's leading bytes (and a way to fetch more) and returns a
``Header`` whose ``TensorInfo`` records hold absolute byte ranges, like safetensors headers, so
the planner and every strategy handle GGUF unchanged. A quantized tensor's record is a ``uint8``
tensor of shape ``(*shape[:-1], row_bytes)`` (its packed bytes); its ``ggml`` field holds the
GGML type and ``ggml_shape`` the logical shape (torch order, reversed GGUF ``ne``).

Every count and length the file claims is checked against the bytes left before anything is
allocated for it; big arrays (a 150k-token vocabulary) stay one ``bytes`` object plus an offset
table until a caller reads that key.
"""

from __future__ import annotations

import os
import re
import struct
from array import array
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import FormatError
from .ggml import GGML_TYPES
from .records import DTYPE_OF_TORCH, DTYPES, Header, TensorInfo, pread_exact

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
#: ggml's GGML_MAX_DIMS: a tensor has at most four dimensions.
MAX_DIMS = 4
#: Arrays of arrays nest at most this deep (llama.cpp refuses any nesting; gguf-py writes some).
MAX_NESTING = 8
#: ne[i] are int64 in ggml; their product must fit too.
INT64_MAX = 2**63 - 1
#: The first read of a header; more is fetched as the parser needs it.
FIRST_READ = 1 << 20
#: Split sets: ``prefix-00001-of-00003.gguf`` (llama.cpp's llama_split_path).
SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")
SPLIT_NO, SPLIT_COUNT, SPLIT_TENSORS = "split.no", "split.count", "split.tensors.count"


@dataclass(frozen=True)
class ValueType:
    """A GGUF metadata value type: its id, name, ``struct`` code and size (0 if variable)."""

    id: int
    name: str
    code: str
    size: int


#: The metadata value types, by id (as gguf.h's ``enum gguf_type``).
VALUE_TYPES: dict[int, ValueType] = {v.id: v for v in (
    ValueType(0, "UINT8", "B", 1), ValueType(1, "INT8", "b", 1),
    ValueType(2, "UINT16", "H", 2), ValueType(3, "INT16", "h", 2),
    ValueType(4, "UINT32", "I", 4), ValueType(5, "INT32", "i", 4),
    ValueType(6, "FLOAT32", "f", 4), ValueType(7, "BOOL", "?", 1),
    ValueType(8, "STRING", "", 0), ValueType(9, "ARRAY", "", 0),
    ValueType(10, "UINT64", "Q", 8), ValueType(11, "INT64", "q", 8),
    ValueType(12, "FLOAT64", "d", 8),
)}
STRING, ARRAY = 8, 9
#: The fewest bytes one element of a type takes (a string: its length; an array: type + count).
_MIN_SIZE = {**{t: v.size for t, v in VALUE_TYPES.items()}, STRING: 8, ARRAY: 12}
#: The fewest bytes of one tensor info: name length, n_dims, type, offset.
_MIN_TENSOR_INFO = 8 + 4 + 4 + 8
#: The fewest bytes of one key/value pair: key length, value type, a one-byte value.
_MIN_KV = 8 + 4 + 1
_U64 = struct.Struct("<Q").unpack_from


class GGUFArray:
    """An array value not decoded yet: its element type, its length, and its raw bytes.

    Strings are decoded on access (``errors="surrogateescape"``, so no byte is lost); numbers
    through one ``struct`` call. ``list(arr)`` or ``arr.tolist()`` decodes everything.
    """

    def __init__(self, type_id: int, raw: bytes, offsets: array | None, count: int,
                 items: list[Any] | None = None) -> None:
        self.type = VALUE_TYPES[type_id]
        self._raw = raw
        self._offsets = offsets  # string arrays: start of each string's bytes in ``raw``
        self._count = count
        self._items = items      # nested arrays: already parsed elements

    def __len__(self) -> int:
        return self._count

    def tolist(self) -> list[Any]:
        if self._items is not None:
            return [v.tolist() if isinstance(v, GGUFArray) else v for v in self._items]
        if self.type.id == STRING:
            assert self._offsets is not None
            raw, offsets = self._raw, self._offsets
            return [raw[offsets[i]:offsets[i + 1] - 8].decode("utf-8", "surrogateescape")
                    for i in range(self._count)]
        if self.type.name == "BOOL":
            return [bool(b) for b in self._raw]
        return list(struct.unpack(f"<{self._count}{self.type.code}", self._raw))

    def __iter__(self) -> Iterator[Any]:
        return iter(self.tolist())

    def __repr__(self) -> str:
        return f"GGUFArray({self.type.name}, {self._count} elements)"


class GGUFMetadata(Mapping[str, Any]):
    """GGUF metadata, key → Python value (int, float, bool, str, or a list for arrays).

    Arrays are decoded when their key is read, then kept: ``meta["tokenizer.ggml.tokens"]``
    costs its decoding once; listing keys or ``describe`` costs nothing.
    """

    def __init__(self, values: dict[str, Any], types: dict[str, str]) -> None:
        self._values = values
        self._types = types

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, GGUFArray):
            value = self._values[key] = value.tolist()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def value_type(self, key: str) -> str:
        """The GGUF type of ``key``'s value: ``"UINT32"``, ``"STRING"``, ``"ARRAY[STRING]"``…"""
        return self._types[key]

    def describe(self, key: str, limit: int = 80) -> str:
        """A short text for ``key``'s value that never decodes a large array."""
        value = self._values[key]
        if isinstance(value, (GGUFArray, list)) and len(value) > 16:
            return f"[{len(value)} × {self._types[key][6:-1]}]"
        text = str(value.tolist() if isinstance(value, GGUFArray) else value)
        return text if len(text) <= limit else text[:limit - 3] + "..."


class _Bytes:
    """A growing window on the file's first bytes, with the bounds checks of every read."""

    def __init__(self, data: bytes, file_size: int, path: str,
                 fetch: Callable[[int, int], bytes] | None) -> None:
        self.data = data
        self.file_size = file_size
        self.path = path
        self.fetch = fetch
        self.pos = 0

    def need(self, n: int, what: str) -> None:
        end = self.pos + n
        if end > self.file_size:
            raise FormatError(f"{what} at offset {self.pos} needs {n} bytes but the file ends at "
                              f"{self.file_size} (truncated or corrupt)", path=self.path)
        if end > len(self.data):
            if self.fetch is None:
                raise FormatError(f"{what} at offset {self.pos} lies past the header bytes given",
                                  path=self.path)
            grow = max(end, min(self.file_size, 2 * len(self.data)))
            more = self.fetch(len(self.data), grow - len(self.data))
            self.data += more
            if len(self.data) < end:
                raise FormatError(f"file ended at {len(self.data)} while reading {what} at offset "
                                  f"{self.pos}", path=self.path)

    def remaining(self) -> int:
        return self.file_size - self.pos

    def unpack(self, code: str, size: int, what: str) -> Any:
        self.need(size, what)
        (value,) = struct.unpack_from("<" + code, self.data, self.pos)
        self.pos += size
        return value

    def u32(self, what: str) -> int:
        return self.unpack("I", 4, what)

    def u64(self, what: str) -> int:
        return self.unpack("Q", 8, what)

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = bytes(self.data[self.pos:self.pos + n])
        self.pos += n
        return out

    def string(self, what: str) -> str:
        start = self.pos
        length = self.u64(f"the length of {what}")
        if length > self.remaining():
            raise FormatError(f"{what} at offset {start} claims {length} bytes, more than the "
                              f"{self.remaining()} left in the file", path=self.path)
        raw = self.take(length, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{what} at offset {start} is not valid UTF-8 (byte {exc.start})",
                              path=self.path) from None


def parse_gguf(data: bytes, *, file_size: int, path: str,
               fetch: Callable[[int, int], bytes] | None = None) -> Header:
    """Validate a GGUF file from its leading bytes ``data``; pure unless ``fetch(offset, n)`` is
    given to read more of the header. ``data`` may be the whole file (as in tests)."""
    buf = _Bytes(bytes(data), file_size, path, fetch)
    buf.need(4, "the magic")
    magic = buf.take(4, "the magic")
    if magic != MAGIC:
        raise FormatError(f"bad magic {magic!r} at offset 0: not a GGUF file (expected b'GGUF')",
                          path=path)
    version = buf.u32("the version")
    if version not in VERSIONS:
        swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
        if swapped in (1, 2, 3):
            raise FormatError(f"is a big-endian GGUF file (version {swapped} byte-swapped); "
                              "weightlift reads little-endian GGUF only: convert it with "
                              "gguf-py's gguf_convert_endian.py", path=path)
        if version == 1:
            raise FormatError("is GGUF version 1, which is not supported (only 2 and 3): "
                              "convert it with a current llama.cpp", path=path)
        raise FormatError(f"unsupported GGUF version {version} at offset 4 (supported: 2, 3)",
                          path=path)
    n_tensors = buf.u64("the tensor count")
    n_kv = buf.u64("the metadata count")
    if n_kv * _MIN_KV > buf.remaining():
        raise FormatError(f"metadata count {n_kv} at offset 16 cannot fit in the "
                          f"{buf.remaining()} bytes left in the file", path=path)
    values: dict[str, Any] = {}
    types: dict[str, str] = {}
    for i in range(n_kv):
        key_at = buf.pos
        key = buf.string(f"metadata key #{i}")
        if key in values:
            raise FormatError(f"metadata key {key!r} at offset {key_at} appears twice", path=path)
        type_id = buf.u32(f"the value type of key {key!r}")
        values[key], types[key] = _value(buf, type_id, key, 0)
    alignment = _alignment(values, types, path)
    if n_tensors * _MIN_TENSOR_INFO > buf.remaining():
        raise FormatError(f"tensor count {n_tensors} at offset 8 cannot fit in the "
                          f"{buf.remaining()} bytes left in the file", path=path)
    raw_infos = [_tensor_info(buf, i) for i in range(n_tensors)]
    data_start = -(-buf.pos // alignment) * alignment
    tensors = _tensors(raw_infos, data_start, alignment, file_size, path)
    return Header(path=path, file_size=file_size, data_start=data_start, tensors=tuple(tensors),
                  metadata=GGUFMetadata(values, types))  # type: ignore[arg-type]


def _value(buf: _Bytes, type_id: int, key: str, depth: int) -> tuple[Any, str]:
    vtype = VALUE_TYPES.get(type_id)
    if vtype is None:
        raise FormatError(f"metadata key {key!r} has unknown value type {type_id} at offset "
                          f"{buf.pos - 4} (known: 0–12)", path=buf.path)
    if type_id == STRING:
        return buf.string(f"the value of key {key!r}"), "STRING"
    if type_id != ARRAY:
        return buf.unpack(vtype.code, vtype.size, f"the value of key {key!r}"), vtype.name
    if depth >= MAX_NESTING:
        raise FormatError(f"metadata key {key!r} nests arrays more than {MAX_NESTING} deep at "
                          f"offset {buf.pos}", path=buf.path)
    at = buf.pos
    elem = buf.u32(f"the element type of key {key!r}")
    count = buf.u64(f"the length of key {key!r}")
    etype = VALUE_TYPES.get(elem)
    if etype is None:
        raise FormatError(f"metadata key {key!r} is an array of unknown type {elem} at offset "
                          f"{at}", path=buf.path)
    if count * _MIN_SIZE[elem] > buf.remaining():
        raise FormatError(f"metadata key {key!r} at offset {at} claims {count} elements of "
                          f"{etype.name}, more than the {buf.remaining()} bytes left in the file",
                          path=buf.path)
    if elem == ARRAY:
        items = []
        inner = "?"
        for _ in range(count):
            value, inner = _value(buf, ARRAY, key, depth + 1)
            items.append(value)
        return GGUFArray(elem, b"", None, count, items), f"ARRAY[{inner}]"
    if elem == STRING:
        return _strings(buf, count, key), "ARRAY[STRING]"
    raw = buf.take(count * etype.size, f"the elements of key {key!r}")
    return GGUFArray(elem, raw, None, count), f"ARRAY[{etype.name}]"


def _strings(buf: _Bytes, count: int, key: str) -> GGUFArray:
    """An array of ``count`` strings: one walk over the lengths (this is the hot loop of a
    150k-token vocabulary), no string object made."""
    start = pos = buf.pos
    data, size = buf.data, buf.file_size
    offsets = array("Q", [8])
    for _ in range(count):
        if pos + 8 > len(data):
            buf.pos = pos
            buf.need(8, f"a string length of key {key!r}")
            data = buf.data
        (length,) = _U64(data, pos)
        pos += 8
        if length > size - pos:
            raise FormatError(f"a string of key {key!r} at offset {pos - 8} claims {length} "
                              f"bytes, more than the {size - pos} left", path=buf.path)
        pos += length
        offsets.append(pos - start + 8)
    buf.pos = start
    buf.need(pos - start, f"the strings of key {key!r}")
    raw = bytes(buf.data[start:pos])
    buf.pos = pos
    return GGUFArray(STRING, raw, offsets, count)


def _alignment(values: dict[str, Any], types: dict[str, str], path: str) -> int:
    if "general.alignment" not in values:
        return DEFAULT_ALIGNMENT
    value = values["general.alignment"]
    if types["general.alignment"] != "UINT32":
        raise FormatError(f"metadata key 'general.alignment' is {types['general.alignment']}, "
                          "not UINT32", path=path)
    if value == 0 or value & (value - 1):
        raise FormatError(f"metadata key 'general.alignment' is {value}, not a power of two",
                          path=path)
    return value


@dataclass(frozen=True)
class _RawInfo:
    name: str
    ne: tuple[int, ...]
    type_id: int
    offset: int
    at: int  # where the info starts in the file, for messages


def _tensor_info(buf: _Bytes, i: int) -> _RawInfo:
    at = buf.pos
    name = buf.string(f"the name of tensor #{i}")
    n_dims = buf.u32(f"the dimension count of tensor {name!r}")
    if n_dims > MAX_DIMS:
        raise FormatError(f"has {n_dims} dimensions at offset {buf.pos - 4} (GGUF allows at "
                          f"most {MAX_DIMS})", path=buf.path, tensor=name)
    buf.need(8 * n_dims, f"the dimensions of tensor {name!r}")
    ne = struct.unpack_from(f"<{n_dims}Q", buf.data, buf.pos)
    buf.pos += 8 * n_dims
    type_id = buf.u32(f"the type of tensor {name!r}")
    offset = buf.u64(f"the offset of tensor {name!r}")
    return _RawInfo(name, tuple(ne), type_id, offset, at)


def _tensors(raw_infos: list[_RawInfo], data_start: int, alignment: int, file_size: int,
             path: str) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for raw in raw_infos:
        if raw.name in seen:
            raise FormatError(f"tensor info at offset {raw.at} repeats the name", path=path,
                              tensor=raw.name)
        seen.add(raw.name)
        tensors.append(_record(raw, data_start, alignment, file_size, path))
    ordered = sorted(tensors, key=lambda t: (t.start, t.end, t.name))
    for before, after in zip(ordered, ordered[1:]):
        if after.start < before.end:
            raise FormatError(f"data [{after.start}, {after.end}) overlaps tensor "
                              f"{before.name!r}, which ends at {before.end}", path=path,
                              tensor=after.name)
    return ordered


def _record(raw: _RawInfo, data_start: int, alignment: int, file_size: int,
            path: str) -> TensorInfo:
    name = raw.name
    gtype = GGML_TYPES.get(raw.type_id)
    if gtype is None:
        raise FormatError(f"has unknown GGML type {raw.type_id} (tensor info at offset "
                          f"{raw.at})", path=path, tensor=name)
    count = 1
    for dim in raw.ne:
        if dim > INT64_MAX or (dim and count > INT64_MAX // dim):
            raise FormatError(f"dimensions {list(raw.ne)} overflow int64 (tensor info at offset "
                              f"{raw.at})", path=path, tensor=name)
        count *= dim
    row = raw.ne[0] if raw.ne else 1
    if row % gtype.block_size:
        raise FormatError(f"row of {row} elements is not a multiple of {gtype.name}'s block "
                          f"size {gtype.block_size}", path=path, tensor=name)
    shape = tuple(reversed(raw.ne))
    nbytes = count // gtype.block_size * gtype.type_size
    if raw.offset % alignment:
        raise FormatError(f"data offset {raw.offset} is not a multiple of the alignment "
                          f"{alignment}", path=path, tensor=name)
    start = data_start + raw.offset
    if start + nbytes > file_size:
        raise FormatError(f"data [{start}, {start + nbytes}) runs past the end of the file "
                          f"({file_size} bytes; truncated?)", path=path, tensor=name)
    if gtype.quantized:
        dtype = DTYPES["U8"]
        stored = (*shape[:-1], gtype.row_bytes(row))
    else:
        assert gtype.torch is not None
        dtype = DTYPE_OF_TORCH[gtype.torch]
        stored = shape
    return TensorInfo(name, dtype, stored, start, start + nbytes, ggml=gtype, ggml_shape=shape)


def read_gguf(path: str, fd: int) -> Header:
    """Read and validate the GGUF header of the open file ``fd`` (named ``path``)."""
    file_size = os.fstat(fd).st_size
    try:
        first = pread_exact(fd, min(FIRST_READ, file_size), 0)
        return parse_gguf(first, file_size=file_size, path=path,
                          fetch=lambda offset, n: pread_exact(fd, n, offset))
    except OSError as exc:
        raise FormatError(f"cannot read the GGUF header: {exc.strerror}", path=path) from exc


def is_gguf(header: Header) -> bool:
    """Whether ``header`` came from a GGUF file."""
    return isinstance(header.metadata, GGUFMetadata)


def split_parts(path: str) -> list[str] | None:
    """The part paths of the split set ``path`` names (``x-00001-of-00003.gguf``), or None."""
    match = SPLIT_NAME.match(os.path.basename(path))
    if match is None:
        return None
    count = int(match["count"])
    directory = os.path.dirname(path)
    return [os.path.join(directory, f"{match['prefix']}-{i:05d}-of-{count:05d}.gguf")
            for i in range(1, count + 1)]


def check_split(headers: list[Header]) -> None:
    """A split set's parts must agree: ``split.no`` in order, one ``split.count``, and the
    ``split.tensors.count`` the first part promises."""
    count = len(headers)
    total = sum(len(h.tensors) for h in headers)
    for i, header in enumerate(headers):
        meta = header.metadata
        assert isinstance(meta, GGUFMetadata)
        if meta.get(SPLIT_COUNT, 1) != count:
            raise FormatError(f"is part of a split set of {meta.get(SPLIT_COUNT, 1)} files per "
                              f"its '{SPLIT_COUNT}', but {count} parts were found", path=header.path)
        if meta.get(SPLIT_NO, 0) != i:
            raise FormatError(f"has '{SPLIT_NO}' {meta.get(SPLIT_NO, 0)} but is part {i} of the "
                              f"set (counting from 0)", path=header.path)
        promised = meta.get(SPLIT_TENSORS, total)
        if promised != total:
            raise FormatError(f"'{SPLIT_TENSORS}' says {promised} tensors but the {count} parts "
                              f"hold {total}", path=header.path)


__all__ = ["GGUFArray", "GGUFMetadata", "VALUE_TYPES", "check_split", "is_gguf",
           "parse_gguf", "read_gguf", "split_parts"]
