"""Command line: ``ebm-fast demo | study | build | info | bench NAME [args]``."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def _build(_args) -> int:
    import os

    os.environ.setdefault("EBM_FAST_VERBOSE_BUILD", "1")
    from ebm_fast import _cpp

    error = _cpp.load_error()
    if error is not None:
        print(f"C++ backend: FAILED: {error}", file=sys.stderr)
        return 1
    print("C++ backend: built and loaded")
    return 0


def _info(_args) -> int:
    import torch

    from ebm_fast.backends import BACKENDS, unavailable_reason

    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name in BACKENDS:
        reason = unavailable_reason(name)
        print(f"  {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    return 0


def _bench(args) -> int:
    script = BENCHMARKS / f"bench_{args.name}.py"
    if not script.exists():
        known = sorted(p.stem[len("bench_"):] for p in BENCHMARKS.glob("bench_*.py"))
        print(f"no benchmark {args.name!r} in {BENCHMARKS} (known: {', '.join(known) or 'none'}; "
              "benchmarks ship with the source checkout)", file=sys.stderr)
        return 2
    sys.argv = [str(script), *args.rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["demo"]:  # the demo parses its own options (`ebm-fast demo -h`)
        from ebm_fast import demo

        return demo.main(argv[1:])
    if argv[:1] == ["study"]:  # likewise (`ebm-fast study -h`)
        from ebm_fast import toy

        return toy.main(argv[1:])
    parser = argparse.ArgumentParser(prog="ebm-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="train a small 2-D EBM with ebm_fast and with the plain loop; "
                   "report speed and exact held-out NLL (`ebm-fast demo -h`)")
    sub.add_parser("study", help="measure CD-k, persistent ML and short-run ML gradients against "
                   "the exact ML gradient of a 2-D EBM (`ebm-fast study -h`)")
    sub.add_parser("build", help="build the C++ CPU kernels now (otherwise built on first use)")
    sub.add_parser("info", help="list the backends and why any is unavailable")
    bench = sub.add_parser("bench", help="run benchmarks/bench_NAME.py (update, buffer, sampler)")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="arguments for the benchmark")
    args = parser.parse_args(argv)
    return {"build": _build, "info": _info, "bench": _bench}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
