"""Hugging Face cache sources, resolved locally: weightlift never touches the network.

The hub cache keeps each repository as ``models--{org}--{name}/`` with ``refs/{branch}`` (a file
holding a commit hash), ``snapshots/{commit}/`` (the repository's files, as symlinks) and
``blobs/`` (the content the symlinks point to). Two kinds of source lead there:

* a repository directory, ``.../models--org--name`` → the snapshot ``refs/main`` names;
* ``hf://org/name[@revision][/path/in/repo]`` → the same, looked up in the local cache
  (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

SCHEME = "hf://"
#: A full commit hash names a snapshot directly.
COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclass(frozen=True)
class HubReference:
    """``hf://org/name@revision/path``: a repository, a revision and a path inside it."""

    repo: str
    revision: str = "main"
    path: str = ""

    def __str__(self) -> str:
        rev = "" if self.revision == "main" else f"@{self.revision}"
        return f"{SCHEME}{self.repo}{rev}{'/' + self.path if self.path else ''}"


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The local hub cache, found the way ``huggingface_hub`` finds it."""
    env = os.environ if environ is None else environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "huggingface" / "hub"


def repo_folder(repo: str) -> str:
    """``org/name`` → ``models--org--name``."""
    return "models--" + repo.replace("/", "--")


def parse_reference(text: str) -> HubReference:
    """``hf://org/name[@revision][/path]``; a one-part name (``hf://gpt2``) is a repo too."""
    rest = text[len(SCHEME):].strip("/")
    parts = [p for p in rest.split("/") if p]
    if not parts or any(p in (".", "..") for p in parts):
        raise CheckpointError(f"{text!r} is not a hub reference like hf://org/name[@revision]")
    # org/name@rev/path or name@rev/path: the revision ends the repository part.
    for count in (2, 1):
        if len(parts) >= count and "@" in parts[count - 1]:
            name, revision = parts[count - 1].split("@", 1)
            return _reference(parts[:count - 1] + [name], revision, parts[count:], text)
    return _reference(parts[:2], "main", parts[2:], text)


def _reference(repo: list[str], revision: str, path: list[str], text: str) -> HubReference:
    if not all(repo) or not revision:
        raise CheckpointError(f"{text!r} is not a hub reference like hf://org/name[@revision]")
    return HubReference("/".join(repo), revision, "/".join(path))


def is_repo_dir(path: Path) -> bool:
    return path.name.startswith("models--") and (path / "snapshots").is_dir()


def snapshot(repo_dir: Path, revision: str = "main") -> Path:
    """The snapshot directory of ``revision`` (a branch or tag under ``refs/``, or a commit)."""
    snapshots = repo_dir / "snapshots"
    if COMMIT.fullmatch(revision):
        commit = revision
    else:
        ref = repo_dir / "refs" / revision
        if ".." in Path(revision).parts or not ref.is_file():
            have = sorted(p.name for p in snapshots.iterdir()) if snapshots.is_dir() else []
            raise CheckpointError(f"has no refs/{revision} (cached snapshots: "
                                  f"{', '.join(have) or 'none'}); name one as hf://org/name@"
                                  "<commit> or download the revision", path=repo_dir)
        commit = ref.read_text(encoding="utf-8").strip()
        if not COMMIT.fullmatch(commit):
            raise CheckpointError(f"refs/{revision} holds {commit[:80]!r}, not a commit hash",
                                  path=repo_dir)
    directory = snapshots / commit
    if not directory.is_dir():
        raise CheckpointError(f"snapshot {commit} of revision {revision!r} is not in the cache "
                              "(partly deleted?); download it again", path=repo_dir)
    return directory


def locate(reference: HubReference, cache: Path | None = None) -> Path:
    """The local path of ``reference`` in the cache; never downloads."""
    cache = cache_dir() if cache is None else cache
    repo = reference.repo
    path = reference.path
    repo_dir = cache / repo_folder(repo)
    if not repo_dir.is_dir() and "/" in repo and reference.revision == "main":
        # hf://gpt2/model.safetensors: a one-part repo and a path.
        first, rest = repo.split("/", 1)
        if (cache / repo_folder(first)).is_dir():
            repo_dir, repo = cache / repo_folder(first), first
            path = f"{rest}/{path}" if path else rest
    if not repo_dir.is_dir():
        raise CheckpointError(f"{reference} is not in the local Hugging Face cache ({cache}); "
                              "weightlift does not download: fetch it first, e.g. "
                              f"`hf download {repo}`, or set HF_HUB_CACHE/HF_HOME")
    directory = snapshot(repo_dir, reference.revision)
    target = directory / path if path else directory
    if not target.exists():
        raise CheckpointError(f"{reference}: no {path!r} in snapshot {directory.name}",
                              path=directory)
    return target


def resolve_source(source: object) -> Path | None:
    """The local path a hub source stands for, or None when ``source`` is not a hub source."""
    if isinstance(source, str) and source.startswith(SCHEME):
        return locate(parse_reference(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if is_repo_dir(path):
            return snapshot(path)
    return None


__all__ = ["HubReference", "cache_dir", "is_repo_dir", "locate", "parse_reference",
           "repo_folder", "resolve_source", "snapshot"]
