"""Unadjusted Langevin dynamics (the IGEBM/JEM sampler)."""

from __future__ import annotations

import math

import torch

from ebm_fast.noise import STREAM_PROPOSAL
from ebm_fast.ops.langevin_update import GRAD_CLIP_MODES
from ebm_fast.samplers.base import Sampler
from ebm_fast.samplers.diagnostics import ChainDiagnostics
from ebm_fast.samplers.kernels import contiguous, update_kernel
from ebm_fast.samplers.schedules import check_step_value, step_counters, step_values


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
            "norm" (each chain's gradient rescaled to norm <= c).
        clamp: None or (lo, hi) applied to the state after each update.
        **options: the options every sampler takes, see :class:`ebm_fast.samplers.base.Sampler`
            (n_steps, seed, chain_offset, backend, compile, cuda_graph, check_finite,
            chunk_size, autocast).
    """

    def __init__(self, energy, *, step_size, noise_scale=None, temperature=None, grad_clip=None,
                 grad_clip_mode="value", clamp=None, **options):
        super().__init__(energy, **options)
        if noise_scale is not None and temperature is not None:
            raise ValueError("give noise_scale (decoupled sigma) or temperature "
                             "(sigma = sqrt(2 step_size temperature)), not both")
        if grad_clip_mode not in GRAD_CLIP_MODES:
            raise ValueError(f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got "
                             f"{grad_clip_mode!r}")
        if grad_clip is not None:
            if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not (
                    0 < grad_clip < math.inf):
                raise ValueError(f"grad_clip must be None or a finite number > 0, got "
                                 f"{grad_clip!r}")
            grad_clip = float(grad_clip)
        if clamp is None:
            clamp = (None, None)
        if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2 and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                for v in clamp)):
            raise ValueError(f"clamp must be None or a (lo, hi) pair of numbers or None, got "
                             f"{clamp!r}")
        clamp = tuple(None if v is None else float(v) for v in clamp)
        if None not in clamp and clamp[0] > clamp[1]:
            raise ValueError(f"clamp has lo > hi: {clamp!r}")
        self.step_size, self.noise_scale = step_size, noise_scale
        self.temperature = 1.0 if noise_scale is None and temperature is None else temperature
        self.grad_clip, self.grad_clip_mode, self.clamp = grad_clip, grad_clip_mode, clamp
        check_step_value(step_size, "step_size", allow_zero=False)
        for value, name in ((noise_scale, "noise_scale"), (self.temperature, "temperature")):
            if value is not None:
                check_step_value(value, name, allow_zero=True)

    def sample(self, x0: torch.Tensor, n_steps: int | None = None, *, step_size=None,
               return_info: bool = False):
        """Run the chains from x0 (not modified) and return the samples, and a SampleInfo with
        return_info=True (which costs one extra energy evaluation for the final energies)."""
        return self._sample(x0, n_steps, step_size, return_info)

    def _tables(self, x, n_steps, step_size):
        eps = step_values(self.step_size if step_size is None else step_size, "step_size",
                          n_steps, x, allow_zero=False)
        if self.noise_scale is not None:
            sigma = step_values(self.noise_scale, "noise_scale", n_steps, x, allow_zero=True)
        else:
            temperature = step_values(self.temperature, "temperature", n_steps, x,
                                      allow_zero=True)
            if eps.dim() != temperature.dim():  # one shared (K,), one per-chain (K, B) table
                eps_rows, temperature = (t if t.dim() == 2 else t[:, None]
                                         for t in (eps, temperature))
            else:
                eps_rows = eps
            sigma = (2 * eps_rows * temperature).sqrt()
        return eps, sigma

    def _chain(self, x, counter, seed, tables, *, n_steps, chain_offset, track):
        eps, sigma = (table.unbind(0) for table in tables)
        steps = step_counters(counter, n_steps)
        diagnostics = ChainDiagnostics(x, n_steps, self.check_finite, track)
        update = update_kernel(x)
        for k in range(n_steps):
            energy, grad = self._energy.value_and_grad(x)
            diagnostics.check(energy)
            diagnostics.measure(energy, grad)
            update(x, x, contiguous(grad), eps[k], sigma[k], seed, steps[k], STREAM_PROPOSAL,
                   chain_offset, self.grad_clip, self.grad_clip_mode, *self.clamp)
        return diagnostics.finish(x, self._energy.value(x) if track else None)
