"""``weightlift.transformers.from_pretrained``: a transformers model, its weights read by weightlift.

    from weightlift.transformers import from_pretrained
    model = from_pretrained("Qwen2-0.5B/", dtype=torch.bfloat16, device="cuda")

The model is built from ``config.json`` on the ``meta`` device (no parameter storage exists before
its bytes arrive), filled in place by ``weightlift.load_into``, then finished the way transformers'
own ``from_pretrained`` finishes it: the tensors no checkpoint holds (rotary ``inv_freq``,
``position_ids``, ...) are computed by the model's own ``_init_weights`` on the real device,
embeddings are tied and the model is put in eval mode. transformers is imported only when one of
these functions runs: it is not a dependency of weightlift (``pip install 'weightlift[transformers]'``).
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .api import load
from .api import open as open_checkpoint
from .computed import compute_unloaded
from .errors import CheckpointError, PlacementError, WeightliftError
from .load_into import LoadIntoResult, check_tensor, load_into, module_slots, put
from .place import parse_device
from .sources.hub import resolve_source

if TYPE_CHECKING:  # pragma: no cover - typing only
    from transformers import PretrainedConfig, PreTrainedModel

#: Keys old checkpoints hold that current models compute instead (transformers ignores them too).
COMPUTED_KEYS = (r"rotary_emb\.inv_freq", r"(^|\.)position_ids$", r"(^|\.)masked_bias$",
                 r"(^|\.)attn\.bias$")


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise WeightliftError("weightlift.transformers needs the transformers package: "
                              "pip install 'weightlift[transformers]'") from exc
    return transformers


def model_directory(source: str | os.PathLike[str]) -> Path:
    """The local directory holding ``config.json`` and the weights of ``source`` (a directory, an
    ``hf://org/name`` reference or HF cache repository folder, or one ``.safetensors``/index file
    next to its ``config.json``)."""
    path = resolve_source(source) or Path(source)
    if not path.exists():
        raise CheckpointError("no such file or directory", path=path)
    return path if path.is_dir() else path.parent


def load_config(source: str | os.PathLike[str]) -> PretrainedConfig:
    """The model's configuration, read from the ``config.json`` next to its weights."""
    directory = model_directory(source)
    if not (directory / "config.json").is_file():
        raise CheckpointError("has no config.json, so the model cannot be built; pass "
                              "config=AutoConfig.from_pretrained(...) or a directory that holds "
                              "one", path=directory)
    auto_config = _transformers().AutoConfig
    try:
        return auto_config.from_pretrained(os.fspath(directory), local_files_only=True)
    except (ValueError, OSError, KeyError) as exc:
        raise CheckpointError(f"config.json cannot be read by transformers: {exc}",
                              path=directory / "config.json") from exc


def model_class_for(config: PretrainedConfig) -> Any:
    """The class ``config.architectures`` names (what the checkpoint was saved from), else the
    ``AutoModel`` class of its model type."""
    transformers = _transformers()
    for name in getattr(config, "architectures", None) or []:
        found = getattr(transformers, name, None)
        if found is not None:
            return found
    return transformers.AutoModel


