"""The process group as the loader sees it, and the one rule that keeps failures from hanging.

Collectives block until every rank of the group joins, so a rank that raises and leaves would
leave the others waiting until the group's timeout. Instead, at agreed points every rank reports
whether it failed (``agree``); if one did, all raise together, the failed ranks their own error and
the others a ``RankFailed`` that carries it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import WeightliftError


class RankFailed(WeightliftError):
    """Another rank of the group failed; this one stopped with it. ``ranks``: the ranks that failed
    (group ranks), ``reasons``: their errors, as text."""

    def __init__(self, ranks: list[int], reasons: list[str]) -> None:
        self.ranks = ranks
        self.reasons = reasons
        listed = "; ".join(f"rank {r}: {why}" for r, why in zip(ranks, reasons))
        super().__init__(f"the sharded load failed on {len(ranks)} rank(s), so this rank stopped "
                         f"too ({listed})")


@dataclass(frozen=True)
class Peers:
    """This rank's view of a process group: its rank, the size, and where collective tensors live."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    #: NCCL moves only CUDA tensors; gloo (and the CPU side of a mixed backend) host tensors.
    device: torch.device

    @classmethod
    def of(cls, group: dist.ProcessGroup | None) -> Peers:
        if not (dist.is_available() and dist.is_initialized()):
            raise WeightliftError("a sharded load needs an initialised process group: call "
                                  "torch.distributed.init_process_group first (e.g. under torchrun)")
        backend = str(dist.get_backend(group))
        device = torch.device("cpu")
        if backend == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        return cls(group, dist.get_rank(group), dist.get_world_size(group), device)

    def global_rank(self, rank: int) -> int:
        """The default-group rank collectives take as ``src`` for group rank ``rank``."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def agree(self, error: Exception | None) -> None:
        """Return if no rank failed; else raise: ``error`` here, ``RankFailed`` on the others."""
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        if error is not None:
            flags[self.rank] = 1
        dist.all_reduce(flags, group=self.group)
        failed = flags.nonzero().flatten().tolist()
        if not failed:
            return
        reasons: list[str | None] = [None] * self.world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reasons, mine, group=self.group)
        if error is not None:
            raise error
        raise RankFailed(failed, [str(reasons[r]) for r in failed])

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sums over the group."""
        total = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(total, group=self.group)
        return [int(v) for v in total.tolist()]

    def max(self, value: float) -> float:
        top = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        return float(top.item())
