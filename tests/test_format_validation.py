"""Every header validation rule of ``weightlift.formats.safetensors``, one test each, against
hand-made bytes.

Each rejection asserts the exception type, that the message names the file (and the tensor, for a
tensor-level problem), and, where the ``safetensors`` package reads the same bytes, that it
rejects them too. Each accepted edge case asserts that ``safetensors`` sees the same tensors.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import _TYPES as SAFETENSORS_TORCH_DTYPES
from safetensors.torch import save

from weightlift.errors import FormatError
from weightlift.formats.records import DTYPES, Header
from weightlift.formats.safetensors import MAX_HEADER_BYTES, parse_header, read_header


def entry(dtype: str, shape: list[Any], offsets: list[Any], **extra: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets, **extra}


def safetensors_bytes(header: dict[str, Any] | bytes, data: bytes = b"") -> bytes:
    """A file image: ``header`` as JSON (or raw header bytes, as given) behind its length."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def write(tmp_path: Path, blob: bytes, name: str = "model.safetensors") -> Path:
    path = tmp_path / name
    path.write_bytes(blob)
    return path


def safetensors_view(path: Path) -> dict[str, tuple[str, list[int]]] | SafetensorError:
    """What the reference reads from ``path``: name → (dtype, shape), or the error it raised."""
    try:
        with safe_open(str(path), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}
    except SafetensorError as exc:
        return exc


def our_view(header: Header) -> dict[str, tuple[str, list[int]]]:
    return {t.name: (t.dtype.name, list(t.shape)) for t in header.tensors}


def assert_rejected(tmp_path: Path, blob: bytes, match: str, *, tensor: str | None = None,
                    oracle: bool = True) -> FormatError:
    """``read_header`` refuses ``blob`` with a FormatError naming the file (and ``tensor``)."""
    path = write(tmp_path, blob)
    with pytest.raises(FormatError, match=match) as info:
        read_header(path)
    err = info.value
    assert err.path == str(path)
    assert str(path) in str(err)
    if tensor is not None:
        assert err.tensor == tensor
        assert repr(tensor) in str(err)
    if oracle:
        assert isinstance(safetensors_view(path), SafetensorError), "safetensors accepts it"
    return err


def assert_accepted(tmp_path: Path, blob: bytes) -> Header:
    """``read_header`` accepts ``blob`` and sees what safetensors sees."""
    path = write(tmp_path, blob)
    header = read_header(path)
    assert our_view(header) == safetensors_view(path)
    return header


U8_ONE = {"a": entry("U8", [1], [0, 1])}


# --- the length prefix ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 7])
def test_file_shorter_than_the_length_field_is_rejected(tmp_path: Path, size: int) -> None:
    err = assert_rejected(tmp_path, b"\x02" + b"\0" * (size - 1) if size else b"",
                          "too short for the 8-byte header length")
    assert f"{size} bytes" in str(err)


def test_header_length_past_end_of_file_is_rejected(tmp_path: Path) -> None:
    blob = struct.pack("<Q", 3) + b"{}"
    assert_rejected(tmp_path, blob, "header length 3 runs past the end of the file \\(10 bytes\\)")


