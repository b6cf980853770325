"""Index and path safety at every entry point: an index whose shard *name* leaves the checkpoint
directory (``..``, an absolute path, backslashes) is refused by ``load``, ``stream``, ``open``
and the ``weightlift info`` / ``load`` commands alike, before any tensor is read. A symlink the
directory itself holds is part of the checkpoint and is followed wherever it points (a file or
a directory, inside or out: model stores and caches are built of them), as vLLM's and
transformers' loaders follow it."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import weightlift
from conftest import assert_same
from test_faults import no_leaks
from weightlift.cli import main
from weightlift.errors import CheckpointError, CheckpointWarning, WeightliftError

INDEX = "model.safetensors.index.json"


def shard(path: Path, names: list[str], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {name: torch.randn(4, 5, generator=g) for name in names}
    save_file(tensors, path)
    return tensors


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(checkpoint directory, a file outside it, the checkpoint's tensors)."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    tensors = shard(directory / "model-1.safetensors", ["a", "b"], 0)
    tensors |= shard(directory / "model-2.safetensors", ["c"], 1)
    write_index(directory, {"a": "model-1.safetensors", "b": "model-1.safetensors",
                            "c": "model-2.safetensors"})
    outside = tmp_path / "secret.safetensors"
    shard(outside, ["stolen"], 2)
    return directory, outside, tensors


def write_index(directory: Path, weight_map: dict[str, str]) -> Path:
    index = directory / INDEX
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return index


def escape(directory: Path, outside: Path, how: str) -> str:
    """Make a shard name that leads to ``outside`` in the way ``how`` says."""
    if how == "dotdot":
        return f"../{outside.name}"
    if how == "dotdot-inside-a-path":
        (directory / "sub").mkdir()
        return f"sub/../../{outside.name}"
    if how == "backslashes":
        return f"..\\{outside.name}"
    if how == "absolute":
        return str(outside)
    if how == "symlinked-file":
        (directory / "link.safetensors").symlink_to(outside)
        return "link.safetensors"
    if how == "symlinked-directory":
        (directory / "elsewhere").symlink_to(outside.parent)
        return f"elsewhere/{outside.name}"
    raise ValueError(how)


#: Names that climb out by themselves: refused.
ESCAPES = ["dotdot", "dotdot-inside-a-path", "backslashes", "absolute"]
#: Names inside the directory that lead out through a symlink it holds: followed.
SYMLINKS = ["symlinked-file", "symlinked-directory"]


def _stream(source: Path) -> object:
    return list(weightlift.stream(source))


def _open(source: Path) -> object:
    with weightlift.open(source) as checkpoint:
        return checkpoint.get_tensor("stolen")


ENTRY_POINTS: dict[str, Callable[[Path], object]] = {
    "load": weightlift.load,
    "stream": _stream,
    "open": _open,
}


@pytest.mark.parametrize("via", ["directory", "index"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("how", ESCAPES)
def test_an_escaping_shard_is_refused_by_the_api(layout: tuple[Path, Path, dict], how: str,
                                                 entry: str, via: str) -> None:
    directory, outside, _ = layout
    name = escape(directory, outside, how)
    index = write_index(directory, {"a": "model-1.safetensors", "b": "model-1.safetensors",
                                    "c": "model-2.safetensors", "stolen": name})
    source = directory if via == "directory" else index
    with no_leaks():
        with pytest.raises(CheckpointError) as info:
            ENTRY_POINTS[entry](source)
    assert info.value.path == str(index)
    assert repr(name) in str(info.value)


@pytest.mark.parametrize("command", ["info", "load"])
@pytest.mark.parametrize("how", ESCAPES)
def test_an_escaping_shard_is_refused_by_the_cli(layout: tuple[Path, Path, dict], how: str,
                                                 command: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    directory, outside, _ = layout
    name = escape(directory, outside, how)
    index = write_index(directory, {"a": "model-1.safetensors", "stolen": name})
    assert main([command, str(directory)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("weightlift: error:") and len(err.splitlines()) == 1
    assert str(index) in err and repr(name) in err


@pytest.mark.parametrize("via", ["directory", "index"])
@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("how", SYMLINKS)
def test_a_symlink_the_directory_holds_is_followed_wherever_it_points(
        layout: tuple[Path, Path, dict], how: str, entry: str, via: str) -> None:
    directory, outside, tensors = layout
    name = escape(directory, outside, how)
    index = write_index(directory, {"a": "model-1.safetensors", "b": "model-1.safetensors",
                                    "c": "model-2.safetensors", "stolen": name})
    source = directory if via == "directory" else index
    expected = tensors | load_file(outside)
    with no_leaks():
        loaded = ENTRY_POINTS[entry](source)
    if entry == "open":
        assert_same({"stolen": loaded}, {"stolen": expected["stolen"]})  # type: ignore[dict-item]
    else:
        assert_same(dict(loaded), expected)  # type: ignore[call-overload]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_a_symlink_that_stays_inside_is_followed(layout: tuple[Path, Path, dict],
                                                 entry: str) -> None:
    directory, _, tensors = layout
    (directory / "real").mkdir()
    (directory / "model-2.safetensors").rename(directory / "real" / "model-2.safetensors")
    (directory / "model-2.safetensors").symlink_to(directory / "real" / "model-2.safetensors")
    if entry == "open":
        with weightlift.open(directory) as checkpoint:
            assert_same({"c": checkpoint.get_tensor("c")}, {"c": tensors["c"]})
    else:
        assert_same(dict(ENTRY_POINTS[entry](directory)), tensors)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Fuzzing shard names. Longer hunt: WEIGHTLIFT_FUZZ_EXAMPLES=5000 pytest tests/test_path_safety.py

SEGMENTS = ["..", ".", "", "sub", "link.safetensors", "elsewhere", "inside.safetensors",
            "model-1.safetensors", "secret.safetensors", "ckpt", "\x00", "~", "%2e%2e"]

shard_names = st.builds(
    lambda root, parts, sep: root + sep.join(parts),
    st.sampled_from(["", "/", "\\", "//", "C:\\"]),
    st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=6),
    st.sampled_from(["/", "\\"]),
)


@pytest.fixture(scope="module")
def playground(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint directory with every kind of way out: symlinks to a file and a directory
    outside, a sub-directory, and an inside symlink."""
    root = tmp_path_factory.mktemp("playground")
    directory = root / "ckpt"
    (directory / "sub").mkdir(parents=True)
    shard(directory / "model-1.safetensors", ["a"], 0)
    shard(root / "secret.safetensors", ["stolen"], 2)
    (directory / "link.safetensors").symlink_to(root / "secret.safetensors")
    (directory / "elsewhere").symlink_to(root)
    (directory / "inside.safetensors").symlink_to(directory / "model-1.safetensors")
    return directory


