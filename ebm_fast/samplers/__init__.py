"""Drop-in samplers: ``LangevinSampler`` (unadjusted, IGEBM/JEM convention) and ``MALASampler``.

Both take any energy callable x -> (B,) or (B, 1) (a plain nn.Module works) and share one
machinery, one concern per module:

* ``results``: SampleInfo (per-chain diagnostics) and NonFiniteChainError;
* ``schedules``: linear / geometric schedules and the per-step tables of step sizes, noise
  scales and temperatures (constants, per-chain tensors or schedules), built so the loop never
  asks the host for a value;
* ``energy``: energy + gradient evaluation that leaves the energy's parameters as they were
  (requires_grad off for the call and restored, also on error), under torch.compile (eager
  fallback) and torch.autocast, optionally negated and in eval mode;
* ``diagnostics``: per-chain diagnostics and the non-finite check, accumulated on the device and
  read once at the end;
* ``inputs``: what a chain reads that changes between calls (state, counter, seed, per-step
  values, the energy's conditioning y / keyword arguments), split per chunk and copied into a
  CUDA graph's static buffers;
* ``cuda_graph``: on CUDA, a chunk's whole K-step chain captured once and replayed;
* ``kernels``: the fused update / accept kernels the chains call;
* ``base``: the options both samplers take, the step counter (a 0-dim int64 device tensor,
  advanced on the device; ``state_dict()`` holds it, so a resumed sampler continues the same
  trajectories), chunking over chains with the noise spec's chain_offset;
* ``langevin``, ``mala``: the two chain loops; ``adaptation``: MALA's step-size adaptation.
"""

from ebm_fast.samplers.langevin import LangevinSampler
from ebm_fast.samplers.mala import MALASampler
from ebm_fast.samplers.results import NonFiniteChainError, SampleInfo
from ebm_fast.samplers.schedules import geometric_schedule, linear_schedule

__all__ = [
    "LangevinSampler",
    "MALASampler",
    "SampleInfo",
    "NonFiniteChainError",
    "linear_schedule",
    "geometric_schedule",
]
