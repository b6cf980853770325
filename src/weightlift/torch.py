"""``weightlift.torch.load_file``: the one-line switch from ``safetensors.torch.load_file``.

This module is named ``torch`` to mirror ``safetensors.torch``. Every module of the package imports
torch absolutely (``import torch``), which always means the real torch under Python 3.
"""

from __future__ import annotations

import os

import torch

from .api import load
from .compat import reference_errors, reference_open_errors, strategy_for


@reference_errors
def load_file(filename: str | os.PathLike[str], device: str | int | torch.device = "cpu", *,
              strategy: str | None = None, backend: str | None = None
              ) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file (or any checkpoint source), in file order, on ``device``.

        state = weightlift.torch.load_file("model.safetensors", device="cuda:0")

    ``backend`` (``"mmap"`` or ``"pread"``, as in safetensors >= 0.8) picks ``mmap`` or
    ``stream`` when no ``strategy`` is named; the default is weightlift's ``auto``. A missing
    file raises ``FileNotFoundError`` and an unreadable one ``PermissionError``, with the
    reference's messages; other errors are also ``safetensors.SafetensorError``s when that
    package is installed.
    """
    if isinstance(device, int):
        device = f"cuda:{device}"
    with reference_open_errors(filename):
        return load(filename, device=device, strategy=strategy_for(strategy, backend))


__all__ = ["load_file"]
