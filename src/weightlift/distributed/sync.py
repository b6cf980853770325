"""The process group as the loader sees it, and the one rule that keeps failures from hanging.

Collectives block until every rank of the group joins, so a rank that raises and leaves would
leave the others waiting until the group's timeout. Instead, at agreed points every rank reports
whether it failed (``agree``); if one did, all raise together, the failed ranks their own error and
the others a ``RankFailed`` that carries it.
"""

from __future__ import annotations

import os
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


def backends(backend: str) -> dict[str, str]:
    """Which backend moves tensors of which device type, from ``dist.get_backend``'s string.

        backends("cpu:gloo,cuda:nccl")  # → {"cpu": "gloo", "cuda": "nccl"}
        backends("nccl")                # → {"cuda": "nccl"}
        backends("gloo")                # → {"cpu": "gloo"}  (gloo's CUDA support stages via host)
    """
    found: dict[str, str] = {}
    for part in backend.lower().replace(" ", "").split(","):
        if not part:
            continue
        if ":" in part:
            device, name = part.split(":", 1)
            found[device] = name
        elif part == "nccl":
            found["cuda"] = part
        else:
            found["cpu"] = part
    return found


def nccl_device(bound: torch.device | None, current: int, local_rank: int | None, *,
                rank: int) -> torch.device:
    """The GPU this rank's NCCL collectives use: the group's bound device (``device_id=`` of
    ``init_process_group``) if any, else the current device — unless that is plainly another
    rank's (``LOCAL_RANK`` set by the launcher names a different one), which would make every rank
    of a node use one GPU and NCCL fail or hang.

        nccl_device(None, 3, 3, rank=3)  # → device(type="cuda", index=3)
    """
    if bound is not None:
        return torch.device(bound)
    if local_rank is not None and local_rank != current:
        raise WeightliftError(
            f"rank {rank}: NCCL collectives would run on cuda:{current}, but LOCAL_RANK is "
            f"{local_rank}; call torch.cuda.set_device({local_rank}) before the load, or pass "
            f"device_id=torch.device('cuda', {local_rank}) to init_process_group")
    return torch.device("cuda", current)


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
        rank = dist.get_rank(group)
        device = torch.device("cpu")
        if backends(backend).get("cuda") == "nccl":
            bound = getattr(group if group is not None else dist.group.WORLD,
                            "bound_device_id", None)
            local = os.environ.get("LOCAL_RANK")
            device = nccl_device(bound, torch.cuda.current_device(),
                                 int(local) if local is not None and local.isdigit() else None,
                                 rank=rank)
        return cls(group, rank, dist.get_world_size(group), device)

    def global_rank(self, rank: int) -> int:
        """The default-group rank collectives take as ``src`` for group rank ``rank``."""
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def agree(self, error: BaseException | None) -> None:
        """Return if no rank failed; else raise: ``error`` here, ``RankFailed`` on the others."""
        failed = self.post(error)
        if error is not None:
            raise error
        if failed is not None:
            raise failed

    def post(self, error: BaseException | None) -> RankFailed | None:
        """Take part in one ``agree`` without raising: this rank's ``error`` (if any) reaches the
        others, and what failed anywhere comes back (None: nothing did).

        What a rank that is leaving calls, so that the others, waiting in their next ``agree``,
        raise at once instead of at the group's timeout."""
        flags = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        if error is not None:
            flags[self.rank] = 1
        dist.all_reduce(flags, group=self.group)
        failed = flags.nonzero().flatten().tolist()
        if not failed:
            return None
        reasons: list[str | None] = [None] * self.world
        mine = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(reasons, mine, group=self.group)
        return RankFailed(failed, [str(reasons[r]) for r in failed])

    def leave(self, exc: BaseException) -> None:
        """On the way out of a step whose next agreement the other ranks wait in (this rank's
        consumer raised, or stopped early): post ``exc`` there, so they raise ``RankFailed`` at
        once. Never raises: a broken group has nobody left to tell."""
        error = exc if isinstance(exc, Exception) else RuntimeError(
            f"its consumer stopped taking tensors midway ({type(exc).__name__})")
        try:
            self.post(error)
        except Exception:  # noqa: BLE001 - the group itself is broken
            pass

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value`` (picklable), in rank order."""
        values: list[object] = [None] * self.world
        dist.all_gather_object(values, value, group=self.group)
        return values

    def gather_agreed(self, error: BaseException | None, value: object) -> list[object]:
        """``agree`` and ``gather`` in one exchange: every rank's ``value`` if no rank failed;
        else raise, ``error`` here and ``RankFailed`` on the others (a failed rank sends no
        value). What a step that ends in an agreement and a gather needs, at the cost of one."""
        mine = None if error is None else f"{type(error).__name__}: {error}"
        pairs = self.gather((mine, None if error is not None else value))
        failed = [rank for rank, pair in enumerate(pairs)
                  if pair[0] is not None]  # type: ignore[index]
        if error is not None:
            raise error
        if failed:
            raise RankFailed(failed, [str(pairs[r][0]) for r in failed])  # type: ignore[index]
        return [pair[1] for pair in pairs]  # type: ignore[index]

    def totals(self, values: list[int], seconds: float) -> tuple[list[int], float]:
        """``sum(values)`` and ``max(seconds)`` over the group in one exchange (counts below
        2**53, as bytes are, are exact in the float64s it sends)."""
        mine = torch.tensor([*values, seconds], dtype=torch.float64, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(every, mine, group=self.group)
        table = torch.stack(every).cpu()
        return ([int(v) for v in table[:, :-1].sum(0).tolist()], float(table[:, -1].max()))

    def sum(self, values: list[int]) -> list[int]:
        """Element-wise sums over the group."""
        total = torch.tensor(values, dtype=torch.int64, device=self.device)
        dist.all_reduce(total, group=self.group)
        return [int(v) for v in total.tolist()]

    def max(self, value: float) -> float:
        top = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(top, op=dist.ReduceOp.MAX, group=self.group)
        return float(top.item())
