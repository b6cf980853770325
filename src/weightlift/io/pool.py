"""Reused host buffers for a stream: memory comes back once the consumer dropped every tensor on it.

A fresh anonymous mapping costs a zero-filled page fault per page on first touch: for a stream
whose consumer copies each tensor away and drops it, that is the whole checkpoint's worth of
faults and zeroing. A ``BufferPool`` hands out mappings as uint8 tensors and watches a per-use
handle (the ``memoryview`` that ``torch.frombuffer`` keeps alive): once the last tensor viewing a
mapping is gone, the next ``take`` finds its handle dead and reads the next block into it.

No code runs where the last view dies (a finalizer's Python code is where a signal handler's
interrupt is printed and dropped): the pool asks its weak references when it needs memory, and a
mapping still out when the pool closes is unmapped by ``mmap`` itself (C) with its last view.

Nothing is borrowed: a tensor the caller still holds keeps its mapping out of the pool, so it
never changes. The pool keeps at most ``limit`` bytes (out and free together) before it unmaps
free mappings rather than keep them, so reuse never raises the memory a load holds.

    pool = BufferPool(limit=512 << 20)
    buf = pool.take(8 << 20)    # fresh the first time
    del buf                     # every view gone: the next take finds it free
    buf = pool.take(8 << 20)    # the same memory again, no page faults
    pool.close()
"""

from __future__ import annotations

import mmap
import threading
import weakref

import torch

from . import base

#: A free mapping up to this many times larger than asked for is reused rather than a fresh one
#: made; beyond that the slack would hold too much memory idle.
WASTE = 2


class BufferPool:
    """Anonymous mappings, reused once every tensor viewing one has been freed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []
        #: Mappings handed out, each with a weak reference to its handle (dead: back to the pool).
        self._out: list[tuple[weakref.ref, mmap.mmap]] = []
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
        with self._lock:
            dropped = self._take_back()
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
        with self._lock:
            self._out.append((weakref.ref(handle), mapping))
        return torch.frombuffer(handle, dtype=torch.uint8, count=nbytes)

    def _take_back(self) -> list[mmap.mmap]:
        """Under the lock: mappings whose every view is gone go back on the free list, within
        the limit; those beyond it are returned, to be unmapped."""
        out, back = [], []
        for ref, mapping in self._out:
            (out if ref() is not None else back).append((ref, mapping))
        self._out = out
        dropped = []
        for _, mapping in back:
            size = len(mapping)
            self._out_bytes -= size
            if not self._closed and self._out_bytes + self._free_bytes + size <= self.limit:
                self._free.append(mapping)
                self._free_bytes += size
            else:
                dropped.append(mapping)
        return dropped

    def close(self) -> None:
        """Unmap the free mappings; mappings still out are unmapped (by ``mmap``, in C) when
        their last view dies."""
        with self._lock:
            self._closed = True
            dropped = self._take_back()
            free, self._free, self._free_bytes = self._free, [], 0
            self._out = []  # each mapping lives on with its handle, and goes with it
        for mapping in dropped + free:
            _unmap(mapping)


def _unmap(mapping: mmap.mmap) -> None:
    try:
        mapping.close()
    except BufferError:
        pass  # still viewed somewhere: unmapped when the last view goes
