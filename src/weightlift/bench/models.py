"""The ``model`` scenario: time to a usable transformers model, weightlift against transformers.

Both loaders build the model ``config.json`` describes and load the checkpoint into it, then hand
out its state dict (the child keeps every tensor and touches its pages, so a model whose weights
are still lazy file mappings is paid for before the clock stops, as its first forward would).
transformers is imported only inside the loaders: ``weightlift bench`` runs without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover - typing only
    from .loaders import Job

#: The scenario these loaders run in (and the only one they run in).
SCENARIO = "model"


def _state(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    state = model.state_dict()
    del model  # the tensors keep their storage; the module goes with the last reference
    while state:
        yield state.popitem()


def prepare() -> None:
    """Import transformers (and the model code) before the clock: both loaders pay it alike, and
    it would hide the load in the measurement of a small checkpoint."""
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from .. import transformers as weightlift_transformers  # noqa: F401


def weightlift_model(job: Job) -> Iterator[tuple[str, torch.Tensor]]:
    """``weightlift.transformers.from_pretrained`` with the job's budget."""
    from ..transformers import from_pretrained

    yield from _state(from_pretrained(job.source, device=job.device,
                                      max_host_memory=job.budget))


def transformers_model(job: Job) -> Iterator[tuple[str, torch.Tensor]]:
    """transformers' own ``AutoModelForCausalLM.from_pretrained``, as its users call it."""
    from transformers import AutoModelForCausalLM

    device_map = None if job.device == "cpu" else job.device  # a device_map needs accelerate
    yield from _state(AutoModelForCausalLM.from_pretrained(job.source, device_map=device_map))


def needs_config(source: str) -> str | None:
    """Why ``source`` cannot be built as a model (no ``config.json``), or None."""
    from pathlib import Path

    path = Path(source)
    directory = path if path.is_dir() else path.parent
    if not (directory / "config.json").is_file():
        return f"{directory} has no config.json"
    return None
