"""Read: move planned byte ranges into tensors, several reads in flight, nothing left half-done.

Two pipelines share one shape — submit reads ahead on an engine (a thread pool or an io_uring,
``io/engine.py``), take results in file order:

* ``_own``: a CPU load with no conversion. Each ``Block`` gets a buffer the strategy fills
  directly; tensors are views of it (zero-copy ``view``s for mmap, or of a window mapped over a
  block in the page cache, ``io/window.py``). No intermediate copy. In a stream, buffers whose
  tensors the consumer has dropped are read into again (``io/pool.py``), and windows are unmapped.
* ``_copy``: destinations already exist or live elsewhere (device, dtype conversion, a module's
  parameters). Chunks pass through a ring of reused slots sized from the host-memory budget, and the
  ``Sink`` copies each piece out; a slot is reused only after its copy is done. A chunk in the page
  cache takes a window of the file instead of a slot: the sink copies straight out of the cache.

Whatever goes wrong — a failed read, the consumer's exception, ``KeyboardInterrupt`` or a
``SystemExit`` from a signal handler at any point — pending reads are cancelled and running ones
finished before the error propagates (``_wind_down``), so no thread (or kernel completion) writes
into memory after the caller has seen the failure. Waiting for them is bounded
(``retry.SETTLE``): a read still running then keeps its memory and descriptors for good, with a
warning. An interrupt that arrives while reads are wound down is raised once they are.

Every read submitted pins the descriptors of its shard (``Shard.pin``) until it is reaped, so no
descriptor is closed (to keep within the descriptor limit) under a read in flight. Reads run in
file order, so few shards are pinned at once; a load pins another shard ahead of the one it
waits for only while the pool of descriptors has room (``_room``). Each pin carries a token the
load records before pinning (``Pins``) and releases exactly once, wherever an exception came.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence

import torch

from .io import retry
from .io.base import PAGE, Strategy, aligned_window
from .io.engine import Deferred, Done, Engine, InlineEngine, Pending, ThreadEngine, settle
from .io.pool import BufferPool
from .io.window import Window
from .place import Sink, as_tensor, as_tensors
from .plan import Block, Chunk, Kind, plan_blocks, plan_chunks
from .sources.descriptors import POOL
from .sources.records import Entry, Layout
from .verify import Verifier

#: Ring slots and read extents are aligned to this for O_DIRECT.
ALIGN = 4096
#: Smallest ring slot: below this, per-read overhead dominates.
MIN_SLOT = 256 << 10
#: Never more slots than this, whatever the budget.
MAX_SLOTS = 32

Progress = Callable[[int], None]


#: Slack around a ring slot: reads of aligned extents around a chunk stay in memory we own.
SLACK = 3 * ALIGN


def pinned_footprint(nbytes: int) -> int:
    """Bytes torch's caching host allocator takes for a page-locked request of ``nbytes``.

    It rounds every request up to a power of two (``PowerOf2Ceil`` in
    ``ATen/core/CachingHostAllocator.h``, torch 2.13; only requests above the configurable
    ``pinned_max_round_threshold`` are taken as they are), so ``2**k + 1`` bytes take ``2**(k+1)``.
    """
    return 1 << (nbytes - 1).bit_length() if nbytes > 0 else 0


def ring_bytes(slot: int, count: int, *, pinned: bool) -> int:
    """Host memory a ring of ``count`` slots of ``slot`` bytes really takes (slack included)."""
    each = slot + SLACK
    return count * (pinned_footprint(each) if pinned else each)


def ring_shape(budget: int, strategy: Strategy, depth: int | None = None, *, pinned: bool = False
               ) -> tuple[int, int]:
    """(slot size, slot count) for a copying load: as many reads in flight as the budget allows
    (``depth``: the engine's, default the strategy's thread count).

    ``pinned``: slots are page-locked through torch's allocator, so each takes a power of two;
    slots are sized so the rounded sizes fit the budget (``ring_bytes(*shape, pinned=True)``).

        ring_shape(8 << 20, make_strategy("direct"), pinned=True)  # → (249856, 32): 32 × 256 KiB
    """
    depth = depth or strategy.in_flight
    wanted = min(max(MAX_SLOTS, depth), 2 * depth)
    if pinned:
        each = _floor_power_of_two(min(strategy.read_size + SLACK, budget // wanted))
        each = max(each, MIN_SLOT)
        count = budget // each
        if count < 2:
            each, count = max(MIN_SLOT, _floor_power_of_two(budget // 2)), 2
        return each - SLACK, min(count, wanted)
    # A small budget gets smaller slots before fewer of them: reads in flight are what keep
    # the storage busy.
    slot = min(strategy.read_size, budget // wanted - SLACK) // ALIGN * ALIGN
    slot = max(slot, MIN_SLOT)
    count = budget // (slot + SLACK)
    if count < 2:
        slot = max(MIN_SLOT, (budget // 2 - SLACK) // ALIGN * ALIGN)
        count = 2
    return slot, min(count, wanted)


def _floor_power_of_two(n: int) -> int:
    return 1 << (n.bit_length() - 1) if n > 0 else 0


def read_tensors(layout: Layout, entries: Sequence[Entry], strategy: Strategy, *,
                 budget: int, sink: Sink | None = None, window: int | None = None,
                 progress: Progress | None = None, verifier: Verifier | None = None,
                 engine: Engine | None = None) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Yield ``(entry, tensor)`` in file order. ``sink`` set: copy mode, else own mode with at most
    ``window`` bytes read ahead of the consumer (None: no limit, for loads that keep everything).
    ``verifier``: every block read is handed to it in file order; its digests are checked before
    the last tensor is yielded (``IntegrityError``).

    ``strategy`` must be prepared for ``layout.shards``. ``engine`` (default: a thread pool made
    and closed here) carries the reads out; a given engine stays the caller's to close. Raises on
    any failure; checks at the end that no file changed while it was read.
    """
    for index in sorted({entry.shard for entry in entries}):
        layout.shards[index].check_unchanged()  # e.g. an ``open()`` checkpoint edited since
    runner = engine if engine is not None else ThreadEngine(strategy.in_flight)
    try:
        if sink is None:
            yield from _own(entries, strategy, runner, window, progress, verifier)
        else:
            yield from _copy(entries, strategy, runner, sink, budget, progress, verifier)
        for index in sorted({entry.shard for entry in entries}):
            layout.shards[index].check_unchanged()
    finally:
        if engine is None:
            runner.close()


