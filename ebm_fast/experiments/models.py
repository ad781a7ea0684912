"""The energies the experiments and ``ebm-fast train`` build, and exact maximum-likelihood
training of a 2-D one."""

from __future__ import annotations

import math

import torch
from torch import nn

from ebm_fast import validation
from ebm_fast.exact2d import BOX, exact_ml_gradient
from ebm_fast.samplers.energy import trainable_parameters

__all__ = ["build_energy", "make_energy", "train_exact_ml"]


def build_energy(kind: str, sample_shape: tuple, hidden: int, outputs: int = 1) -> nn.Module:
    """mlp: flatten -> hidden -> hidden -> outputs (SiLU); conv (images): three SiLU
    convolutions (32, 64, 64 channels, the last two with stride 2) and a linear read-out to
    outputs (1: an energy; the number of classes: a JEM classifier's logits)."""
    features = math.prod(sample_shape)
    if kind == "mlp":
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, outputs),
        )
    channels, height, width = sample_shape
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Conv2d(64, 64, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(64 * math.ceil(height / 4) * math.ceil(width / 4), outputs),
    )


def make_energy(seed: int, hidden: int = 128) -> nn.Module:
    """An MLP energy 2 -> hidden -> hidden -> 1 (SiLU), initialised from ``seed`` (the caller's
    global RNG state is left as it was)."""
    hidden = validation.integer(hidden, "hidden", low=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(validation.integer(seed, "seed", low=0, high=2**64))
        return nn.Sequential(
            nn.Linear(2, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, 1),
        )


def train_exact_ml(
    energy: nn.Module,
    data: torch.Tensor,
    iterations: int,
    *,
    lr: float = 1e-3,
    box: float = BOX,
    cells: int = 100,
) -> nn.Module:
    """Adam on the exact ML gradient of the whole data set (cheap in 2-D)."""
    iterations = validation.integer(iterations, "iterations", low=0)
    optimiser = torch.optim.Adam(trainable_parameters(energy), lr=lr)
    for _ in range(iterations):
        for param, grad in zip(
            trainable_parameters(energy), exact_ml_gradient(energy, data, box, cells)
        ):
            param.grad = grad
        optimiser.step()
    return energy
