"""Exact tools for 2-D energy-based models, and the study of gradient estimators they allow.

In 2-D the partition function is a sum over a grid: on the box [-b, b]^2 cut into cells x cells
squares, Z = sum_i exp(-E(c_i)) * area (c_i the cell centres: the midpoint rule, exact up to the
quadrature error and the mass outside the box). With it the exact negative log-likelihood and its
exact gradient

    grad NLL = E_data[grad E] - E_p[grad E]        (p = exp(-E) / Z)

are computable, and any sampling-based estimator of that gradient can be measured against it.
``ebm-fast study`` does that for CD-k, persistent (replay-buffer) ML and short-run ML on a partly
trained model of a ring of Gaussians (see docs/estimators.md).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from typing import Callable

import torch
from torch import nn

from ebm_fast.buffer import ReplayBuffer
from ebm_fast.datasets import ring_of_gaussians
from ebm_fast.estimators import (contrastive_divergence, persistent_ml, short_run_ml,
                                 surrogate_gradient, trainable_parameters)
from ebm_fast.noise import philox_uniform
from ebm_fast.samplers import LangevinSampler

__all__ = ["BOX", "grid", "log_partition", "exact_expectation", "exact_nll",
           "exact_ml_gradient", "exact_samples", "ring_of_gaussians", "make_energy",
           "train_exact_ml", "estimator_study", "main"]

BOX = 4.0  # default half-width of the box [-BOX, BOX]^2 (the ring data lie well inside)


def make_energy(seed: int, hidden: int = 128) -> nn.Module:
    """An MLP energy 2 -> hidden -> hidden -> 1 (SiLU), initialised from ``seed`` (the caller's
    global RNG state is left as it was)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                             nn.SiLU(), nn.Linear(hidden, 1))


def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_box_cells(box, cells) -> None:
    if isinstance(box, bool) or not isinstance(box, (int, float)) or not 0 < box < math.inf:
        raise ValueError(f"box must be a finite number > 0, got {box!r}")
    _check_int(cells, "cells", 2)


def grid(box: float = BOX, cells: int = 200, *, dtype=torch.float32,
         device=None) -> tuple[torch.Tensor, float]:
    """(cell centres (cells**2, 2), cell area) of the box [-box, box]^2 cut into cells x cells."""
    _check_box_cells(box, cells)
    width = 2 * box / cells
    axis = -box + width * (torch.arange(cells, dtype=dtype, device=device) + 0.5)
    points = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    return points, width * width


def _grid_energies(energy, box, cells) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(grid points, E at each, cell area); the grid takes the energy's parameter dtype/device."""
    param = next(iter(energy.parameters()), None) if isinstance(energy, nn.Module) else None
    points, area = grid(box, cells, dtype=torch.float32 if param is None else param.dtype,
                        device=None if param is None else param.device)
    values = energy(points)
    # (N,) or (N, 1) only: flattening anything wider would silently sum the wrong terms into Z.
    if values.shape not in ((points.shape[0],), (points.shape[0], 1)):
        raise ValueError(f"energy must return one value per point, shape ({points.shape[0]},) or "
                         f"({points.shape[0]}, 1), got {tuple(values.shape)}")
    return points, values.reshape(-1), area


def log_partition(energy, box: float = BOX, cells: int = 200) -> torch.Tensor:
    """log Z = log sum_cells exp(-E) * area, as a 0-dim tensor (differentiable in the energy's
    parameters: its gradient is -E_p[grad E])."""
    _, values, area = _grid_energies(energy, box, cells)
    return torch.logsumexp(-values, 0) + math.log(area)


@torch.no_grad()
def exact_expectation(energy, f: Callable[[torch.Tensor], torch.Tensor], box: float = BOX,
                      cells: int = 200) -> torch.Tensor:
    """E_p[f(x)] with weights softmax(-E) over the grid cells; f maps (N, 2) points to (N, ...)."""
    points, energies, _ = _grid_energies(energy, box, cells)
    weights = torch.softmax(-energies, 0)
    values = f(points)
    if values.shape[:1] != (points.shape[0],):
        raise ValueError(f"f must return one value (or row) per point, shape ({points.shape[0]}, "
                         f"...), got {tuple(values.shape)}")
    return torch.tensordot(weights.to(values.dtype), values, dims=1)


