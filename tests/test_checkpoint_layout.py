"""``checkpoint.resolve``: every kind of source, and every broken layout refused by name.

Sharded checkpoints come from transformers' own ``save_pretrained``; the broken ones are those
checkpoints edited the way a bad upload or a hostile index would be.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift

from weightlift.errors import CheckpointError, CheckpointWarning, FormatError
from weightlift.sources import resolve
from weightlift.sources.descriptors import POOL
from weightlift.sources.records import Layout, iter_entries

from test_format_validation import safetensors_view as reference_view

INDEX = "model.safetensors.index.json"


def safetensors_view(path: Path) -> dict[str, tuple[str, list[int]]]:
    view = reference_view(path)
    assert isinstance(view, dict), view
    return view


def layout_view(layout: Layout) -> dict[str, tuple[str, list[int]]]:
    return {name: (e.info.dtype.name, list(e.info.shape)) for name, e in layout.entries.items()}


def shard_of(layout: Layout) -> dict[str, str]:
    """tensor → file name of the shard the layout found it in."""
    return {name: Path(layout.shards[e.shard].path).name for name, e in layout.entries.items()}


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_descriptor_leak() -> Iterator[None]:
    """Every test resolves inside ``with`` or fails to resolve: either way nothing stays open."""
    before = open_fds()
    yield
    assert open_fds() <= before, "resolve leaked a file descriptor"


def write_file(path: Path, names: list[str], seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file({n: torch.randn(2, 3, generator=gen) for n in names}, str(path),
              metadata={"format": "pt"})
    return path


@pytest.fixture
def sharded(llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of conftest's transformers-written Llama checkpoint, for a test to break."""
    return Path(shutil.copytree(llama_dir, tmp_path / "ckpt"))


def edit_index(directory: Path, change) -> Path:  # type: ignore[no-untyped-def]
    index = directory / INDEX
    obj = json.loads(index.read_text())
    change(obj)
    index.write_text(json.dumps(obj))
    return index


def assert_refused(source: object, error: type[Exception], match: str, names: Path | str) -> str:
    with pytest.raises(error, match=match) as info:
        resolve(source)  # type: ignore[arg-type]
    assert str(names) in str(info.value), f"the message does not name {names}"
    return str(info.value)


# --- sources that resolve -------------------------------------------------------------------------

def test_single_file(tmp_path: Path) -> None:
    path = write_file(tmp_path / "weights.safetensors", ["a", "b"])
    with resolve(path) as layout:
        assert [s.path for s in layout.shards] == [str(path)]
        assert layout_view(layout) == safetensors_view(path)
        assert layout.metadata == {"format": "pt"}
        assert layout.index_path is None and layout.root == str(tmp_path)
        assert layout.total_bytes == 2 * 24
    assert all(s.closed and not POOL.has_open(s) for s in layout.shards), \
        "leaving the context closes the files"


