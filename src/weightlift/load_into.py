"""``load_into``: fill an existing module's parameters and buffers straight from a checkpoint.

Each tensor is copied from the read buffers into the module's own storage (converting floating
dtypes on the way, like ``load_state_dict``), so no state dict is ever built next to the model.
Tensors on the ``meta`` device (or on another device than ``device=``) get fresh storage on the
target device, which is then filled the same way and put in place of the old tensor.

A GGUF checkpoint is first seen under the module's names through its family's rules
(``gguf_families``: llama.cpp's names, and the layout changes to undo). Tensors that need work
between the read and the module (a q/k permutation to undo, packed blocks to dequantize) pass
through ``stream()`` one at a time (host memory: the budget plus one tensor).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

from . import api
from .computed import compute_unloaded, is_transformers_model
from .dequant import check_supported, dequantize, packed_type
from .errors import PlacementError
from .formats.ggml import GGMLType
from .formats.records import DTYPES, TensorInfo
from .gguf_families import Transform, family_of
from .place import parse_device
from .sources import Source, resolve
from .sources.records import Entry, Layout


class LoadIntoResult(NamedTuple):
    """Like ``load_state_dict``'s result: keys the module has that the checkpoint lacks, and the
    reverse."""

    missing_keys: list[str]
    unexpected_keys: list[str]


@dataclass
class Slot:
    """One tensor of the module, under every name it has (tied weights share one slot)."""

    names: list[str]
    owners: list[tuple[torch.nn.Module, str]]
    tensor: torch.Tensor
    is_parameter: bool
    persistent: bool


def module_slots(module: torch.nn.Module) -> list[Slot]:
    """Every parameter and buffer, grouped by identity, in module order."""
    slots: dict[int, Slot] = {}
    for prefix, owner in module.named_modules(remove_duplicate=False):
        dot = f"{prefix}." if prefix else ""
        tensors = [(name, t, True) for name, t in owner._parameters.items()]
        tensors += [(name, t, False) for name, t in owner._buffers.items()]
        for attr, tensor, is_parameter in tensors:
            if tensor is None:
                continue
            persistent = is_parameter or attr not in owner._non_persistent_buffers_set
            slot = slots.get(id(tensor))
            if slot is None:
                slot = slots[id(tensor)] = Slot([], [], tensor, is_parameter, persistent)
            if (owner, attr) not in [(o, a) for o, a in slot.owners]:
                slot.owners.append((owner, attr))
                slot.names.append(f"{dot}{attr}")
            slot.persistent = slot.persistent or persistent
    return list(slots.values())


def load_into(module: torch.nn.Module, source: Source, *, strict: bool = True,
              strategy: str = "auto", device: str | torch.device | None = None,
              max_host_memory: int | str | None = None, engine: str = "auto") -> LoadIntoResult:
    """Copy a checkpoint into ``module``'s parameters and buffers, in place.

        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        weightlift.load_into(model, "Llama-3-8B/", device="cuda")

    Names must match the module's ``state_dict`` keys; GGUF files of Llama, Mistral and Qwen2
    are mapped from llama.cpp's names (see ``weightlift.gguf_families``). ``strict``: raise when
    the module has keys the checkpoint lacks or the reverse (otherwise return them). Shapes must
    always match; floating dtypes are converted to the module's, other dtypes must match. Tied
    weights are loaded once, from whichever of their names the checkpoint holds. Tensors on
    ``meta`` are created on ``device`` (default CPU) and filled; with ``device`` set, every tensor
    ends up there. ``max_host_memory`` bounds the host memory of the reads (see
    ``weightlift.load``); ``engine`` as for ``load``.

    A meta tensor the checkpoint does not hold (e.g. a non-persistent buffer) has no value to
    load. In a transformers model it is computed after the load as transformers computes it
    (rotary ``inv_freq``, ``position_ids``; see ``weightlift.transformers``), and with
    ``strict=False`` missing weights are initialised by the model's own ``_init_weights``. In
    other modules it is reported as missing, and created uninitialised when ``strict=False``.
    """
    target = parse_device(device) if device is not None else None
    with resolve(source) as layout:
        view, work = _module_view(layout, module)
        slots = module_slots(module)
        computed = _computed_buffers(module, slots)
        plan = _match(module, [s for s in slots if id(s) not in computed], view, target, strict)
        for destinations in plan.by_device.values():
            for name in destinations.keys() & work.keys():
                if work[name].packed is not None:  # refused before anything is read
                    check_supported(work[name].packed, tensor=work[name].source)
        for group, destinations in plan.by_device.items():
            plain = {n: d for n, d in destinations.items() if n not in work}
            if plain:
                _read(view, plain, parse_device(group), strategy, max_host_memory, engine)
            worked = {n: d for n, d in destinations.items() if n in work}
            if worked:
                _rework(layout, worked, work, strategy, max_host_memory, engine)
        plan.unloaded.extend(s for s in slots if id(s) in computed)
        _install(plan, target)
        if computed:
            _compute(module, plan)
    return LoadIntoResult(plan.missing, plan.unexpected)


@dataclass(frozen=True)
class _Work:
    """A checkpoint tensor that needs work between the read and the module."""

    source: str                 # its name in the checkpoint
    packed: GGMLType | None     # packed blocks of this type, to dequantize
    transform: Transform | None
    argument: int               # the transform's ``n``


def _module_view(layout: Layout, module: torch.nn.Module) -> tuple[Layout, dict[str, _Work]]:
    """``layout`` under the module's names, and the tensors that need work (by those names).

    Safetensors checkpoints already use them; a GGUF file's names and layouts are mapped back by
    its family's rules, and a packed tensor is matched as the float32 tensor it will become."""
    if layout.format != "gguf":
        return layout, {}
    family = family_of(layout.metadata, layout.root)
    meta = layout.metadata or {}
    prefix = _base_prefix(module)
    renamed: dict[str, Entry] = {}
    work: dict[str, _Work] = {}
    for name, entry in layout.entries.items():
        if name in family.ignored:
            continue
        mapped = family.hf_name(name)
        if mapped is None:
            new = name  # left as it is: reported as unexpected
        elif mapped.startswith("model."):
            new = prefix + mapped.removeprefix("model.")
        else:
            new = mapped
        info = entry.info
        packed = packed_type(info)
        transform = family.transform(name)
        if packed is not None or transform is not None:
            argument = 0 if transform is None else transform.argument(meta, family.architecture,
                                                                      layout.root)
            work[new] = _Work(name, packed, transform, argument)
        if packed is not None:
            info = replace(info, dtype=DTYPES["F32"], shape=info.ggml_shape or info.shape)
        renamed[new] = Entry(entry.shard, replace(info, name=new))
    return Layout(layout.root, layout.shards, renamed, layout.metadata, layout.index_path), work


