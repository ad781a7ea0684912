"""What bfloat16 energy passes cost in exactness, measured in 2-D against the exact density.

1. Sampling. An MLP energy 2-64-64-1 is fitted to the ring (8 Gaussians) by exact maximum
   likelihood (exact2d.exact_ml_gradient, Adam). Chains start at exact draws of its density
   exp(-E) / Z (stationary from the start: what is measured is each sampler's bias, not its
   mixing) and run K steps of unadjusted Langevin (ULA, temperature 1) and of MALA, once with
   float32 energy passes and once under autocast=torch.bfloat16, same eps, same K, same seed.
   Reported: KL(histogram of the chains || exact bin probabilities) on a 40 x 40 grid of bins
   over [-4, 4]^2, next to the same KL for as many exact draws (the histogram estimator's own
   floor at this many samples), and MALA's acceptance rate.
2. Training. The ring with PersistentML (the `ebm-fast train` ring settings, shorter) with
   float32 and with bfloat16 sampling (and loss passes), over several seeds: the exact
   KL(data || model) at the end, mean +- standard error over seeds.

Writes benchmarks/results/precision.json.  Usage:
    python benchmarks/bench_precision.py [--chains N] [--steps K] [--eps EPS]
        [--seeds S] [--iterations I] [--threads T] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from ebm_fast import LangevinSampler, MALASampler, ReplayBuffer, datasets, validation
from ebm_fast.exact2d import BOX, exact_kl, exact_ml_gradient, exact_samples, grid
from ebm_fast.experiments.models import build_energy
from ebm_fast.training import Trainer
from ebm_fast.training.losses import PersistentML

RESULTS = Path(__file__).resolve().parent / "results" / "precision.json"
BINS, CELLS = 40, 200  # 5 x 5 exact-grid cells per histogram bin
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16}
count = validation.argparse_type(validation.integer, low=1)
positive_real = validation.argparse_type(validation.real, low=0.0, low_open=True)


def fit_exact_ml(iterations: int, seed: int) -> torch.nn.Module:
    """An MLP energy fitted to 4000 ring points by exact ML (the grid's log Z, no sampler)."""
    torch.manual_seed(seed)
    data = datasets.TOY_2D["ring"].sample(4000, torch.Generator().manual_seed(seed))
    energy = build_energy("mlp", (2,), 64)
    optimizer = torch.optim.Adam(energy.parameters(), lr=1e-2)
    for _ in range(iterations):
        grads = exact_ml_gradient(energy, data, BOX, 100)
        for p, g in zip(energy.parameters(), grads):
            p.grad = g
        optimizer.step()
    return energy.requires_grad_(False)


def bin_of(points: torch.Tensor) -> torch.Tensor:
    """The histogram bin of each point (points outside the box go to the edge bins)."""
    index = ((points + BOX) / (2 * BOX) * BINS).floor().long().clamp_(0, BINS - 1)
    return index[:, 0] * BINS + index[:, 1]


def histogram(points: torch.Tensor) -> torch.Tensor:
    return torch.bincount(bin_of(points), minlength=BINS * BINS).double() / points.shape[0]


@torch.no_grad()
def exact_bin_probabilities(energy) -> torch.Tensor:
    points, _ = grid(BOX, CELLS)
    weights = torch.softmax(-energy(points).reshape(-1).double(), 0)
    return torch.zeros(BINS * BINS, dtype=torch.float64).index_add_(0, bin_of(points), weights)


def histogram_kl(points: torch.Tensor, exact: torch.Tensor) -> float:
    """KL(histogram || exact) in nats; empty bins contribute 0."""
    q = histogram(points)
    seen = q > 0
    return float((q[seen] * (q[seen] / exact[seen]).log()).sum())


def sampling_study(energy, chains: int, steps: int, eps: float) -> dict:
    exact = exact_bin_probabilities(energy)
    x0 = exact_samples(energy, chains, seed=11, step=0, cells=CELLS)
    floor = exact_samples(energy, chains, seed=12, step=0, cells=CELLS)
    rows = {"exact_draws": {"histogram_kl": histogram_kl(floor, exact)}}
    for sampler_name, make in (
        ("ula", lambda **o: LangevinSampler(energy, temperature=1.0, **o)),
        ("mala", lambda **o: MALASampler(energy, **o)),
    ):
        for precision, autocast in PRECISIONS.items():
            sampler = make(step_size=eps, n_steps=steps, seed=13, autocast=autocast)
            start = time.perf_counter()
            x, info = sampler.sample(x0, return_info=True)
            row = {"histogram_kl": histogram_kl(x, exact), "seconds": time.perf_counter() - start}
            if sampler_name == "mala":
                row["accept_rate"] = float(info.accept_rate.mean())
            rows[f"{sampler_name}_{precision}"] = row
            print(
                f"  {sampler_name:5s} {precision:9s} KL(hist || exact) "
                f"{row['histogram_kl']:.5f}"
                + (f", acceptance {row['accept_rate']:.4f}" if "accept_rate" in row else "")
                + f" ({row['seconds']:.1f} s)",
                flush=True,
            )
    print(
        f"  exact draws        KL(hist || exact) {rows['exact_draws']['histogram_kl']:.5f} "
        f"(the estimator's floor at {chains} samples)",
        flush=True,
    )
    return rows


def train_ring(seed: int, autocast, iterations: int) -> float:
    """PersistentML on the ring (ebm-fast train's ring settings, hidden 64, batch 128): the exact
    KL(data || model) after `iterations`."""
    toy = datasets.TOY_2D["ring"]
    data = toy.sample(20000, torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    energy = build_energy("mlp", (2,), 64)
    sampler = LangevinSampler(
        energy,
        step_size=0.01,
        noise_scale=0.1414,
        n_steps=20,
        clamp=(-BOX, BOX),
        seed=seed + 1,
        autocast=autocast,
    )
    buffer = ReplayBuffer(10000, (2,), init_range=(-BOX, BOX), reinit_prob=0.05, seed=seed + 2)
    loss = PersistentML(sampler, buffer, alpha=0.01)
    optimizer = torch.optim.Adam(energy.parameters(), lr=1e-3, betas=(0.0, 0.999))
    Trainer(energy, loss, optimizer, progress=False, log_every=iterations, data_seed=seed).fit(
        data, iterations, 128
    )
    return exact_kl(toy.log_density, energy)


def training_study(seeds: int, iterations: int) -> dict:
    rows = {}
    for precision, autocast in PRECISIONS.items():
        start = time.perf_counter()
        kls = [train_ring(seed, autocast, iterations) for seed in range(seeds)]
        mean = statistics.fmean(kls)
        se = statistics.stdev(kls) / math.sqrt(seeds) if seeds > 1 else float("nan")
        rows[precision] = {
            "exact_kl": kls,
            "mean": mean,
            "standard_error": se,
            "seconds": time.perf_counter() - start,
        }
        print(
            f"  {precision:9s} exact KL(data || model) {mean:.3f} +- {se:.3f} over {seeds} "
            f"seeds ({', '.join(f'{k:.3f}' for k in kls)}; {rows[precision]['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chains", type=count, default=100_000)
    parser.add_argument("--steps", type=count, default=300)
    parser.add_argument("--eps", type=positive_real, default=0.01)
    parser.add_argument(
        "--fit-iterations",
        type=count,
        default=300,
        help="exact-ML Adam steps for the sampling study's energy",
    )
    parser.add_argument("--seeds", type=count, default=3)
    parser.add_argument(
        "--iterations", type=count, default=600, help="PersistentML iterations per training run"
    )
    parser.add_argument("--threads", type=count, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    report = {
        "benchmark": "precision",
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "load_average_before": os.getloadavg(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(
        f"sampling: exact-ML ring energy, {args.chains} chains from exact draws, "
        f"K = {args.steps}, eps = {args.eps}",
        flush=True,
    )
    energy = fit_exact_ml(args.fit_iterations, seed=0)
    report["sampling"] = sampling_study(energy, args.chains, args.steps, args.eps)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"training: ring, PersistentML, {args.iterations} iterations", flush=True)
    report["training"] = training_study(args.seeds, args.iterations)
    report["load_average_after"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=2))
    print(
        f"load average before/after: {report['load_average_before']} / "
        f"{report['load_average_after']}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
