"""Tensor-parallel loading over ``torch.distributed``: each rank loads only its part.

    from weightlift.distributed import llama_plan, load_sharded
    state, report = load_sharded("Llama-3-70B/", llama_plan(world_size=8), device="cuda")

See ``docs/distributed.md`` for running it under torchrun with NCCL.
"""

from .load import MODES, ShardReport, load_sharded
from .plan import Index, Placement, Plan, PlanFn, Replicate, Skip, Split, llama_plan
from .sync import RankFailed

__all__ = [
    "MODES",
    "Index",
    "Placement",
    "Plan",
    "PlanFn",
    "RankFailed",
    "Replicate",
    "ShardReport",
    "Skip",
    "Split",
    "llama_plan",
    "load_sharded",
]