def _own(entries: Sequence[Entry], strategy: Strategy, engine: Engine,
         window: int | None, progress: Progress | None, verifier: Verifier | None
         ) -> Iterator[tuple[Entry, torch.Tensor]]:
    read_size = strategy.read_size
    reuse = None
    if window is not None:
        # Within a small window, smaller reads keep as many in flight as a large one would.
        read_size = min(read_size, window // (2 * engine.depth)) // ALIGN * ALIGN
        read_size = max(MIN_SLOT, read_size)
    # A load that keeps zero-copy views of mapped files, run inline (the small path, auto's
    # cached mmap): one block per run of adjacent tensors, its views made in bulk.
    whole = strategy.zero_copy and window is None and isinstance(engine, InlineEngine)
    blocks = deque(plan_blocks(entries, read_size, kind=_kind(strategy), whole=whole))
    if window is not None and blocks:
        # Tensors the consumer drops give their memory back to the next blocks. The pool keeps
        # idle mappings only while everything it handed out and holds stays within the window
        # plus one block (the one the consumer holds, with its O_DIRECT slack): reuse never
        # raises a stream's bound of budget + largest tensor.
        reuse = BufferPool(window + max(block.nbytes for block in blocks) + 3 * ALIGN)
    pending: deque[tuple[Block, torch.Tensor, list[Pending], object, bool]] = deque()
    pins: Pins = {}
    ahead = 0       # bytes read ahead into buffers but not yet handed out
    reads = 0       # reads submitted but not yet collected
    submitted = 0   # blocks submitted
    ready = False   # the first block needs no read: hand it out before submitting more
    try:
        while blocks or pending:
            # Keep the engine busy, within the window, allocating buffers just in time. Every
            # block read ahead counts against the window, the one being waited for included (it
            # may exceed the window alone: one tensor larger than the budget), so a stream holds
            # at most the window plus the tensor its consumer has: budget + largest tensor.
            # Windows of the file count from when they are mapped until the consumer has dropped
            # every tensor viewing them: what is mapped stays within the window.
            while blocks and (not pending or (reads < engine.ahead and (
                    window is None or _held(strategy, ahead) + _footprint(strategy, blocks[0])
                    <= window) and _room(strategy, blocks[0].shard) and not ready)):
                block = blocks.popleft()
                futures: list[Pending] = []
                token = _pin(strategy, block.shard, pins)
                # Pending (so cancelled and unpinned on failure) from before its first read.
                pending.append((block, _NOTHING, futures, token, False))
                buf, mapped = _submit_block(block, strategy, engine, reuse, futures,
                                            first=not submitted)
                # The first block of a stream wholly in the page cache is handed out at once,
                # before any read ahead is submitted (and threads are started for it).
                ready = not submitted and mapped and not futures
                submitted += 1
                pending[-1] = (block, buf, futures, token, mapped)
                if not mapped:
                    ahead += block.nbytes
                    # A window's step runs when it is handed out (``_populating``): only reads
                    # the engine carries count against its depth, so windows are mapped (and
                    # uncached pages asked for) as far ahead as the window allows.
                    reads += len(futures)
            block, buf, futures, token, mapped = pending[0]  # pending (cancelled on failure)
            ready = False
            for future in futures:
                future.result()
            pending.popleft()
            _unpin(strategy, token, pins)
            # Nothing is handed out whose bytes may have been read across a change of the file.
            strategy.shards[block.shard].check_unchanged()
            held = _verify(verifier, block.shard, block.start, buf, window is not None,
                           last=not blocks and len(pending) == 0)
            if mapped or strategy.zero_copy:
                strategy.viewed += block.nbytes
            if not mapped:
                ahead -= block.nbytes
                reads -= len(futures)
            strategy.consumed(block.shard, block.start, block.end)
            if progress is not None:
                progress(block.nbytes)
            if whole:
                views = as_tensors(buf, block.start, block.entries)
                if held:
                    verifier.finish()  # type: ignore[union-attr] # nothing of a bad file comes out
                yield from zip(block.entries, views)
                del views
            else:
                for index, entry in enumerate(block.entries):
                    if held and index == len(block.entries) - 1:
                        verifier.finish()  # type: ignore[union-attr] # nothing of a bad file
                    lo, hi = entry.info.start - block.start, entry.info.end - block.start
                    yield entry, as_tensor(buf[lo:hi], entry.info)
            del buf  # the consumer's tensors alone decide when this memory is reused (unmapped)
    finally:
        def held() -> list[tuple[object, torch.Tensor | None, list[Pending]]]:
            return [(token, buf, futures) for _, buf, futures, token, _ in pending]

        try:
            interrupted = _wound_down(strategy, pins, held)
        except (KeyboardInterrupt, SystemExit) as exc:  # as it was called, before its loop
            interrupted = _wound_down(strategy, pins, held) or exc
        pending.clear()
        if reuse is not None:
            reuse.close()
        if interrupted is not None:
            raise interrupted


def _kind(strategy: Strategy) -> Kind | None:
    """Small tensors in the page cache are grouped apart from the others, so that their group
    can be mapped (``Strategy.window``) rather than read."""
    if strategy.windows is None:
        return None
    return lambda entry: strategy.mappable(entry.shard, entry.info.start, entry.info.end)


def _held(strategy: Strategy, ahead: int) -> int:
    """Bytes a stream holds against its window: ``ahead`` read into buffers, plus every window
    of the file still mapped (pending, or viewed by tensors the consumer still has)."""
    return ahead + (strategy.windows.live if strategy.windows is not None else 0)


def _footprint(strategy: Strategy, block: Block) -> int:
    """What ``block`` will take: its bytes, and the pages around them if it is mapped."""
    return block.nbytes + (2 * PAGE if strategy.windows is not None else 0)


def _verify(verifier: Verifier | None, shard: int, start: int, data: torch.Tensor,
            streaming: bool, last: bool) -> bool:
    """Hand a block to ``verifier``; a stream (whose consumer may change yielded tensors) waits
    until it is hashed. True for the last block: its last tensor waits for ``finish``."""
    if verifier is None:
        return False
    ticket = verifier.feed(shard, start, data)
    if streaming:
        verifier.wait(ticket)
    return last


def _submit_block(block: Block, strategy: Strategy, engine: Engine, reuse: BufferPool | None,
                  futures: list[Pending], first: bool = False) -> tuple[torch.Tensor, bool]:
    """Submit ``block``'s reads, appending each to ``futures`` as it goes; its buffer, and
    whether that is a window of the file (mapped, not read). ``first``: the load's first block,
    which is not populated where every page of it was cached (its consumer's first touch maps
    them, as auto's mmap leaves the first tensor of a stream: ``MmapStrategy.lazy_until``)."""
    if strategy.zero_copy:
        buf = strategy.view(block.shard, block.start, block.end)
        for lo, hi in block.reads:
            futures.append(engine.call(strategy.populate, block.shard, lo, hi))
        return buf, False
    window = strategy.window(block.shard, block.start, block.end)
    if window is not None:
        if first and strategy.fully_cached(block.shard, block.start, block.end):
            return window.view(block.start, block.end), True
        for lo, hi in block.reads:
            futures.append(_populating(window, lo, hi))
        return window.view(block.start, block.end), True
    buf = strategy.alloc(block.nbytes, block.start, reuse.take if reuse is not None else None)
    for lo, hi in block.reads:
        if hi > lo:
            futures.append(engine.read(strategy, block.shard, lo,
                                       buf[lo - block.start:hi - block.start]))
    return buf, False


#: A load's pins: token → (shard, kinds). Recorded before pinning, dropped after unpinning; what
#: is left when the load ends is unpinned then (unpinning a token twice changes nothing).
Pins = dict[object, tuple[int, tuple[str, ...]]]
#: The buffer of a block whose reads are not submitted yet.
_NOTHING = torch.empty(0, dtype=torch.uint8)


def _pin(strategy: Strategy, shard: int, pins: Pins) -> object:
    """Pin the descriptors ``strategy`` reads ``shard`` through, for reads about to be submitted;
    the token to unpin them with (``_unpin``). If this raises, ``pins`` still says what to undo."""
    token = object()
    kinds = strategy.kinds(shard)
    pins[token] = (shard, kinds)
    s = strategy.shards[shard]
    for kind in kinds:
        s.pin(kind, token)
    return token


def _unpin(strategy: Strategy, token: object, pins: Pins) -> None:
    """Undo ``_pin`` once every read it covered has been reaped (finished or withdrawn)."""
    shard, kinds = pins[token]
    s = strategy.shards[shard]
    for kind in kinds:
        s.unpin(kind, token)
    del pins[token]


def _wind_down(strategy: Strategy, pins: Pins,
               held: list[tuple[object, torch.Tensor | None, list[Pending]]]
               ) -> BaseException | None:
    """Stop the reads a load has pending — ``held``: (pin token, memory, reads) — and release
    every pin of ``pins``, whatever interrupts it; an interrupt that came meanwhile is returned
    for the caller to raise once it has cleaned up. Reads still running after
    ``retry.SETTLE`` keep their memory and their descriptors pinned for good."""
    running, interrupted = settle([future for _, _, futures in held for future in futures])
    if running:
        still = {id(future) for future in running}
        for token, memory, futures in held:
            if any(id(future) in still for future in futures):
                retry.keep(memory)
                pins.pop(token, None)  # its descriptors stay pinned: a read may still use them
        warnings.warn(f"{len(running)} read(s) were still running {retry.SETTLE:g} s after the "
                      "load stopped; their memory and descriptors are kept for the rest of the "
                      "process", RuntimeWarning, stacklevel=3)
    for token in list(pins):
        try:
            _unpin(strategy, token, pins)
        except BaseException as exc:
            interrupted = interrupted or exc
    return interrupted


def _wound_down(strategy: Strategy, pins: Pins,
                held: Callable[[], list[tuple[object, torch.Tensor | None, list[Pending]]]]
                ) -> BaseException | None:
    """``_wind_down(strategy, pins, held())`` carried to its end: an interrupt that lands where
    it cannot keep one (building ``held``, between its steps) is kept, and the wind-down run
    again (settling settled reads and unpinning released pins change nothing); the interrupt to
    raise once the caller has cleaned up is returned, the first one kept.

    A load's cleanup runs in a generator's ``finally``, which the garbage collector may be the
    one to run (a ``for`` loop left by the first Ctrl-C drops the stream): there Python prints
    and drops what a second signal's handler raises, so without this the cleanup stopped where
    it landed, and the load's pins, with a descriptor, were kept for the rest of the process
    (once in 200 real signals, a SIGTERM sent twice). An interrupt can land as this function
    is entered, before its loop: callers call it again from an ``except`` clause."""
    kept: BaseException | None = None
    while True:
        try:
            interrupted = _wind_down(strategy, pins, held())
        except (KeyboardInterrupt, SystemExit) as exc:
            kept = kept or exc
            continue
        return kept or interrupted


def _room(strategy: Strategy, shard: int) -> bool:
    """Whether reads of ``shard`` may be submitted ahead: its descriptors are pinned already, or
    the pool has room for them without going over its bound."""
    s = strategy.shards[shard]
    wanted = sum(1 for kind in strategy.kinds(shard) if not s.pinned(kind))
    return wanted == 0 or POOL.room(wanted)


def _copy(entries: Sequence[Entry], strategy: Strategy, engine: Engine, sink: Sink,
          budget: int, progress: Progress | None, verifier: Verifier | None
          ) -> Iterator[tuple[Entry, torch.Tensor]]:
    # Pinned slots let host→device copies run asynchronously while the next reads land, unless
    # the strategy found it cannot read into page-locked memory here.
    pinned = sink.pinned and not strategy.zero_copy and strategy.pin_refused is None
    slot_size, count = ring_shape(budget, strategy, engine.depth, pinned=pinned)
    chunks = deque(plan_chunks(entries, slot_size, _kind(strategy)))
    # ``count`` places, each a ring slot or a window of the file (a chunk in the page cache,
    # copied straight out of it): at most the budget held, mapped or allocated. Slots are made
    # when a chunk needs one, so a load served from windows allocates none.
    free: list[torch.Tensor] = []
    made = 0
    windows = 0     # chunks pending whose source is a window
    fenced: deque[tuple[torch.Tensor, object | None]] = deque()
    pending: deque[tuple[Chunk, torch.Tensor | None, torch.Tensor | None, Pending, object]
                  ] = deque()
    pins: Pins = {}
    try:
        while chunks or pending:
            while chunks and len(pending) < count and (
                    not pending or _room(strategy, chunks[0].shard)):
                chunk = chunks[0]
                slot = window = None
                if not strategy.zero_copy and made + windows < count:
                    window = strategy.window(chunk.shard, chunk.start, chunk.end)
                if not strategy.zero_copy and window is None:
                    if not free and made + windows < count:
                        free.append(sink.slot(slot_size + SLACK, pinned=pinned))
                        made += 1
                    if not free and fenced:
                        done_slot, fence = fenced.popleft()
                        sink.wait(fence)
                        free.append(done_slot)
                    if not free:
                        break
                    slot = free.pop()
                chunks.popleft()
                token = _pin(strategy, chunk.shard, pins)  # undone by _wind_down if this raises
                src, future = _submit_chunk(chunk, slot, window, strategy, engine)
                windows += window is not None
                del window  # the views in ``src`` alone keep it mapped
                pending.append((chunk, slot, src, future, token))
            chunk, slot, src, future, token = pending[0]  # pending (cancelled on failure)
            future.result()
            pending.popleft()
            _unpin(strategy, token, pins)
            strategy.shards[chunk.shard].check_unchanged()
            ticket = None
            if verifier is not None:
                ticket = verifier.feed(chunk.shard, chunk.start, src)
            for piece in chunk.pieces:
                lo = piece.entry.info.start + piece.begin - chunk.start
                sink.place(piece, src[lo:lo + piece.end - piece.begin])
            if verifier is not None:
                verifier.wait(ticket)  # hashed while placed; the slot may be reused after this
                if not chunks and not pending:
                    verifier.finish()  # before the last tensor comes out
            fence = sink.fence()  # one per chunk, covering all its pieces
            if slot is not None:
                if fence is None:
                    free.append(slot)
                else:
                    fenced.append((slot, fence))
            else:
                # A mapping's pages are released next (the window unmapped, or mmap's range
                # dropped): the copy out of them must be done.
                sink.wait(fence)
                if not strategy.zero_copy:
                    windows -= 1
                strategy.viewed += chunk.nbytes
            src = None  # a window is unmapped here, before the next one is mapped
            strategy.consumed(chunk.shard, chunk.start, chunk.end)
            if progress is not None:
                progress(chunk.nbytes)
            for piece in chunk.pieces:
                if piece.last:
                    yield piece.entry, sink.finish(piece.entry)
    finally:
        def held() -> list[tuple[object, torch.Tensor | None, list[Pending]]]:
            return [(token, memory if memory is not None else src, [future])
                    for _, memory, src, future, token in pending]

        try:
            interrupted = _wound_down(strategy, pins, held)
        except (KeyboardInterrupt, SystemExit) as exc:  # as it was called, before its loop
            interrupted = _wound_down(strategy, pins, held) or exc
        try:
            # Every copy queued so far, including those of a chunk whose placing raised before
            # its fence: none may still read a slot or write a destination once they are freed.
            sink.drain()
            free.clear()
            fenced.clear()
            pending.clear()
            slot = src = done_slot = None  # noqa: F841 - the last references to slots, windows
            if made:
                sink.release_slots()
        finally:
            if interrupted is not None:
                raise interrupted


def _submit_chunk(chunk: Chunk, slot: torch.Tensor | None, window: Window | None,
                  strategy: Strategy, engine: Engine) -> tuple[torch.Tensor, Pending]:
    if window is not None:
        return window.view(chunk.start, chunk.end), _populating(window, chunk.start, chunk.end)
    if slot is None:
        src = strategy.view(chunk.shard, chunk.start, chunk.end)
        return src, engine.call(strategy.populate, chunk.shard, chunk.start, chunk.end)
    src = aligned_window(slot, chunk.nbytes, chunk.start, ALIGN)
    return src, engine.read(strategy, chunk.shard, chunk.start, src)


def _populating(window: Window, start: int, end: int) -> Pending:
    """What makes ``[start, end)`` of ``window`` ready for the consumer; nothing runs on a
    worker thread.

    A window whose pages were all cached is not populated: a page in memory cannot fail to read,
    and the consumer's copy maps the pages as it goes (the kernel maps 16 around each fault) at
    the cost of the populate it saves (~25 ms/GB here), as ``auto``'s mapped loads do
    (docs/safety.md). Handing that page-table work to worker threads cost more than it saved in
    hand-offs and wake-ups, most of all on a core shared with the consumer (vLLM pins its worker
    to one): a warm 2 GB stream took 0.8 s against 0.5 s for one thread mapping and copying.
    Other windows have pages to read: their reads are asked of the disk now
    (``MADV_WILLNEED``), to run while the consumer copies what comes before, and the populate
    that waits for them (and turns an I/O error into a ``ReadError``) runs when the consumer is
    handed the window, in its thread.
    """
    if window.cached:
        return _READY
    window.willneed(start, end)
    return Deferred(window.populate, start, end)


#: A step with nothing left to do.
_READY = Done()
