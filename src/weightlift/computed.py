"""Tensors no checkpoint holds, given the values transformers gives them.

A transformers model built on the ``meta`` device has buffers that are computed, never saved
(rotary ``inv_freq``, ``position_ids``). transformers' own ``from_pretrained`` computes them after
the load by marking every loaded tensor ``_is_hf_initialized`` and running the model's
``initialize_weights``, whose init functions skip marked tensors; so does weightlift. This module
never imports transformers: ``load_into`` asks it about any module.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

import torch

#: transformers' flag for "this tensor holds its final value; ``_init_weights`` leaves it alone".
INITIALISED = "_is_hf_initialized"


def is_transformers_model(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers ``PreTrainedModel`` (never imports transformers)."""
    transformers = sys.modules.get("transformers")
    base = getattr(transformers, "PreTrainedModel", None) if transformers is not None else None
    return base is not None and isinstance(module, base)


def compute_unloaded(model: Any, loaded: Iterable[torch.Tensor]) -> None:
    """Give every tensor of ``model`` not in ``loaded`` the value transformers gives it.

    Marks ``loaded`` as initialised and runs the model's own ``initialize_weights``, which (as in
    transformers' ``from_pretrained``) recomputes the non-persistent buffers (rotary ``inv_freq``,
    ``position_ids``) and initialises parameters no checkpoint held; loaded tensors are skipped.
    Every tensor must already be on a real device.
    """
    for tensor in loaded:
        setattr(tensor, INITIALISED, True)
    model.initialize_weights()


__all__ = ["INITIALISED", "compute_unloaded", "is_transformers_model"]