def test_header_length_over_100mb_is_rejected_without_allocating(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    import weightlift.formats.safetensors as fmt

    reads: list[int] = []
    real_pread = fmt.os.pread
    monkeypatch.setattr(fmt.os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    claimed = MAX_HEADER_BYTES + 1
    assert_rejected(tmp_path, struct.pack("<Q", claimed) + b"{}",
                    f"header length {claimed} exceeds the {MAX_HEADER_BYTES}-byte limit")
    assert reads == [8], "only the length field may be read"
    # The largest claimable length too (u64 max), and checked before "past end of file".
    assert_rejected(tmp_path, struct.pack("<Q", 2**64 - 1) + b"{}", "exceeds the")


def test_header_length_zero_is_rejected(tmp_path: Path) -> None:
    assert_rejected(tmp_path, struct.pack("<Q", 0), "too small for a JSON object")


def test_pure_parser_applies_the_length_rules(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="x.safetensors: header length 2 runs past the end"):
        parse_header(b"{}", file_size=9, path="x.safetensors")


# --- JSON -----------------------------------------------------------------------------------------

def test_header_not_utf8_is_rejected(tmp_path: Path) -> None:
    assert_rejected(tmp_path, safetensors_bytes(b'{"\xff": 1}'), "not valid UTF-8 \\(byte 2\\)")


def test_header_not_json_is_rejected(tmp_path: Path) -> None:
    assert_rejected(tmp_path, safetensors_bytes(b'{"a": '), "not valid JSON")


def test_utf8_byte_order_mark_is_rejected(tmp_path: Path) -> None:
    assert_rejected(tmp_path, safetensors_bytes(b"\xef\xbb\xbf{}"), "not valid JSON")


@pytest.mark.parametrize(("raw", "kind"), [(b"[]", "an array"), (b"[1, 2]", "an array"),
                                           (b"42", "a number"), (b'"hi"', "a string"),
                                           (b"null", "null"), (b"true", "a boolean")])
def test_header_not_an_object_is_rejected(tmp_path: Path, raw: bytes, kind: str) -> None:
    assert_rejected(tmp_path, safetensors_bytes(raw), f"header is {kind}, not a JSON object")


def test_duplicate_tensor_names_are_rejected_deliberately(tmp_path: Path) -> None:
    raw = b'{"a": %s, "a": %s}' % ((json.dumps(entry("U8", [1], [0, 1])).encode(),) * 2)
    assert_rejected(tmp_path, safetensors_bytes(raw, b"x"), "the key 'a' twice", oracle=False)
    # safetensors keeps the last one silently: the file means two things, so we refuse it.
    assert safetensors_view(tmp_path / "model.safetensors") == {"a": ("U8", [1])}


def test_duplicate_keys_inside_an_entry_are_rejected(tmp_path: Path) -> None:
    raw = b'{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    assert_rejected(tmp_path, safetensors_bytes(raw, b"x"), "the key 'dtype' twice")


@pytest.mark.parametrize("constant", [b"NaN", b"Infinity", b"-Infinity"])
def test_non_standard_json_constants_are_rejected(tmp_path: Path, constant: bytes) -> None:
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": %s}}' % constant
    assert_rejected(tmp_path, safetensors_bytes(raw, b"x"), "non-standard JSON constant")


def test_number_out_of_float_range_is_rejected(tmp_path: Path) -> None:
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1e400}}'
    assert_rejected(tmp_path, safetensors_bytes(raw, b"x"), "1e400, out of range")


def test_integer_with_thousands_of_digits_is_a_format_error(tmp_path: Path) -> None:
    # Python's int() refuses > 4300 digits with a ValueError; it must not escape as one.
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": %s}}' % (b"7" * 5000)
    err = assert_rejected(tmp_path, safetensors_bytes(raw, b"x"), "out of range")
    assert "5000 characters" in str(err)


def test_big_integer_in_an_extra_field_is_accepted(tmp_path: Path) -> None:
    raw = b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": %s}}' % (b"9" * 30)
    assert_accepted(tmp_path, safetensors_bytes(raw, b"x"))


@pytest.mark.parametrize("where", ["name", "metadata", "extra"])
def test_unpaired_surrogate_escape_is_rejected(tmp_path: Path, where: str) -> None:
    lone = "\\ud800"
    header = {"__metadata__": {"k": "v"}, "a": entry("U8", [1], [0, 1], x="y")}
    raw = json.dumps(header)
    raw = {"name": raw.replace('"a"', f'"{lone}"'), "metadata": raw.replace('"v"', f'"{lone}"'),
           "extra": raw.replace('"y"', f'"{lone}"')}[where]
    assert_rejected(tmp_path, safetensors_bytes(raw.encode(), b"x"), "unpaired UTF-16 surrogate")


def test_paired_surrogate_escape_is_accepted(tmp_path: Path) -> None:
    raw = b'{"\\ud83d\\ude00": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}'
    header = assert_accepted(tmp_path, safetensors_bytes(raw, b"x"))
    assert header.tensors[0].name == "\U0001f600"


