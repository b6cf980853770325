"""``weightlift verify SOURCE``: check every file of a checkpoint against its SHA-256.

The expected digests come from the Hugging Face cache (each LFS file's blob is named by its
SHA-256) or from ``--sums FILE`` (``sha256sum`` output). Each file is streamed once through the
normal read path with the host-memory budget, hashing as it goes; nothing is kept.
"""

from __future__ import annotations

import argparse
import sys

from ..api import run_load
from ..errors import IntegrityError
from ..io import NAMES
from ..sources import resolve
from ..units import format_bytes, parse_size
from ..verify import Verifier, expected_digests


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("verify", help="check a checkpoint's files against their SHA-256")
    parser.add_argument("source", help="hf://org/name, a cache repo directory, a file or directory")
    parser.add_argument("--sums", metavar="FILE",
                        help="expected digests as sha256sum lines (default: the HF cache's)")
    parser.add_argument("--strategy", choices=NAMES, default="stream")
    parser.add_argument("--max-host-memory", type=parse_size, metavar="SIZE",
                        help="host-memory budget of the reads (default: weightlift's)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """One line per file, as ``sha256sum -c`` prints them; exit 1 if any file fails."""
    verify = args.sums if args.sums else True
    failed = 0
    with resolve(args.source) as layout:
        expected = expected_digests(layout, verify, range(len(layout.shards)))
        for index, shard in enumerate(layout.shards):
            # The tensors loaded from this file (a tensor stored twice loads one copy).
            keys = [entry.name for entry in layout.entries.values() if entry.shard == index]
            size = format_bytes(shard.header.file_size)
            try:
                if not keys:  # every tensor of it loads from a copy elsewhere: read it whole
                    verifier = Verifier(layout, {index: expected[index]})
                    try:
                        verifier.finish()
                    finally:
                        verifier.close()
                for _ in run_load(layout, keys=keys, device="cpu", strategy=args.strategy,
                                  dtype=None, streaming=True, verify={shard.path: expected[index]},
                                  max_host_memory=args.max_host_memory) if keys else ():
                    pass
            except IntegrityError as exc:
                failed += 1
                print(f"{shard.path}: FAILED ({size}): expected SHA-256 {exc.expected}, the file "
                      f"has {exc.actual}", flush=True)
                continue
            print(f"{shard.path}: OK ({size}, SHA-256 {expected[index]})", flush=True)
    if failed:
        print(f"weightlift: {failed} of {len(layout.shards)} files do not match their SHA-256: "
              "they are corrupted or were not fully downloaded; delete them and download again",
              file=sys.stderr)
        return 1
    return 0
