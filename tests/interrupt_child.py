"""The child of ``test_interrupts.py``'s real-signal test: loads a checkpoint again and again until
a signal interrupts it, then checks that the process is whole, for ``trials`` signals in a row.

    python tests/interrupt_child.py CHECKPOINT ENGINES TRIALS SEED    # ENGINES: uring,threads

Like vLLM's workers, it turns SIGTERM into ``SystemExit`` (code 143); SIGINT is Python's
``KeyboardInterrupt``. It speaks one line at a time on stdout:

* ``ready SECONDS``: set up; one load takes about SECONDS.
* ``go N ENGINE STRATEGY MODE``: trial N starts loading (``load`` or ``stream``) — send a
  signal now.
* ``caught N EXCEPTION``: the interrupt reached the caller.
* ``swallowed N | WHERE``: a signal's handler ran (WHERE: the frames it raised in) and yet a load
  ended normally: something caught the interrupt. The child loads on.
* ``ok N``: a second load compared bit for bit with safetensors, no descriptor, thread or
  io_uring is left over from the interrupted one, no memory had to be kept.

After the last trial's checks it raises the last interrupt again, so the process ends by it.
Any failure is a traceback on stderr and a non-zero exit.
"""

from __future__ import annotations

import ctypes
import faulthandler
import gc
import mmap
import os
import random
import signal
import sys
import threading
import time
import types
import warnings
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
faulthandler.register(signal.SIGUSR1)  # the parent asks for every thread's stack on a hang


#: Where each signal's handler ran, as one line (the main thread's innermost frames then): an
#: interrupt a load swallowed shows where it was raised.
HANDLED: list[str] = []


def handled_at(frame: FrameType | None) -> None:
    where = []
    while frame is not None and len(where) < 5:  # cheap: no source read inside a handler
        where.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} "
                     f"{frame.f_code.co_name}")
        frame = frame.f_back
    HANDLED.append(" < ".join(where))


def terminate(signum: int, frame: FrameType | None) -> None:
    handled_at(frame)
    raise SystemExit(143)  # as vLLM's worker processes do on SIGTERM


def interrupt(signum: int, frame: FrameType | None) -> None:
    handled_at(frame)
    raise KeyboardInterrupt  # what Python's own SIGINT handler does


signal.signal(signal.SIGTERM, terminate)
# Set, not inherited: a process started in the background by a shell without job control (as a
# CI runner may start the suite) has SIGINT ignored, and Python then leaves it ignored, so every
# SIGINT the parent sent would be dropped by the kernel and the child would load on.
signal.signal(signal.SIGINT, interrupt)

import torch  # noqa: E402 - the handlers first: a signal may come while torch imports
from safetensors.torch import load_file  # noqa: E402

import pagecache  # noqa: E402
from test_faults import open_fds  # noqa: E402
import weightlift  # noqa: E402
from weightlift.io import retry  # noqa: E402

STRATEGIES = ("direct", "stream", "mmap")
MODES = ("load", "stream")


def say(*words: object) -> None:
    """One line to the parent, in one write: a signal cannot cut it in two."""
    os.write(sys.stdout.fileno(), (" ".join(map(str, words)) + "\n").encode())


#: A mapping of the checkpoint outlived its load (see ``main``): its pages cannot be evicted.
PINNED = False


def mappings_of(path: Path) -> int:
    """How many of this process's mappings are of ``path``."""
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        return sum(line.rstrip("\n").endswith(str(path)) for line in maps)


def holders(path: Path) -> str:
    """What keeps the mappings of ``path`` alive: the tensors (or ``ctypes`` arrays) found over
    them among the objects the garbage collector tracks, and what refers to those."""
    warnings.simplefilter("ignore")  # isinstance on torch's deprecated names warns
    ranges = []
    with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
        for line in maps:
            if line.rstrip("\n").endswith(str(path)):
                lo, hi = line.split()[0].split("-")
                ranges.append((int(lo, 16), int(hi, 16)))
    out = [f"mappings of {path.name}: {[f'{lo:#x}-{hi:#x}' for lo, hi in ranges]}"]
    objects = gc.get_objects()
    for obj in objects:
        try:
            if isinstance(obj, torch.Tensor):
                address = obj.untyped_storage().data_ptr()
            elif isinstance(obj, ctypes.Array):
                address = ctypes.addressof(obj)
            else:
                continue
        except Exception:  # noqa: BLE001 - a tensor without storage: not it
            continue
        if not any(lo <= address < hi for lo, hi in ranges):
            continue
        refs = []
        for ref in gc.get_referrers(obj):
            if ref is objects:
                continue
            kind = type(ref).__name__
            if isinstance(ref, types.FrameType):
                kind += f"({ref.f_code.co_name}:{ref.f_lineno})"
            elif isinstance(ref, (dict, list, tuple)):
                kind += "<-" + ",".join(
                    type(r).__name__ + (f"({r.f_code.co_name})" if isinstance(r, types.FrameType)
                                        else "") for r in gc.get_referrers(ref)[:5]
                    if r is not objects)
            refs.append(kind)
        out.append(f"{type(obj).__name__} at {address:#x} held by {refs[:8]}")
    # An ``mmap.mmap`` (a window's owner) is not tracked by the collector: look for it among
    # what tracked objects refer to, by a size the mapping could have (its slack included).
    sizes = [hi - lo for lo, hi in ranges]
    for obj in objects:
        for ref in gc.get_referents(obj):
            if isinstance(ref, (mmap.mmap, memoryview)) and not getattr(ref, "closed", False) \
                    and any(size <= len(ref) <= size + (2 << 20) for size in sizes):
                out.append(f"{type(ref).__name__} of {len(ref)} bytes held by "
                           f"{type(obj).__name__}")
    from weightlift.io import retry
    out.append(f"memory kept for reads the kernel still had: {len(retry.KEPT)}")
    return "\n".join(out)


