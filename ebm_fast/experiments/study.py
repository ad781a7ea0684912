"""Measure CD-k, persistent ML and short-run ML gradients against a 2-D EBM's exact ML gradient.

``ebm-fast study``: the model is a partly trained MLP energy of a ring of Gaussians; the exact
gradient comes from ebm_fast.exact2d's grid sums; each estimator is scored by its cosine and
relative error to it (docs/estimators.md).
"""

from __future__ import annotations

import json
import math
import time
from typing import Callable

import torch

from ebm_fast import validation
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.datasets import ring_of_gaussians
from ebm_fast.estimators import (contrastive_divergence, persistent_ml, short_run_ml,
                                 surrogate_gradient)
from ebm_fast.exact2d import BOX, exact_ml_gradient, exact_nll, exact_samples
from ebm_fast.experiments import options
from ebm_fast.experiments.models import make_energy, train_exact_ml
from ebm_fast.noise import philox_uniform
from ebm_fast.samplers import LangevinSampler

__all__ = ["estimator_study", "format_table", "add_arguments", "main"]


def _similarity(estimate: list[torch.Tensor], exact: list[torch.Tensor]) -> tuple[float, float]:
    """(cosine similarity, relative error |g - g*| / |g*|) of the flattened gradients."""
    g = torch.cat([t.reshape(-1) for t in estimate]).double()
    g_exact = torch.cat([t.reshape(-1) for t in exact]).double()
    cosine = torch.dot(g, g_exact) / (g.norm() * g_exact.norm()).clamp_min(1e-300)
    return float(cosine), float((g - g_exact).norm() / g_exact.norm().clamp_min(1e-300))


def _mean_std(values: list[float]) -> dict:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std()) if len(values) > 1 else 0.0}


