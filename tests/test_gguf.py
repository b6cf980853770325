"""GGUF files written by gguf-py's ``GGUFWriter`` load byte for byte as ``GGUFReader`` sees them,
through every strategy, ``stream()``, the budget, the report, progress and the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter

import weightlift
from weightlift.cli import main as cli_main
from weightlift.errors import CheckpointError, FormatError

STRATEGIES = ["mmap", "direct", "stream", "auto"]


def write_gguf(path: Path, tensors: list[tuple[str, np.ndarray, Q | None]],
               kv: Callable[[GGUFWriter], None] | None = None, alignment: int | None = None,
               split_max_tensors: int = 0) -> Path:
    writer = GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    if kv is not None:
        kv(writer)
    for name, data, raw in tensors:
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_blocks(rng: np.random.Generator, qtype: Q, rows: int, row_elements: int
                  ) -> np.ndarray:
    """Random packed rows of ``qtype`` (any bytes are a valid layout for packed loading)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 256, (rows, row_elements // block * size), dtype=np.uint8)


def mixed_tensors(seed: int = 0) -> list[tuple[str, np.ndarray, Q | None]]:
    rng = np.random.default_rng(seed)
    floats = rng.standard_normal((8, 256)).astype(np.float32)
    return [
        ("norm.weight", rng.standard_normal(64).astype(np.float32), None),
        ("f16", rng.standard_normal((3, 5, 32)).astype(np.float16), None),
        ("f64", rng.standard_normal((4, 2)), None),
        ("i8", rng.integers(-128, 127, (7,), dtype=np.int8), None),
        ("i16", rng.integers(-9999, 9999, (2, 3), dtype=np.int16), None),
        ("i32", rng.integers(-2**31, 2**31 - 1, (5,), dtype=np.int32), None),
        ("i64", rng.integers(-2**62, 2**62, (1, 1, 3), dtype=np.int64), None),
        ("bf16", gguf.quants.quantize(floats, Q.BF16), Q.BF16),
        ("q4_0", gguf.quants.quantize(floats, Q.Q4_0), Q.Q4_0),
        ("q4_1", gguf.quants.quantize(floats, Q.Q4_1), Q.Q4_1),
        ("q5_0", gguf.quants.quantize(floats, Q.Q5_0), Q.Q5_0),
        ("q5_1", gguf.quants.quantize(floats, Q.Q5_1), Q.Q5_1),
        ("q8_0", gguf.quants.quantize(floats[:3], Q.Q8_0), Q.Q8_0),
        ("big.q8_0", gguf.quants.quantize(rng.standard_normal((96, 4096)).astype(np.float32),
                                          Q.Q8_0), Q.Q8_0),  # > 1 MiB: a block of its own
        ("q4_k", random_blocks(rng, Q.Q4_K, 4, 512), Q.Q4_K),
        ("q6_k", random_blocks(rng, Q.Q6_K, 2, 256), Q.Q6_K),
        ("q2_k", random_blocks(rng, Q.Q2_K, 1, 256), Q.Q2_K),
        ("q3_k", random_blocks(rng, Q.Q3_K, 3, 256), Q.Q3_K),
        ("q5_k", random_blocks(rng, Q.Q5_K, 2, 768), Q.Q5_K),
        ("iq4_nl", random_blocks(rng, Q.IQ4_NL, 2, 64), Q.IQ4_NL),
        ("iq4_xs", random_blocks(rng, Q.IQ4_XS, 2, 256), Q.IQ4_XS),
        ("iq2_xxs", random_blocks(rng, Q.IQ2_XXS, 1, 256), Q.IQ2_XXS),
        ("mxfp4", random_blocks(rng, Q.MXFP4, 2, 64), Q.MXFP4),
        ("tq2_0", random_blocks(rng, Q.TQ2_0, 1, 256), Q.TQ2_0),
        ("experts.q4_k", random_blocks(rng, Q.Q4_K, 12, 256).reshape(3, 4, 144), Q.Q4_K),
    ]


def assert_matches_reader(loaded: dict[str, torch.Tensor], *paths: Path) -> None:
    """Every tensor has GGUFReader's shape and bytes; quantized ones are uint8."""
    expected = {}
    for path in paths:
        for t in GGUFReader(path).tensors:
            expected[t.name] = (t, np.ascontiguousarray(t.data))
    assert sorted(loaded) == sorted(expected)
    for name, (info, data) in expected.items():
        got = loaded[name]
        if info.tensor_type == Q.BF16:  # gguf-py has no bfloat16: it shows the bytes
            assert got.dtype == torch.bfloat16, name
            assert tuple(got.shape) == (*data.shape[:-1], data.shape[-1] // 2), name
        else:
            assert tuple(got.shape) == data.shape, name
        if info.tensor_type in (Q.F32, Q.F16, Q.F64, Q.I8, Q.I16, Q.I32, Q.I64):
            assert got.dtype == torch.from_numpy(data.copy()).dtype, name
        elif info.tensor_type != Q.BF16:
            assert got.dtype == torch.uint8, name
        assert got.contiguous().view(torch.uint8).numpy().tobytes() == data.tobytes(), name


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "mixed.gguf", mixed_tensors())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_type_loads_as_gguf_py_reads_it(mixed: Path, strategy: str) -> None:
    assert_matches_reader(weightlift.load(mixed, strategy=strategy), mixed)


@pytest.mark.parametrize("strategy", ["direct", "stream"])
def test_stream_yields_every_tensor_within_the_budget(mixed: Path, strategy: str) -> None:
    reports: list[weightlift.LoadReport] = []
    got = {name: t.clone() for name, t in weightlift.stream(
        mixed, strategy=strategy, max_host_memory="4MiB", on_report=reports.append)}
    assert_matches_reader(got, mixed)
    assert reports[0].tensors == len(got)
    assert reports[0].bytes == sum(t.nbytes for t in got.values())


def test_progress_counts_every_byte(mixed: Path) -> None:
    seen: list[tuple[int, int]] = []
    state = weightlift.load(mixed, on_progress=lambda done, total: seen.append((done, total)))
    total = sum(t.nbytes for t in state.values())
    assert seen[-1] == (total, total)


def test_keys_select_tensors_and_open_describes_them(mixed: Path) -> None:
    state = weightlift.load(mixed, keys=["q4_k", "norm.weight"])
    assert sorted(state) == ["norm.weight", "q4_k"]
    with weightlift.open(mixed) as ckpt:
        info = ckpt.info("q4_k")
        assert (info.dtype, info.shape, info.ggml_type, info.ggml_shape) == \
            ("U8", (4, 288), "Q4_K", (4, 512))
        reader = {t.name: t for t in GGUFReader(mixed).tensors}
        assert info.offset == reader["q4_k"].data_offset
        kind = ckpt.ggml_type("experts.q4_k")
        assert kind is not None and (kind.id, kind.block_size, kind.type_size) == (12, 256, 144)
        assert ckpt.info("f16").ggml_shape == (3, 5, 32)
        assert ckpt.info("f16").ggml_type == "F16"
        assert torch.equal(ckpt.get_tensor("f16"), torch.from_numpy(
            np.array(reader["f16"].data)))


def test_every_metadata_value_type(tmp_path: Path) -> None:
    def kv(w: GGUFWriter) -> None:
        w.add_uint8("v.u8", 255)
        w.add_int8("v.i8", -128)
        w.add_uint16("v.u16", 65535)
        w.add_int16("v.i16", -32768)
        w.add_uint32("v.u32", 2**32 - 1)
        w.add_int32("v.i32", -2**31)
        w.add_float32("v.f32", 0.1)
        w.add_uint64("v.u64", 2**64 - 1)
        w.add_int64("v.i64", -2**63)
        w.add_float64("v.f64", 1e300)
        w.add_bool("v.bool", True)
        w.add_string("v.str", "héllo, wörld ✓")
        w.add_string("v.empty", "")
        w.add_array("v.ints", [1, -2, 3])
        w.add_array("v.floats", [0.5, 1.5])
        w.add_array("v.bools", [True, False, True])
        w.add_array("v.strs", ["a", "", "ünï", "x" * 300])
        w.add_array("v.nested", [[1, 2], [3], [4, 5, 6]])
        w.add_array("v.nested_strs", [["a", "b"], ["c"]])
        w.add_key_value("v.u8s", [1, 2, 250], gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT8)
        w.add_key_value("v.u64s", [2**64 - 1, 0], gguf.GGUFValueType.ARRAY,
                        gguf.GGUFValueType.UINT64)

    path = write_gguf(tmp_path / "meta.gguf", [("t", np.ones(4, np.float32), None)], kv)
    reader = GGUFReader(path)
    with weightlift.open(path) as ckpt:
        meta = ckpt.metadata()
        assert meta is not None
        assert list(meta) == [k for k in reader.fields if not k.startswith("GGUF.")]
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key.startswith("v.nested"):
                continue  # gguf-py's contents() flattens nested arrays
            assert meta[key] == field.contents(), key
        assert meta["v.nested"] == [[1, 2], [3], [4, 5, 6]]
        assert meta["v.nested_strs"] == [["a", "b"], ["c"]]
        assert meta["v.f32"] == np.float32(0.1)
        assert meta.value_type("v.nested") == "ARRAY[ARRAY[INT32]]"
        assert meta.value_type("v.u64s") == "ARRAY[UINT64]"


def test_a_150k_token_vocabulary_is_not_decoded_until_read(tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(150_000)]

    def kv(w: GGUFWriter) -> None:
        w.add_array("tokenizer.ggml.tokens", tokens)

    path = write_gguf(tmp_path / "vocab.gguf", [("t", np.ones(4, np.float32), None)], kv)
    with weightlift.open(path) as ckpt:
        meta = ckpt.metadata()
        assert meta is not None
        raw = meta._values["tokenizer.ggml.tokens"]  # type: ignore[attr-defined]
        assert isinstance(raw, gguf_array())  # still packed bytes, no str objects
        assert meta.describe("tokenizer.ggml.tokens") == "[150000 × STRING]"
        assert meta["tokenizer.ggml.tokens"] == tokens


def gguf_array() -> type:
    from weightlift.formats.gguf import GGUFArray
    return GGUFArray


@pytest.mark.parametrize("alignment", [64, 4096, 1])
def test_custom_alignment(tmp_path: Path, alignment: int) -> None:
    path = write_gguf(tmp_path / "aligned.gguf", mixed_tensors(1)[:6], alignment=alignment)
    for strategy in ("direct", "mmap"):
        assert_matches_reader(weightlift.load(path, strategy=strategy), path)


def test_split_set_loads_as_one_checkpoint(tmp_path: Path) -> None:
    tensors = mixed_tensors(2)[:7]
    write_gguf(tmp_path / "model.gguf", tensors, split_max_tensors=3,
               kv=lambda w: w.add_uint32("llama.block_count", 2))
    parts = sorted(tmp_path.glob("*.gguf"))
    assert [p.name for p in parts] == [f"model-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    for source in (parts[0], parts[2], tmp_path):
        state = weightlift.load(source, strategy="stream")
        assert_matches_reader(state, *parts)
    with weightlift.open(parts[1]) as ckpt:
        meta = ckpt.metadata()
        assert meta is not None and meta["llama.block_count"] == 2
        assert meta["split.count"] == 3


def test_split_set_with_a_missing_part_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "model.gguf", mixed_tensors(3)[:4], split_max_tensors=2)
    (tmp_path / "model-00002-of-00002.gguf").unlink()
    with pytest.raises(CheckpointError, match="lacks model-00002-of-00002.gguf"):
        weightlift.load(tmp_path / "model-00001-of-00002.gguf")


def test_split_set_with_a_mismatched_part_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "a.gguf", mixed_tensors(3)[:4], split_max_tensors=2)
    write_gguf(tmp_path / "b.gguf", mixed_tensors(3)[:6], split_max_tensors=2)  # 3 parts
    (tmp_path / "b-00002-of-00003.gguf").replace(tmp_path / "a-00002-of-00002.gguf")
    with pytest.raises(FormatError, match="split set of 3 files"):
        weightlift.load(tmp_path / "a-00001-of-00002.gguf")