def _base_prefix(module: torch.nn.Module) -> str:
    """``"model."`` for a *ForCausalLM, ``""`` for a bare LlamaModel-like module."""
    names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    return "" if "embed_tokens.weight" in names and "model.embed_tokens.weight" not in names \
        else "model."


def _computed_buffers(module: torch.nn.Module, slots: list[Slot]) -> set[int]:
    """The meta non-persistent buffers of a transformers model: its own init code computes them."""
    if not is_transformers_model(module):
        return set()
    return {id(s) for s in slots if s.tensor.is_meta and not s.persistent}


def _compute(module: torch.nn.Module, plan: "_Plan") -> None:
    """Let a transformers model compute what was not loaded; what was loaded stays as it is."""
    unloaded = {name for slot in plan.unloaded for name in slot.names}
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    compute_unloaded(module, [t for name, t in named if name not in unloaded])


@dataclass
class _Plan:
    #: device → checkpoint name → tensor to fill (the module's own storage, or a fresh one).
    by_device: dict[str, dict[str, torch.Tensor]]
    #: slot → the fresh tensor that replaces the module's (meta or moved tensors).
    fresh: list[tuple[Slot, torch.Tensor]]
    #: slots not loaded from the checkpoint.
    unloaded: list[Slot]
    missing: list[str]
    unexpected: list[str]


def _match(module: torch.nn.Module, slots: list[Slot], layout: Layout,
           target: torch.device | None, strict: bool) -> _Plan:
    entries = layout.entries
    known: set[str] = set()
    plan = _Plan(defaultdict(dict), [], [], [], [])
    problems: list[str] = []
    for slot in slots:
        known.update(slot.names if slot.persistent else [])
        present = [name for name in slot.names if name in entries] if slot.persistent else []
        if not present:
            plan.unloaded.append(slot)
            if slot.persistent or slot.tensor.is_meta:
                plan.missing.extend(slot.names)
            continue
        name = present[0]  # tied weights: one name is enough
        problem = check_tensor(name, entries[name].info, slot.tensor)
        if problem:
            problems.append(problem)
            continue
        dest = slot.tensor.detach()
        home = target or (torch.device("cpu") if dest.is_meta else dest.device)
        if dest.is_meta or dest.device != home:
            dest = torch.empty(dest.shape, dtype=dest.dtype, device=home)
            plan.fresh.append((slot, dest))
        elif not dest.is_contiguous():
            problems.append(f"{name}: the module's tensor is not contiguous")
            continue
        plan.by_device[str(home)][name] = dest
    plan.unexpected = sorted(set(entries) - known)
    kind = type(module).__name__
    if problems:
        raise PlacementError(f"cannot load into {kind}: " + "; ".join(problems), path=layout.root)
    if strict and (plan.missing or plan.unexpected):
        raise PlacementError(_key_message(kind, plan), path=layout.root)
    return plan


