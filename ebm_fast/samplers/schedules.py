"""Per-step parameter values: schedules, and the tables a call builds from a sampler's
step_size / noise_scale / temperature (a number, a per-chain tensor or a schedule)."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ebm_fast.reference.langevin_update import compute_dtype
from ebm_fast.samplers.kernels import contiguous

__all__ = ["linear_schedule", "geometric_schedule"]


def linear_schedule(start: float, end: float) -> Callable[[int, int], float]:
    """A schedule for step_size / noise_scale / temperature: start at step 0, end at the last."""
    def schedule(k: int, n_steps: int) -> float:
        return start + (end - start) * (k / max(n_steps - 1, 1))
    return schedule


def geometric_schedule(start: float, end: float) -> Callable[[int, int], float]:
    """Like :func:`linear_schedule` but interpolating log-linearly (start and end > 0)."""
    if not (start > 0 and end > 0):
        raise ValueError(f"geometric_schedule needs start > 0 and end > 0, got {start}, {end}")
    def schedule(k: int, n_steps: int) -> float:
        return start * (end / start) ** (k / max(n_steps - 1, 1))
    return schedule


def check_step_value(value, name: str, *, allow_zero: bool) -> None:
    """Type-check a step-size / noise / temperature argument; numbers must be finite and > 0
    (>= 0 with allow_zero). Tensor values are not read (that would synchronise with the device)."""
    if isinstance(value, torch.Tensor) or (callable(value) and not isinstance(value, bool)):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, a tensor or a schedule f(k, n_steps), got "
                        f"{type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A table built on the host, on the chains' device. PyTorch synchronises the stream for a
    copy from pageable host memory; a pinned, non-blocking copy is queued like a kernel."""
    if device.type == "cuda" and table.device.type == "cpu":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def step_values(value, name: str, n_steps: int, x: torch.Tensor, *, allow_zero: bool,
                allow_schedule: bool = True) -> torch.Tensor:
    """A parameter's value at each of the call's steps: (K,) shared, or (K, B) per chain.

    value: a number, a 0-dim or per-chain (B,) tensor, or a schedule ``f(k, n_steps)`` returning
    either, evaluated on the host once per call. Tensor values are not checked (that would
    synchronise with the device); numbers must be finite and > 0 (>= 0 with allow_zero). The
    table reaches the device without waiting for it (no host synchronisation).
    """
    check_step_value(value, name, allow_zero=allow_zero)
    dtype, chains = compute_dtype(x.dtype), x.shape[0]
    if callable(value) and not isinstance(value, torch.Tensor):
        if not allow_schedule:
            raise TypeError(f"{name} cannot be a schedule here")
        rows = [value(k, n_steps) for k in range(n_steps)]
        if any(isinstance(row, torch.Tensor) or callable(row) for row in rows):
            rows = [step_values(row, f"{name} (schedule at step {k})", 1, x,
                                allow_zero=allow_zero, allow_schedule=False)[0]
                    for k, row in enumerate(rows)]
            return torch.stack(torch.broadcast_tensors(*rows))
        for k, row in enumerate(rows):
            check_step_value(row, f"{name} (schedule at step {k})", allow_zero=allow_zero)
        # Numbers only: one (K,) table built on the host, one copy.
        return _on_device(torch.tensor([float(row) for row in rows], dtype=dtype), x.device)
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a floating tensor, got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != chains):
            raise ValueError(f"{name} must be a number, a 0-dim tensor or a per-chain tensor of "
                             f"shape ({chains},), got shape {tuple(value.shape)}")
        if value.dim() == 1 and value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
        # Contiguous: the kernels take each step's row as it is.
        value = contiguous(_on_device(value.detach().to(dtype), x.device))
    else:
        value = torch.full((), float(value), dtype=dtype, device=x.device)
    return value.expand(n_steps, *value.shape)


def step_counters(counter: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, ...]:
    """The noise step of each of the call's updates, counter + k, as 0-dim device tensors made by
    two ops per call (an in-place increment per step cost ~10-20 us on a CPU thread)."""
    return (counter + torch.arange(n_steps, device=counter.device)).unbind(0)


def chunk_rows(table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A per-step table restricted to chains lo:hi (per-chain tables are (K, B))."""
    return table[:, lo:hi] if table.dim() == 2 else table
