"""Reference MALA accept/reject, in pure torch (the spec every backend is held to).

The proposal y = x - eps * grad E(x) + sqrt(2 eps T) xi targets the density exp(-E / T). Per chain,

    log_alpha = -(E_y - E_x) / T - (|x - y + eps g_y|^2 - |y - x + eps g_x|^2) / (4 eps T)
    accept_prob = min(1, exp(log_alpha)), and 0 where E_y is not finite or log_alpha is NaN
    accepted = u < accept_prob, u the spec's uniform (stream ``stream``, n = chain index)

and accepted chains take the proposal: x <- y, grad_x <- grad_y, energy_x <- energy_y.

The two squared norms are nearly equal for small eps (both about 2 eps T per element), so their
difference is evaluated as the per-chain sum it equals, |a|^2 - |b|^2 = (a - b) . (a + b):

    (|x - y + eps g_y|^2 - |y - x + eps g_x|^2) / (4 eps T)
        = sum((g_x + g_y) * (eps (g_y - g_x) - 2 (y - x))) / (4 T)

which cancels nothing large and never divides by eps. Arithmetic runs in float32 for float32,
bfloat16 and float16 states and in float64 for float64 ones; energies and accept_prob are in that
compute dtype.
"""

from __future__ import annotations

import torch

from ebm_fast.reference.langevin_update import per_chain
from ebm_fast.reference.philox import philox_uniform_ref
from ebm_fast.validation import compute_dtype


def proposal_log_ratio_sum(x, y, grad_x, grad_y, step_size) -> torch.Tensor:
    """Per chain sum((g_x + g_y) * (eps (g_y - g_x) - 2 (y - x))) in the compute dtype: (B,)."""
    dtype = compute_dtype(x.dtype)
    x_c, y_c, gx, gy = (t.to(dtype).reshape(x.shape[0], -1) for t in (x, y, grad_x, grad_y))
    eps = per_chain(step_size.to(dtype), x_c)
    return ((gx + gy) * (eps * (gy - gx) - 2 * (y_c - x_c))).sum(dim=1)


def accept_probability(
    x, y, grad_x, grad_y, energy_x, energy_y, step_size, temperature
) -> torch.Tensor:
    """min(1, exp(log_alpha)) per chain, 0 where E_y is not finite or log_alpha is NaN."""
    dtype = compute_dtype(x.dtype)
    temp = temperature.to(dtype).to(x.device)
    log_alpha = -(energy_y.to(dtype) - energy_x.to(dtype)) / temp - proposal_log_ratio_sum(
        x, y, grad_x, grad_y, step_size
    ) / (4 * temp)
    valid = torch.isfinite(energy_y) & ~torch.isnan(log_alpha)
    return torch.where(valid, torch.exp(log_alpha.clamp(max=0)), torch.zeros_like(log_alpha))


def mala_accept_ref(
    x,
    y,
    grad_x,
    grad_y,
    energy_x,
    energy_y,
    step_size,
    temperature,
    seed,
    step,
    stream=1,
    chain_offset=0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted (B,) bool, accept_prob (B,) compute dtype); reads its inputs, writes nothing."""
    accept_prob = accept_probability(
        x, y, grad_x, grad_y, energy_x, energy_y, step_size, temperature
    )
    u = philox_uniform_ref(
        (x.shape[0],),
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
        device=x.device,
    )
    return u.to(accept_prob.dtype) < accept_prob, accept_prob


def mala_accept_out(
    accepted,
    accept_prob,
    x,
    y,
    grad_x,
    grad_y,
    energy_x,
    energy_y,
    step_size,
    temperature,
    seed,
    step,
    stream,
    chain_offset,
):
    """The backend entry point: fills accepted / accept_prob and moves accepted chains in place."""
    decided, prob = mala_accept_ref(
        x,
        y,
        grad_x,
        grad_y,
        energy_x,
        energy_y,
        step_size,
        temperature,
        seed,
        step,
        stream,
        chain_offset,
    )
    accepted.copy_(decided)
    accept_prob.copy_(prob)
    take = per_chain(decided, x)
    x.copy_(torch.where(take, y, x))
    grad_x.copy_(torch.where(take, grad_y, grad_x))
    energy_x.copy_(torch.where(decided, energy_y, energy_x))
