"""Op ``ebm_fast::langevin_update``: x <- clamp(x - step_size * clip(grad) + noise_scale * xi).

Two registered ops share one dispatch: ``ebm_fast::langevin_update`` (functional, differentiable
in x and grad) and ``ebm_fast::langevin_update_out`` (writes into ``out``; ``out=x`` is the
allocation-free hot path). The Python wrapper :func:`langevin_update` validates and normalises
the arguments; the backends (reference / cpu / triton) receive contiguous tensors.
"""

from __future__ import annotations

import torch

from ebm_fast.ops._dispatch import (
    as_int64_scalar, call_op, check_chain_offset, check_int, float_kernel_for)
from ebm_fast.reference.langevin_update import (
    chain_norms, compute_dtype, per_chain, pre_clamp_update)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GRAD_CLIP_MODES = ("value", "norm")


def langevin_update_into(out, x, grad, step_size, noise_scale, seed, step, stream, chain_offset,
                         grad_clip, grad_clip_mode, clamp_lo, clamp_hi) -> None:
    """Unchecked entry point for callers that already validated and normalised the arguments:
    writes the update into ``out``."""
    target = out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    float_kernel_for("langevin_update", x)(
        target, x.contiguous(), grad.contiguous(), step_size.contiguous(),
        noise_scale.contiguous(), seed, step, stream, chain_offset, grad_clip, grad_clip_mode,
        clamp_lo, clamp_hi)
    if target is not out:
        out.copy_(target)


def _updated(x, grad, step_size, noise_scale, seed, step, stream, chain_offset, grad_clip,
             grad_clip_mode, clamp_lo, clamp_hi) -> torch.Tensor:
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    _update_out(out, x, grad, step_size, noise_scale, seed, step, stream, chain_offset, grad_clip,
                grad_clip_mode, clamp_lo, clamp_hi)
    return out


def _update_out(out, x, grad, step_size, noise_scale, seed, step, stream, chain_offset, grad_clip,
                grad_clip_mode, clamp_lo, clamp_hi) -> None:
    if x.numel():
        langevin_update_into(out, x, grad, step_size, noise_scale, seed, step, stream,
                             chain_offset, grad_clip, grad_clip_mode, clamp_lo, clamp_hi)


@torch.library.custom_op("ebm_fast::langevin_update", mutates_args=())
def _langevin_update_op(x: torch.Tensor, grad: torch.Tensor, step_size: torch.Tensor,
                        noise_scale: torch.Tensor, seed: torch.Tensor, step: torch.Tensor,
                        stream: int, chain_offset: int, grad_clip: float | None,
                        grad_clip_mode: str, clamp_lo: float | None,
                        clamp_hi: float | None) -> torch.Tensor:
    return _updated(x, grad, step_size, noise_scale, seed, step, stream, chain_offset, grad_clip,
                    grad_clip_mode, clamp_lo, clamp_hi)


@_langevin_update_op.register_fake
def _(x, grad, step_size, noise_scale, seed, step, stream, chain_offset, grad_clip,
      grad_clip_mode, clamp_lo, clamp_hi):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("ebm_fast::langevin_update_out", mutates_args=("out",))
def _langevin_update_out_op(out: torch.Tensor, x: torch.Tensor, grad: torch.Tensor,
                            step_size: torch.Tensor, noise_scale: torch.Tensor,
                            seed: torch.Tensor, step: torch.Tensor, stream: int,
                            chain_offset: int, grad_clip: float | None, grad_clip_mode: str,
                            clamp_lo: float | None, clamp_hi: float | None) -> None:
    _update_out(out, x, grad, step_size, noise_scale, seed, step, stream, chain_offset, grad_clip,
                grad_clip_mode, clamp_lo, clamp_hi)


@_langevin_update_out_op.register_fake
def _(out, x, grad, step_size, noise_scale, seed, step, stream, chain_offset, grad_clip,
      grad_clip_mode, clamp_lo, clamp_hi):
    return None


def _setup_context(ctx, inputs, output):
    x, grad, step_size, noise_scale, seed, step, *options = inputs
    ctx.save_for_backward(x, grad, step_size, noise_scale, seed, step)
    ctx.options = options


def _backward(ctx, grad_output):
    """Vector-Jacobian product in x and grad (noise is a constant of the update).

    The clamp mask needs the pre-clamp value, which is recomputed from the reference: backward
    is rare (the differentiable last step of Du et al. 2021), and storing a mask would cost the
    hot forward pass memory traffic.
    """
    x, grad, step_size, noise_scale, seed, step = ctx.saved_tensors
    stream, chain_offset, grad_clip, grad_clip_mode, clamp_lo, clamp_hi = ctx.options
    dtype = compute_dtype(x.dtype)
    upstream = grad_output.to(dtype)
    if clamp_lo is not None or clamp_hi is not None:
        pre = pre_clamp_update(x, grad, step_size, noise_scale, seed, step, stream, chain_offset,
                               grad_clip, grad_clip_mode)
        inside = torch.ones_like(pre, dtype=torch.bool)
        if clamp_lo is not None:
            inside &= pre >= clamp_lo
        if clamp_hi is not None:
            inside &= pre <= clamp_hi
        upstream = upstream * inside
    d_clipped = -per_chain(step_size.to(dtype), upstream) * upstream
    g = grad.to(dtype)
    if grad_clip is not None and grad_clip_mode == "value":
        d_grad = d_clipped * (g.abs() <= grad_clip)
    elif grad_clip is not None:  # norm: d(c g/|g|) = (c/|g|)(I - g g^T/|g|^2) where |g| > c
        norms = chain_norms(g)
        dot = (g * d_clipped).reshape(g.shape[0], -1).sum(1).reshape(norms.shape)
        scaled = (grad_clip / norms.clamp(min=1e-30)) * (d_clipped - g * dot / norms.clamp(min=1e-30) ** 2)
        d_grad = torch.where(norms > grad_clip, scaled, d_clipped)
    else:
        d_grad = d_clipped
    return (upstream.to(x.dtype), d_grad.to(grad.dtype)) + (None,) * 10


