"""Run a benchmark, benchmarks/bench_NAME.py, with the arguments that follow its name."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent.parent / "benchmarks"


def benchmark_script(name: str) -> Path:
    """argparse type: NAME -> the script benchmarks/bench_NAME.py, which must exist."""
    script = BENCHMARKS / f"bench_{name}.py"
    if not script.is_file():
        known = sorted(p.stem[len("bench_") :] for p in BENCHMARKS.glob("bench_*.py"))
        raise argparse.ArgumentTypeError(
            f"no benchmark {name!r}; known: {', '.join(known)}"
            if known
            else f"no benchmarks in {BENCHMARKS}: they ship with the source checkout"
        )
    return script


def add_arguments(parser) -> None:
    parser.add_argument(
        "script",
        metavar="NAME",
        type=benchmark_script,
        help="update, buffer or sampler (benchmarks/bench_NAME.py)",
    )
    rest = parser.add_argument(
        "args",
        metavar="ARGS",
        nargs=argparse.REMAINDER,
        help="the benchmark's own options (`ebm-fast bench NAME -h`)",
    )
    # argparse counts a REMAINDER positional as required: a bare `ebm-fast bench` would then
    # report "NAME, ARGS" missing, though ARGS may be empty.
    rest.required = False


def main(args) -> int:
    # The script reads its options from sys.argv, as when run by itself.
    caller_argv, sys.argv = sys.argv, [str(args.script), *args.args]
    try:
        runpy.run_path(str(args.script), run_name="__main__")
    finally:
        sys.argv = caller_argv
    return 0