def test_nesting_deeper_than_the_reference_limit_is_rejected(tmp_path: Path) -> None:
    def nested(depth: int) -> bytes:  # two levels (header, entry) + the extra field's arrays
        return b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": %s%s}}' % (
            b"[" * (depth - 2), b"]" * (depth - 2))

    assert_accepted(tmp_path, safetensors_bytes(nested(127), b"x"))
    assert_rejected(tmp_path, safetensors_bytes(nested(128), b"x"), "nested more than 127 levels")
    assert_rejected(tmp_path, safetensors_bytes(nested(100_000), b"x"), "nested")


# --- entries --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "kind"), [([], "an array"), (None, "null"), ("F32", "a string"),
                                             (3, "a number")])
def test_tensor_entry_not_an_object_is_rejected(tmp_path: Path, value: Any, kind: str) -> None:
    # safetensors also reads an entry given as an array ["U8", [1], [0, 1]]; we do not.
    assert_rejected(tmp_path, safetensors_bytes({"w": value}), f"entry is {kind}, not an object",
                    tensor="w", oracle=value != [])


@pytest.mark.parametrize("key", ["dtype", "shape", "data_offsets"])
def test_entry_missing_a_field_is_rejected(tmp_path: Path, key: str) -> None:
    item = entry("U8", [1], [0, 1])
    del item[key]
    assert_rejected(tmp_path, safetensors_bytes({"w": item}, b"x"), f"entry has no '{key}'",
                    tensor="w")


@pytest.mark.parametrize("dtype", ["F33", "u8", "float32", ""])
def test_unknown_dtype_is_rejected_and_named(tmp_path: Path, dtype: str) -> None:
    err = assert_rejected(tmp_path, safetensors_bytes({"w": entry(dtype, [1], [0, 1])}, b"x"),
                          f"unknown dtype {dtype!r}", tensor="w")
    assert "F32" in str(err) and "BF16" in str(err), "the message lists the known dtypes"


def test_dtype_not_a_string_is_rejected(tmp_path: Path) -> None:
    assert_rejected(tmp_path, safetensors_bytes({"w": entry(3, [1], [0, 1])}, b"x"),  # type: ignore[arg-type]
                    "dtype is a number, not a string", tensor="w")


def test_sub_byte_dtype_torch_lacks_is_rejected_deliberately(tmp_path: Path) -> None:
    # F6 packs 6-bit elements; torch has no element type for them, so we refuse.
    assert_rejected(tmp_path, safetensors_bytes({"w": entry("F6_E2M3", [4], [0, 3])}, b"xyz"),
                    "F6_E2M3 packs elements smaller than a byte", tensor="w", oracle=False)


def test_f4_with_an_odd_last_dimension_is_refused(tmp_path: Path) -> None:
    # torch holds F4 as float4_e2m1fn_x2, two elements per byte: an odd last dim has no shape.
    assert_rejected(tmp_path, safetensors_bytes({"w": entry("F4", [2, 3], [0, 3])}, b"xyz"),
                    "last dimension must be a multiple of 2", tensor="w", oracle=False)


@pytest.mark.parametrize("dim", [-1, 1.0, 2.5, True, "1", None, [1]])
def test_bad_shape_dimension_is_rejected(tmp_path: Path, dim: Any) -> None:
    blob = safetensors_bytes({"w": entry("U8", [dim], [0, 1])}, b"x")
    assert_rejected(tmp_path, blob, "not an integer in \\[0, 2\\*\\*64\\)", tensor="w")


def test_negative_zero_dimension_is_rejected_like_the_reference(tmp_path: Path) -> None:
    raw = b'{"w": {"dtype": "U8", "shape": [-0], "data_offsets": [0, 0]}}'
    assert_rejected(tmp_path, safetensors_bytes(raw), "not an integer", tensor="w")


def test_dimension_past_64_bits_is_rejected(tmp_path: Path) -> None:
    blob = safetensors_bytes({"w": entry("U8", [0, 2**64], [0, 0])})
    assert_rejected(tmp_path, blob, "not an integer in", tensor="w")


