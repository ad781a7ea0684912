"""Train a small 2-D EBM with ebm_fast and with the plain loop; report speed and exact held-out NLL.

``ebm-fast demo``. Both runs use the same model initialisation, data and hyper-parameters and the
same estimator:
replay-buffer training in the style of Du & Mordatch (2019) — persistent chains drawn from a
buffer, a few Langevin steps, written back. Gagnon & Lajoie (2022) show this is approximate
maximum likelihood, not contrastive divergence (CD starts its chains at the data), so it is named
here for what it is. The fast run uses ebm_fast.ReplayBuffer + ebm_fast.LangevinSampler; the plain
run the loop as IGEBM/JEM code writes it (a tensor buffer with torch.rand reinit, autograd.grad,
``x - eps * g + sigma * randn_like(x)``, clamp). Because the model is 2-D, the exact negative
log-likelihood of held-out data is computed on a grid (exact partition function), so the speed
comparison comes with a check that the fast run learned as well as the plain one. The two
trainings run interleaved, one iteration each in turn, so that load changes on the machine hit
both alike; each keeps its own random state, so the results equal two separate runs.
"""

from __future__ import annotations

import json
import math
import time

import torch
from torch import nn

from ebm_fast.allocator import retain_freed_cpu_memory
from ebm_fast.backends import available_backends
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.datasets import ring_of_gaussians
# Data, buffer init and chains live in [-BOX, BOX]^2; the exact NLL sums Z on a grid over it.
from ebm_fast.exact2d import BOX, exact_nll
from ebm_fast.experiments import options
from ebm_fast.experiments.models import make_energy
from ebm_fast.samplers import LangevinSampler

__all__ = ["plain_langevin", "PlainBuffer", "Training", "add_arguments", "main"]


def plain_langevin(energy: nn.Module, x: torch.Tensor, n_steps: int, step_size: float,
                   noise_scale: float) -> torch.Tensor:
    """The sampling loop as EBM code usually writes it."""
    for _ in range(n_steps):
        x = x.detach().requires_grad_(True)
        grad = torch.autograd.grad(energy(x).sum(), x)[0]
        x = (x - step_size * grad + noise_scale * torch.randn_like(x)).clamp(-BOX, BOX)
    return x.detach()


