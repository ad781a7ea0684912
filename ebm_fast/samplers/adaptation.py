"""MALA's per-chain step-size adaptation, kept apart from the kernel (as BlackJAX keeps its
adaptation apart from its samplers): the chain loop calls it, the kernel knows nothing of it."""

from __future__ import annotations

import torch


def adapt_step_scale(
    scale: torch.Tensor, accept_prob: torch.Tensor, target_accept: float, rate: float
) -> None:
    """One adaptation step, in place: log scale += rate * (accept_prob - target_accept).

    scale multiplies each chain's step size; raising it when proposals are accepted more often
    than the target and lowering it otherwise drives the acceptance rate toward the target
    (Robbins-Monro on log step size, without a decreasing gain: adaptation stops at a fixed step).
    """
    scale.mul_(torch.exp(rate * (accept_prob - target_accept)))