def test_shape_not_an_array_is_rejected(tmp_path: Path) -> None:
    assert_rejected(tmp_path, safetensors_bytes({"w": entry("U8", "1", [0, 1])}, b"x"),  # type: ignore[arg-type]
                    "shape is a string, not an array", tensor="w")


@pytest.mark.parametrize("shape", [[2**40, 2**40], [2**62, 4], [2**32, 2**32, 0], [2**64 - 1, 2]])
def test_shape_size_overflow_is_rejected(tmp_path: Path, shape: list[int]) -> None:
    # [2**32, 2**32, 0] holds no element, but the reference multiplies left to right and
    # overflows before it reaches the 0, so it refuses the file: so do we.
    blob = safetensors_bytes({"w": entry("F32", shape, [0, 0])})
    err = assert_rejected(tmp_path, blob, "overflows 64 bits", tensor="w")
    assert str(shape) in str(err)


def test_huge_dimensions_before_a_zero_are_accepted(tmp_path: Path) -> None:
    blob = safetensors_bytes({"w": entry("U8", [2**40, 2**20, 0], [0, 0])})
    header = assert_accepted(tmp_path, blob)
    assert header.tensors[0].numel == 0 and header.tensors[0].nbytes == 0


@pytest.mark.parametrize("shape", [[0, 2**40, 2**40], [0, 2**63], [2**64 - 1, 0]])
def test_empty_tensor_torch_cannot_hold_is_rejected_deliberately(tmp_path: Path,
                                                                  shape: list[int]) -> None:
    # Valid safetensors, but torch keeps sizes and strides in int64: torch.empty(shape) fails.
    blob = safetensors_bytes({"w": entry("U8", shape, [0, 0])})
    assert_rejected(tmp_path, blob, "cannot be a torch tensor", tensor="w", oracle=False)
    assert isinstance(safetensors_view(tmp_path / "model.safetensors"), dict)
    with pytest.raises((RuntimeError, TypeError)):
        torch.empty(shape, dtype=torch.uint8)


@pytest.mark.parametrize("offsets", [[0, 1.0], [0.0, 1], ["0", 1], [None, 1], [True, 1], [-1, 0]])
def test_offsets_not_integers_are_rejected(tmp_path: Path, offsets: list[Any]) -> None:
    blob = safetensors_bytes({"w": entry("U8", [1], offsets)}, b"x")
    assert_rejected(tmp_path, blob, "are not non-negative integers", tensor="w")


@pytest.mark.parametrize("offsets", [[0], [0, 1, 2], "0,1", {"0": 1}])
def test_offsets_not_a_pair_are_rejected(tmp_path: Path, offsets: Any) -> None:
    blob = safetensors_bytes({"w": entry("U8", [1], offsets)}, b"x")
    assert_rejected(tmp_path, blob, "is not an array of two integers", tensor="w")


def test_reversed_offsets_are_rejected(tmp_path: Path) -> None:
    blob = safetensors_bytes({"w": entry("U8", [0], [1, 0])}, b"x")
    assert_rejected(tmp_path, blob, "data_offsets \\[1, 0\\] end before they begin", tensor="w")


def test_offsets_past_the_data_section_are_rejected(tmp_path: Path) -> None:
    blob = safetensors_bytes({"w": entry("U8", [4], [0, 4])}, b"xx")
    assert_rejected(tmp_path, blob, "run past the end of the data section \\(2 bytes", tensor="w")


def test_truncated_data_section_is_rejected(tmp_path: Path) -> None:
    good = save({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(3)})
    err = assert_rejected(tmp_path, good[:-5], "the file may be truncated", tensor="b")
    assert "[24, 36]" in str(err) and "(31 bytes" in str(err)


@pytest.mark.parametrize(("dtype", "shape", "span"), [("F32", [2, 3], 20), ("U8", [0], 1),
                                                      ("BF16", [], 4), ("U8", [3], 2)])
