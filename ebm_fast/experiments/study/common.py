"""What the experiments share: the data and its exact density, exact and histogram KL, the
models along an exact-ML run, the estimators as ebm_fast.training losses, summary statistics."""

from __future__ import annotations

import copy
import itertools
import math
import zlib

import torch
from torch import nn

from ebm_fast import validation
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.datasets import ring_log_density, ring_of_gaussians
from ebm_fast.exact2d import exact_kl, exact_ml_gradient, grid
from ebm_fast.experiments.models import make_energy
from ebm_fast.experiments.study.config import StudyConfig
from ebm_fast.ops.philox import philox_uniform
from ebm_fast.samplers import LangevinSampler
from ebm_fast.training import (ContrastiveDivergence, KLPersistentML, PersistentCD, PersistentML,
                               ShortRunML)

__all__ = ["ESTIMATORS", "MODEL_NAMES", "RING", "ring_log_density", "bin_log_probs",
           "binned_kl", "histogram_kl", "mean_se", "flat", "Context"]

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
    return (seed * 0x9E3779B1 + zlib.crc32(repr(labels).encode())) % 2 ** 63


class Context:
    """One study run: its config and seed, data, derived seeds, and the work experiments share
    (the exact-ML models of E1/E2, the trained runs of E3 that E4 and E5 reuse)."""

    def __init__(self, config: StudyConfig, seed: int):
        if not isinstance(config, StudyConfig):
            raise TypeError(f"config must be a StudyConfig, got {type(config).__name__}")
        self.config = config
        self.seed = validation.integer(seed, "seed", low=0, high=2 ** 63)
        generator = torch.Generator().manual_seed(self.seed_for("data"))
        self.train = ring_of_gaussians(config.train_size, generator)
        self.heldout = ring_of_gaussians(config.heldout_size, generator)
        self._models: dict | None = None
        self.runs: dict = {}  # (method, temperature, seed index) -> E3's training record

    def seed_for(self, *labels) -> int:
        return _derived_seed(self.seed, *labels)

    def data(self, n: int, *labels) -> torch.Tensor:
        """n fresh ring points from the stream named by labels."""
        return ring_of_gaussians(n, torch.Generator().manual_seed(self.seed_for("data", *labels)))

    def uniform_init(self, *labels):
        """init(batch) -> uniform noise on the box, noise-spec uniforms at a fresh step per call."""
        seed, draws, box = self.seed_for("uniform", *labels), itertools.count(), self.config.box
        return lambda n: (2 * philox_uniform((n, 2), seed=seed, step=next(draws)) - 1) * box

    def exact_kl_to_model(self, energy, temperature: float = 1.0) -> float:
        """Exact KL(p_data || p) with p proportional to exp(-E / temperature)."""
        return exact_kl(ring_log_density, energy, self.config.box, self.config.cells,
                        temperature=temperature)

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

    def sampler(self, energy, n_steps: int, *labels, temperature: float = 1.0):
        cfg = self.config
        return LangevinSampler(energy, step_size=cfg.step_size, temperature=temperature,
                               n_steps=n_steps, clamp=(-cfg.box, cfg.box),
                               seed=self.seed_for("sampler", *labels))

    def buffer(self, capacity: int, *labels) -> ReplayBuffer:
        box = self.config.box
        return ReplayBuffer(capacity, (2,), init_range=(-box, box),
                            reinit_prob=self.config.reinit_prob,
                            seed=self.seed_for("buffer", *labels))

    def loss(self, name: str, energy: nn.Module, k: int, *labels, buffer_size: int,
             temperature: float = 1.0, loss_class=None, **options):
        """The estimator ``name`` as an ebm_fast.training loss (alpha 0) on a fresh sampler of k
        steps; ``loss_class`` overrides the class (E1 keeps the KL chains), ``options`` go to
        its constructor."""
        sampler = self.sampler(energy, k, name, *labels, temperature=temperature)
        if name == "cd":
            return ContrastiveDivergence(sampler, k, **options)
        if name == "pcd":
            return PersistentCD(sampler, **options)
        if name == "short_run_ml":
            return ShortRunML(sampler, self.uniform_init(name, *labels), **options)
        buffer = self.buffer(buffer_size, name, *labels)
        if name == "persistent_ml":
            return PersistentML(sampler, buffer, **options)
        if name == "kl_persistent_ml":
            return (loss_class or KLPersistentML)(sampler, buffer, **options)
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {name!r}")
