"""What the experiments share: the data and its exact density, exact and histogram KL, the
models along an exact-ML run, the estimators as ebm_fast.training losses, a stack of MLP
energies trained side by side, summary statistics, jobs run in a pool of processes."""

from __future__ import annotations

import copy
import itertools
import math
import multiprocessing
import zlib

import torch
from torch import nn

from ebm_fast import validation
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.datasets import TOY_2D, ring_log_density
from ebm_fast.exact2d import exact_kl, exact_ml_gradient, grid
from ebm_fast.experiments.models import make_energy
from ebm_fast.experiments.study.config import StudyConfig
from ebm_fast.ops.philox import philox_uniform
from ebm_fast.samplers import LangevinSampler
from ebm_fast.training import (
    ContrastiveDivergence,
    KLPersistentML,
    PersistentCD,
    PersistentML,
    ShortRunML,
)

__all__ = [
    "ESTIMATORS",
    "MODEL_NAMES",
    "RING",
    "ring_log_density",
    "bin_log_probs",
    "binned_kl",
    "histogram_kl",
    "mean_se",
    "flat",
    "Context",
    "MLPStack",
    "run_jobs",
]

#: the sampling estimators, as results.json names them
ESTIMATORS = ("cd", "pcd", "persistent_ml", "short_run_ml", "kl_persistent_ml")
MODEL_NAMES = ("early", "middle", "converged")
RING = dict(modes=8, radius=2.5, std=0.25)  # ring_of_gaussians' defaults


def _grid_log_probs(log_density, box: float, cells: int) -> torch.Tensor:
    """log of each grid cell's probability under the density, normalised over the grid."""
    points, _ = grid(box, cells)
    with torch.no_grad():
        return torch.log_softmax(log_density(points).reshape(-1).double(), 0)


def bin_log_probs(log_density, box: float, bins: int, refine: int = 4) -> torch.Tensor:
    """(bins * bins,) log probabilities of the histogram cells under the density: the
    density's grid of (bins * refine)^2 cells summed over each histogram cell."""
    fine = _grid_log_probs(log_density, box, bins * refine).reshape(bins, refine, bins, refine)
    return torch.logsumexp(fine.permute(0, 2, 1, 3).reshape(bins, bins, -1), -1).reshape(-1)


def binned_kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(P || Q) of two binned distributions given by their cell log probabilities."""
    return float((log_p.exp() * (log_p - log_q)).sum())


def histogram_kl(samples: torch.Tensor, log_probs: torch.Tensor, box: float, bins: int) -> float:
    """KL(q || p) from samples of q: q's histogram on bins x bins cells of [-box, box]^2 against
    p's cell log probabilities (``bin_log_probs``), minus the plug-in bias (occupied cells - 1) /
    (2 n) (Miller-Madow). It estimates the KL between the binned distributions, a lower bound of
    the continuous KL (coarse graining loses information) that approaches it as cells shrink.
    Samples outside the box count in its edge cells."""
    n = samples.shape[0]
    index = ((samples.detach().double() + box) / (2 * box) * bins).floor().long()
    index = index.clamp_(0, bins - 1)
    counts = torch.bincount(index[:, 0] * bins + index[:, 1], minlength=bins * bins).double()
    occupied = counts > 0
    q = counts[occupied] / n
    plug_in = (q * (q.log() - log_probs[occupied])).sum()
    return float(plug_in) - (int(occupied.sum()) - 1) / (2 * n)


def mean_se(values) -> dict:
    """{"mean", "se" (standard error of the mean), "n"} of a list of numbers."""
    t = torch.tensor(list(values), dtype=torch.float64)
    return {"mean": float(t.mean()), "se": float(t.std() / math.sqrt(len(t))), "n": len(t)}


def flat(tensors) -> torch.Tensor:
    """A list of gradient tensors as one float64 vector."""
    return torch.cat([t.reshape(-1) for t in tensors]).double()


def _derived_seed(seed: int, *labels) -> int:
    """A 63-bit seed for one named use (labels), so that adding a use moves no other stream."""
    return (seed * 0x9E3779B1 + zlib.crc32(repr(labels).encode())) % 2**63


class MLPStack(nn.Module):
    """S MLP energies 2-hidden-hidden-1 (SiLU) evaluated side by side as one energy of x (B, 2S),
    which holds one 2-D point per member: E(x) = the sum of the members' energies at their
    points. Langevin on it runs each member's chains on its own energy (dE/dx_s is member s's
    gradient alone), and a loss mean E(x+) - mean E(x-) gives member s's weights member s's own
    gradient (Adam acts elementwise), so training the stack trains S independent models. The
    study's batches are small enough that a step costs per call, not per flop: a stack of 5 ran
    its Langevin steps ~2x faster per member than 5 separate MLPs.
    """

    def __init__(self, members: list):
        super().__init__()
        linears = [[m for m in member if isinstance(m, nn.Linear)] for member in members]
        # layer l: weight (S, in, out) and bias (S, 1, out), so that a batched matmul applies it
        depth = len(linears[0])
        self.weights = nn.ParameterList(
            torch.stack([member[i].weight.detach().T for member in linears]) for i in range(depth)
        )
        self.biases = nn.ParameterList(
            torch.stack([member[i].bias.detach()[None] for member in linears]) for i in range(depth)
        )

        # The same Parameter objects as a plain tuple: ParameterList's indexing cost ~7% of a
        # training iteration (they are updated in place, so the tuple stays current).
        self.layers = tuple(zip(self.weights, self.biases))
        self.size = len(members)

    def energies(self, x: torch.Tensor) -> torch.Tensor:
        """(B, S): member s's energy at x[:, 2s:2s + 2]."""
        h = x.reshape(x.shape[0], self.size, 2).transpose(0, 1)
        for i, (weight, bias) in enumerate(self.layers):
            h = torch.baddbmm(bias, h, weight)
            if i < len(self.layers) - 1:
                h = nn.functional.silu(h)
        return h[..., 0].T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energies(x).sum(1)

    def member(self, s: int) -> nn.Sequential:
        """A copy of member s as a plain MLP (nn.Sequential), for the exact tools."""
        layers = []
        for weight, bias in zip(self.weights, self.biases):
            linear = nn.Linear(*weight.shape[1:])
            with torch.no_grad():
                linear.weight.copy_(weight[s].T)
                linear.bias.copy_(bias[s, 0])
            layers += [linear, nn.SiLU()]
        return nn.Sequential(*layers[:-1])


