"""``weightlift.torch.load_file``: the one-line switch from ``safetensors.torch.load_file``.

This module is named ``torch`` to mirror ``safetensors.torch``. Every module of the package imports
torch absolutely (``import torch``), which always means the real torch under Python 3.
"""

from __future__ import annotations

import os

import torch

from .api import load


def load_file(filename: str | os.PathLike[str], device: str | int | torch.device = "cpu", *,
              strategy: str = "auto") -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (or any checkpoint source), in file order, on ``device``.

        state = weightlift.torch.load_file("model.safetensors", device="cuda:0")
    """
    if isinstance(device, int):
        device = f"cuda:{device}"
    return load(filename, device=device, strategy=strategy)


__all__ = ["load_file"]
