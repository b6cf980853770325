"""Device loads on a real CUDA/ROCm device. Without one these skip: CPU-only torch cannot say
anything about pinned rings, side streams or on-device conversion, so nothing is faked here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import weightlift
from conftest import assert_same

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="no CUDA/ROCm device in this torch build or on this machine"),
]

STRATEGIES = ["auto", "mmap", "direct", "stream"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_device_load_is_bit_exact(minilm_path: Path, strategy: str) -> None:
    state = weightlift.load(minilm_path, device="cuda", strategy=strategy, max_host_memory="8MB")
    assert all(t.device.type == "cuda" for t in state.values())
    assert_same(state, load_file(minilm_path))


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_device_conversion_happens_on_the_device(llama_dir: Path, strategy: str) -> None:
    ref = {}
    for shard in sorted(llama_dir.glob("*.safetensors")):
        ref.update(load_file(shard))
    state = weightlift.load(llama_dir, device="cuda", dtype=torch.float16, strategy=strategy)
    for name, tensor in ref.items():
        assert state[name].dtype == torch.float16
        assert torch.equal(state[name].cpu(), tensor.to(torch.float16)), name


def test_streamed_device_tensors_survive_ring_reuse(minilm_path: Path) -> None:
    """Each yielded tensor owns its device memory: later reads into the ring never change it."""
    ref = load_file(minilm_path)
    kept = dict(weightlift.stream(minilm_path, device="cuda", strategy="direct",
                                  max_host_memory="4MiB"))
    torch.cuda.synchronize()
    assert_same(kept, ref)
