"""Hugging Face cache sources: repository directories and hf:// references, never the network.

The cache is built in the test with the layout huggingface_hub writes (blobs, symlinked
snapshots, refs); huggingface_hub's own cache lookup and transformers' from_pretrained with
local_files_only=True read the same cache as oracles.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import try_to_load_from_cache
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import weightlift
from conftest import assert_same
from weightlift.compat import safe_open
from weightlift.errors import CheckpointError
from weightlift.load_into import load_into
from weightlift.sources import resolve
from weightlift.sources.hub import HubReference, cache_dir, parse_reference

REPO = "tiny-org/tiny-llama"
COMMIT = "a" * 40
OLD_COMMIT = "b" * 40


def add_snapshot(cache: Path, repo: str, files: Path, commit: str,
                 refs: tuple[str, ...] = ("main",)) -> Path:
    """Put ``files`` in ``cache`` as huggingface_hub does: content in blobs/, symlinks in
    snapshots/{commit}/, refs naming the commit."""
    repo_dir = cache / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for file in sorted(files.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        blob = repo_dir / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / digest)
    for ref in refs:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)
    return repo_dir


@pytest.fixture
def hub_cache(tmp_path: Path, llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    add_snapshot(cache, REPO, llama_dir, COMMIT, refs=("main",))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_cache_dir_follows_huggingface_hub_precedence(tmp_path: Path) -> None:
    assert cache_dir({"HF_HUB_CACHE": "/x/hub", "HF_HOME": "/y"}) == Path("/x/hub")
    assert cache_dir({"HF_HOME": "/y"}) == Path("/y/hub")
    assert cache_dir({"XDG_CACHE_HOME": "/z"}) == Path("/z/huggingface/hub")
    home = Path(os.path.expanduser("~"))
    assert cache_dir({}) == home / ".cache" / "huggingface" / "hub"


@pytest.mark.parametrize("text, expected", [
    ("hf://org/name", HubReference("org/name")),
    ("hf://org/name@v1.0", HubReference("org/name", "v1.0")),
    ("hf://org/name@" + COMMIT + "/sub/model.safetensors",
     HubReference("org/name", COMMIT, "sub/model.safetensors")),
    ("hf://org/name/model.safetensors", HubReference("org/name", "main", "model.safetensors")),
    ("hf://gpt2", HubReference("gpt2")),
    ("hf://gpt2@main/model.safetensors", HubReference("gpt2", "main", "model.safetensors")),
])
def test_references_parse(text: str, expected: HubReference) -> None:
    assert parse_reference(text) == expected


@pytest.mark.parametrize("text", ["hf://", "hf://org/../x", "hf://org/name@"])
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(CheckpointError, match="not a hub reference"):
        parse_reference(text)


def test_hf_reference_loads_the_main_snapshot(hub_cache: Path, llama_dir: Path) -> None:
    assert_same(weightlift.load(f"hf://{REPO}"), weightlift.load(llama_dir))


def test_repo_directory_resolves_refs_main(hub_cache: Path, llama_dir: Path) -> None:
    repo_dir = hub_cache / "models--tiny-org--tiny-llama"
    with resolve(repo_dir) as layout:
        assert Path(layout.root) == repo_dir / "snapshots" / COMMIT
        assert layout.index_path is not None  # the sharded index, through its symlink
    assert_same(weightlift.load(repo_dir), weightlift.load(llama_dir))


def test_revisions_by_ref_and_by_commit(hub_cache: Path, tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    state = {"w": torch.arange(4.0)}
    save_file(state, old / "model.safetensors")
    add_snapshot(hub_cache, REPO, old, OLD_COMMIT, refs=("v0",))
    for ref in (f"hf://{REPO}@v0", f"hf://{REPO}@{OLD_COMMIT}"):
        assert torch.equal(weightlift.load(ref)["w"], state["w"]), ref
    assert "w" not in weightlift.load(f"hf://{REPO}")  # main still names the other commit


def test_a_file_inside_the_repo_agrees_with_huggingface_hub(hub_cache: Path) -> None:
    name = sorted(p.name for p in (hub_cache / "models--tiny-org--tiny-llama" / "snapshots" /
                                   COMMIT).glob("*.safetensors"))[0]
    expected = try_to_load_from_cache(REPO, name, cache_dir=hub_cache)
    assert isinstance(expected, str)
    with resolve(f"hf://{REPO}/{name}") as layout:
        assert [s.path for s in layout.shards] == [expected]


def test_safe_open_accepts_hub_sources(hub_cache: Path, llama_dir: Path) -> None:
    with safe_open(f"hf://{REPO}", "pt") as ours, safe_open(llama_dir, "pt") as theirs:
        assert ours.keys() == theirs.keys()
        name = ours.keys()[0]
        assert torch.equal(ours.get_slice(name)[:2], theirs.get_tensor(name)[:2])


def test_load_into_matches_from_pretrained_from_the_cache(hub_cache: Path) -> None:
    reference = LlamaForCausalLM.from_pretrained(REPO, cache_dir=hub_cache, local_files_only=True)
    torch.manual_seed(5)
    model = LlamaForCausalLM(reference.config)
    load_into(model, f"hf://{REPO}")
    ids = torch.arange(9).reshape(1, 9)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)


def test_uncached_repo_says_it_does_not_download(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache .*does not "
                                              r"download.*hf download other/model"):
        resolve("hf://other/model")


def test_missing_ref_lists_the_cached_snapshots(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match=f"has no refs/dev \\(cached snapshots: {COMMIT}\\)"):
        resolve(f"hf://{REPO}@dev")


def test_missing_file_in_snapshot(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="no 'nope.safetensors' in snapshot"):
        resolve(f"hf://{REPO}/nope.safetensors")


def test_symlinks_leaving_the_repo_are_followed(hub_cache: Path, tmp_path: Path) -> None:
    """A snapshot's files are symlinks; one that points out of the cache (a store shared by
    several caches) is part of the checkpoint all the same, as for huggingface_hub itself."""
    snapshot = hub_cache / "models--tiny-org--tiny-llama" / "snapshots" / COMMIT
    shard = sorted(snapshot.glob("*.safetensors"))[0]
    expected = weightlift.load(f"hf://{REPO}")
    outside = tmp_path / "outside.safetensors"
    shutil.copyfile(shard, outside)
    shard.unlink()
    shard.symlink_to(outside)
    assert_same(weightlift.load(f"hf://{REPO}"), expected)
