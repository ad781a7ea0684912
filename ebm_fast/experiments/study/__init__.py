"""Measure the CD-versus-maximum-likelihood questions exactly on a 2-D EBM (E1-E5).

``ebm-fast study [--quick] [--out DIR] [--only E1,E3] [--seed N] [--processes 2]`` answers,
on 2-D densities (a ring of Gaussians, two spirals) where the partition function, the likelihood
and its gradient are exact grid sums (ebm_fast.exact2d), the questions of Gagnon & Lajoie
(2022, arXiv 2202.12176), "Contrastive Divergence versus Maximum Likelihood":

  E1 gradient audit: each estimator's bias and variance against the exact ML gradient (each
     density)
  E2 the CD objective KL(p_data || p) - KL(q_k || p) from histograms of many chains
  E3 training outcomes: exact KL and held-out NLL curves, several seeds, mean +- SE, over
     budgets up to 16x the base one (each density)
  E4 the short-run fixed point (Nijkamp et al. 2019)
  E5 temperature T = sigma^2 / (2 eps) of decoupled Langevin

It writes DIR/results.json, one PNG figure per experiment and DIR/report.md; a DIR holding an
earlier study is refused unless --overwrite, which replaces that study whole (its figures too).
Deterministic given --seed. The full run's report is docs/study/report.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ebm_fast import validation
from ebm_fast.experiments import options
from ebm_fast.experiments.study import (
    e1_gradients,
    e2_cd_objective,
    e3_training,
    e4_short_run,
    e5_temperature,
    report,
)
from ebm_fast.experiments.study.common import Context
from ebm_fast.experiments.study.config import FULL, QUICK, StudyConfig

__all__ = ["EXPERIMENTS", "run_study", "StudyConfig", "FULL", "QUICK", "add_arguments", "main"]

EXPERIMENTS = {
    "E1": e1_gradients,
    "E2": e2_cd_objective,
    "E3": e3_training,
    "E4": e4_short_run,
    "E5": e5_temperature,
}


def _experiment_names(only) -> list[str]:
    names = list(EXPERIMENTS) if only is None else list(only)
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown or not names:
        raise ValueError(
            f"only must name experiments among {', '.join(EXPERIMENTS)}, got {names!r}"
        )
    return [name for name in EXPERIMENTS if name in names]  # the study's order


def run_study(
    config: StudyConfig = FULL,
    *,
    seed: int = 0,
    only=None,
    threads: int = 1,
    processes: int = 1,
    progress: bool = True,
) -> dict:
    """Run the experiments named in ``only`` (default all) and return results.json's content:
    a key per experiment, and "setup" (the config, the seed, each experiment's settings and
    wall-clock and CPU seconds). E4 and E5 reuse E3's training runs when E3 ran first.

    ``threads``: torch's intra-op threads for the run (restored after). The study's batches are
    small: on a busy 2-core machine one thread ran its sampler steps ~80x faster than two
    (threads waiting on each other); results are deterministic for a given thread count.
    ``processes`` (1 or 2): E1's densities and E3's training runs are independent jobs, run in
    that many processes (the results do not depend on it).
    """
    names = _experiment_names(only)
    threads = validation.integer(threads, "threads", low=1)
    ctx = Context(config, seed, processes=processes, threads=threads)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _run(ctx, names, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _run(ctx: Context, names: list[str], progress: bool) -> dict:
    config = ctx.config
    results = {}
    setup: dict = {
        "config": dataclasses.asdict(config),
        "seed": ctx.seed,
        "experiments": {},
        "seconds": {},
        "cpu_seconds": {},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "processes": ctx.processes,
    }
    total = sum(EXPERIMENTS[name].units(config) for name in names)
    with tqdm(total=total, unit="step", disable=not progress, dynamic_ncols=True) as bar:
        for name in names:
            bar.set_description(name)
            start, cpu_start = time.perf_counter(), time.process_time()
            children = _children_cpu_seconds()
            results[name], setup["experiments"][name] = EXPERIMENTS[name].run(ctx, bar)
            setup["seconds"][name] = time.perf_counter() - start
            # CPU time of this process and its finished worker processes: on a shared machine
            # the wall-clock time is inflated.
            setup["cpu_seconds"][name] = (
                time.process_time() - cpu_start + _children_cpu_seconds() - children
            )
    return {**results, "setup": setup}


def _children_cpu_seconds() -> float:
    """CPU seconds of this process's finished (waited-for) child processes."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _only(text: str) -> list[str]:
    try:
        return _experiment_names([part.strip().upper() for part in text.split(",")])
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _output_dir(text: str) -> Path:
    """A directory the study writes into: created now (with parents), so that a long run does
    not fail at its end."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise argparse.ArgumentTypeError(f"cannot create directory {text}: {error}") from None
    probe = path / ".write-test"
    try:
        probe.touch()
        probe.unlink()
    except OSError:
        raise argparse.ArgumentTypeError(f"directory {text} is not writable") from None
    return path


_processes = validation.argparse_type(validation.integer, low=1, high=3)  # 1 or 2


def add_arguments(parser) -> None:
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer repetitions, same structure (under 5 minutes on 2 cores)",
    )
    parser.add_argument(
        "--out",
        type=_output_dir,
        default=Path("study"),
        help="directory for results.json, report.md and the figures",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the study already in --out: its results.json, report.md "
        "and figures (e*.png) are removed as the new ones are written",
    )
    parser.add_argument(
        "--only",
        type=_only,
        default=None,
        metavar="E1,E3",
        help="comma-separated experiments to run (default: all)",
    )
    parser.add_argument("--seed", type=options.seed, default=0)
    parser.add_argument(
        "--threads",
        type=options.count,
        default=1,
        help="torch intra-op threads (default 1: the study's batches are small)",
    )
    parser.add_argument(
        "--processes",
        type=_processes,
        default=1,
        help="processes for E1's densities and E3's training runs (1 or 2; "
        "the results do not depend on it)",
    )


def _earlier_study(out: Path) -> list[Path]:
    """The files of a study already in out: results.json, report.md and its figures."""
    return [path for path in (out / "results.json", out / "report.md") if path.exists()] + sorted(
        out.glob("e[0-9]*.png")
    )


def main(args) -> int:
    earlier = _earlier_study(args.out)
    if earlier and not args.overwrite:  # checked before any work, like the other options
        print(
            f"ebm-fast study: error: --out {args.out} holds an earlier study "
            f"({', '.join(path.name for path in earlier)}): choose another --out, or pass "
            "--overwrite to replace it whole",
            file=sys.stderr,
        )
        return 2
    config = QUICK if args.quick else FULL
    start, cpu_start = time.perf_counter(), time.process_time() + _children_cpu_seconds()
    results = run_study(
        config, seed=args.seed, only=args.only, threads=args.threads, processes=args.processes
    )
    results["setup"]["command"] = shlex.join(
        [
            "ebm-fast",
            "study",
            *(["--quick"] if args.quick else []),
            "--out",
            str(args.out),
            *(["--only", ",".join(args.only)] if args.only else []),
            "--seed",
            str(args.seed),
            "--threads",
            str(args.threads),
            "--processes",
            str(args.processes),
        ]
    )
    results["setup"]["total_seconds"] = time.perf_counter() - start
    results["setup"]["total_cpu_seconds"] = (
        time.process_time() - cpu_start + _children_cpu_seconds()
    )
    for path in _earlier_study(args.out):  # no figure of the earlier study outlives it
        path.unlink()
    written = report.write(results, args.out, quick=args.quick)
    print(
        f"study: {', '.join(str(path) for path in written)} "
        f"({results['setup']['total_seconds']:.0f} s)"
    )
    return 0