class PlainBuffer:
    """A replay buffer as IGEBM-style code writes it: a tensor, torch.randint slots,
    torch.rand reinit."""

    def __init__(self, capacity: int, reinit_prob: float, device: torch.device):
        self.storage = (torch.rand(capacity, 2, device=device) * 2 - 1) * BOX
        self.reinit_prob = reinit_prob

    def sample(self, batch: int):
        device = self.storage.device
        idx = torch.randint(len(self.storage), (batch,), device=device)
        x = self.storage[idx]
        fresh = torch.rand(batch, device=device) < self.reinit_prob
        x[fresh] = (torch.rand(int(fresh.sum()), 2, device=device) * 2 - 1) * BOX
        return x, idx

    def push(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        self.storage[idx] = x


class Training:
    """One of the two trainings, advanced an iteration at a time so that main() can interleave
    them: machine load that drifts during the demo then hits both alike."""

    def __init__(self, kind: str, args, data: torch.Tensor):
        self.kind, self.args, self.data = kind, args, data
        self.device = data.device
        self.energy = make_energy(args.seed).to(self.device)
        self.optimiser = torch.optim.Adam(self.energy.parameters(), lr=args.lr,
                                          betas=(0.0, 0.999))
        if kind == "ebm_fast":
            # Checks off on both sides, like for like: the plain loop and buffer check nothing
            # (with them on, a call costs one host read and a few small ops more).
            self.buffer = ReplayBuffer(args.buffer_size, (2,), device=self.device,
                                       init_range=(-BOX, BOX),
                                       reinit_prob=args.reinit_prob, seed=args.seed,
                                       check_values=False)
            self.sampler = LangevinSampler(
                self.energy, step_size=args.step_size, noise_scale=args.noise_scale,
                n_steps=args.steps, clamp=(-BOX, BOX), seed=args.seed, check_finite=False)
        else:
            # The plain loop draws from the device's global RNG, as such code does; it gets the
            # state torch.manual_seed(seed) would give and keeps it between its iterations, so
            # that interleaving with the other training changes none of its draws.
            # (--device cuda means the current CUDA device.)
            self.global_generator = (torch.default_generator if self.device.type == "cpu" else
                                     torch.cuda.default_generators[torch.cuda.current_device()])
            self.rng_state = torch.Generator(self.device).manual_seed(args.seed).get_state()
            self.buffer = self._with_own_rng(
                lambda: PlainBuffer(args.buffer_size, args.reinit_prob, self.device))
        self.generator = torch.Generator().manual_seed(args.seed + 1)
        self.sampling_seconds = self.total_seconds = 0.0
        self.loss = float("nan")

    def negatives(self) -> torch.Tensor:
        args = self.args
        x0, idx = self.buffer.sample(args.batch)
        if self.kind == "ebm_fast":
            x = self.sampler.sample(x0)
        else:
            x = plain_langevin(self.energy, x0, args.steps, args.step_size, args.noise_scale)
        self.buffer.push(x, idx)
        return x

    def _with_own_rng(self, fn):
        """fn() under this training's global-RNG state, the caller's restored afterwards."""
        outer = self.global_generator.get_state()
        self.global_generator.set_state(self.rng_state)
        try:
            return fn()
        finally:
            self.rng_state = self.global_generator.get_state()
            self.global_generator.set_state(outer)

    def iteration(self) -> None:
        if self.kind == "plain":
            self._with_own_rng(self._timed_iteration)
        else:
            self._timed_iteration()

    def _clock(self) -> float:
        """Seconds, read once the device has finished the work queued so far (CUDA runs
        asynchronously: without the wait the clock would time the launches only)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _timed_iteration(self) -> None:
        start = self._clock()
        args = self.args
        positives = self.data[torch.randint(len(self.data), (args.batch,),
                                            generator=self.generator)]
        t0 = self._clock()
        x_neg = self.negatives()
        self.sampling_seconds += self._clock() - t0
        e_pos, e_neg = self.energy(positives), self.energy(x_neg)
        # Approximate-ML gradient: data energy down, model-sample energy up; a small energy
        # magnitude penalty keeps the scale bounded (Du & Mordatch 2019).
        loss = e_pos.mean() - e_neg.mean() + args.alpha * (e_pos ** 2 + e_neg ** 2).mean()
        self.optimiser.zero_grad(set_to_none=True)
        loss.backward()
        self.optimiser.step()
        self.loss = loss
        self.total_seconds += self._clock() - start

    def result(self) -> dict:
        args = self.args
        return {"kind": self.kind, "total_seconds": self.total_seconds,
                "sampling_seconds": self.sampling_seconds,
                "chain_steps_per_second": args.iterations * args.batch * args.steps
                / self.sampling_seconds}


def add_arguments(parser) -> None:
    parser.add_argument("--iterations", type=options.count, default=400)
    parser.add_argument("--batch", type=options.count, default=256)
    parser.add_argument("--steps", type=options.count, default=20,
                        help="Langevin steps per iteration")
    parser.add_argument("--step-size", type=options.positive_real, default=0.01)
    parser.add_argument("--noise-scale", type=options.non_negative_real, default=0.1414)
    parser.add_argument("--buffer-size", type=options.count, default=10000)
    parser.add_argument("--reinit-prob", type=options.probability, default=0.05)
    parser.add_argument("--lr", type=options.positive_real, default=1e-3)
    parser.add_argument("--alpha", type=options.non_negative_real, default=0.1,
                        help="weight of the energy-magnitude penalty")
    parser.add_argument("--seed", type=options.seed, default=0)
    parser.add_argument("--device", type=options.device, choices=("cpu", "cuda"), default="cpu",
                        help="where both trainings run")
    parser.add_argument("--log-every", type=options.count, default=100)
    parser.add_argument("--json", type=options.output_file, help="write the results here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="leave glibc's allocator as it is (by default freed memory is kept "
                             "for reuse, for both runs: see ebm_fast.allocator)")


def main(args) -> int:
    def log(line: str) -> None:
        print(line, flush=True)

    malloc = "default" if args.default_malloc or not retain_freed_cpu_memory() else "retain"

    # Build/load the C++ kernels before any timing starts.
    log(f"backends available: {', '.join(available_backends())}")
    generator = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    data = ring_of_gaussians(20000, generator).to(device)
    held_out = ring_of_gaussians(5000, generator).to(device)
    log(f"ebm-fast demo: 2-D ring of 8 Gaussians, MLP 2-128-128-1, replay-buffer approximate ML, "
        f"{args.iterations} iterations x {args.batch} chains x {args.steps} Langevin steps "
        f"(torch {torch.__version__}, {device}, {torch.get_num_threads()} threads, "
        f"malloc {malloc})")
    trainings = [Training(kind, args, data) for kind in ("plain", "ebm_fast")]
    for it in range(1, args.iterations + 1):
        # Interleaved, iteration by iteration: drifting machine load hits both runs alike.
        for training in trainings:
            training.iteration()
        if it % args.log_every == 0 or it == args.iterations:
            for training in trainings:
                log(f"  [{training.kind:8s}] iteration {it:4d}/{args.iterations}  loss "
                    f"{training.loss.item():+.4f}  sampling {training.sampling_seconds:.2f}s")
    rows = [dict(training.result(), held_out_nll=exact_nll(training.energy, held_out))
            for training in trainings]
    plain, fast = rows
    log("")
    log(f"{'run':10s} {'total s':>9s} {'sampling s':>11s} {'chain-steps/s':>14s} "
        f"{'held-out NLL':>13s}")
    for run in rows:
        log(f"{run['kind']:10s} {run['total_seconds']:9.2f} {run['sampling_seconds']:11.2f} "
            f"{run['chain_steps_per_second']:14.0f} {run['held_out_nll']:13.3f}")
    # A ratio below 1 means ebm_fast was slower: printed as measured, never as "faster".
    log(f"\nebm_fast vs the plain loop, speed-up (plain time / ebm_fast time): sampling "
        f"{plain['sampling_seconds'] / fast['sampling_seconds']:.2f}x, whole training "
        f"{plain['total_seconds'] / fast['total_seconds']:.2f}x; "
        f"exact held-out NLL {fast['held_out_nll']:.3f} vs {plain['held_out_nll']:.3f} "
        f"(a uniform density on the box scores {math.log((2 * BOX) ** 2):.3f}).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "malloc": malloc, "runs": rows}, f, indent=2)
    return 0

