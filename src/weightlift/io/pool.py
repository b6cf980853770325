"""Reused host buffers for a stream: memory comes back once the consumer dropped every tensor on it.

A fresh anonymous mapping costs a zero-filled page fault per page on first touch: for a stream
whose consumer copies each tensor away and drops it, that is the whole checkpoint's worth of
faults and zeroing. A ``BufferPool`` hands out mappings as uint8 tensors and watches a per-use
handle (the ``memoryview`` that ``torch.frombuffer`` keeps alive): when the last tensor viewing a
mapping is gone, the mapping goes back on a free list and the next block is read into it.

Nothing is borrowed: a tensor the caller still holds keeps its mapping out of the pool, so it
never changes. The pool keeps at most ``limit`` bytes (out and free together) before it unmaps
free mappings rather than keep them, so reuse never raises the memory a load holds.

    pool = BufferPool(limit=512 << 20)
    buf = pool.take(8 << 20)    # fresh the first time
    del buf                     # every view gone: back on the free list
    buf = pool.take(8 << 20)    # the same memory again, no page faults
    pool.close()
"""

from __future__ import annotations

import mmap
import threading
import weakref

import torch

from . import base, retry

#: A free mapping up to this many times larger than asked for is reused rather than a fresh one
#: made; beyond that the slack would hold too much memory idle.
WASTE = 2


class BufferPool:
    """Anonymous mappings, reused once every tensor viewing one has been freed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()     # finalizers run on whichever thread drops a tensor
        self._free: list[mmap.mmap] = []
        self._free_bytes = 0
        self._out_bytes = 0
        self._closed = False
        #: Mappings made fresh / taken again from the free list.
        self.fresh = 0
        self.reused = 0

    def take(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of ``nbytes``; its memory returns to the pool when its last view dies."""
        if nbytes < base.OWN_MAPPING:
            return base.host_buffer(nbytes)
        mapping: mmap.mmap | None = None
        dropped = []
        with self._lock:
            fits = [m for m in self._free if nbytes <= len(m) <= WASTE * nbytes]
            if fits:
                mapping = min(fits, key=len)
                self._free.remove(mapping)
                self._free_bytes -= len(mapping)
                self.reused += 1
            else:
                # Make room: free mappings that do not fit go before a fresh one comes.
                while self._free and self._out_bytes + self._free_bytes + nbytes > self.limit:
                    old = self._free.pop(0)
                    self._free_bytes -= len(old)
                    dropped.append(old)
                self.fresh += 1
            size = len(mapping) if mapping is not None else nbytes
            self._out_bytes += size
        for old in dropped:
            _unmap(old)
        if mapping is None:
            mapping = base.anonymous_mapping(nbytes)
        handle = memoryview(mapping)
        weakref.finalize(handle, retry.guarded, self._give_back, mapping).atexit = False
        return torch.frombuffer(handle, dtype=torch.uint8, count=nbytes)

    def _give_back(self, mapping: mmap.mmap) -> None:
        size = len(mapping)
        with self._lock:
            self._out_bytes -= size
            keep = not self._closed and self._out_bytes + self._free_bytes + size <= self.limit
            if keep:
                self._free.append(mapping)
                self._free_bytes += size
        if not keep:
            _unmap(mapping)

    def close(self) -> None:
        """Unmap the free mappings; mappings still out are unmapped when their tensors die."""
        with self._lock:
            self._closed = True
            free, self._free, self._free_bytes = self._free, [], 0
        for mapping in free:
            _unmap(mapping)


def _unmap(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:
        pass  # still viewed somewhere: unmapped when the last view goes