def estimator_study(*, steps=(1, 10, 50), repetitions: int = 10, batch: int = 1024,
                    train_iterations: int = 300, hidden: int = 64, lr: float = 3e-3,
                    step_size: float = 0.01, buffer_size: int = 1024, reinit_prob: float = 0.05,
                    warmup_iterations: int = 50, box: float = BOX, cells: int = 200,
                    train_cells: int = 80, seed: int = 0, log=None) -> dict:
    """Each estimator's gradient against the exact ML gradient of one fixed, partly trained model.

    The model (an MLP energy) is trained ``train_iterations`` Adam steps on the exact ML gradient
    of ring-of-Gaussians data, then frozen. For each repetition r a fresh data batch B_r is drawn
    and the target is the exact gradient on B_r, so the data terms agree and every difference
    comes from the negatives. For each step count k: CD-k (chains start at B_r), short-run ML
    (k steps from uniform noise on the box) and persistent ML (k steps per call from a replay
    buffer of ``buffer_size`` slots, first warmed up by ``warmup_iterations`` calls). "exact
    samples" (``batch`` independent negatives drawn exactly from the grid density) is what an
    ideal sampler with that many chains would measure.
    Langevin runs at temperature 1 (sigma = sqrt(2 step_size)), clamped to the box.
    Returns {"config", "model", "rows"}; each row has cosine and rel_error as {mean, std}.
    """
    # Checked before the (slow) training, not when a bad value first reaches a tensor.
    for value, name, low in ((repetitions, "repetitions", 1), (batch, "batch", 1),
                             (train_iterations, "train_iterations", 0), (hidden, "hidden", 1),
                             (buffer_size, "buffer_size", 1),
                             (warmup_iterations, "warmup_iterations", 0),
                             (train_cells, "train_cells", 2), (cells, "cells", 2)):
        validation.integer(value, name, low=low)
    validation.integer(seed, "seed", low=0, high=2 ** 63)  # seed + small offsets stay 64-bit
    validation.real(box, "box", low=0.0, low_open=True)
    if len(steps) == 0:
        raise ValueError("steps must name at least one step count, got an empty sequence")
    for k in steps:
        validation.integer(k, "steps", low=1)
    log = log or (lambda line: None)
    config = dict(steps=list(steps), repetitions=repetitions, batch=batch,
                  train_iterations=train_iterations, hidden=hidden, lr=lr, step_size=step_size,
                  buffer_size=buffer_size, reinit_prob=reinit_prob,
                  warmup_iterations=warmup_iterations, box=box, cells=cells,
                  train_cells=train_cells, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    train_data = ring_of_gaussians(2000, generator)
    batches = ring_of_gaussians(repetitions * batch, generator).split(batch)
    energy = make_energy(seed, hidden)
    start = time.perf_counter()
    log(f"training: {train_iterations} Adam steps of exact ML (grid {train_cells}^2), "
        f"MLP 2-{hidden}-{hidden}-1")
    train_exact_ml(energy, train_data, train_iterations, lr=lr, box=box, cells=train_cells)
    model = {"train_nll": exact_nll(energy, train_data, box, cells),
             "uniform_nll": math.log((2 * box) ** 2),
             "train_seconds": time.perf_counter() - start}
    log(f"  exact NLL of the training data {model['train_nll']:.3f} (uniform on the box: "
        f"{model['uniform_nll']:.3f}), {model['train_seconds']:.1f}s")
    exact = [exact_ml_gradient(energy, b, box, cells) for b in batches]

    def sampler(offset: int) -> LangevinSampler:
        return LangevinSampler(energy, step_size=step_size, clamp=(-box, box),
                               seed=seed + offset, check_finite=False)

    init_draws = iter(range(1 << 31))

    def uniform_init(n: int) -> torch.Tensor:  # noise-spec uniforms, a fresh step per call
        u = philox_uniform((n, 2), seed=seed + 1, step=next(init_draws))
        return (2 * u - 1) * box

    rows = []

    def measure(name: str, k, estimate: Callable[[int, torch.Tensor], list]) -> None:
        t0 = time.perf_counter()
        pairs = [_similarity(estimate(r, b), exact[r]) for r, b in enumerate(batches)]
        row = {"estimator": name, "steps": k,
               "cosine": _mean_std([p[0] for p in pairs]),
               "rel_error": _mean_std([p[1] for p in pairs]),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        log(f"  {name:14s} k={str(k):>4s}  cosine {row['cosine']['mean']:+.3f}  "
            f"rel. error {row['rel_error']['mean']:.3f}  ({row['seconds']:.1f}s)")

    measure("exact samples", "-", lambda r, b: surrogate_gradient(
        energy, b, exact_samples(energy, batch, seed=seed + 2, step=r, box=box, cells=cells)))
    for k in steps:
        cd = sampler(10)
        measure("CD", k, lambda r, b: contrastive_divergence(energy, b, k, cd).grads)
        short = sampler(20)
        measure("short-run ML", k, lambda r, b: short_run_ml(energy, b, short, uniform_init,
                                                             n_steps=k).grads)
        buffer = ReplayBuffer(buffer_size, (2,), init_range=(-box, box), reinit_prob=reinit_prob,
                              seed=seed + 3)
        persistent = sampler(30)
        for _ in range(warmup_iterations):
            persistent_ml(energy, batches[0], buffer, persistent, n_steps=k)
        measure("persistent ML", k, lambda r, b: persistent_ml(energy, b, buffer, persistent,
                                                               n_steps=k).grads)
    return {"config": config, "model": model, "rows": rows}


def format_table(result: dict) -> str:
    lines = [f"{'estimator':14s} {'steps':>5s}  {'cosine (mean ± std)':>20s}  "
             f"{'rel. error (mean ± std)':>24s}"]
    for row in result["rows"]:
        cos, rel = row["cosine"], row["rel_error"]
        lines.append(f"{row['estimator']:14s} {str(row['steps']):>5s}  "
                     f"{cos['mean']:+9.3f} ± {cos['std']:.3f}  "
                     f"{rel['mean']:13.3f} ± {rel['std']:.3f}")
    return "\n".join(lines)


def add_arguments(parser) -> None:
    parser.add_argument("--steps", type=options.count, nargs="+", default=[1, 10, 50],
                        help="sampler steps per estimate (k of CD-k)")
    parser.add_argument("--repetitions", type=options.count, default=10)
    parser.add_argument("--batch", type=options.count, default=1024,
                        help="data batch = chains per estimate")
    parser.add_argument("--train-iterations", type=options.non_negative_count, default=300)
    parser.add_argument("--hidden", type=options.count, default=64)
    parser.add_argument("--step-size", type=options.positive_real, default=0.01)
    parser.add_argument("--buffer-size", type=options.count, default=1024,
                        help="the model is fixed: a buffer about the batch size lets the warm-up "
                             "visit every slot many times")
    parser.add_argument("--reinit-prob", type=options.probability, default=0.05)
    parser.add_argument("--warmup-iterations", type=options.non_negative_count, default=50,
                        help="persistent ML calls before measuring")
    parser.add_argument("--cells", type=options.grid_cells, default=200,
                        help="grid cells per axis (exact terms)")
    parser.add_argument("--seed", type=options.seed, default=0)
    parser.add_argument("--json", type=options.output_file, help="write the results here")


def main(args) -> int:
    start = time.perf_counter()
    result = estimator_study(steps=tuple(args.steps), repetitions=args.repetitions,
                             batch=args.batch, train_iterations=args.train_iterations,
                             hidden=args.hidden, step_size=args.step_size,
                             buffer_size=args.buffer_size, reinit_prob=args.reinit_prob,
                             warmup_iterations=args.warmup_iterations, cells=args.cells,
                             seed=args.seed, log=lambda line: print(line, flush=True))
    print()
    print(format_table(result))
    print(f"\n{args.repetitions} repetitions x {args.batch} chains; target: the exact ML gradient "
          f"on the same data batch (grid {args.cells}^2); {time.perf_counter() - start:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
