"""Op ``ebm_fast::langevin_update``: x <- clamp(x - step_size * clip(grad) + noise_scale * xi).

Two registered ops: ``ebm_fast::langevin_update`` (functional, differentiable in x and grad:
:func:`langevin_update_impl`) and ``ebm_fast::langevin_update_out`` (writes into ``out``,
``out=x`` being the allocation-free hot path: :func:`langevin_update_out_impl`). The public
:func:`langevin_update` validates and normalises the arguments; the route to the kernel is
ops/_dispatch.py's.
"""

from __future__ import annotations

import inspect

import torch

from ebm_fast import validation
from ebm_fast.ops._dispatch import kernel_for, run_op
from ebm_fast.reference.langevin_update import chain_norms, per_chain, pre_clamp_update


def langevin_update_out_impl(
    out: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    noise_scale: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    chain_offset: int,
    grad_clip: float | None,
    grad_clip_mode: str,
    clamp_lo: float | None,
    clamp_hi: float | None,
) -> None:
    """Write the update of x into out, arguments as :func:`langevin_update` normalises them. The
    kernels take contiguous tensors: a non-contiguous out is written through a contiguous copy."""
    if not x.numel():
        return
    target = (
        out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    )
    kernel_for("langevin_update", x)(
        out=target,
        x=x.contiguous(),
        grad=grad.contiguous(),
        step_size=step_size.contiguous(),
        noise_scale=noise_scale.contiguous(),
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
        grad_clip=grad_clip,
        grad_clip_mode=grad_clip_mode,
        clamp_lo=clamp_lo,
        clamp_hi=clamp_hi,
    )
    if target is not out:
        out.copy_(target)