_langevin_update_op.register_autograd(_backward, setup_context=_setup_context)


def chain_param(value, name: str, x: torch.Tensor, *, allow_zero: bool) -> torch.Tensor:
    """Validate a float or per-chain (B,) parameter and return it as a compute-dtype tensor."""
    dtype = compute_dtype(x.dtype)
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a floating tensor, got {value.dtype}")
        if value.dim() == 1 and value.shape[0] != x.shape[0]:
            raise ValueError(f"{name} has {value.shape[0]} entries but x has {x.shape[0]} chains")
        if value.dim() > 1:
            raise ValueError(f"{name} must be a float, a 0-dim tensor or a per-chain tensor of "
                             f"shape ({x.shape[0]},), got shape {tuple(value.shape)}")
        # A 0-dim CPU tensor is read on the host by every backend; anything else lives with x.
        if value.device != x.device and (value.dim() == 1 or value.device.type != "cpu"):
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
        # Values of tensors are not checked: that would synchronise with the device.
        return value.to(dtype)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    value = float(value)
    if not (value > 0 or (allow_zero and value == 0)) or value != value or value == float("inf"):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")
    return torch.tensor(value, dtype=dtype)


def check_chains(x) -> None:
    """x must be a (chains, ...) tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"x must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x must have a leading chain axis (at least 1 dimension)")


def check_same_layout(x: torch.Tensor, other: torch.Tensor, name: str) -> None:
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(other).__name__}")
    if other.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(other.shape)} but x has {tuple(x.shape)}")
    if other.device != x.device:
        raise ValueError(f"{name} is on {other.device} but x is on {x.device}")
    if other.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {other.dtype} but x has {x.dtype}")


def langevin_update(x, grad, step_size, noise_scale, *, seed, step, stream=0, chain_offset=0,
                    grad_clip=None, grad_clip_mode="value", clamp=None, out=None):
    """One Langevin step for a batch of chains: clamp(x - step_size * clip(grad) + noise_scale * xi).

    Args:
        x, grad: tensors of the same shape (chains, ...) and dtype (float32, bfloat16, float16;
            float64 on the reference and cpu backends). Arithmetic runs in float32 (float64).
        step_size: float > 0 or per-chain tensor (chains,). noise_scale: float >= 0 or (chains,).
        seed: 64-bit int or 0-dim integer tensor. step: 32-bit counter, int or 0-dim tensor.
        stream, chain_offset: noise-spec stream and the index of x's first chain in the batch.
        grad_clip, grad_clip_mode: None, or c > 0 with "value" (elements into [-c, c]) or
            "norm" (each chain's gradient rescaled to norm <= c).
        clamp: None or (lo, hi), lo <= hi; either side may be None.
        out: tensor to write into (``out=x`` updates in place, no allocation). Not differentiable.

    Returns the updated tensor (``out`` when given). Differentiable in x and grad otherwise.
    """
    check_chains(x)
    check_same_layout(x, grad, "grad")
    step_size_t = chain_param(step_size, "step_size", x, allow_zero=False)
    noise_scale_t = chain_param(noise_scale, "noise_scale", x, allow_zero=True)
    stream = check_int(stream, "stream", 0, 1 << 32)
    chain_offset = check_chain_offset(chain_offset, x.shape)
    if grad_clip_mode not in GRAD_CLIP_MODES:
        raise ValueError(f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got {grad_clip_mode!r}")
    if grad_clip is not None:
        grad_clip = float(grad_clip)
        if not grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 (or None), got {grad_clip}")
    clamp_lo = clamp_hi = None
    if clamp is not None:
        if not isinstance(clamp, (tuple, list)) or len(clamp) != 2:
            raise ValueError(f"clamp must be None or a (lo, hi) pair, got {clamp!r}")
        clamp_lo, clamp_hi = (None if v is None else float(v) for v in clamp)
        if clamp_lo is not None and clamp_hi is not None and clamp_lo > clamp_hi:
            raise ValueError(f"clamp has lo > hi: {clamp!r}")
    args = (step_size_t, noise_scale_t, as_int64_scalar(seed, "seed", 64),
            as_int64_scalar(step, "step", 32), stream, chain_offset, grad_clip,
            grad_clip_mode, clamp_lo, clamp_hi)
    differentiable = torch.is_grad_enabled() and (x.requires_grad or grad.requires_grad)
    if out is None:
        if differentiable:
            return _langevin_update_op(x, grad, *args)  # the registered op carries the autograd formula
        return call_op(_langevin_update_op, _updated, x, grad, *args)
    check_same_layout(x, out, "out")
    if differentiable:
        raise RuntimeError("langevin_update(out=...) is not differentiable; call it without out")
    call_op(_langevin_update_out_op, _update_out, out, x, grad, *args)
    return out
