"""What the first CPU read of freshly read page-cache pages costs on this VM, by who reads it first.

    PYTHONPATH=src python docs/measure/first_touch.py /work/scratch/diffusers/flux/diffusion_pytorch_model.safetensors 2

Per repetition, each way in turn in a fresh process, the file evicted and freed memory settled
first (as ``diffusers_load.py``): map the file private (as safetensors and weightlift's ``mmap``
do), get its pages in one way, then time a first and a second pass reading one byte of every
4 KiB page (a strided ``sum``, one torch thread), with the pass's CPU time and page faults:

- ``fault``: nothing before the pass, whose page faults read the file (safetensors' ``load_file``
  and diffusers' default: the load maps, the first use reads);
- ``populate``: ``MADV_POPULATE_READ`` of the whole mapping first (weightlift's ``mmap``: the
  file read and every page mapped during the load, an I/O error a ``ReadError``);
- ``willneed``: ``POSIX_FADV_WILLNEED`` of the whole file, then the populate;
- ``pipelined``: ``POSIX_FADV_WILLNEED`` of the whole file, then two threads each populating a
  16 MiB chunk and reading one byte of its every page at once (the first read overlapping the
  reading of the chunks after it);
- ``populate-wait``: ``populate``, then 5 s (not counted) before the passes;
- ``read``: the whole file ``read()`` through one reused 16 MiB buffer, then the populate (the
  CPU copies every byte of the page cache out: the pages' first read is in the preparation).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import resource
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

WAYS = ("fault", "populate", "willneed", "read", "pipelined", "populate-wait")
MADV_POPULATE_READ = 22


def populate(address: int, length: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    if libc.madvise(address, length, MADV_POPULATE_READ):
        raise OSError(ctypes.get_errno(), "madvise")


def child(way: str, path: str) -> str:
    import torch

    torch.set_num_threads(1)
    size = os.path.getsize(path)
    fd = os.open(path, os.O_RDONLY)
    began = time.perf_counter()
    if way == "willneed":
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
    elif way == "read":
        view = memoryview(bytearray(16 << 20))
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass
    mapping = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    if way == "pipelined":
        os.posix_fadvise(fd, 0, size, os.POSIX_FADV_WILLNEED)
        whole = torch.frombuffer(mapping, dtype=torch.uint8)
        chunk = 16 << 20

        def populate_and_read(start: int) -> None:
            end = min(size, start + chunk)
            # ctypes lets the GIL go (mmap.madvise holds it); torch's sum does too.
            populate(whole.data_ptr() + start, end - start)
            whole[start:end:4096].sum()

        with ThreadPoolExecutor(2) as pool:
            list(pool.map(populate_and_read, range(0, size, chunk)))
    elif way != "fault":
        mapping.madvise(MADV_POPULATE_READ)
    if way == "populate-wait":
        time.sleep(5)  # not counted below
    prepared = time.perf_counter() - began - (5 if way == "populate-wait" else 0)
    pages = torch.frombuffer(mapping, dtype=torch.uint8)[::4096]
    before = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    pages.sum()
    first = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_SELF)
    began = time.perf_counter()
    pages.sum()
    second = time.perf_counter() - began
    user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
    return (f"{way:9s} prepare {prepared:5.2f} s  first pass {first:5.2f} s (CPU {user:5.2f} s "
            f"user {system:5.2f} s system, "
            f"{after.ru_minflt - before.ru_minflt} minor / {after.ru_majflt - before.ru_majflt} "
            f"major faults)  second pass {second:5.3f} s  total {prepared + first:5.2f} s")


def parent(path: str, repetitions: int) -> None:
    from weightlift.bench.runner import set_cache, settle_reported_memory

    print("load average before", open("/proc/loadavg").read().split()[:3])
    for _ in range(repetitions):
        for way in WAYS:
            set_cache([path], "cold")
            settle_reported_memory()
            done = subprocess.run([sys.executable, __file__, "--child", way, path],
                                  capture_output=True, text=True, check=True,
                                  env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            print(done.stdout.strip(), flush=True)
    print("load average after", open("/proc/loadavg").read().split()[:3])


if __name__ == "__main__":
    if sys.argv[1] == "--child":
        print(child(sys.argv[2], sys.argv[3]))
    else:
        parent(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)
