"""Fresh CPU destinations of converting loads are faulted in on a thread of their own."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import weightlift
from weightlift.io import base as io_base
from weightlift.io.base import OWN_MAPPING, Prefaulter


def prefault_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("weightlift-prefault")]


def test_buffers_are_zeroed_writable_and_the_thread_ends_with_close() -> None:
    prefault = Prefaulter()
    try:
        small = prefault.buffer(4096)
        assert not prefault_threads()  # small buffers come from the allocator, as they are
        large = prefault.buffer(3 * OWN_MAPPING + 4096)
        assert prefault_threads()  # large ones are faulted in on a thread of its own
        assert large.numel() == 3 * OWN_MAPPING + 4096 and small.numel() == 4096
        assert not large.any()  # fresh memory, and populating never writes data
        large.fill_(7)
    finally:
        prefault.close()
    assert not prefault_threads()
    assert bool((large == 7).all())  # the memory stays the caller's after close


def test_converting_load_into_prefaulted_targets_matches_safetensors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    tensors = {"big": torch.randn(1024, 700, generator=g).to(torch.bfloat16),
               "small": torch.randn(3, 5, generator=g).to(torch.bfloat16),
               "ints": torch.arange(300_000, dtype=torch.int32),
               "empty": torch.empty(0, 4, dtype=torch.bfloat16)}
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path))
    state = weightlift.load(path, dtype=torch.float32, strategy="stream")
    assert not prefault_threads()  # the load waited for its thread
    for name, expected in load_file(str(path)).items():
        want = expected.float() if expected.is_floating_point() else expected
        assert state[name].dtype == want.dtype and state[name].shape == want.shape, name
        assert torch.equal(state[name], want), name
    state["big"].add_(1)  # results are ordinary writable tensors


def test_a_signal_does_not_switch_prefaulting_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """MADV_POPULATE_WRITE stopped by a signal (EINTR) or EAGAIN is asked again, and the next
    buffers are still faulted in ahead; only EINVAL (a kernel without it) switches it off."""
    answers: list[str] = []
    madvise = io_base.madvise

    def interrupted_once(address: int, length: int, advice: int) -> None:
        if advice == io_base.MADV_POPULATE_WRITE and not answers:
            answers.append("EINTR")
            raise InterruptedError(errno.EINTR, os.strerror(errno.EINTR))
        madvise(address, length, advice)
        answers.append("done")

    monkeypatch.setattr(io_base, "madvise", interrupted_once)
    prefault = Prefaulter()
    try:
        first = prefault.buffer(2 * OWN_MAPPING)
        second = prefault.buffer(2 * OWN_MAPPING)
    finally:
        prefault.close()  # waits for the thread
    assert answers == ["EINTR", "done", "done"]
    assert not first.any() and not second.any()