def resolve_dtype(dtype: torch.dtype | str | None, config: PretrainedConfig,
                  source: str | os.PathLike[str]) -> torch.dtype:
    """``None``/``"auto"`` → the config's ``dtype``, else the checkpoint's first floating dtype
    (what transformers 5 does by default); a name like ``"bfloat16"`` → ``torch.bfloat16``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        configured = getattr(config, "dtype", None)
        if isinstance(configured, str):
            configured = getattr(torch, configured, None)
        if isinstance(configured, torch.dtype):
            return configured
        with open_checkpoint(source) as checkpoint:
            for name in checkpoint.keys():
                stored = checkpoint.layout.entries[name].info.dtype.torch
                if stored.is_floating_point:
                    return stored
        return torch.get_default_dtype()
    found = getattr(torch, dtype, None)
    if not isinstance(found, torch.dtype):
        raise PlacementError(f"unknown dtype {dtype!r}; pass a torch.dtype, 'auto' or a name "
                             "like 'bfloat16'")
    return found


def build_on_meta(model_class: Any, config: PretrainedConfig, dtype: torch.dtype,
                  **kwargs: Any) -> PreTrainedModel:
    """``model_class`` (a model class or an ``AutoModel*`` class) built from ``config`` with every
    parameter and buffer on the ``meta`` device: no storage is allocated."""
    with torch.device("meta"):
        if hasattr(model_class, "_model_mapping"):  # AutoModelForCausalLM and friends
            return model_class.from_config(config, dtype=dtype, **kwargs)
        return model_class._from_config(config, dtype=dtype, **kwargs)


def _materialise(model: torch.nn.Module, device: torch.device) -> None:
    """Fresh (uninitialised) storage on ``device`` for the tensors still on ``meta``."""
    for slot in module_slots(model):
        if slot.tensor.is_meta:
            put(slot, torch.empty(slot.tensor.shape, dtype=slot.tensor.dtype, device=device))


def _adopt(module: torch.nn.Module, weights: str | os.PathLike[str], dtype: torch.dtype,
           strategy: str, max_host_memory: int | str | None) -> LoadIntoResult:
    """CPU: ``weightlift.load`` the tensors and make them the module's own, without a copy.

    The loaded tensors become the parameters (views of the file mapping when ``auto`` picks
    ``mmap`` for a warm checkpoint, as transformers does; buffers read in parallel when cold), so
    no parameter storage is ever allocated next to them.
    """
    with open_checkpoint(weights) as checkpoint:
        infos = {name: checkpoint.layout.entries[name].info for name in checkpoint.keys()}
    chosen, missing, problems = {}, [], []
    known: set[str] = set()
    for slot in module_slots(module):
        if not slot.persistent:
            missing.extend(slot.names if slot.tensor.is_meta else [])
            continue
        known.update(slot.names)
        present = [name for name in slot.names if name in infos]
        if not present:
            missing.extend(slot.names)
            continue
        problem = check_tensor(present[0], infos[present[0]], slot.tensor)
        if problem:
            problems.append(problem)
        chosen[present[0]] = slot
    if problems:
        raise PlacementError(f"cannot load into {type(module).__name__}: " + "; ".join(problems),
                             path=weights)
    state = load(weights, keys=list(chosen), dtype=dtype, strategy=strategy,
                 max_host_memory=max_host_memory)
    for name, slot in chosen.items():
        tensor = state.pop(name)
        put(slot, tensor if tensor.dtype == slot.tensor.dtype else tensor.to(slot.tensor.dtype))
    return LoadIntoResult(missing, sorted(set(infos) - known))


def copies_into_place(device: torch.device) -> bool:
    """Whether the weights are copied from the read buffers into fresh tensors on ``device``
    (accelerators), rather than the loaded CPU tensors becoming the parameters themselves."""
    return device.type != "cpu"


def _target(model: PreTrainedModel, keys: set[str]) -> tuple[torch.nn.Module, Callable[[str], str]]:
    """The module whose names are the checkpoint's, and what turns its names into the model's:
    checkpoints saved from ``BertModel`` load into ``BertForX.bert``, and the reverse."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    dot = f"{prefix}."
    saved_with_prefix = bool(prefix) and any(k.startswith(dot) for k in keys)
    has_base = bool(prefix) and isinstance(getattr(model, prefix, None), torch.nn.Module)
    if has_base and not saved_with_prefix:
        return getattr(model, prefix), lambda name: dot + name
    if prefix and not has_base and saved_with_prefix:
        holder = torch.nn.Module()
        holder.add_module(prefix, model)
        return holder, lambda name: name.removeprefix(dot)
    return model, lambda name: name


