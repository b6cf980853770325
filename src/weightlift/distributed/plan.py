"""Sharding plans: for each tensor, the part each rank of a tensor-parallel group needs.

A plan is any callable ``(name, info, rank, world) -> index | None``: ``None`` means the rank needs
nothing of that tensor, an index (a numpy-style tuple of slices and ints; ``()`` is the whole
tensor) selects its part. It must give the same answer on every rank, because the collective mode
asks each rank for every other rank's part instead of exchanging plans.

``Plan`` builds one from name patterns, first match wins:

    plan = Plan({"*.q_proj.weight": Split(0), "*.o_proj.weight": Split(1), "*.rotary*": Skip()})
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Protocol, Union

from ..errors import PlacementError
from ..formats.records import TensorInfo

#: A numpy-style basic index: one slice or int per leading dimension.
Index = tuple[Union[slice, int], ...]
#: Any plan: which part of tensor ``name`` rank ``rank`` of ``world`` needs (None: nothing).
PlanFn = Callable[[str, TensorInfo, int, int], Union[Index, None]]


class Placement(Protocol):
    def index(self, info: TensorInfo, rank: int, world: int) -> Index | None: ...


@dataclass(frozen=True)
class Replicate:
    """Every rank gets the whole tensor (norms, biases of row-parallel layers)."""

    def index(self, info: TensorInfo, rank: int, world: int) -> Index | None:
        return ()


@dataclass(frozen=True)
class Skip:
    """No rank gets the tensor (e.g. rotary caches the model recomputes)."""

    def index(self, info: TensorInfo, rank: int, world: int) -> Index | None:
        return None


@dataclass(frozen=True)
class Split:
    """Rank ``r`` gets the ``r``-th of ``world`` consecutive parts along ``dim``.

    Parts must be equal unless ``uneven=True`` (then sizes follow ``torch.tensor_split``: the first
    ``size % world`` parts are one longer), because tensor-parallel layers assume equal shards.
    """

    dim: int
    uneven: bool = False

    def index(self, info: TensorInfo, rank: int, world: int) -> Index | None:
        ndim = len(info.shape)
        dim = self.dim + ndim if self.dim < 0 else self.dim
        if not 0 <= dim < ndim:
            raise PlacementError(f"Split({self.dim}) does not fit shape {list(info.shape)}",
                                 tensor=info.name)
        size = info.shape[dim]
        if size % world and not self.uneven:
            raise PlacementError(f"Split({self.dim}) of size {size} does not divide into {world} "
                                 f"equal parts; pass Split({self.dim}, uneven=True) to allow "
                                 "unequal ones", tensor=info.name)
        start, stop = split_bounds(size, rank, world)
        return (slice(None),) * dim + (slice(start, stop),)


def split_bounds(size: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of part ``rank`` of ``world``, as ``torch.tensor_split`` cuts them."""
    base, extra = divmod(size, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


class Plan:
    """Placements chosen by glob patterns on tensor names (``fnmatch``, first match wins).

    ``world_size`` set: the plan refuses to run in a group of another size (a plan cut for 8 GPUs
    silently loaded on 4 would give every rank the wrong shapes).
    """

    def __init__(self, rules: Mapping[str, Placement] | Iterable[tuple[str, Placement]] = (),
                 *, default: Placement = Replicate(), world_size: int | None = None) -> None:
        items = rules.items() if isinstance(rules, Mapping) else rules
        self.rules: list[tuple[str, Placement]] = list(items)
        self.default = default
        self.world_size = world_size

    def placement(self, name: str) -> Placement:
        for pattern, placement in self.rules:
            if fnmatchcase(name, pattern):
                return placement
        return self.default

    def __call__(self, name: str, info: TensorInfo, rank: int, world: int) -> Index | None:
        if self.world_size is not None and world != self.world_size:
            raise PlacementError(f"the plan was made for {self.world_size} ranks but the group "
                                 f"has {world}")
        return self.placement(name).index(info, rank, world)

    def __repr__(self) -> str:
        return f"Plan({self.rules!r}, default={self.default!r}, world_size={self.world_size})"


def llama_plan(world_size: int | None = None) -> Plan:
    """Megatron-style tensor parallelism for Llama-family checkpoints (Llama, Mistral, Qwen2...).

    q/k/v/gate/up are column-parallel (dim 0 of the ``[out, in]`` weight, and their biases),
    o/down row-parallel (dim 1), embeddings and lm_head vocab-parallel (dim 0), the rest (norms)
    replicated.
    """
    column, row = Split(0), Split(1)
    rules: list[tuple[str, Placement]] = []
    for proj in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"):
        rules.append((f"*.{proj}.weight", column))
        rules.append((f"*.{proj}.bias", column))
    rules += [("*.o_proj.weight", row), ("*.down_proj.weight", row),
              ("*embed_tokens.weight", column), ("*lm_head.weight", column)]
    return Plan(rules, world_size=world_size)


__all__ = ["Index", "Placement", "Plan", "PlanFn", "Replicate", "Skip", "Split", "llama_plan",
           "split_bounds"]
