"""Which ranks of a group share a host, and so a page cache.

Two ranks share a page cache when they run on one kernel: the host name alone is not enough
(containers on two machines may carry one name), so the key is the host name and the kernel's
boot id, which changes with every boot of every machine.

    host_key()                     # "node7/5b1e…" on this rank
    Hosts(keys, rank)              # every rank's key, gathered with the load's first exchange
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

BOOT_ID = "/proc/sys/kernel/random/boot_id"


def host_key() -> str:
    """This machine's host name and boot id (the name alone where there is no boot id)."""
    try:
        with open(BOOT_ID, encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


@dataclass(frozen=True)
class Hosts:
    """The host of every rank of a group (group ranks), as seen by rank ``rank``."""

    keys: tuple[str, ...]
    rank: int

    @property
    def single(self) -> bool:
        """Do all ranks share one host?"""
        return len(set(self.keys)) == 1

    @property
    def local(self) -> list[int]:
        """The group ranks on this rank's host, in order."""
        return [r for r, key in enumerate(self.keys) if key == self.keys[self.rank]]
