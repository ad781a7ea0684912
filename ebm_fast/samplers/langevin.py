"""Unadjusted Langevin dynamics (the IGEBM/JEM sampler)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from ebm_fast import validation
from ebm_fast.noise import STREAM_PROPOSAL
from ebm_fast.ops import langevin_update
from ebm_fast.samplers.base import Sampler, SamplerOptions
from ebm_fast.samplers.diagnostics import ChainDiagnostics
from ebm_fast.samplers.energy import eval_mode, module_of
from ebm_fast.samplers.inputs import Conditioning
from ebm_fast.samplers.kernels import contiguous, update_kernel
from ebm_fast.samplers.schedules import (
    StepParameter,
    blocks,
    check_step_value,
    step_counters,
    step_values,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack from Python 3.11


class LangevinSampler(Sampler):
    """Unadjusted Langevin dynamics: x <- clamp(x - eps * clip(grad E(x)) + sigma * xi).

    The IGEBM/JEM convention, with eps (step_size) and sigma (noise_scale) decoupled; give
    temperature T instead of noise_scale for sigma = sqrt(2 eps T), the discretised Langevin
    diffusion targeting exp(-E / T) (with neither, T = 1). step_size, noise_scale and temperature
    each take a number, a per-chain tensor (B,) or a schedule f(k, n_steps) -> value for step
    k of a call (see linear_schedule / geometric_schedule). xi is the noise spec's normal
    (stream 0) at the sampler's step counter.

    Args:
        energy: callable x -> (B,) or (B, 1) energies; a plain nn.Module works.
        grad_clip, grad_clip_mode: None, or c > 0 with "value" (elements into [-c, c]) or
            "norm" (each chain's gradient rescaled to norm <= c); inf means no clipping.
        clamp: None or (lo, hi) applied to the state after each update (a side None or inf:
            unbounded).
        **options: the options every sampler takes, see :class:`ebm_fast.samplers.base.Sampler`
            (n_steps, seed, chain_offset, backend, compile, cuda_graph, check_finite,
            chunk_size, autocast, negate, eval_mode, mlp_gradient).
    """

    def __init__(
        self,
        energy: Callable[..., torch.Tensor],
        *,
        step_size: StepParameter,
        noise_scale: StepParameter | None = None,
        temperature: StepParameter | None = None,
        grad_clip: float | None = None,
        grad_clip_mode: str = "value",
        clamp: tuple[float | None, float | None] | None = None,
        **options: Unpack[SamplerOptions],
    ) -> None:
        super().__init__(energy, **options)
        if noise_scale is not None and temperature is not None:
            raise ValueError(
                "give noise_scale (decoupled sigma) or temperature "
                "(sigma = sqrt(2 step_size temperature)), not both"
            )
        self.grad_clip_mode = validation.choice(
            grad_clip_mode, "grad_clip_mode", validation.GRAD_CLIP_MODES
        )
        self.grad_clip = validation.grad_clip(grad_clip)
        self.clamp = validation.clamp_bounds(clamp)
        self.step_size, self.noise_scale = step_size, noise_scale
        self.temperature = 1.0 if noise_scale is None and temperature is None else temperature
        check_step_value(step_size, "step_size", allow_zero=False)
        for value, name in ((noise_scale, "noise_scale"), (self.temperature, "temperature")):
            if value is not None:
                check_step_value(value, name, allow_zero=True)

    def _tables(self, x, n_steps, step_size):
        eps = step_values(
            self.step_size if step_size is None else step_size,
            "step_size",
            n_steps,
            x,
            allow_zero=False,
        )
        noise = (
            (self.noise_scale, "noise_scale")
            if self.noise_scale is not None
            else (self.temperature, "temperature")
        )
        return eps, step_values(*noise, n_steps, x, allow_zero=True)

    def _parameter_values(self):
        return self.step_size, self.noise_scale, self.temperature

    def _noise_scales(self, eps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """A block's noise scales sigma: noise_scale as given, or sqrt(2 eps T)."""
        if self.noise_scale is not None:
            return noise
        if eps.dim() != noise.dim():  # one shared (n,), one per-chain (n, B) block
            eps, noise = (t if t.dim() == 2 else t[:, None] for t in (eps, noise))
        return (2 * eps * noise).sqrt()

    def _chain(self, inputs, *, n_steps, chain_offset, track):
        x, (eps_values, noise_values) = inputs.x, inputs.tables
        # The limits as the kernels apply them in x's compute dtype (inf: no limit).
        grad_clip, clamp_lo, clamp_hi = validation.update_limits(
            self.grad_clip, *self.clamp, x.dtype
        )
        diagnostics = ChainDiagnostics(x, n_steps, self.check_finite, track)
        update, seed, mode = update_kernel(x), inputs.seed, self.grad_clip_mode
        for first, n in blocks(n_steps):
            eps = eps_values.block(first, n)
            sigma = self._noise_scales(eps, noise_values.block(first, n))
            steps = step_counters(inputs.counter, first, n)
            for eps_k, sigma_k, step in zip(eps.unbind(0), sigma.unbind(0), steps):
                if diagnostics.needs_energy:
                    energy, grad = self._energy.value_and_grad(x, inputs.conditioning)
                    diagnostics.check(energy)
                    diagnostics.measure(energy, grad)
                else:
                    grad = self._energy.grad(x, inputs.conditioning)
                # Keywords spelled out in the call: a functools.partial holding them merges
                # dicts on every call (microseconds per step on a CPU).
                update(
                    out=x,
                    x=x,
                    grad=contiguous(grad),
                    step_size=eps_k,
                    noise_scale=sigma_k,
                    seed=seed,
                    step=step,
                    stream=STREAM_PROPOSAL,
                    chain_offset=chain_offset,
                    grad_clip=grad_clip,
                    grad_clip_mode=mode,
                    clamp_lo=clamp_lo,
                    clamp_hi=clamp_hi,
                )
        final_energy = self._energy.value(x, inputs.conditioning) if track else None
        return diagnostics.finish(x, final_energy)

    def differentiable_step(
        self,
        x: torch.Tensor,
        step: int,
        *,
        chains: int | None = None,
        y: object = None,
        **energy_kwargs: Any,
    ) -> torch.Tensor:
        """The update a one-step sample() takes from x when the step counter is at ``step``,
        on the first ``chains`` chains (all when None), differentiable in the energy's
        parameters: the energy gradient stays in the graph (create_graph) and the update runs
        through langevin_update's autograd, with the same noise, sizes, clipping, clamp,
        backend and eval mode as the sampler's step. x itself is a constant. The step counter
        does not move. Du et al. (2021)'s KL term differentiates the chains' last step so."""
        n = x.shape[0] if chains is None else validation.integer(chains, "chains", low=1)
        n = min(n, x.shape[0])
        eps_values, noise_values = (t.for_chains(0, n) for t in self._tables(x, 1, None))
        eps = eps_values.block(0, 1)
        sigma = self._noise_scales(eps, noise_values.block(0, 1))[0]
        x_n = x[:n].detach()
        x_var = x_n.clone().requires_grad_(True)
        conditioning = Conditioning(y, energy_kwargs).for_chains(0, n)
        self._use_precision(x)
        with (
            torch.enable_grad(),
            self.backend_context(),
            eval_mode(module_of(self.energy) if self.eval_mode else None),
        ):
            energy = self._energy.energies(x_var, conditioning)
            (grad,) = torch.autograd.grad(energy.sum(), x_var, create_graph=True)
            return langevin_update(
                x_n,
                grad,
                eps[0],
                sigma,
                seed=self._seed,
                step=step,
                stream=STREAM_PROPOSAL,
                chain_offset=self.chain_offset,
                grad_clip=self.grad_clip,
                grad_clip_mode=self.grad_clip_mode,
                clamp=self.clamp,
            )
