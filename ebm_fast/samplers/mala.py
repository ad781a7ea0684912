"""Metropolis-adjusted Langevin (MALA): exact for exp(-E / T) at any step size."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ebm_fast import validation
from ebm_fast.noise import STREAM_MALA_ACCEPT, STREAM_PROPOSAL
from ebm_fast.samplers.adaptation import adapt_step_scale
from ebm_fast.samplers.base import Sampler, SamplerOptions
from ebm_fast.samplers.diagnostics import ChainDiagnostics
from ebm_fast.samplers.kernels import accept_kernel, contiguous, update_kernel
from ebm_fast.samplers.schedules import (
    StepParameter,
    blocks,
    check_step_value,
    step_counters,
    step_values,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


class MALASampler(Sampler):
    """Metropolis-adjusted Langevin: exact for exp(-E / T) at any step size.

    Proposal y = x - eps grad E(x) + sqrt(2 eps T) xi (noise stream 0), accepted with the
    Metropolis-Hastings probability by the fused mala_accept kernel (uniform from stream 1), both
    at the sampler's step counter. One energy+gradient evaluation per step: the current state's
    energy and gradient are cached. No clamp and no gradient clipping: either would change the
    proposal density the acceptance ratio assumes and break detailed balance.

    adapt=True tunes each chain's step size toward target_accept during the first adapt_steps
    steps of every call (default: half of them), log eps += adapt_rate * (accept_prob - target)
    (see :func:`ebm_fast.samplers.adaptation.adapt_step_scale`). While it adapts, the chain is
    not exactly reversible (the kernel changes with the chain's history); the steps after the
    adaptation phase are exact MALA steps again.

    step_size and temperature take a number, a per-chain tensor (B,) or a schedule f(k, n_steps).
    **options: the options every sampler takes, see :class:`ebm_fast.samplers.base.Sampler`.
    """

    def __init__(
        self,
        energy: Callable[..., torch.Tensor],
        *,
        step_size: StepParameter,
        temperature: StepParameter = 1.0,
        adapt: bool = False,
        target_accept: float = 0.574,
        adapt_steps: int | None = None,
        adapt_rate: float = 0.05,
        clamp: None = None,
        grad_clip: None = None,
        **options: Unpack[SamplerOptions],
    ) -> None:
        super().__init__(energy, **options)
        if clamp is not None or grad_clip is not None:
            raise ValueError(
                "MALASampler takes no clamp or grad_clip: they change the proposal "
                "density and break detailed balance (use LangevinSampler for them)"
            )
        self.step_size, self.temperature = step_size, temperature
        self.adapt = bool(adapt)
        self.target_accept = validation.real(
            target_accept, "target_accept", low=0.0, high=1.0, low_open=True, high_open=True
        )
        self.adapt_steps = (
            None if adapt_steps is None else validation.integer(adapt_steps, "adapt_steps", low=0)
        )
        self.adapt_rate = validation.real(adapt_rate, "adapt_rate", low=0.0, low_open=True)
        check_step_value(step_size, "step_size", allow_zero=False)
        check_step_value(temperature, "temperature", allow_zero=False)

    def _tables(self, x, n_steps, step_size):
        return (
            step_values(
                self.step_size if step_size is None else step_size,
                "step_size",
                n_steps,
                x,
                allow_zero=False,
            ),
            step_values(self.temperature, "temperature", n_steps, x, allow_zero=False),
        )

    def _parameter_values(self):
        return self.step_size, self.temperature

    def _chain(self, inputs, *, n_steps, chain_offset, track):
        x, seed, (eps_values, temperature_values) = inputs.x, inputs.seed, inputs.tables
        chains, dtype = x.shape[0], validation.compute_dtype(x.dtype)
        n_adapt = (
            0
            if not self.adapt
            else (n_steps // 2 if self.adapt_steps is None else min(self.adapt_steps, n_steps))
        )
        # Per-chain multiplier of the step sizes, tuned during the adaptation phase.
        scale = torch.ones(chains, dtype=dtype, device=x.device)
        accepted_count = torch.zeros(chains, dtype=torch.float32, device=x.device)
        accepted = torch.empty(chains, dtype=torch.bool, device=x.device)
        accept_prob = torch.empty(chains, dtype=dtype, device=x.device)
        diagnostics = ChainDiagnostics(x, n_steps, self.check_finite, track)
        energy_x, grad_x = self._energy.value_and_grad(x, inputs.conditioning)
        grad_x = contiguous(grad_x)
        # Only the initial state goes through check(): accepted states have finite energies
        # (mala_accept rejects non-finite proposals); finish() checks the final state.
        diagnostics.check(energy_x)
        diagnostics.measure(energy_x, grad_x)
        proposal = torch.empty_like(x)
        propose, accept = update_kernel(x), accept_kernel(x)  # x, grad_x, energy_x: in place
        for first, n in blocks(n_steps):
            eps_rows = eps_values.block(first, n).unbind(0)
            temperatures = temperature_values.block(first, n).unbind(0)
            steps = step_counters(inputs.counter, first, n)
            for k, eps_row, temperature, step in zip(
                range(first, first + n), eps_rows, temperatures, steps
            ):
                eps = eps_row * scale
                propose(
                    out=proposal,
                    x=x,
                    grad=grad_x,
                    step_size=eps,
                    noise_scale=(2 * eps * temperature).sqrt(),
                    seed=seed,
                    step=step,
                    stream=STREAM_PROPOSAL,
                    chain_offset=chain_offset,
                    grad_clip=None,
                    grad_clip_mode="value",
                    clamp_lo=None,
                    clamp_hi=None,
                )
                energy_y, grad_y = self._energy.value_and_grad(proposal, inputs.conditioning)
                accept(
                    accepted=accepted,
                    accept_prob=accept_prob,
                    x=x,
                    y=proposal,
                    grad_x=grad_x,
                    grad_y=contiguous(grad_y),
                    energy_x=energy_x,
                    energy_y=energy_y,
                    step_size=eps,
                    temperature=temperature,
                    seed=seed,
                    step=step,
                    stream=STREAM_MALA_ACCEPT,
                    chain_offset=chain_offset,
                )
                accepted_count += accepted
                if k < n_adapt:
                    adapt_step_scale(scale, accept_prob, self.target_accept, self.adapt_rate)
                diagnostics.measure(energy_x, grad_x)
        results = diagnostics.finish(x, energy_x)
        if track:
            results.update(accept_rate=accepted_count / n_steps, step_size=eps_rows[-1] * scale)
        return results
