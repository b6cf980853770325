"""Run the tests that race with the kernel several times on a machine made busy on purpose.

Tests that touch the page cache, read-ahead, io_uring's worker threads or signals must pass on a
loaded machine, not only on an idle one: CI runners and developers' laptops are busy. This starts
``--busy`` processes that spin on a core each (default: one more than there are cores), runs the
fault, engine, concurrency and memory-pressure test files ``--runs`` times (a fresh pytest
process each time), stops the busy processes whatever happens (also if this script is killed:
they die with it), and prints pass/fail counts per run and the tests that failed.

    PYTHONPATH=$PWD/src python tests/under_load.py                 # 5 runs, cores + 1 busy
    PYTHONPATH=$PWD/src python tests/under_load.py --runs 10 --busy 3 tests/test_faults.py
    PYTHONPATH=$PWD/src python tests/under_load.py -- -k storm     # arguments after -- go to pytest

The exit status is 0 only if every run passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
#: The files whose tests race with the kernel: page cache, read-ahead, io_uring, signals, memory.
FILES = ["tests/test_faults.py", "tests/test_engines.py", "tests/test_concurrency.py",
         "tests/test_memory_pressure.py"]
#: A process that spins on one core and dies with its parent (PR_SET_PDEATHSIG = 1, SIGKILL),
#: so a runner killed without a chance to clean up leaves nothing spinning.
SPIN = ("import ctypes, os, sys\n"
        "ctypes.CDLL(None).prctl(1, 9)\n"
        "if os.getppid() != int(sys.argv[1]):\n"
        "    sys.exit()  # the parent died before prctl took effect\n"
        "while True:\n"
        "    pass\n")


@dataclass
class Run:
    number: int
    seconds: float
    status: int
    counts: Counter[str] = field(default_factory=Counter)
    failed: list[str] = field(default_factory=list)


def start_busy(count: int) -> list[subprocess.Popen[bytes]]:
    busy: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            busy.append(subprocess.Popen([sys.executable, "-c", SPIN, str(os.getpid())],
                                         stdin=subprocess.DEVNULL))
    except BaseException:
        stop_busy(busy)
        raise
    return busy


def stop_busy(busy: list[subprocess.Popen[bytes]]) -> None:
    for process in busy:
        process.kill()
    for process in busy:
        process.wait()


def outcome(report: Path) -> tuple[Counter[str], list[str]]:
    """(outcome → count, failed test ids) from a pytest JUnit XML report."""
    counts: Counter[str] = Counter()
    failed: list[str] = []
    if not report.exists():
        return counts, failed
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            counts["failed"] += 1
            failed.append(name)
        elif "skipped" in kinds:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts, failed


def run_once(number: int, files: list[str], extra: list[str], timeout: float,
             log: Path) -> Run:
    report = log.with_suffix(".xml")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
               f"--junitxml={report}", *files, *extra]
    started = time.monotonic()
    with open(log, "wb") as out:
        try:
            status = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = -1
    counts, failed = outcome(report)
    if status == -1:
        failed.append(f"(run timed out after {timeout:.0f} s)")
    return Run(number, time.monotonic() - started, status, counts, failed)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", default=FILES,
                        help=f"test files (default: {' '.join(FILES)})")
    parser.add_argument("--runs", type=int, default=5, help="pytest runs (default 5)")
    parser.add_argument("--busy", type=int, default=(os.cpu_count() or 1) + 1,
                        help="processes spinning on a core each (default: cores + 1)")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one run may take (default 1800)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="directory for each run's output (default: a temporary one)")
    args = parser.parse_args(argv)
    logs = args.logs or Path(tempfile.mkdtemp(prefix="weightlift-under-load-"))
    logs.mkdir(parents=True, exist_ok=True)

    print(f"{args.runs} runs of {' '.join(args.files)} {' '.join(extra)} beside {args.busy} busy "
          f"processes on {os.cpu_count()} cores; output in {logs}", flush=True)
    runs: list[Run] = []
    busy = start_busy(args.busy)
    try:
        for number in range(1, args.runs + 1):
            run = run_once(number, args.files, extra, args.timeout, logs / f"run-{number}.log")
            runs.append(run)
            counts = ", ".join(f"{n} {kind}" for kind, n in sorted(run.counts.items()))
            verdict = "ok" if run.status == 0 else f"FAILED (exit {run.status})"
            print(f"run {number}: {verdict} in {run.seconds:.0f} s: {counts}", flush=True)
            for name in run.failed:
                print(f"    failed: {name}", flush=True)
    finally:
        stop_busy(busy)

    total: Counter[str] = Counter()
    for run in runs:
        total.update(run.counts)
    failing = Counter(name for run in runs for name in run.failed)
    good = sum(run.status == 0 for run in runs)
    print(f"{good} of {len(runs)} runs passed; tests: "
          + ", ".join(f"{n} {kind}" for kind, n in sorted(total.items())))
    for name, times in failing.most_common():
        print(f"  {name} failed in {times} of {len(runs)} runs")
    return 0 if runs and good == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