def test_list_of_files(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    first = write_file(tmp_path / "x" / "one.safetensors", ["a", "b"])
    second = write_file(tmp_path / "two.safetensors", ["c"], seed=1)
    with resolve([first, str(second)]) as layout:
        assert [s.path for s in layout.shards] == [str(first), str(second)]
        assert shard_of(layout) == {"a": "one.safetensors", "b": "one.safetensors",
                                    "c": "two.safetensors"}
        assert layout_view(layout) == {**safetensors_view(first), **safetensors_view(second)}
        assert layout.root == str(tmp_path)


def test_directory_with_model_safetensors(tmp_path: Path) -> None:
    path = write_file(tmp_path / "model.safetensors", ["w"])
    write_file(tmp_path / "adapter.safetensors", ["w"], seed=2)  # another file is not a shard
    with resolve(tmp_path) as layout:
        assert [s.path for s in layout.shards] == [str(path)]
        assert layout_view(layout) == safetensors_view(path)


def test_hf_sharded_directory_matches_its_index(llama_dir: Path) -> None:
    index = json.loads((llama_dir / INDEX).read_text())
    shards = sorted(llama_dir.glob("*.safetensors"))
    assert len(shards) > 2, "max_shard_size should have split the model"
    with resolve(llama_dir) as layout:
        assert layout.index_path == str(llama_dir / INDEX)
        assert shard_of(layout) == index["weight_map"]
        expected: dict[str, tuple[str, list[int]]] = {}
        for shard in shards:
            expected.update(safetensors_view(shard))
        assert layout_view(layout) == expected
        assert layout.total_bytes == index["metadata"]["total_size"]
        assert layout.metadata is not None
        assert layout.metadata["total_size"] == str(index["metadata"]["total_size"])
        order = [(e.shard, e.info.start) for e in iter_entries(layout)]
        assert order == sorted(order), "iter_entries walks shards in file order"


def test_index_file_given_directly(llama_dir: Path) -> None:
    with resolve(llama_dir / INDEX) as layout:
        assert layout.index_path == str(llama_dir / INDEX)
        assert len(layout.entries) == len(json.loads((llama_dir / INDEX).read_text())
                                          ["weight_map"])


def test_loose_shards_without_an_index(sharded: Path) -> None:
    (sharded / INDEX).unlink()
    files = sorted(sharded.glob("*.safetensors"))
    with resolve(sharded) as layout:
        assert [s.path for s in layout.shards] == [str(f) for f in files]
        assert layout.index_path is None
        assert len(layout.entries) == sum(len(safetensors_view(f)) for f in files)


def test_index_shard_names_with_a_dot_segment_open_once(sharded: Path) -> None:
    first = sorted(sharded.glob("*.safetensors"))[0].name
    index = json.loads((sharded / INDEX).read_text())["weight_map"]
    respelled = next(t for t, s in index.items() if s == first)
    edit_index(sharded, lambda o: o["weight_map"].__setitem__(respelled, f"./{first}"))
    with resolve(sharded) as layout:
        assert len(layout.shards) == len(set(index.values()))
        assert shard_of(layout)[respelled] == first


def test_iter_entries_selects_keys_and_refuses_unknown_ones(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.safetensors", ["a", "b", "c"])
    with resolve(path) as layout:
        assert [e.name for e in iter_entries(layout, ["c", "a", "c"])] == ["a", "c"]
        with pytest.raises(CheckpointError, match="has no tensor named 'zz'") as info:
            list(iter_entries(layout, ["a", "zz"]))
        assert str(tmp_path) in str(info.value)


# --- sources that do not ---------------------------------------------------------------------------

def test_missing_path(tmp_path: Path) -> None:
    assert_refused(tmp_path / "nope.safetensors", CheckpointError, "no such file or directory",
                   tmp_path / "nope.safetensors")


def test_empty_path_is_not_the_current_directory() -> None:
    with pytest.raises(CheckpointError, match="path is empty"):
        resolve("")


def test_empty_list() -> None:
    with pytest.raises(CheckpointError, match="list of checkpoint files is empty"):
        resolve([])


def test_list_with_a_missing_file(tmp_path: Path) -> None:
    good = write_file(tmp_path / "a.safetensors", ["a"])
    assert_refused([good, tmp_path / "b.safetensors"], CheckpointError, "file not found",
                   tmp_path / "b.safetensors")


def test_same_file_listed_twice(tmp_path: Path) -> None:
    path = write_file(tmp_path / "a.safetensors", ["a"])
    (tmp_path / "alias.safetensors").symlink_to(path)
    assert_refused([path, path], CheckpointError, "is the same file as", path)
    assert_refused([path, tmp_path / "alias.safetensors"], CheckpointError,
                   "alias.safetensors is the same file as", path)


def test_directory_in_a_list(tmp_path: Path) -> None:
    assert_refused([tmp_path], CheckpointError, "is a directory, not a safetensors file", tmp_path)


@pytest.fixture
def no_hang() -> Iterator[None]:
    """Turn a blocking open (a FIFO waits for a writer) into a failure instead of a hung run."""
    def hung(*_: object) -> None:
        raise AssertionError("resolve blocked on a FIFO")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(10)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path, no_hang: None) -> None:
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    assert_refused(fifo, CheckpointError, "not a regular file", fifo)


def test_fifo_index_is_refused_without_waiting_for_a_writer(tmp_path: Path, no_hang: None) -> None:
    os.mkfifo(tmp_path / INDEX)
    assert_refused(tmp_path, CheckpointError, "index is not a regular file", tmp_path / INDEX)


def test_empty_directory(tmp_path: Path) -> None:
    assert_refused(tmp_path, CheckpointError, "holds no \\*.safetensors file", tmp_path)


def test_invalid_file_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x05\0\0\0\0\0\0\0{oops")
    assert_refused(tmp_path, FormatError, "not valid JSON", bad)


def test_several_indexes_without_the_standard_one(sharded: Path) -> None:
    shutil.move(sharded / INDEX, sharded / "a.safetensors.index.json")
    shutil.copy(sharded / "a.safetensors.index.json", sharded / "b.safetensors.index.json")
    assert_refused(sharded, CheckpointError, "several index files", sharded)


def test_index_with_parent_directory_shard(sharded: Path, tmp_path: Path) -> None:
    write_file(tmp_path / "x.safetensors", ["outside"])
    index = edit_index(sharded, lambda o: o["weight_map"].__setitem__("outside", "../x.safetensors"))
    assert_refused(sharded, CheckpointError, "'../x.safetensors' climbs out", index)


def test_index_with_absolute_shard(sharded: Path, tmp_path: Path) -> None:
    outside = write_file(tmp_path / "x.safetensors", ["outside"])
    index = edit_index(sharded, lambda o: o["weight_map"].__setitem__("outside", str(outside)))
    assert_refused(sharded, CheckpointError, "is an absolute path", index)


def test_index_with_symlink_leaving_the_directory_is_followed(sharded: Path,
                                                              tmp_path: Path) -> None:
    """The directory holds the symlink, so it is part of the checkpoint wherever it points
    (model stores and caches are built of them), as for vLLM's and transformers' loaders."""
    outside = write_file(tmp_path / "x.safetensors", ["outside"])
    (sharded / "link.safetensors").symlink_to(outside)
    edit_index(sharded, lambda o: o["weight_map"].__setitem__("outside", "link.safetensors"))
    with resolve(sharded) as layout:
        assert shard_of(layout)["outside"] == "link.safetensors"
        assert layout.accepted == []


def test_index_with_symlinked_directory_leaving_is_followed(sharded: Path,
                                                            tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    write_file(tmp_path / "elsewhere" / "x.safetensors", ["outside"])
    (sharded / "sub").symlink_to(tmp_path / "elsewhere")
    edit_index(sharded, lambda o: o["weight_map"].__setitem__("outside", "sub/x.safetensors"))
    with resolve(sharded) as layout:
        assert layout.shards[layout.entries["outside"].shard].path == \
            str(sharded / "sub" / "x.safetensors")


def test_index_with_symlink_inside_the_directory_is_fine(sharded: Path) -> None:
    first = sorted(sharded.glob("*.safetensors"))[0]
    first.rename(sharded / "real.bin")
    first.symlink_to(sharded / "real.bin")
    with resolve(sharded) as layout:
        assert first.name in shard_of(layout).values()


@pytest.mark.parametrize("name", [None, 3, "", ["a"]])
def test_index_shard_name_not_a_string(sharded: Path, name: object) -> None:
    index = edit_index(sharded, lambda o: o["weight_map"].__setitem__("lm_head.weight", name))
    assert_refused(sharded, CheckpointError, "not a file name", index)


def test_missing_shard(sharded: Path) -> None:
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    message = assert_refused(sharded, CheckpointError, "listed in the index is missing",
                             sharded / INDEX)
    assert victim.name in message


def test_shard_that_is_a_directory(sharded: Path) -> None:
    victim = sorted(sharded.glob("*.safetensors"))[-1]
    victim.unlink()
    victim.mkdir()
    assert_refused(sharded, CheckpointError, "is missing \\(not a file\\)", sharded / INDEX)


def shared_shard_tensor(directory: Path) -> tuple[str, str]:
    """A tensor whose shard holds other tensors too (so the shard stays in the index), and it."""
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    shards = list(weight_map.values())
    tensor = next(t for t, s in sorted(weight_map.items()) if shards.count(s) > 1)
    return tensor, weight_map[tensor]


# --- an index and files that disagree: accepted as vLLM's and transformers' loaders accept them,
# said by a CheckpointWarning and in ``Layout.accepted`` (``LoadReport.notes``)


def accepted(source: Path, match: str) -> Layout:
    """``resolve(source)``, which must warn once, matching ``match``; closed, for inspection."""
    with pytest.warns(CheckpointWarning, match=match) as warned:
        with resolve(source) as layout:
            pass
    assert [str(w.message) for w in warned] == layout.accepted
    return layout


def test_indexed_tensor_absent_from_its_shard(sharded: Path) -> None:
    _, shard = shared_shard_tensor(sharded)
    index = edit_index(sharded, lambda o: o["weight_map"].__setitem__("ghost.weight", shard))
    layout = accepted(sharded, f"^{index}: the index lists 1 tensor that no shard stores, "
                      f"'ghost.weight' \\(in '{shard}'\\); not loaded")
    assert layout.missing == {"ghost.weight": shard}
    assert "ghost.weight" not in layout.entries
    assert layout_view(layout) == merged_view(sharded)
    with pytest.warns(CheckpointWarning), resolve(sharded) as layout, \
            pytest.raises(CheckpointError) as info:
        list(iter_entries(layout, ["ghost.weight"]))  # asked for by name: an error
    assert str(info.value) == (f"{index}: the index lists tensor 'ghost.weight' in '{shard}', "
                               "but no shard stores it")


def test_indexed_tensor_in_another_shard(sharded: Path) -> None:
    tensor, actual = shared_shard_tensor(sharded)
    shards = json.loads((sharded / INDEX).read_text())["weight_map"].values()
    wrong = next(s for s in sorted(set(shards)) if s != actual)
    index = edit_index(sharded, lambda o: o["weight_map"].__setitem__(tensor, wrong))
    layout = accepted(sharded, f"^{index}: the index puts 1 tensor in a shard that does not hold "
                      f"it, '{tensor}' \\(index: '{wrong}', stored in '{actual}'\\)")
    assert shard_of(layout)[tensor] == actual


def test_shard_holding_a_tensor_the_index_omits(sharded: Path) -> None:
    tensor, _ = shared_shard_tensor(sharded)
    index = edit_index(sharded, lambda o: o["weight_map"].pop(tensor))
    layout = accepted(sharded, f"^{index}: the shards hold 1 tensor the index does not list, "
                      f"'{tensor}'; they load too")
    assert layout_view(layout) == merged_view(sharded)


def test_tensor_present_in_two_shards_loads_from_the_last(tmp_path: Path) -> None:
    """vLLM's loader reads both files in order and its model keeps the last copy: so do we."""
    write_file(tmp_path / "a.safetensors", ["x", "shared"], seed=1)
    write_file(tmp_path / "b.safetensors", ["shared", "y"], seed=2)
    layout = accepted(tmp_path, f"^{tmp_path}: 1 tensor stored in more than one file, 'shared' "
                      "from b.safetensors \\(the last of its files; also in a.safetensors\\)")
    assert shard_of(layout) == {"x": "a.safetensors", "shared": "b.safetensors",
                                "y": "b.safetensors"}
    assert layout.copies == {"shared": [0, 1]}
    listed = accepted_list([tmp_path / "b.safetensors", tmp_path / "a.safetensors"])
    assert shard_of(listed)["shared"] == "a.safetensors", "a list's last file"


def accepted_list(files: list[Path]) -> Layout:
    with pytest.warns(CheckpointWarning, match="stored in more than one file"):
        with resolve(files) as layout:
            return layout


@pytest.mark.parametrize("named", ["a.safetensors", "b.safetensors"])
def test_tensor_present_in_two_indexed_shards_loads_the_indexs_copy(tmp_path: Path,
                                                                    named: str) -> None:
    write_file(tmp_path / "a.safetensors", ["x", "shared"], seed=1)
    write_file(tmp_path / "b.safetensors", ["shared", "y"], seed=2)
    index = tmp_path / INDEX
    index.write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors",
                                                "shared": named}}))
    other = "b.safetensors" if named == "a.safetensors" else "a.safetensors"
    layout = accepted(tmp_path, f"^{index}: 1 tensor stored in more than one file, 'shared' "
                      f"from {named} \\(the index names it; also in {other}\\)")
    assert shard_of(layout)["shared"] == named
    with pytest.warns(CheckpointWarning):
        state = weightlift.load(tmp_path)
    copies = {name: load_file(tmp_path / name)["shared"] for name in (named, other)}
    assert not torch.equal(copies[named], copies[other])
    assert torch.equal(state["shared"], copies[named])