def load(path: Path, strategy: str, mode: str, engine: str) -> dict[str, torch.Tensor]:
    if strategy == "direct":
        if PINNED:
            weightlift.probes.evict(path)  # what can be evicted is
        else:
            pagecache.evict(path)  # else cached ranges are copied by threads, not the ring
    if mode == "stream":
        out = {}
        for name, tensor in weightlift.stream(path, strategy=strategy, engine=engine,
                                              max_host_memory="64MiB"):
            out[name] = tensor.clone() if strategy == "mmap" else tensor  # a consumer's work
        return out
    return weightlift.load(path, strategy=strategy, engine=engine)


def same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected), "tensor names differ"
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(got.contiguous().view(torch.uint8).flatten(),
                           tensor.contiguous().view(torch.uint8).flatten()), f"{name}: bytes differ"


def main(argv: list[str]) -> None:
    path, engines, trials, seed = Path(argv[0]), argv[1].split(","), int(argv[2]), int(argv[3])
    # Copies: safetensors' tensors map the file, whose pages could then not be evicted.
    reference = {name: tensor.clone() for name, tensor in load_file(path).items()}
    gc.collect()
    started = time.monotonic()
    combos = [(engine, strategy, mode) for engine in engines for strategy in STRATEGIES
              for mode in MODES]
    for engine in engines:  # every thread, descriptor and cache a load keeps, kept
        for strategy in STRATEGIES:
            same(load(path, strategy, "load", engine), reference)
    seconds = (time.monotonic() - started) / (len(engines) * len(STRATEGIES))
    gc.collect()
    fds, threads, maps = open_fds(), set(threading.enumerate()), mappings_of(path)
    rng = random.Random(seed)
    say("ready", f"{seconds:.3f}")
    caught: BaseException | None = None
    for trial in range(trials):
        if trial % len(combos) == 0:
            rng.shuffle(combos)
        engine, strategy, mode = combos[trial % len(combos)]
        say("go", trial, engine, strategy, mode)
        handled = len(HANDLED)
        try:
            while True:
                load(path, strategy, mode, engine)
                if len(HANDLED) > handled:  # a handler ran, and yet a load ended normally
                    say("swallowed", trial, "|", " | ".join(HANDLED[handled:]))
                    handled = len(HANDLED)
        except (KeyboardInterrupt, SystemExit) as exc:
            caught = exc
        told = False
        while True:  # a second signal the parent may send right after the first
            try:
                if not told:
                    told = True
                    say("caught", trial, type(caught).__name__)
                time.sleep(0.3)
                break
            except (KeyboardInterrupt, SystemExit):
                continue
        # The interrupt's traceback holds the interrupted load's frames, and so its tensors:
        # dropped, or what they map would count as left behind.
        caught.__traceback__ = caught.__context__ = caught.__cause__ = None
        gc.collect()
        # A descriptor could still outlive an interrupt that lands right after ``os.open``
        # returned, before its number is stored: Python offers no atomic section (docs/safety.md,
        # "What is not promised"). Counted and told to the parent, which bounds how often.
        leaked = []
        global PINNED
        now = mappings_of(path)
        if now > maps:
            sys.stderr.write(f"signal {trial}: {holders(path)}\n")
            sys.stderr.flush()
            leaked.append(f"{now - maps}-mapping(s)")
            maps, PINNED = now, True
        same(load(path, strategy, mode, engine), reference)
        gc.collect()
        left = {fd: target for fd, target in open_fds().items() if fds.get(fd) != target}
        if left:
            leaked.append(f"descriptor(s)-{sorted(left)}")
            fds = open_fds()
        extra = set(threading.enumerate()) - threads
        assert not extra, f"threads left running: {[thread.name for thread in extra]}"
        assert not retry.KEPT, f"{len(retry.KEPT)} buffers had to be kept"
        say("ok", trial, ",".join(leaked) if leaked else "clean")
    assert caught is not None
    raise caught


if __name__ == "__main__":
    main(sys.argv[1:])
