"""Reference Langevin update: clamp(x - step_size * clip(grad) + noise_scale * xi), in pure torch.

Arithmetic runs in float32 for float32/bfloat16/float16 inputs and in float64 for float64 ones;
the result is rounded to x's dtype once, at the end. xi is the spec's standard normal
(ebm_fast/noise.py, stream ``stream``) for every element of the (chains, ...) tensor.
"""

from __future__ import annotations

import torch

from ebm_fast.reference.philox import philox_normal_ref
from ebm_fast.validation import compute_dtype


def per_chain(param: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A 0-dim or (chains,) parameter shaped to broadcast against a (chains, ...) tensor."""
    return param.to(like.device).reshape(-1, *([1] * (like.dim() - 1)))


def chain_norms(grad: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each chain's gradient, shaped (chains, 1, ..., 1)."""
    return torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1).reshape(
        -1, *([1] * (grad.dim() - 1))
    )


def clip_gradient(grad: torch.Tensor, grad_clip: float | None, mode: str) -> torch.Tensor:
    """'value': each element into [-c, c]; 'norm': each chain's gradient scaled to norm <= c."""
    if grad_clip is None:
        return grad
    if mode == "value":
        return grad.clamp(-grad_clip, grad_clip)
    return grad * (grad_clip / chain_norms(grad).clamp(min=grad_clip))


def pre_clamp_update(
    x,
    grad,
    step_size,
    noise_scale,
    seed,
    step,
    stream,
    chain_offset,
    grad_clip,
    grad_clip_mode,
    noise_dtype=None,
) -> torch.Tensor:
    """x - step_size * clip(grad) + noise_scale * xi in the compute dtype (before the clamp)."""
    dtype = compute_dtype(x.dtype)
    x_c, grad_c = x.to(dtype), grad.to(dtype)
    xi = philox_normal_ref(
        x.shape,
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
        device=x.device,
        dtype=noise_dtype or torch.float32,
    ).to(dtype)
    eps, sigma = per_chain(step_size.to(dtype), x_c), per_chain(noise_scale.to(dtype), x_c)
    return x_c - eps * clip_gradient(grad_c, grad_clip, grad_clip_mode) + sigma * xi


def langevin_update_ref(
    x,
    grad,
    step_size,
    noise_scale,
    seed,
    step,
    stream=0,
    chain_offset=0,
    grad_clip=None,
    grad_clip_mode="value",
    clamp_lo=None,
    clamp_hi=None,
    noise_dtype=None,
) -> torch.Tensor:
    """The whole update, returned in x's dtype. noise_dtype=torch.float64 with float64 inputs
    gives the "exact" value kernel tolerances are measured from."""
    new = pre_clamp_update(
        x=x,
        grad=grad,
        step_size=step_size,
        noise_scale=noise_scale,
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
        grad_clip=grad_clip,
        grad_clip_mode=grad_clip_mode,
        noise_dtype=noise_dtype,
    )
    if clamp_lo is not None or clamp_hi is not None:
        new = new.clamp(clamp_lo, clamp_hi)
    return new.to(x.dtype)


def langevin_update_out(
    out,
    x,
    grad,
    step_size,
    noise_scale,
    seed,
    step,
    stream,
    chain_offset,
    grad_clip,
    grad_clip_mode,
    clamp_lo,
    clamp_hi,
):
    out.copy_(
        langevin_update_ref(
            x=x,
            grad=grad,
            step_size=step_size,
            noise_scale=noise_scale,
            seed=seed,
            step=step,
            stream=stream,
            chain_offset=chain_offset,
            grad_clip=grad_clip,
            grad_clip_mode=grad_clip_mode,
            clamp_lo=clamp_lo,
            clamp_hi=clamp_hi,
        )
    )