def tied_head_checkpoint(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A sharded checkpoint whose index lists a tied head that no shard stores (as some
    exporters write them), and the tensors its shards do store."""
    write_file(directory / "model-1.safetensors", ["embed.weight", "norm.weight"], seed=1)
    write_file(directory / "model-2.safetensors", ["layer.weight"], seed=2)
    index = directory / INDEX
    index.write_text(json.dumps({"weight_map": {
        "embed.weight": "model-1.safetensors", "norm.weight": "model-1.safetensors",
        "layer.weight": "model-2.safetensors", "lm_head.weight": "model-2.safetensors"}}))
    stored = load_file(directory / "model-1.safetensors") | load_file(
        directory / "model-2.safetensors")
    return index, stored


def _load(source: Path, reports: list) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    return weightlift.load(source, on_report=reports.append)


def _stream(source: Path, reports: list) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    return dict(weightlift.stream(source, on_report=reports.append))


def _open(source: Path, reports: list) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    with weightlift.open(source) as checkpoint:
        assert "lm_head.weight" not in checkpoint
        with pytest.raises(CheckpointError, match="lists tensor 'lm_head.weight' in "
                           "'model-2.safetensors', but no shard stores it"):
            checkpoint.get_tensor("lm_head.weight")
        return {name: checkpoint.get_tensor(name) for name in checkpoint.keys()}


def _safe_open(source: Path, reports: list) -> dict[str, torch.Tensor]:  # type: ignore[type-arg]
    with weightlift.safe_open(source, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}


@pytest.mark.parametrize("entry", [_load, _stream, _open, _safe_open])
@pytest.mark.parametrize("via", ["directory", "index"])
def test_every_entry_point_loads_the_stored_tensors_of_an_index_listing_more(
        tmp_path: Path, entry, via: str) -> None:  # type: ignore[no-untyped-def]
    index, stored = tied_head_checkpoint(tmp_path)
    reports: list = []  # type: ignore[type-arg]
    with pytest.warns(CheckpointWarning, match=f"^{index}: the index lists 1 tensor that no "
                      "shard stores, 'lm_head.weight' \\(in 'model-2.safetensors'\\)"):
        state = entry(tmp_path if via == "directory" else index, reports)
    assert sorted(state) == sorted(stored)
    for name, tensor in stored.items():
        assert torch.equal(state[name], tensor), name
    for report in reports:
        assert report.missing == ["lm_head.weight"]
        assert report.notes[0].startswith(f"{index}: the index lists 1 tensor")


def test_asking_for_an_index_entry_no_shard_stores_raises(tmp_path: Path) -> None:
    index, _ = tied_head_checkpoint(tmp_path)
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError) as info:
        weightlift.load(tmp_path, keys=["embed.weight", "lm_head.weight"])
    assert str(info.value) == (f"{index}: the index lists tensor 'lm_head.weight' in "
                               "'model-2.safetensors', but no shard stores it")


def merged_view(directory: Path) -> dict[str, tuple[str, list[int]]]:
    """Every tensor the directory's files store, as safetensors reads them."""
    view: dict[str, tuple[str, list[int]]] = {}
    for path in sorted(directory.glob("*.safetensors")):
        view.update(safetensors_view(path))
    return view


@pytest.mark.parametrize(("content", "match"), [
    (b"{not json", "index is not valid JSON"),
    (b"\xff\xfe\x00", "index is not valid JSON"),
    (b'{"weight_map": {"a": "b"}, "x": ' + b"1" * 5000 + b"}", "index is not valid JSON"),
    (b"[" * 100_000, "index is not valid JSON"),
    (b"[]", "no 'weight_map' object"),
    (b'{"metadata": {}}', "no 'weight_map' object"),
    (b'{"weight_map": ["a.safetensors"]}', "no 'weight_map' object"),
    (b'{"weight_map": "model.safetensors"}', "no 'weight_map' object"),
    (b'{"weight_map": {}}', "'weight_map' is empty"),
    (b'{"weight_map": {"a": "model-00001-of-00010.safetensors"}, "metadata": 3}',
     "'metadata' is not an object"),
])
def test_broken_index(sharded: Path, content: bytes, match: str) -> None:
    (sharded / INDEX).write_bytes(content)
    assert_refused(sharded, CheckpointError, match, sharded / INDEX)
