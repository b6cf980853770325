"""Property tests: mutated safetensors files never crash the parser, and it is as strict as the
reference.

Valid files come from ``safetensors.torch.save``; structured mutations (JSON-level edits of the
header, byte-level damage to the whole file) turn them into near-misses. For every input:

- ``read_header``, ``resolve`` and a load raise nothing but ``WeightliftError`` subclasses;
- if we accept a file, safetensors accepts it and sees the same names, dtypes and shapes, and the
  loaded tensors hold exactly the bytes their offsets point at;
- if we refuse a file that safetensors accepts, the refusal is one of our deliberate strictnesses
  (``DELIBERATE``).

Inputs that once found a bug live in ``tests/corpus/`` and are replayed on every run. A longer
hunt: ``WEIGHTLIFT_FUZZ_EXAMPLES=5000 pytest tests/test_header_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis.control import currently_in_test_context
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import _TYPES as SAFETENSORS_TORCH_DTYPES
from safetensors.torch import save

import weightlift
from weightlift.errors import WeightliftError
from weightlift.formats.records import Header
from weightlift.formats.safetensors import read_header
from weightlift.sources import resolve

from test_format_validation import safetensors_view

CORPUS = Path(__file__).parent / "corpus"

#: Where we refuse files safetensors reads, on purpose (the message says which rule).
DELIBERATE = {
    "duplicate keys: the file means two things": re.compile(r"the key .* twice"),
    "sub-byte dtypes: torch has no element type": re.compile(r"packs elements smaller than a byte"),
    "F4 with an odd last dimension, even empty: torch's float4_e2m1fn_x2 holds pairs":
        re.compile(r"torch packs 2 elements per torch\.float4_e2m1fn_x2"),
    "more than 64 dimensions": re.compile(r"dimensions \(at most 64\)"),
    "empty tensors whose sizes or strides overflow torch's int64":
        re.compile(r"cannot be a torch tensor"),
    "entry as an array ([dtype, shape, offsets]), which serde reads into the struct":
        re.compile(r"entry is an array, not an object"),
    "dtype as an object ({\"U8\": null}), which serde reads as the enum":
        re.compile(r"dtype is an object, not a string"),
}

#: Derandomized, so a run (CI runs once) explores the same examples every time and cannot fail
#: on a new find; ``WEIGHTLIFT_FUZZ_RANDOM=1`` explores afresh (findings go to ``tests/corpus/``).
FUZZ = settings(max_examples=int(os.environ.get("WEIGHTLIFT_FUZZ_EXAMPLES", "200")), deadline=None,
                derandomize=os.environ.get("WEIGHTLIFT_FUZZ_RANDOM") != "1",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- the oracle check, shared by the properties and the corpus --------------------------------------

def check_file(path: Path, strategy: str = "stream") -> Header | WeightliftError:
    """Parse, resolve and load ``path``, holding our result to the reference's."""
    blob = path.read_bytes()
    try:
        header: Header | WeightliftError = read_header(path)
    except WeightliftError as exc:
        header = exc
    theirs = safetensors_view(path)
    if currently_in_test_context():
        note(f"weightlift: {header!r}\nsafetensors: {theirs!r}")
        both = "both refuse" if isinstance(theirs, SafetensorError) else "only we refuse"
        event("both accept" if isinstance(header, Header) else both)
    if isinstance(header, WeightliftError):
        assert str(path) in str(header), "the error does not name the file"
        if not isinstance(theirs, SafetensorError):
            reasons = [why for why, rule in DELIBERATE.items() if rule.search(str(header))]
            assert reasons, f"we refuse a file safetensors reads: {header}"
        try:
            resolve(path).close()
        except WeightliftError as exc:
            assert type(exc) is type(header) and str(exc) == str(header)
        else:
            raise AssertionError("resolve accepts a file read_header refuses")
        return header

    assert not isinstance(theirs, SafetensorError), f"we accept a file safetensors refuses: {theirs}"
    assert {t.name: (t.dtype.name, list(t.shape)) for t in header.tensors} == theirs
    with resolve(path) as layout:
        assert {n: e.info for n, e in layout.entries.items()} == header.by_name()
    loaded = weightlift.load(path, strategy=strategy)
    assert sorted(loaded) == sorted(t.name for t in header.tensors)
    for info in header.tensors:
        tensor = loaded[info.name]
        assert tensor.dtype == info.dtype.torch and tuple(tensor.shape) == info.torch_shape
        raw = tensor.contiguous().reshape(-1).view(torch.uint8) if tensor.numel() else None
        assert (bytes(raw.numpy()) if raw is not None else b"") == blob[info.start:info.end]
    return header


