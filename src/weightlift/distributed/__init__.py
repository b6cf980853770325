"""Tensor-parallel loading over ``torch.distributed``: each rank loads only its part.

    from weightlift.distributed import llama_plan, load_sharded
    state, report = load_sharded("Llama-3-70B/", llama_plan(world_size=8), device="cuda")
    for name, tensor in stream_sharded("Llama-3-70B/", group=tp_group):  # whole tensors
        ...

See ``docs/distributed.md`` for running it under torchrun with NCCL.
"""

from .load import MODES, SHARES, ShardReport, load_sharded
from .plan import Index, Placement, Plan, PlanFn, Replicate, Skip, Split, llama_plan
from .stream import stream_sharded
from .sync import RankFailed

__all__ = [
    "MODES",
    "Index",
    "Placement",
    "Plan",
    "PlanFn",
    "RankFailed",
    "Replicate",
    "SHARES",
    "ShardReport",
    "Skip",
    "Split",
    "llama_plan",
    "load_sharded",
    "stream_sharded",
]