#: The directory's own ways out: symlinks it holds, which lead to the tensor that lives outside.
LINKS_OUT = {"link.safetensors", "elsewhere"}


def through_a_link_out(name: str) -> bool:
    """Does ``name`` reach outside only by a symlink the directory holds: a relative name, no
    ``..``, whose first step is one of ``LINKS_OUT``?"""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    return (not name.startswith(("/", "\\")) and "\\" not in name and ".." not in parts
            and bool(parts) and parts[0] in LINKS_OUT)


@settings(max_examples=int(os.environ.get("WEIGHTLIFT_FUZZ_EXAMPLES", "150")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=shard_names)
def test_no_shard_name_reaches_a_file_outside(playground: Path, name: str) -> None:
    """Whatever the index names, the tensor that lives only outside loads only through a
    symlink the directory holds: the index is refused (the name escapes, is no file, or holds
    ``a`` a second time), or the checkpoint loads, with ``stolen`` only by such a name (else
    an index entry no shard stores: warned, not loaded)."""
    write_index(playground, {"a": "model-1.safetensors", "stolen": name})
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CheckpointWarning)
            state = weightlift.load(playground)
    except WeightliftError:
        return
    assert ("stolen" in state) == through_a_link_out(name), name
    assert sorted(state) == sorted({"a"} | ({"stolen"} if "stolen" in state else set()))