# --- valid files --------------------------------------------------------------------------------

DTYPES = sorted(SAFETENSORS_TORCH_DTYPES.items())
names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    _, dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 4), max_size=3))
    numel = 1
    for dim in shape:
        numel *= dim
    size = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.frombuffer(bytearray(draw(st.binary(min_size=size, max_size=size))) or
                           bytearray(1), dtype=torch.uint8)[:size]
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


@st.composite
def valid_files(draw: st.DrawFn) -> bytes:
    state = draw(st.dictionaries(names.filter(lambda n: n != "__metadata__"), tensors(),
                                 max_size=4))
    metadata = draw(st.none() | st.dictionaries(names, st.text(max_size=8), max_size=2))
    if not state and metadata == {}:
        metadata = None  # save({}, metadata={}) writes invalid JSON (see the corpus)
    return save(state, metadata=metadata)


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack("<Q", blob[:8]) if len(blob) >= 8 else (0,)
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def join(header: dict[str, Any] | bytes, data: bytes) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


# --- JSON-level mutations --------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False,
                                                                       allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=3),
    max_leaves=6)
sizes = (st.integers(0, 64) | st.integers(-3, -1) | st.sampled_from([2**32, 2**63, 2**64 - 1,
                                                                      2**64, 2**70]))
dtype_names = st.sampled_from(["F32", "F16", "BF16", "U8", "I8", "BOOL", "F64", "I64", "C64",
                               "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "U16", "f32", "Q4", ""])


#: JSON text that Python and serde_json may read differently: placed verbatim into a header.
NUMBER_LITERALS = ["-0", "0.0", "1.0", "1E0", "1e400", "-1e400", "9" * 5000, "1" + "0" * 25,
                   "18446744073709551615", "18446744073709551616", "9223372036854775808",
                   "-9223372036854775809", "-1", "00", "+1", ".5", "1.", "0x10", "NaN",
                   "Infinity", "-Infinity"]
STRING_LITERALS = ['"\\ud800"', '"x\\udc00"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\u00e9"',
                   '"\\q"', '"tab\tin"', '"\\"']
VALUE_LITERALS = ["[" * 126 + "]" * 126, "[" * 125 + "]" * 125, "{}", "[]", "true", "null", "tru"]


def tensor_keys(header: dict[str, Any]) -> list[str]:
    return [k for k in header if k != "__metadata__"]


@st.composite
def literal(draw: st.DrawFn, raw: dict[str, str], pool: list[str]) -> str:
    """A placeholder string that ``render`` swaps for a literal drawn from ``pool``."""
    placeholder = f"@@literal{len(raw)}@@"
    raw[placeholder] = draw(st.sampled_from(pool))
    return placeholder


def render(header: dict[str, Any], raw: dict[str, str]) -> bytes:
    text = json.dumps(header)
    for placeholder, text_literal in raw.items():
        text = text.replace(json.dumps(placeholder), text_literal)
    return text.encode()


@st.composite
def json_mutation(draw: st.DrawFn, header: dict[str, Any], data_size: int,
                  raw: dict[str, str]) -> None:
    """Edit ``header`` in place, one structured change; verbatim JSON text goes into ``raw``."""
    keys = tensor_keys(header)
    numbers = sizes | literal(raw, NUMBER_LITERALS)
    anything = json_values | literal(raw, NUMBER_LITERALS + STRING_LITERALS + VALUE_LITERALS)
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "add_field", "add_tensor",
                                 "add_empty", "remove_tensor", "metadata", "replace_entry",
                                 "rename"]))
    if kind == "add_tensor" or not keys:
        header[draw(names)] = draw(st.fixed_dictionaries({
            "dtype": dtype_names, "shape": st.lists(numbers, max_size=3),
            "data_offsets": st.lists(numbers, min_size=2, max_size=2)}) | anything)
        return
    if kind == "add_empty":  # a 0 somewhere in the shape, placed at the end of the data
        shape = draw(st.lists(numbers, max_size=3))
        shape.insert(draw(st.integers(0, len(shape))), 0)
        header[draw(names)] = {"dtype": draw(dtype_names), "shape": shape,
                               "data_offsets": [data_size, data_size]}
        return
    if kind == "metadata":
        header["__metadata__"] = draw(anything | st.dictionaries(st.text(max_size=4), anything,
                                                                 max_size=2))
        return
    key = draw(st.sampled_from(keys))
    entry = header[key]
    if kind == "remove_tensor":
        del header[key]
    elif kind == "rename":
        header[draw(literal(raw, STRING_LITERALS) | names)] = header.pop(key)
    elif kind == "replace_entry" or not isinstance(entry, dict):
        header[key] = draw(anything)
    elif kind == "dtype":
        entry["dtype"] = draw(dtype_names | anything)
    elif kind == "shape":
        shape = entry.get("shape")
        shape = list(shape) if isinstance(shape, list) else []
        choice = draw(st.sampled_from(["set", "append", "pop", "other"]))
        if choice == "set" and shape:
            shape[draw(st.integers(0, len(shape) - 1))] = draw(numbers | anything)
        elif choice == "append":
            shape.append(draw(numbers))
        elif choice == "pop" and shape:
            shape.pop()
        else:
            shape = draw(anything)
        entry["shape"] = shape
    elif kind == "offsets":
        offsets = entry.get("data_offsets")
        ints = isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) for o in offsets)
        begin, end = offsets if ints else (0, 0)
        entry["data_offsets"] = draw(st.sampled_from([
            [end, begin], [begin + 1, end + 1], [begin, end + 1], [begin, end - 1],
            [begin - 1, end]]) | st.lists(numbers | anything, max_size=3))
    elif kind == "drop":
        entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
    else:
        entry[draw(st.text(max_size=6))] = draw(anything)