def _run_job(task):
    index, function, job = task
    return index, function(*job)


def run_jobs(function, jobs: list, processes: int, threads: int, progress) -> list:
    """[function(*job) for job in jobs], in this process or in a pool of ``processes`` spawned
    processes with ``threads`` torch threads each (function and jobs must pickle). A job's
    randomness is its own (derived seeds), so the results do not depend on ``processes``;
    progress advances as each job finishes. Put the longest jobs first."""
    if processes == 1 or len(jobs) < 2:
        results = []
        for job in jobs:
            results.append(function(*job))
            progress.update(1)
        return results
    results = [None] * len(jobs)
    pool = multiprocessing.get_context("spawn").Pool(
        min(processes, len(jobs)), initializer=torch.set_num_threads, initargs=(threads,)
    )
    try:
        for index, value in pool.imap_unordered(
            _run_job, [(i, function, job) for i, job in enumerate(jobs)]
        ):
            results[index] = value
            progress.update(1)
        pool.close()  # then join: the workers' CPU time counts once they are waited for
    finally:
        pool.terminate()
        pool.join()
    return results


class Context:
    """One study run on one density: its config and seed, data, derived seeds, and the work
    experiments share (the exact-ML models of E1/E2, the trained runs of E3 that E4 and E5
    reuse). ``processes``: how many processes the experiments' independent jobs may use."""

    def __init__(
        self,
        config: StudyConfig,
        seed: int,
        density: str | None = None,
        *,
        processes: int = 1,
        threads: int = 1,
    ):
        if not isinstance(config, StudyConfig):
            raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
        self.config = config
        self.seed = validation.integer(seed, "seed", low=0, high=2**63)
        self.density = (
            config.densities[0]
            if density is None
            else validation.choice(density, "density", config.densities)
        )
        self.processes = validation.integer(processes, "processes", low=1, high=3)  # 1 or 2
        self.threads = validation.integer(threads, "threads", low=1)
        toy = TOY_2D[self.density]
        assert toy.log_density is not None  # config.densities holds exact densities only
        self.sample, self.log_density = toy.sample, toy.log_density
        generator = torch.Generator().manual_seed(self.seed_for("data"))
        self.train = self.sample(config.train_size, generator)
        self.heldout = self.sample(config.heldout_size, generator)
        self._models: dict | None = None
        self._others = {self.density: self}
        self.runs: dict = {}  # (method, temperature) -> E3's training record

    def on(self, density: str) -> Context:
        """The same run on another of config.densities (made once, then kept)."""
        if density not in self._others:
            other = Context(
                self.config, self.seed, density, processes=self.processes, threads=self.threads
            )
            other._others = self._others
            self._others[density] = other
        return self._others[density]

    @property
    def budgets(self) -> tuple:
        """E3's budgets (Adam iterations) on this density: config.budgets on the first, the
        base iterations times config.other_budget_factors on the others."""
        if self.density == self.config.densities[0]:
            return self.config.budgets
        return tuple(self.config.iterations * f for f in self.config.other_budget_factors)

    def seed_for(self, *labels) -> int:
        # The main density keeps the labels alone (its streams as before the others existed).
        extra = () if self.density == self.config.densities[0] else (self.density,)
        return _derived_seed(self.seed, *extra, *labels)

    def data(self, n: int, *labels) -> torch.Tensor:
        """n fresh data points from the stream named by labels."""
        return self.sample(n, torch.Generator().manual_seed(self.seed_for("data", *labels)))

    def uniform_init(self, *labels, dim: int = 2):
        """init(batch) -> (batch, dim) uniform noise on the box, noise-spec uniforms at a fresh
        step per call."""
        seed, draws, box = self.seed_for("uniform", *labels), itertools.count(), self.config.box
        return lambda n: (2 * philox_uniform((n, dim), seed=seed, step=next(draws)) - 1) * box

    def exact_kl_to_model(self, energy, temperature: float = 1.0) -> float:
        """Exact KL(p_data || p) with p proportional to exp(-E / temperature)."""
        return exact_kl(
            self.log_density, energy, self.config.box, self.config.cells, temperature=temperature
        )

    def models(self) -> dict:
        """{"early", "middle", "converged"}: copies of one MLP energy along Adam on the exact ML
        gradient of the training data, after config.checkpoints iterations."""
        if self._models is None:
            cfg = self.config
            energy = make_energy(self.seed_for("models"), cfg.hidden)
            optimiser = torch.optim.Adam(energy.parameters(), lr=cfg.lr, betas=(0.0, 0.999))
            self._models = {}
            for iteration in range(cfg.checkpoints[-1] + 1):
                if iteration in cfg.checkpoints:
                    name = MODEL_NAMES[cfg.checkpoints.index(iteration)]
                    self._models[name] = copy.deepcopy(energy).requires_grad_(True)
                if iteration < cfg.checkpoints[-1]:
                    grads = exact_ml_gradient(energy, self.train, cfg.box, cfg.cells)
                    for param, grad in zip(energy.parameters(), grads):
                        param.grad = grad
                    optimiser.step()
        return self._models

    def keep_models(self, models: dict) -> None:
        """models() as computed elsewhere (E1's process), so that E2 does not train them again."""
        self._models = models

    def sampler(self, energy, n_steps: int, *labels, temperature: float = 1.0):
        cfg = self.config
        return LangevinSampler(
            energy,
            step_size=cfg.step_size,
            temperature=temperature,
            n_steps=n_steps,
            clamp=(-cfg.box, cfg.box),
            seed=self.seed_for("sampler", *labels),
        )

    def buffer(self, capacity: int, *labels, sample_shape: tuple = (2,)) -> ReplayBuffer:
        box = self.config.box
        return ReplayBuffer(
            capacity,
            sample_shape,
            init_range=(-box, box),
            reinit_prob=self.config.reinit_prob,
            seed=self.seed_for("buffer", *labels),
        )

    def loss(
        self,
        name: str,
        energy: nn.Module,
        k: int,
        *labels,
        buffer_size: int,
        temperature: float = 1.0,
        loss_class=None,
        sample_shape: tuple = (2,),
        **options,
    ):
        """The estimator ``name`` as an ebm_fast.training loss (alpha 0) on a fresh sampler of k
        steps for states of ``sample_shape`` ((2 S,) for an MLPStack of S); ``loss_class``
        overrides the class (E1 keeps the KL chains), ``options`` go to its constructor."""
        sampler = self.sampler(energy, k, name, *labels, temperature=temperature)
        if name == "cd":
            return ContrastiveDivergence(sampler, k, **options)
        if name == "pcd":
            return PersistentCD(sampler, **options)
        dim = math.prod(sample_shape)
        if name == "short_run_ml":
            return ShortRunML(sampler, self.uniform_init(name, *labels, dim=dim), **options)
        buffer = self.buffer(buffer_size, name, *labels, sample_shape=sample_shape)
        if name == "persistent_ml":
            return PersistentML(sampler, buffer, **options)
        if name == "kl_persistent_ml":
            return (loss_class or KLPersistentML)(sampler, buffer, **options)
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")
