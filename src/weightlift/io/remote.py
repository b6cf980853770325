"""``remote``: parallel ranged GETs from object storage straight into destination buffers.

Each ``read`` is one GET conditional on the ETag seen with the shard's header; its body is copied
into the destination (a tensor's buffer or a ring slot) in ``CHUNK``-sized pieces as it arrives,
so the bytes held beyond the destinations are about ``concurrency × CHUNK``. Requests in flight
(``concurrency``) and their size (``request_size``) come from ``storage_options``; the ring and the
stream window size them down to the host-memory budget like every other strategy's reads.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..sources.records import Shard
from .base import Strategy, Unavailable, host_view


class RemoteStrategy(Strategy):
    name = "remote"
    # Object stores reward many requests of a few MiB in flight.
    in_flight = 16
    read_size = 8 << 20

    def prepare(self, shards: Sequence[Shard]) -> None:
        local = [s.path for s in shards if not s.remote]
        if local:
            raise Unavailable(f"{local[0]} is a local file; the remote strategy reads object "
                              "storage URLs")
        super().prepare(shards)
        if shards:
            shards[0].check_unchanged()  # refuses a closed checkpoint
            tuning = shards[0].obj.client.tuning  # type: ignore[attr-defined]
            self.in_flight = tuning.concurrency
            self.read_size = tuning.request_size

    def kinds(self, shard: int) -> tuple[str, ...]:
        return ()  # ranged GETs, no descriptor

    def read(self, shard: int, start: int, dest: torch.Tensor) -> None:
        from ..remote.store import fetch_into

        s = self.shards[shard]
        s.check_unchanged()  # refuses reads once the checkpoint is closed
        fetch_into(s.obj, start, host_view(dest))  # type: ignore[attr-defined]

    def close(self) -> None:
        self.shards = ()
