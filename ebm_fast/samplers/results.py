"""What a sample() call hands back besides the samples: its diagnostics and its error."""

from __future__ import annotations

import dataclasses

import torch

from ebm_fast.precision import PrecisionChoice


class NonFiniteChainError(FloatingPointError):
    """Chains reached a non-finite energy or state (raised when check_finite is on)."""


@dataclasses.dataclass
class SampleInfo:
    """Per-chain diagnostics of one sample() call; tensors have shape (chains,).

    initial_energy / final_energy: energy at x0 and at the returned samples. mean_grad_norm: the
    energy gradient's Euclidean norm, averaged over the states the chain stood at (Langevin: the
    K states it stepped from; MALA: x0 and the state after each step, proposals not included).
    displacement: |x_K - x0|.
    time_s: wall-clock seconds of the call (the device is synchronised to measure it).
    MALA only: accept_rate (fraction of accepted proposals) and step_size (per chain, after any
    adaptation; pass it back as ``sample(..., step_size=info.step_size)`` to keep it).
    precision: what the energy's passes ran in, and why (``autocast="auto"`` resolved).
    """

    initial_energy: torch.Tensor
    final_energy: torch.Tensor
    mean_grad_norm: torch.Tensor
    displacement: torch.Tensor
    time_s: float
    accept_rate: torch.Tensor | None = None
    step_size: torch.Tensor | None = None
    precision: PrecisionChoice | None = None
