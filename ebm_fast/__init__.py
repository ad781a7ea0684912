"""ebm_fast: fast, trustworthy MCMC sampling for energy-based models."""

from ebm_fast import noise, ops
from ebm_fast.allocator import retain_freed_cpu_memory
from ebm_fast.backends import available_backends, use_backend
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.ops import langevin_update
from ebm_fast.samplers import (
    LangevinSampler,
    MALASampler,
    NonFiniteChainError,
    SampleInfo,
    geometric_schedule,
    linear_schedule,
)

__version__ = "0.1.0"

__all__ = [
    "noise",
    "ops",
    "available_backends",
    "use_backend",
    "langevin_update",
    "LangevinSampler",
    "MALASampler",
    "NonFiniteChainError",
    "SampleInfo",
    "geometric_schedule",
    "linear_schedule",
    "ReplayBuffer",
    "retain_freed_cpu_memory",
]
