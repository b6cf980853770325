"""The child of ``test_interrupts.py``'s real-signal test: loads a checkpoint again and again until
a signal interrupts it, then checks that the process is whole, for ``trials`` signals in a row.

    python tests/interrupt_child.py CHECKPOINT ENGINES TRIALS SEED    # ENGINES: uring,threads

Like vLLM's workers, it turns SIGTERM into ``SystemExit`` (code 143); SIGINT is Python's
``KeyboardInterrupt``. It speaks one line at a time on stdout:

* ``ready SECONDS``: set up; one load takes about SECONDS.
* ``go N ENGINE STRATEGY MODE``: trial N starts loading (``load`` or ``stream``) — send a
  signal now.
* ``caught N EXCEPTION``: the interrupt reached the caller.
* ``ok N``: a second load compared bit for bit with safetensors, no descriptor, thread or
  io_uring is left over from the interrupted one, no memory had to be kept.

After the last trial's checks it raises the last interrupt again, so the process ends by it.
Any failure is a traceback on stderr and a non-zero exit.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parent))
faulthandler.register(signal.SIGUSR1)  # the parent asks for every thread's stack on a hang


def terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(143)  # as vLLM's worker processes do on SIGTERM


signal.signal(signal.SIGTERM, terminate)

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
        try:
            while True:
                load(path, strategy, mode, engine)
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
