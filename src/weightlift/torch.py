"""``weightlift.torch``: the one-line switch from ``safetensors.torch`` for reading.

    state = weightlift.torch.load_file("model.safetensors", device="cuda:0")
    weightlift.torch.load_model(model, "model.safetensors")   # tied weights included

This module is named ``torch`` to mirror ``safetensors.torch``. Every module of the package imports
torch absolutely (``import torch``), which always means the real torch under Python 3.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict

import torch

from .api import load
from .compat import reference_errors, reference_open_errors, strategy_for
from .errors import ModelMismatchError


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


def load_model(model: torch.nn.Module, filename: str | os.PathLike[str], strict: bool = True,
               device: str | int | torch.device = "cpu", *, strategy: str | None = None,
               backend: str | None = None) -> tuple[list[str], list[str]]:
    """Load ``filename`` into ``model``, as ``safetensors.torch.load_model`` does: parameters the
    model ties together (``model.b = model.a``) are stored once in the file, under any of their
    names, and fill every name of the group.

    Returns ``(missing, unexpected)``: model names the file did not fill, and file names the
    model has no place for. With ``strict`` (the default) either raises ``ModelMismatchError``
    (a ``RuntimeError``, as torch raises) naming them.
    """
    state = load_file(filename, device=device, strategy=strategy, backend=backend)
    groups = tied_groups(model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing, unexpected = set(missing), list(unexpected)
    for group, whole in groups:
        stored = sorted(set(whole) & set(state))
        keep = stored[0] if stored else whole[0]
        for name in group:
            if name == keep:
                continue
            if name in missing:
                missing.remove(name)  # filled through the name it is tied to
            else:
                unexpected.append(name)  # the file holds it twice: one copy has no place
    if strict and (missing or unexpected):
        lines = [f"Error(s) in loading state_dict for {type(model).__name__}:"]
        if missing:
            lines.append("    Missing key(s) in state_dict: " + _quoted(missing))
        if unexpected:
            lines.append("    Unexpected key(s) in state_dict: " + _quoted(unexpected))
        raise ModelMismatchError("\n".join(lines), path=filename)
    return sorted(missing), unexpected


def tied_groups(state: dict[str, torch.Tensor]) -> list[tuple[list[str], list[str]]]:
    """Names whose tensors overlap in memory, as ``(group, whole)``: each group sorted, ``whole``
    the names in it that span their entire storage (one of them is the copy a file holds).

    Views side by side in one storage without overlapping (an RNN's flattened weights) are not
    tied. A tied group where no name spans the storage cannot be loaded safely and raises.
    """
    by_storage: dict[tuple[torch.device, int, int], list[str]] = defaultdict(list)
    for name, tensor in state.items():
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        if storage.data_ptr() and storage.nbytes():
            by_storage[(tensor.device, storage.data_ptr(), storage.nbytes())].append(name)
    groups: list[tuple[list[str], list[str]]] = []
    for names in by_storage.values():
        spans = sorted((state[name].data_ptr(), _end(state[name]), name) for name in names)
        runs: list[list[str]] = []
        reach = -1
        for start, end, name in spans:
            if runs and start < reach:  # overlaps the run so far
                runs[-1].append(name)
                reach = max(reach, end)
            else:
                runs.append([name])
                reach = end
        for run in runs:
            if len(run) < 2:
                continue
            whole = sorted(name for name in run if _is_whole(state[name]))
            if not whole:
                raise ModelMismatchError(f"tied parameters {sorted(run)} are views of which none "
                                         "spans its whole storage; load the state dict by hand")
            groups.append((sorted(run), whole))
    return groups


def _end(tensor: torch.Tensor) -> int:
    """One past the last byte ``tensor`` addresses."""
    if tensor.numel() == 0:
        return tensor.data_ptr()
    last = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride()))
    return tensor.data_ptr() + (last + 1) * tensor.element_size()


def _is_whole(tensor: torch.Tensor) -> bool:
    storage = tensor.untyped_storage()
    return (tensor.data_ptr() == storage.data_ptr()
            and math.prod(tensor.shape) * tensor.element_size() == storage.nbytes())


def _quoted(names: set[str] | list[str]) -> str:
    return ", ".join(f'"{name}"' for name in sorted(names))


__all__ = ["load_file", "load_model", "tied_groups"]