def test_renamed_part_of_a_split_set_is_refused(tmp_path: Path) -> None:
    write_gguf(tmp_path / "m.gguf", mixed_tensors(3)[:4], split_max_tensors=2)
    (tmp_path / "m-00001-of-00002.gguf").replace(tmp_path / "renamed.gguf")
    with pytest.raises(CheckpointError, match="one part of a split set of 2"):
        weightlift.load(tmp_path / "renamed.gguf")


def test_directory_with_one_gguf_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "only.gguf", mixed_tensors(4)[:3])
    assert_matches_reader(weightlift.load(tmp_path), path)
    write_gguf(tmp_path / "other.gguf", mixed_tensors(4)[:3])
    with pytest.raises(CheckpointError, match="several GGUF checkpoints"):
        weightlift.load(tmp_path)


def test_cli_info_and_load(mixed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["info", str(mixed), "--json", "--tensors"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf"
    assert info["tensors"] == len(GGUFReader(mixed).tensors)
    assert info["dtypes"]["Q4_K"]["tensors"] == 2
    assert info["metadata"]["general.architecture"] == "llama"
    listed = {t["name"]: t for t in info["tensor_list"]}
    assert listed["q4_k"]["ggml_shape"] == [4, 512]
    assert cli_main(["info", str(mixed)]) == 0
    assert "Q4_K" in capsys.readouterr().out
    assert cli_main(["load", str(mixed), "--strategy", "stream", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tensors"] == len(GGUFReader(mixed).tensors)


def test_hub_cache_entries_with_a_gguf_split_set(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from test_hub import add_snapshot

    files = tmp_path / "files"
    files.mkdir()
    write_gguf(files / "q.gguf", mixed_tensors(5)[:5], split_max_tensors=2)
    cache = tmp_path / "hub"
    repo_dir = add_snapshot(cache, "org/tiny-gguf", files, "c" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    parts = sorted(files.glob("*.gguf"))
    for source in ("hf://org/tiny-gguf", "hf://org/tiny-gguf/q-00002-of-00003.gguf", repo_dir):
        assert_matches_reader(weightlift.load(source), *parts)


def test_a_big_endian_file_from_gguf_py_is_refused(tmp_path: Path) -> None:
    writer = GGUFWriter(tmp_path / "be.gguf", "llama", endianess=gguf.GGUFEndian.BIG)
    writer.add_tensor("t", np.ones(8, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(FormatError, match="big-endian GGUF file"):
        weightlift.load(tmp_path / "be.gguf")