def _named_tensors(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer under every name (tied ones twice)."""
    return [*module.named_parameters(remove_duplicate=False),
            *module.named_buffers(remove_duplicate=False)]


def _ignored(model: PreTrainedModel, unexpected: list[str]) -> list[str]:
    patterns = [*COMPUTED_KEYS, *(getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    ignore = re.compile("|".join(f"({p})" for p in patterns))
    return [key for key in unexpected if not ignore.search(key)]


def from_pretrained(source: str | os.PathLike[str], *, model_class: Any = None,
                    dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                    strategy: str = "auto", max_host_memory: int | str | None = None,
                    config: PretrainedConfig | None = None, **model_kwargs: Any
                    ) -> PreTrainedModel:
    """A transformers model with the weights of ``source``, in eval mode, like
    ``AutoModelForCausalLM.from_pretrained`` but read by weightlift and never allocated twice.

        model = from_pretrained("hf://Qwen/Qwen2-0.5B", dtype="bfloat16", device="cuda")
        model = from_pretrained("minilm/", model_class=transformers.AutoModel)

    ``source``: a directory with ``config.json`` and safetensors weights, an ``hf://org/name``
    reference to the local HF cache, or a weights file next to its ``config.json``.
    ``model_class``: a model class or an ``AutoModel*`` class (default: ``config.architectures``).
    ``dtype``: ``None``/``"auto"`` (the config's, else the checkpoint's), a ``torch.dtype`` or its
    name. ``strategy`` and ``max_host_memory`` are weightlift's (see ``weightlift.load``); other
    keyword arguments (e.g. ``attn_implementation="eager"``) go to the model's constructor.
    Checkpoint keys saved with or without the model's base prefix (``bert.``, ``model.``) are
    matched like transformers matches them; tensors the checkpoint lacks are initialised by the
    model (with a warning), keys the model does not use are reported in a warning.
    """
    target_device = parse_device(device)
    # Building sets config.dtype: the caller's config stays as it was (as in transformers).
    config = load_config(source) if config is None else copy.deepcopy(config)
    torch_dtype = resolve_dtype(dtype, config, source)
    cls = model_class if model_class is not None else model_class_for(config)
    model = build_on_meta(cls, config, torch_dtype, **model_kwargs)
    weights = resolve_source(source) or source
    with open_checkpoint(weights) as checkpoint:
        keys = set(checkpoint.keys())
    module, model_name = _target(model, keys)
    if not copies_into_place(target_device):
        result = _adopt(module, weights, torch_dtype, strategy, max_host_memory)
    else:  # copied from the read buffers straight to the device
        result = load_into(module, weights, strict=False, strategy=strategy,
                           device=target_device, max_host_memory=max_host_memory)
    model.tie_weights()  # a head tied to a base-model checkpoint's embeddings gets them now
    missing = {model_name(name) for name in result.missing_keys}
    missing.update(name for name, t in _named_tensors(model) if t.is_meta)  # e.g. a new head
    _materialise(model, target_device)
    loaded = [t for name, t in _named_tensors(model) if name not in missing]
    compute_unloaded(model, loaded)
    model.tie_weights()
    model.eval()
    _warn_keys(model, weights, missing, _ignored(model, result.unexpected_keys))
    _generation_config(model, model_directory(source))
    return model


def _warn_keys(model: PreTrainedModel, source: object, missing: set[str],
               unexpected: list[str]) -> None:
    persistent = set(model.state_dict().keys())
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    absent = sorted(k for k in missing if k in persistent and k not in tied)
    kind = type(model).__name__
    if absent:
        warnings.warn(f"{source}: {kind} weights not in the checkpoint, newly initialised "
                      f"(train them before use): {', '.join(absent[:8])}"
                      f"{' ...' if len(absent) > 8 else ''}", UserWarning, stacklevel=3)
    if unexpected:
        warnings.warn(f"{source}: checkpoint tensors {kind} does not use: "
                      f"{', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}",
                      UserWarning, stacklevel=3)


def _generation_config(model: PreTrainedModel, directory: Path) -> None:
    """Like transformers: a generating model takes ``generation_config.json`` when there is one."""
    if not (directory / "generation_config.json").is_file() or not model.can_generate():
        return
    generation = _transformers().GenerationConfig
    try:
        model.generation_config = generation.from_pretrained(os.fspath(directory),
                                                             local_files_only=True)
    except (ValueError, OSError) as exc:
        warnings.warn(f"{directory}/generation_config.json is not usable ({exc}); keeping the "
                      "defaults from config.json", UserWarning, stacklevel=3)


__all__ = ["build_on_meta", "copies_into_place", "from_pretrained",
           "load_config", "model_class_for", "model_directory", "resolve_dtype"]