# --- byte-level mutations --------------------------------------------------------------------------

@st.composite
def byte_mutation(draw: st.DrawFn, blob: bytes) -> bytes:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "length"]))
    (n,) = struct.unpack("<Q", blob[:8]) if len(blob) >= 8 else (0,)
    # Half the damage lands in the header, where the parsing is.
    where = draw(st.integers(0, len(blob)) | st.integers(8, 8 + n))
    if kind == "flip" and blob:
        at = min(where, len(blob) - 1)
        return blob[:at] + bytes([blob[at] ^ draw(st.integers(1, 255))]) + blob[at + 1:]
    if kind == "truncate":
        return blob[:where]
    if kind == "insert":
        return blob[:where] + draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
            [b" ", b"\t", b"\x00", b"{", b"}", b'"', b"\\", b"\\ud800"])) + blob[where:]
    if kind == "delete":
        return blob[:where] + blob[where + draw(st.integers(1, 8)):]
    length = draw(st.integers(0, 2**64 - 1) | st.integers(max(0, n - 4), n + 4)
                  | st.sampled_from([100_000_000, 100_000_001]))
    return struct.pack("<Q", length) + blob[8:]


# --- the properties ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "model.safetensors"


@FUZZ
@given(blob=valid_files(), strategy=st.sampled_from(["stream", "mmap"]))
def test_valid_files_parse_as_safetensors_reads_them(scratch: Path, blob: bytes,
                                                     strategy: str) -> None:
    scratch.write_bytes(blob)
    assert isinstance(check_file(scratch, strategy), Header)


@FUZZ
@given(blob=valid_files(), data=st.data())
def test_json_mutations_raise_only_weightlift_errors(scratch: Path, blob: bytes,
                                                     data: st.DataObject) -> None:
    header, body = split(blob)
    raw: dict[str, str] = {}
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        data.draw(json_mutation(header, len(body), raw))
    scratch.write_bytes(join(render(header, raw), body))
    check_file(scratch)


@FUZZ
@given(blob=valid_files(), data=st.data())
def test_byte_mutations_raise_only_weightlift_errors(scratch: Path, blob: bytes,
                                                     data: st.DataObject) -> None:
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        blob = data.draw(byte_mutation(blob))
    scratch.write_bytes(blob)
    check_file(scratch)


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.safetensors")), ids=lambda p: p.stem)
def test_corpus_replays(path: Path) -> None:
    """Each saved input ends in a WeightliftError or a clean parse that matches safetensors."""
    result = check_file(path)
    assert isinstance(result, (Header, WeightliftError))


def test_corpus_is_not_empty() -> None:
    assert len(list(CORPUS.glob("*.safetensors"))) >= 5
