"""``weightlift.numpy.load_file``: the one-line switch from ``safetensors.numpy.load_file``.

    state = weightlift.numpy.load_file("model.safetensors")   # {name: np.ndarray}

Named ``numpy`` to mirror ``safetensors.numpy``; the package imports numpy absolutely, so this
module never shadows the real one. bfloat16 and float8 arrays need ``ml_dtypes``.
"""

from __future__ import annotations

import os

import numpy as np

from .compat import safe_open


def load_file(filename: str | os.PathLike[str], *, strategy: str | None = None,
              backend: str | None = None) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file (or any checkpoint source) as a numpy array, in file
    order. ``strategy``/``backend`` and the errors are those of ``weightlift.safe_open``."""
    with safe_open(filename, framework="np", strategy=strategy, backend=backend) as f:
        return f.get_tensors()


__all__ = ["load_file"]
