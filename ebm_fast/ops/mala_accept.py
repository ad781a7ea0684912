"""Op ``ebm_fast::mala_accept``: fused MALA accept/reject, in place for the accepted chains.

The spec is ebm_fast/reference/mala_accept.py. The registered op mutates x, grad_x and energy_x
and returns new (accepted, accept_prob) tensors. Every backend (reference / cpu / triton) exposes
the entry point of ops/_dispatch.py's convention, here with the two outputs first and the mutated
inputs among the op's inputs:

    mala_accept_out(accepted, accept_prob, x, y, grad_x, grad_y, energy_x, energy_y,
                    step_size, temperature, seed, step, stream, chain_offset) -> None

accepted (B,) bool and accept_prob (B,) are written; x, grad_x, energy_x are updated in place for
accepted chains. All tensors are contiguous and on x's device: accept_prob, energies, step_size
and temperature in the compute dtype (float64 for float64 states, else float32), step_size and
temperature 0-dim or (B,), seed and step 0-dim int64.
"""

from __future__ import annotations

import torch

from ebm_fast import validation
from ebm_fast.ops._dispatch import kernel_for, run_op


def _new_outputs(x: torch.Tensor, energy_x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    chains = x.shape[0]
    return (
        torch.empty(chains, dtype=torch.bool, device=x.device),
        torch.empty(chains, dtype=energy_x.dtype, device=x.device),
    )


def mala_accept_impl(
    x: torch.Tensor,
    y: torch.Tensor,
    grad_x: torch.Tensor,
    grad_y: torch.Tensor,
    energy_x: torch.Tensor,
    energy_y: torch.Tensor,
    step_size: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    chain_offset: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted, accept_prob) as new tensors, accepted chains moved in place, arguments as
    :func:`mala_accept` normalises them. The kernels write contiguous rows: a non-contiguous
    mutated input goes through a contiguous copy."""
    accepted, accept_prob = _new_outputs(x, energy_x)
    if not x.shape[0]:
        return accepted, accept_prob
    mutated = {"x": x, "grad_x": grad_x, "energy_x": energy_x}
    work = {name: t if t.is_contiguous() else t.contiguous() for name, t in mutated.items()}
    kernel_for("mala_accept", x)(
        accepted=accepted,
        accept_prob=accept_prob,
        **work,
        y=y.contiguous(),
        grad_y=grad_y.contiguous(),
        energy_y=energy_y.contiguous(),
        step_size=step_size.contiguous(),
        temperature=temperature.contiguous(),
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
    )
    for name, target in mutated.items():
        if work[name] is not target:
            target.copy_(work[name])
    return accepted, accept_prob


_mala_accept_op = torch.library.custom_op(
    "ebm_fast::mala_accept", mala_accept_impl, mutates_args=("x", "grad_x", "energy_x")
)


@_mala_accept_op.register_fake
def _(
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
    return _new_outputs(x, energy_x)


def _check_energy(energy: object, name: str, x: torch.Tensor) -> None:
    if not isinstance(energy, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(energy).__name__}")
    if tuple(energy.shape) != (x.shape[0],):
        raise ValueError(
            f"{name} must have shape ({x.shape[0]},) (one energy per chain), got "
            f"{tuple(energy.shape)}"
        )
    if energy.device != x.device:
        raise ValueError(f"{name} is on {energy.device} but x is on {x.device}")
    if energy.dtype != validation.compute_dtype(x.dtype):
        raise TypeError(
            f"{name} must have dtype {validation.compute_dtype(x.dtype)} for x of "
            f"dtype {x.dtype}, got {energy.dtype}"
        )


def mala_accept(
    x: torch.Tensor,
    y: torch.Tensor,
    grad_x: torch.Tensor,
    grad_y: torch.Tensor,
    energy_x: torch.Tensor,
    energy_y: torch.Tensor,
    step_size: validation.ChainParameter,
    temperature: validation.ChainParameter,
    *,
    seed: validation.Counter,
    step: validation.Counter,
    stream: int = 1,
    chain_offset: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Metropolis-adjusted Langevin accept/reject for a batch of chains, fused and in place.

    The proposal y = x - step_size * grad_x + sqrt(2 step_size temperature) xi targets the density
    exp(-E / temperature). Each chain accepts with probability
    min(1, exp(log_alpha)),
    log_alpha = -(E_y - E_x) / T - (|x - y + eps g_y|^2 - |y - x + eps g_x|^2) / (4 eps T),
    (0 where energy_y is not finite or log_alpha is NaN), decided by the noise spec's per-chain
    uniform (stream ``stream``). Accepted chains take the proposal IN PLACE: x <- y,
    grad_x <- grad_y, energy_x <- energy_y.

    Args:
        x, y, grad_x, grad_y: current states, proposals and the energy gradients at both, all of
            one shape (chains, ...), device and dtype (float32, bfloat16, float16, float64).
        energy_x, energy_y: (chains,) energies, float32 (float64 when x is float64).
        step_size, temperature: float > 0 or per-chain tensor (chains,) (0-dim tensors too).
        seed: 64-bit int or 0-dim integer tensor. step: 32-bit counter, int or 0-dim tensor.
        stream, chain_offset: noise-spec stream and the index of x's first chain in the batch.

    Returns (accepted, accept_prob): (chains,) bool and (chains,) float32 (float64 for float64
    states). Arithmetic runs in float32 for bfloat16/float16 states. Not differentiable: it reads
    and writes the tensors' data, like an optimiser step under no_grad.
    """
    validation.chain_tensor(x)
    for other, name in ((y, "y"), (grad_x, "grad_x"), (grad_y, "grad_y")):
        validation.same_layout(x, other, name)
    _check_energy(energy_x, "energy_x", x)
    _check_energy(energy_y, "energy_y", x)
    # The mutated tensors are written while the others are read.
    for written, name in ((x, "x"), (grad_x, "grad_x"), (energy_x, "energy_x")):
        validation.no_partial_overlap(written, name, y=y, grad_y=grad_y, energy_y=energy_y)
    step_size_t = validation.chain_param(step_size, "step_size", x, allow_zero=False).detach()
    temperature_t = validation.chain_param(temperature, "temperature", x, allow_zero=False).detach()
    stream = validation.integer(stream, "stream", low=0, high=1 << 32)
    chain_offset = validation.chain_offset(chain_offset, (x.shape[0],))  # one draw per chain
    return run_op(
        _mala_accept_op,
        mala_accept_impl,
        x=x.detach(),
        y=y.detach(),
        grad_x=grad_x.detach(),
        grad_y=grad_y.detach(),
        energy_x=energy_x.detach(),
        energy_y=energy_y.detach(),
        step_size=step_size_t,
        temperature=temperature_t,
        seed=validation.counter(seed, "seed", 64),
        step=validation.counter(step, "step", 32),
        stream=stream,
        chain_offset=chain_offset,
    )