def test_byte_size_not_numel_times_itemsize_is_rejected(tmp_path: Path, dtype: str,
                                                        shape: list[int], span: int) -> None:
    blob = safetensors_bytes({"w": entry(dtype, shape, [0, span])}, b"x" * span)
    needs = DTYPES[dtype].itemsize * (shape[0] * shape[1] if len(shape) == 2 else
                                      shape[0] if shape else 1)
    assert_rejected(tmp_path, blob,
                    re.escape(f"hold {span} bytes but shape {shape} of {dtype} needs {needs}"),
                    tensor="w")


def test_overlapping_tensors_are_rejected(tmp_path: Path) -> None:
    header = {"a": entry("U8", [4], [0, 4]), "b": entry("U8", [4], [2, 6])}
    err = assert_rejected(tmp_path, safetensors_bytes(header, b"x" * 6),
                          "overlap tensor 'a', which ends at 4", tensor="b")
    assert "[2, 6]" in str(err)


def test_aliased_tensors_are_rejected(tmp_path: Path) -> None:
    header = {"a": entry("U8", [4], [0, 4]), "b": entry("U8", [4], [0, 4])}
    assert_rejected(tmp_path, safetensors_bytes(header, b"x" * 4), "overlap tensor 'a'",
                    tensor="b")


def test_empty_tensor_inside_another_is_rejected(tmp_path: Path) -> None:
    header = {"a": entry("U8", [4], [0, 4]), "e": entry("U8", [0], [2, 2])}
    assert_rejected(tmp_path, safetensors_bytes(header, b"x" * 4), "overlap tensor 'a'", tensor="e")


def test_hole_between_tensors_is_rejected(tmp_path: Path) -> None:
    header = {"a": entry("U8", [2], [0, 2]), "b": entry("U8", [2], [3, 5])}
    assert_rejected(tmp_path, safetensors_bytes(header, b"x" * 5),
                    "leave a hole of 1 bytes after offset 2", tensor="b")


def test_hole_before_the_first_tensor_is_rejected(tmp_path: Path) -> None:
    header = {"a": entry("U8", [2], [8, 10])}
    assert_rejected(tmp_path, safetensors_bytes(header, b"x" * 10), "hole of 8 bytes after offset 0",
                    tensor="a")


def test_trailing_bytes_after_the_last_tensor_are_rejected(tmp_path: Path) -> None:
    good = save({"a": torch.zeros(4)})
    err = assert_rejected(tmp_path, good + b"\0" * 3,
                          "end at offset 16 but the data section holds 19 bytes")
    assert "the last 3 belong to no tensor" in str(err)


def test_data_bytes_with_no_tensors_are_rejected(tmp_path: Path) -> None:
    assert_rejected(tmp_path, safetensors_bytes({}, b"junk"), "the last 4 belong to no tensor")


# --- metadata -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "match"), [
    ({"k": 1}, "__metadata__\\['k'\\] is a number, not a string"),
    ({"k": None}, "__metadata__\\['k'\\] is null, not a string"),
    ({"k": {"n": "v"}}, "__metadata__\\['k'\\] is an object, not a string"),
    ({"k": ["v"]}, "__metadata__\\['k'\\] is an array"),
    ("format=pt", "__metadata__ is a string, not an object of strings"),
    ([], "__metadata__ is an array, not an object of strings"),
])
def test_metadata_not_strings_is_rejected(tmp_path: Path, value: Any, match: str) -> None:
    assert_rejected(tmp_path, safetensors_bytes({"__metadata__": value, **U8_ONE}, b"x"), match)


# --- valid edge cases -----------------------------------------------------------------------------

@pytest.mark.parametrize("padding", [b" ", b"        ", b"\t\n\r "])
def test_whitespace_after_the_json_is_accepted(tmp_path: Path, padding: bytes) -> None:
    raw = json.dumps(U8_ONE).encode() + padding
    header = assert_accepted(tmp_path, safetensors_bytes(raw, b"x"))
    assert header.data_start == 8 + len(raw)
    assert header.tensors[0].start == header.data_start