@torch.no_grad()
def exact_nll(energy, data: torch.Tensor, box: float = BOX, cells: int = 300) -> float:
    """Mean -log p(data) with p = exp(-E) / Z, Z summed on the grid."""
    return float(energy(data).mean() + log_partition(energy, box, cells))


def exact_ml_gradient(energy: nn.Module, data: torch.Tensor, box: float = BOX,
                      cells: int = 200) -> list[torch.Tensor]:
    """Gradients of the exact NLL, mean E(data) + log Z, w.r.t. the trainable parameters:
    E_data[grad E] - E_p[grad E] with the model expectation summed exactly on the grid."""
    with torch.enable_grad():
        nll = energy(data).mean() + log_partition(energy, box, cells)
        return list(torch.autograd.grad(nll, trainable_parameters(energy)))


@torch.no_grad()
def exact_samples(energy, n: int, *, seed: int, step: int, box: float = BOX,
                  cells: int = 200) -> torch.Tensor:
    """n independent draws of grid cell centres with probabilities softmax(-E) (inverse CDF of
    noise-spec uniforms at (seed, step)): the negatives an ideal sampler would give."""
    _check_int(n, "n", 1)
    points, energies, _ = _grid_energies(energy, box, cells)
    cdf = torch.softmax(-energies.double(), 0).cumsum(0)
    u = philox_uniform((n,), seed=seed, step=step, device=points.device).double() * cdf[-1]
    # u in [0, total): cell i is drawn for cdf[i-1] <= u < cdf[i] (right=True), so a cell of
    # probability 0 is never drawn; the clamp only absorbs rounding at the top end.
    return points[torch.searchsorted(cdf, u, right=True).clamp_(max=points.shape[0] - 1)]


def train_exact_ml(energy: nn.Module, data: torch.Tensor, iterations: int, *, lr: float = 1e-3,
                   box: float = BOX, cells: int = 100) -> nn.Module:
    """Adam on the exact ML gradient of the whole data set (cheap in 2-D)."""
    optimiser = torch.optim.Adam(trainable_parameters(energy), lr=lr)
    for _ in range(iterations):
        for param, grad in zip(trainable_parameters(energy),
                               exact_ml_gradient(energy, data, box, cells)):
            param.grad = grad
        optimiser.step()
    return energy


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
    for value, name, minimum in ((repetitions, "repetitions", 1), (batch, "batch", 1),
                                 (train_iterations, "train_iterations", 0), (hidden, "hidden", 1),
                                 (buffer_size, "buffer_size", 1),
                                 (warmup_iterations, "warmup_iterations", 0),
                                 (train_cells, "train_cells", 2)):
        _check_int(value, name, minimum)
    _check_box_cells(box, cells)
    if not steps or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in steps):
        raise ValueError(f"steps must be a non-empty sequence of ints >= 1, got {steps!r}")
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ebm-fast study",
        description="Measure CD-k, persistent (replay-buffer) ML and short-run ML gradients "
                    "against the exact ML gradient of a partly trained 2-D EBM.")
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 10, 50],
                        help="sampler steps per estimate (k of CD-k)")
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1024,
                        help="data batch = chains per estimate")
    parser.add_argument("--train-iterations", type=int, default=300)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--step-size", type=float, default=0.01)
    parser.add_argument("--buffer-size", type=int, default=1024,
                        help="the model is fixed: a buffer about the batch size lets the warm-up "
                             "visit every slot many times")
    parser.add_argument("--reinit-prob", type=float, default=0.05)
    parser.add_argument("--warmup-iterations", type=int, default=50,
                        help="persistent ML calls before measuring")
    parser.add_argument("--cells", type=int, default=200, help="grid cells per axis (exact terms)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    raise SystemExit(main())
