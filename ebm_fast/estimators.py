"""Gradient estimators for EBM training, each named for what it is.

Every estimator returns an :class:`Estimate`: the parameter gradients of the surrogate loss
``mean E(data) - mean E(negatives)`` and the negatives themselves. The surrogate's gradient
estimates the maximum-likelihood gradient ``E_data[grad E] - E_p[grad E]`` exactly as well as
the negatives stand in for samples of p = exp(-E) / Z; the estimators differ only in where their
chains start.

* :func:`contrastive_divergence` (CD-k, Hinton 2002): chains start AT THE DATA batch and run k
  steps. Its fixed point is not the ML solution in general, and with k = 0 the gradient is 0.
* :func:`persistent_ml`: chains drawn from a replay buffer, run, written back (Du & Mordatch
  2019; Tieleman's persistent CD is the reinit_prob = 0 case). Gagnon & Lajoie (2022,
  arXiv 2202.12176) show this is approximate maximum likelihood, not CD: the chains never
  restart at the data, they persist toward the model distribution.
* :func:`short_run_ml`: chains start from noise every time and run a fixed budget (Nijkamp et al.
  2019, short-run MCMC) — also an approximation of ML, biased by the short budget.

``ebm-fast study`` (ebm_fast/experiments/study.py) measures each one against the exact ML
gradient of a 2-D model (ebm_fast.exact2d).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from ebm_fast import validation
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.exact2d import trainable_parameters
from ebm_fast.samplers import LangevinSampler

__all__ = ["Estimate", "contrastive_divergence", "persistent_ml", "short_run_ml",
           "surrogate_gradient", "trainable_parameters"]


class Estimate(NamedTuple):
    """grads: one tensor per trainable parameter (the order of ``energy.parameters()``);
    negatives: the chains' final states, shaped like the data batch."""

    grads: list[torch.Tensor]
    negatives: torch.Tensor


def surrogate_gradient(energy: torch.nn.Module, data_batch: torch.Tensor,
                       negatives: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of ``mean E(data) - mean E(negatives)`` w.r.t. the trainable parameters.

    The two energies are evaluated separately, so identical data and negatives give gradients
    that cancel exactly (CD-0 is exactly 0)."""
    with torch.enable_grad():
        loss = energy(data_batch).mean() - energy(negatives.detach()).mean()
        return list(torch.autograd.grad(loss, trainable_parameters(energy)))


def _check_batch(data_batch, name: str = "data_batch") -> None:
    if not isinstance(data_batch, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(data_batch).__name__}")
    if data_batch.dim() < 1 or data_batch.shape[0] == 0:
        raise ValueError(f"{name} must have a leading batch axis with at least one sample, got "
                         f"shape {tuple(data_batch.shape)}")


def _check_sampler(sampler) -> None:
    if not isinstance(sampler, LangevinSampler):
        raise TypeError(f"sampler must be an ebm_fast.LangevinSampler, got "
                        f"{type(sampler).__name__}")


def contrastive_divergence(energy: torch.nn.Module, data_batch: torch.Tensor, k: int,
                           sampler: LangevinSampler) -> Estimate:
    """CD-k: k sampler steps from the data batch itself; k = 0 returns the data (gradient 0)."""
    _check_batch(data_batch)
    _check_sampler(sampler)
    k = validation.integer(k, "k", low=0)
    negatives = sampler.sample(data_batch, n_steps=k) if k > 0 else data_batch.detach().clone()
    return Estimate(surrogate_gradient(energy, data_batch, negatives), negatives)


def persistent_ml(energy: torch.nn.Module, data_batch: torch.Tensor, buffer: ReplayBuffer,
                  sampler: LangevinSampler, n_steps: int | None = None) -> Estimate:
    """Replay-buffer approximate ML: draw len(data_batch) chains from the buffer (each reset to
    init noise with the buffer's reinit_prob), run the sampler (n_steps, default its own), push
    them back to their slots."""
    _check_batch(data_batch)
    _check_sampler(sampler)
    if not isinstance(buffer, ReplayBuffer):
        raise TypeError(f"buffer must be an ebm_fast.ReplayBuffer, got {type(buffer).__name__}")
    x0, slots = buffer.sample(data_batch.shape[0])
    negatives = sampler.sample(x0, n_steps)
    buffer.push(negatives, slots)
    return Estimate(surrogate_gradient(energy, data_batch, negatives), negatives)


def short_run_ml(energy: torch.nn.Module, data_batch: torch.Tensor, sampler: LangevinSampler,
                 init: Callable[[int], torch.Tensor], n_steps: int | None = None) -> Estimate:
    """Short-run ML: fresh chains from ``init(batch_size)`` (noise) every call, run n_steps
    (default the sampler's own)."""
    _check_batch(data_batch)
    _check_sampler(sampler)
    if not callable(init):
        raise TypeError(f"init must be a callable batch_size -> initial states, got "
                        f"{type(init).__name__}")
    x0 = init(data_batch.shape[0])
    _check_batch(x0, "init(batch_size)")
    if x0.shape != data_batch.shape:
        raise ValueError(f"init(batch_size) must return the data batch's shape "
                         f"{tuple(data_batch.shape)}, got {tuple(x0.shape)}")
    negatives = sampler.sample(x0, n_steps)
    return Estimate(surrogate_gradient(energy, data_batch, negatives), negatives)