def check_tensor(name: str, info: TensorInfo, tensor: torch.Tensor) -> str | None:
    """Why checkpoint tensor ``info`` cannot fill ``tensor`` (shape, or a dtype that is not
    converted), None when it can."""
    if tuple(tensor.shape) != info.torch_shape:
        return (f"size mismatch for {name}: the checkpoint has shape {list(info.torch_shape)}, the "
                f"module {list(tensor.shape)}")
    stored = info.dtype.torch
    if stored != tensor.dtype and not (stored.is_floating_point and tensor.dtype.is_floating_point):
        return (f"dtype mismatch for {name}: the checkpoint has {info.dtype.name} ({stored}), the "
                f"module {tensor.dtype}; only floating dtypes are converted")
    return None


def _key_message(kind: str, plan: _Plan) -> str:
    parts = [f"cannot load into {kind} (strict=True)"]
    meta = [n for s in plan.unloaded if s.tensor.is_meta and not s.persistent for n in s.names]
    absent = [name for name in plan.missing if name not in meta]
    if absent:
        parts.append(f"missing key(s) in the checkpoint: {_names(absent)}")
    if meta:
        parts.append(f"non-persistent buffer(s) on the meta device, which no checkpoint holds: "
                     f"{_names(meta)}; build the module with its buffers on a real device (only "
                     "the parameters on meta), or pass strict=False and set them after the load "
                     "(a transformers model: weightlift.transformers.from_pretrained does it)")
    if plan.unexpected:
        parts.append(f"unexpected key(s) in the checkpoint: {_names(plan.unexpected)}")
    return "; ".join(parts)


def _names(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(f'"{n}"' for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read(layout: Layout, destinations: dict[str, torch.Tensor], device: torch.device,
          strategy: str, max_host_memory: int | str | None = None, engine: str = "auto"
          ) -> None:
    with torch.no_grad():
        for _ in api.run_load(layout, keys=list(destinations), device=device, strategy=strategy,
                          dtype=None, streaming=False, destinations=destinations,
                          max_host_memory=max_host_memory, engine=engine):
            pass


def _rework(layout: Layout, destinations: dict[str, torch.Tensor], work: dict[str, _Work],
            strategy: str, max_host_memory: int | str | None, engine: str) -> None:
    """Stream the tensors that need work, one at a time, and copy each into its destination."""
    wanted = {work[name].source: (work[name], dest) for name, dest in destinations.items()}
    with torch.no_grad():
        for name, tensor in api.run_load(layout, keys=list(wanted), device="cpu",
                                         strategy=strategy, dtype=None, streaming=True,
                                         max_host_memory=max_host_memory, engine=engine):
            job, dest = wanted[name]
            value = tensor
            if job.packed is not None:
                value = dequantize(tensor, job.packed, torch.float32)
            if job.transform is not None:
                value = job.transform.undo(value, job.argument)
            dest.copy_(value)


def _install(plan: _Plan, target: torch.device | None) -> None:
    """Put fresh tensors in the module, and bring what was not loaded to ``target``."""
    replacements = list(plan.fresh)
    for slot in plan.unloaded:
        tensor = slot.tensor.detach()
        home = target or (torch.device("cpu") if tensor.is_meta else tensor.device)
        if tensor.is_meta:
            replacements.append((slot, torch.empty(tensor.shape, dtype=tensor.dtype, device=home)))
        elif tensor.device != home:
            replacements.append((slot, tensor.to(home)))
    for slot, tensor in replacements:
        put(slot, tensor)


def put(slot: Slot, tensor: torch.Tensor) -> None:
    """Make ``tensor`` the slot's parameter or buffer under every name it has."""
    value: torch.Tensor = tensor
    if slot.is_parameter:
        value = torch.nn.Parameter(tensor, requires_grad=slot.tensor.requires_grad)
    for owner, attr in slot.owners:
        table = owner._parameters if slot.is_parameter else owner._buffers
        table[attr] = value


__all__ = ["LoadIntoResult", "check_tensor", "load_into", "module_slots", "put"]
