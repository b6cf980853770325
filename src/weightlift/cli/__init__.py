"""The ``weightlift`` command line: one module per subcommand, each with ``register(subparsers)``.

Exit codes: 0 success, 1 a weightlift error (bad file, failed read: one line on stderr),
2 usage error (argparse), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ..errors import WeightliftError

# Subcommand modules, in the order `weightlift --help` lists them.
SUBCOMMANDS = ("info", "load", "verify", "demo", "bench", "doctor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightlift",
        description="Load model checkpoints into tensors fast, with bounded host memory.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except WeightliftError as exc:
        if args.debug:
            raise
        print(f"weightlift: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("weightlift: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