def langevin_update_impl(
    x: torch.Tensor,
    grad: torch.Tensor,
    step_size: torch.Tensor,
    noise_scale: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    chain_offset: int,
    grad_clip: float | None,
    grad_clip_mode: str,
    clamp_lo: float | None,
    clamp_hi: float | None,
) -> torch.Tensor:
    """The update of x as a new tensor."""
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    langevin_update_out_impl(
        out=out,
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
    return out


_langevin_update_op = torch.library.custom_op(
    "ebm_fast::langevin_update", langevin_update_impl, mutates_args=()
)
_langevin_update_out_op = torch.library.custom_op(
    "ebm_fast::langevin_update_out", langevin_update_out_impl, mutates_args=("out",)
)
_PARAMETERS = tuple(inspect.signature(langevin_update_impl).parameters)
_DIFFERENTIABLE = ("x", "grad")  # the op's other inputs get no gradient
_SAVED = _DIFFERENTIABLE + ("step_size", "noise_scale", "seed", "step")


@_langevin_update_op.register_fake
def _(
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
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@_langevin_update_out_op.register_fake
def _(
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
    return None


def _setup_context(ctx, inputs, output):
    arguments = dict(zip(_PARAMETERS, inputs))
    ctx.save_for_backward(*(arguments.pop(name) for name in _SAVED))
    ctx.options = arguments  # stream, chain_offset, grad_clip, grad_clip_mode, clamp_lo, clamp_hi


def _backward(ctx, grad_output):
    """Vector-Jacobian product in x and grad (noise is a constant of the update).

    The clamp mask needs the pre-clamp value, which is recomputed from the reference: backward
    is rare (the differentiable last step of Du et al. 2021), and storing a mask would cost the
    hot forward pass memory traffic.
    """
    x, grad, step_size, noise_scale, seed, step = ctx.saved_tensors
    options = ctx.options
    grad_clip, grad_clip_mode = options["grad_clip"], options["grad_clip_mode"]
    clamp_lo, clamp_hi = options["clamp_lo"], options["clamp_hi"]
    dtype = validation.compute_dtype(x.dtype)
    upstream = grad_output.to(dtype)
    if clamp_lo is not None or clamp_hi is not None:
        pre = pre_clamp_update(
            x=x,
            grad=grad,
            step_size=step_size,
            noise_scale=noise_scale,
            seed=seed,
            step=step,
            stream=options["stream"],
            chain_offset=options["chain_offset"],
            grad_clip=grad_clip,
            grad_clip_mode=grad_clip_mode,
        )
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
        scaled = (grad_clip / norms.clamp(min=1e-30)) * (
            d_clipped - g * dot / norms.clamp(min=1e-30) ** 2
        )
        d_grad = torch.where(norms > grad_clip, scaled, d_clipped)
    else:
        d_grad = d_clipped
    return (upstream.to(x.dtype), d_grad.to(grad.dtype)) + (None,) * (
        len(_PARAMETERS) - len(_DIFFERENTIABLE)
    )


_langevin_update_op.register_autograd(_backward, setup_context=_setup_context)


def langevin_update(
    x: torch.Tensor,
    grad: torch.Tensor,
    step_size: validation.ChainParameter,
    noise_scale: validation.ChainParameter,
    *,
    seed: validation.Counter,
    step: validation.Counter,
    stream: int = 0,
    chain_offset: int = 0,
    grad_clip: float | None = None,
    grad_clip_mode: str = "value",
    clamp: validation.Bounds | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Langevin step per chain: clamp(x - step_size * clip(grad) + noise_scale * xi).

    Args:
        x, grad: tensors of the same shape (chains, ...) and dtype (float32, bfloat16, float16;
            float64 on the reference and cpu backends). Arithmetic runs in float32 (float64).
        step_size: float > 0 or per-chain tensor (chains,). noise_scale: float >= 0 or (chains,).
            Numbers must stay finite (and step_size > 0) once rounded to the compute dtype.
        seed: 64-bit int or 0-dim integer tensor. step: 32-bit counter, int in [0, 2**32) or
            0-dim integer tensor (its value is not checked: that would synchronise with its
            device; its low 32 bits are used).
        stream, chain_offset: noise-spec stream and the index of x's first chain in the batch.
        grad_clip, grad_clip_mode: None, or c > 0 with "value" (elements into [-c, c]) or
            "norm" (each chain's gradient rescaled to norm <= c). c is rounded to the compute
            dtype: beyond its range (inf, or 1e300 in float32) it clips nothing; below its
            smallest normal number it is refused.
        clamp: None or (lo, hi), lo <= hi, NaN refused; either side may be None or +-inf.
            Bounds are rounded to the compute dtype like grad_clip.
        out: tensor to write into (``out=x`` updates in place, no allocation); it must not
            partially overlap x or grad in memory. Not differentiable.

    Returns the updated tensor (``out`` when given). Differentiable in x and grad otherwise.
    Numpy integer and float scalars are accepted wherever a number is.
    """
    validation.chain_tensor(x)
    validation.same_layout(x, grad, "grad")
    step_size_t = validation.chain_param(step_size, "step_size", x, allow_zero=False)
    noise_scale_t = validation.chain_param(noise_scale, "noise_scale", x, allow_zero=True)
    stream = validation.integer(stream, "stream", low=0, high=1 << 32)
    chain_offset = validation.chain_offset(chain_offset, x.shape)
    grad_clip_mode = validation.choice(grad_clip_mode, "grad_clip_mode", validation.GRAD_CLIP_MODES)
    grad_clip, clamp_lo, clamp_hi = validation.update_limits(
        validation.grad_clip(grad_clip), *validation.clamp_bounds(clamp), x.dtype
    )
    arguments = dict(
        x=x,
        grad=grad,
        step_size=step_size_t,
        noise_scale=noise_scale_t,
        seed=validation.counter(seed, "seed", 64),
        step=validation.counter(step, "step", 32),
        stream=stream,
        chain_offset=chain_offset,
        grad_clip=grad_clip,
        grad_clip_mode=grad_clip_mode,
        clamp_lo=clamp_lo,
        clamp_hi=clamp_hi,
    )
    differentiable = torch.is_grad_enabled() and (x.requires_grad or grad.requires_grad)
    if out is None:
        if differentiable:  # the registered op carries the autograd formula
            return _langevin_update_op(**arguments)
        return run_op(_langevin_update_op, langevin_update_impl, **arguments)
    validation.same_layout(x, out, "out")
    validation.no_partial_overlap(out, "out", x=x, grad=grad)
    if differentiable:
        raise RuntimeError("langevin_update(out=...) is not differentiable; call it without out")
    run_op(_langevin_update_out_op, langevin_update_out_impl, out=out, **arguments)
    return out
