"""Every GGUF validation rule, one test each, on hand-made bytes; then random mutations of valid
files. Anchored on llama.cpp's ``gguf.cpp`` checks and its past parser vulnerabilities: every
error is a ``FormatError`` naming the file, the key or tensor and the offset, and no count the file
claims sizes an allocation."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightlift
from weightlift.errors import FormatError
from weightlift.formats.gguf import parse_gguf

PATH = "hostile.gguf"
U32, STRING, ARRAY = 4, 8, 9


def s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def u32_kv(key: str, value: int) -> bytes:
    return kv(key, U32, struct.pack("<I", value))


def tinfo(name: str, ne: list[int], ggml: int = 0, offset: int = 0) -> bytes:
    return (s(name) + struct.pack("<I", len(ne)) + struct.pack(f"<{len(ne)}Q", *ne)
            + struct.pack("<II", ggml, 0)[:4] + struct.pack("<Q", offset))


def build(kvs: list[bytes] = (), infos: list[bytes] = (), data: bytes = b"", *,
          version: int = 3, n_tensors: int | None = None, n_kv: int | None = None,
          alignment: int = 32, magic: bytes = b"GGUF") -> bytes:
    head = magic + struct.pack("<IQQ", version, len(infos) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    head += b"\0" * (-len(head) % alignment)
    return head + data


def parse(raw: bytes):  # noqa: ANN201 - a Header
    return parse_gguf(raw, file_size=len(raw), path=PATH)


def refused(raw: bytes, *fragments: str) -> FormatError:
    with pytest.raises(FormatError) as info:
        parse(raw)
    message = str(info.value)
    assert message.startswith(PATH + ":"), message
    for fragment in fragments:
        assert fragment in message, message
    return info.value


def test_a_valid_hand_made_file_parses() -> None:
    data = np.arange(8, dtype=np.float32).tobytes()
    header = parse(build([u32_kv("k", 1)], [tinfo("t", [8])], data))
    (t,) = header.tensors
    assert (t.name, t.shape, t.end - t.start) == ("t", (8,), 32)
    assert header.metadata["k"] == 1


def test_version_2_parses() -> None:
    header = parse(build([u32_kv("k", 1)], [tinfo("t", [8])], b"\0" * 32, version=2))
    assert [t.name for t in header.tensors] == ["t"]


def test_bad_magic() -> None:
    refused(build(magic=b"GGML"), "bad magic", "offset 0")


def test_version_1_is_refused_clearly() -> None:
    refused(build(version=1), "version 1", "not supported")


def test_unknown_version() -> None:
    refused(build(version=4), "unsupported GGUF version 4", "offset 4")


def test_big_endian_is_detected() -> None:
    raw = b"GGUF" + struct.pack(">IQQ", 3, 0, 0)
    refused(raw, "big-endian")


def test_truncated_header() -> None:
    refused(build()[:10], "file ends at 10")


def test_tensor_count_that_cannot_fit() -> None:
    refused(build(n_tensors=2**40), "tensor count 1099511627776", "offset 8")


def test_metadata_count_that_cannot_fit() -> None:
    refused(build(n_kv=2**62), "metadata count", "offset 16")


def test_key_length_beyond_the_file() -> None:
    raw = build(n_kv=1, alignment=1) + struct.pack("<Q", 2**63) + b"abcdefgh"
    refused(raw, "metadata key #0", "claims 9223372036854775808 bytes")


def test_string_value_length_beyond_the_file() -> None:
    raw = build([s("k") + struct.pack("<IQ", STRING, 1000) + b"xy"])
    refused(raw, "'k'", "claims 1000 bytes")


def test_array_length_beyond_the_file() -> None:
    raw = build([kv("arr", ARRAY, struct.pack("<IQ", U32, 2**61))])
    refused(raw, "'arr'", "claims 2305843009213693952 elements")


def test_string_array_element_beyond_the_file() -> None:
    raw = build([kv("toks", ARRAY, struct.pack("<IQ", STRING, 2) + s("a") +
                    struct.pack("<Q", 10**9))])
    refused(raw, "'toks'", "claims 1000000000 bytes")


def test_arrays_nested_too_deep() -> None:
    payload = struct.pack("<IQ", ARRAY, 1) * 20 + struct.pack("<IQ", U32, 0)
    refused(build([kv("deep", ARRAY, payload)]), "'deep'", "nests arrays more than 8 deep")


def test_unknown_value_type() -> None:
    refused(build([kv("k", 13, b"\0" * 8)]), "'k'", "unknown value type 13")


def test_unknown_array_element_type() -> None:
    refused(build([kv("k", ARRAY, struct.pack("<IQ", 99, 1))]), "'k'", "unknown type 99")


def test_duplicate_key() -> None:
    refused(build([u32_kv("k", 1), u32_kv("k", 2)]), "'k'", "appears twice")


def test_key_not_utf8() -> None:
    refused(build([s(b"\xff\xfe") + struct.pack("<II", U32, 0)]), "not valid UTF-8")


@pytest.mark.parametrize("value", [0, 3, 48])
def test_alignment_not_a_power_of_two(value: int) -> None:
    refused(build([u32_kv("general.alignment", value)]), "general.alignment", f"is {value}")


def test_alignment_of_the_wrong_type() -> None:
    raw = build([kv("general.alignment", 10, struct.pack("<Q", 32))])
    refused(raw, "general.alignment", "not UINT32")


def test_unknown_ggml_type() -> None:
    refused(build([], [tinfo("t", [32], ggml=4)], b"\0" * 64), "tensor 't'", "GGML type 4")


def test_more_than_four_dims() -> None:
    refused(build([], [tinfo("t", [1] * 5)], b"\0" * 32), "tensor 't'", "5 dimensions")


def test_dims_whose_product_overflows() -> None:
    refused(build([], [tinfo("t", [2**32, 2**32])]), "tensor 't'", "overflow int64")


def test_negative_dim() -> None:
    refused(build([], [tinfo("t", [2**64 - 1])]), "tensor 't'", "overflow int64")


def test_row_not_a_multiple_of_the_block_size() -> None:
    refused(build([], [tinfo("t", [33, 2], ggml=8)], b"\0" * 256), "tensor 't'",
            "not a multiple of Q8_0's block size 32")


def test_offset_not_aligned() -> None:
    refused(build([], [tinfo("t", [4], offset=4)], b"\0" * 64), "tensor 't'",
            "offset 4 is not a multiple of the alignment 32")


def test_overlapping_tensors() -> None:
    infos = [tinfo("a", [16]), tinfo("b", [8], offset=32)]
    refused(build([], infos, b"\0" * 64), "tensor 'b'", "overlaps tensor 'a'")


def test_data_past_the_end() -> None:
    refused(build([], [tinfo("t", [64])], b"\0" * 100), "tensor 't'", "runs past the end")


def test_offset_far_past_the_end() -> None:
    refused(build([], [tinfo("t", [1], offset=2**64 - 32)], b"\0" * 32), "tensor 't'",
            "past the end")


def test_duplicate_tensor_names() -> None:
    infos = [tinfo("t", [8]), tinfo("t", [8], offset=32)]
    refused(build([], infos, b"\0" * 64), "tensor 't'", "repeats the name")


def test_load_reports_the_file_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(build(version=7))
    with pytest.raises(FormatError, match=f"^{path}: unsupported GGUF version 7"):
        weightlift.load(path)


def test_a_file_named_gguf_without_the_magic(tmp_path: Path) -> None:
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"\x08\0\0\0\0\0\0\0{}      ")
    with pytest.raises(FormatError, match="bad magic"):
        weightlift.load(path)


def _valid_file() -> bytes:
    kvs = [u32_kv("general.alignment", 32), kv("name", STRING, s("tiny")),
           kv("toks", ARRAY, struct.pack("<IQ", STRING, 3) + s("a") + s("bc") + s("")),
           kv("ids", ARRAY, struct.pack("<IQ", U32, 2) + struct.pack("<II", 5, 6)),
           kv("nest", ARRAY, struct.pack("<IQ", ARRAY, 1) + struct.pack("<IQ", U32, 1) +
              struct.pack("<I", 7))]
    infos = [tinfo("a", [8]), tinfo("q", [32, 2], ggml=8, offset=32)]
    return build(kvs, infos, b"\1" * (32 + 68))


VALID = _valid_file()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1,
                max_size=6),
       st.integers(0, len(VALID)))
def test_mutations_parse_or_raise_format_error(edits: list[tuple[int, int]], cut: int) -> None:
    raw = bytearray(VALID)
    for position, value in edits:
        raw[position] = value
    for candidate in (bytes(raw), bytes(raw[:cut])):
        try:
            header = parse(candidate)
        except FormatError as exc:
            assert str(exc).startswith(PATH + ":")
            continue
        for t in header.tensors:
            assert 0 <= t.start <= t.end <= len(candidate)
        list(header.metadata.items())  # every value decodes


@settings(max_examples=150, deadline=None)
@given(st.integers(0, 200), st.sampled_from([0, 1, 2**32 - 1, 2**63, 2**64 - 1, 64]))
def test_huge_counts_anywhere_are_refused_without_allocating(position: int, value: int) -> None:
    raw = bytearray(VALID)
    position = min(position, len(raw) - 8)
    raw[position:position + 8] = struct.pack("<Q", value)
    try:
        parse(bytes(raw))
    except FormatError:
        pass