def test_nul_padding_after_the_json_is_rejected(tmp_path: Path) -> None:
    raw = json.dumps(U8_ONE).encode() + b"\0\0"
    assert_rejected(tmp_path, safetensors_bytes(raw, b"x"), "not valid JSON")


def test_whitespace_before_the_json_is_accepted(tmp_path: Path) -> None:
    assert_accepted(tmp_path, safetensors_bytes(b"  " + json.dumps(U8_ONE).encode(), b"x"))


def test_null_metadata_is_accepted(tmp_path: Path) -> None:
    header = assert_accepted(tmp_path, safetensors_bytes({"__metadata__": None, **U8_ONE}, b"x"))
    assert header.metadata is None


def test_metadata_is_kept(tmp_path: Path) -> None:
    header = assert_accepted(tmp_path, save({"a": torch.zeros(1)}, metadata={"format": "pt"}))
    assert header.metadata == {"format": "pt"}


def test_empty_header_is_accepted(tmp_path: Path) -> None:
    header = assert_accepted(tmp_path, safetensors_bytes({}))
    assert header.tensors == () and header.data_size == 0 and header.metadata is None


def test_scalars_are_accepted(tmp_path: Path) -> None:
    blob = save({"s": torch.tensor(1.5, dtype=torch.float64), "t": torch.tensor(7, dtype=torch.int8)})
    header = assert_accepted(tmp_path, blob)
    s = header.by_name()["s"]
    assert s.shape == () and s.numel == 1 and s.nbytes == 8


def test_empty_tensors_are_accepted(tmp_path: Path) -> None:
    blob = save({"e": torch.zeros(3, 0, 2), "f": torch.zeros(0, dtype=torch.int64),
                 "a": torch.ones(2, dtype=torch.uint8)})
    header = assert_accepted(tmp_path, blob)
    e = header.by_name()["e"]
    assert e.shape == (3, 0, 2) and e.nbytes == 0 and e.numel == 0


def test_empty_tensor_at_the_end_of_the_data_is_accepted(tmp_path: Path) -> None:
    header = {"a": entry("U8", [1], [0, 1]), "b": entry("U8", [0], [1, 1])}
    assert_accepted(tmp_path, safetensors_bytes(header, b"x"))


def test_extra_fields_in_an_entry_are_accepted(tmp_path: Path) -> None:
    header = {"a": entry("U8", [1], [0, 1], note="hi", more={"n": [1, 2.5, None]})}
    assert_accepted(tmp_path, safetensors_bytes(header, b"x"))


def test_empty_tensor_name_is_accepted(tmp_path: Path) -> None:
    assert_accepted(tmp_path, safetensors_bytes({"": entry("U8", [1], [0, 1])}, b"x"))


def test_every_dtype_reads_as_safetensors_writes_it(tmp_path: Path) -> None:
    tensors = {name: torch.zeros(2, 3, dtype=d.torch) for name, d in DTYPES.items()
               if name in SAFETENSORS_TORCH_DTYPES}
    assert len(tensors) >= 17
    header = assert_accepted(tmp_path, save(tensors))
    for name, info in header.by_name().items():
        assert info.dtype.name == name
        assert info.nbytes == 6 * info.dtype.itemsize


def test_offsets_are_absolute_and_in_file_order(tmp_path: Path) -> None:
    header = {"z": entry("U8", [2], [0, 2]), "a": entry("I16", [3], [2, 8])}
    raw = json.dumps(header).encode()
    parsed = assert_accepted(tmp_path, safetensors_bytes(raw, bytes(8)))
    assert [(t.name, t.start, t.end) for t in parsed.tensors] == [
        ("z", 8 + len(raw), 10 + len(raw)), ("a", 10 + len(raw), 16 + len(raw))]


def test_e8m0_which_safetensors_torch_cannot_build_is_read(tmp_path: Path) -> None:
    header = assert_accepted(tmp_path, safetensors_bytes({"s": entry("F8_E8M0", [3], [0, 3])},
                                                         b"\x7f\x80\x81"))
    assert header.tensors[0].dtype.torch == torch.float8_e8m0fnu
