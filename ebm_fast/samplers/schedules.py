"""Per-step parameter values: schedules, and the values a call serves its chain loop for a
sampler's step_size / noise_scale / temperature (a number, a per-chain tensor or a schedule).

The loop takes them a block of BLOCK_STEPS steps at a time, so a call's extra memory does not
grow with n_steps: a schedule is evaluated on the host one block at a time, a constant is a view.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from ebm_fast import validation

__all__ = ["linear_schedule", "geometric_schedule"]

# What step_size / noise_scale / temperature take: a number, a per-chain tensor (B,), or a
# schedule f(k, n_steps) -> the value at step k of a call.
Schedule = Callable[[int, int], float | torch.Tensor]
StepParameter = float | torch.Tensor | Schedule

# Steps per block: per-block work (a schedule's host evaluation and copy, the blocks' views and
# noise counters) costs a few op calls, spread over this many steps.
BLOCK_STEPS = 32


def linear_schedule(start: float, end: float) -> Callable[[int, int], float]:
    """A schedule for step_size / noise_scale / temperature: start at step 0, end at the last."""

    def schedule(k: int, n_steps: int) -> float:
        return start + (end - start) * (k / max(n_steps - 1, 1))

    return schedule


def geometric_schedule(start: float, end: float) -> Callable[[int, int], float]:
    """Like :func:`linear_schedule` but interpolating log-linearly (start and end > 0)."""
    start = validation.real(start, "start", low=0.0, low_open=True)
    end = validation.real(end, "end", low=0.0, low_open=True)

    def schedule(k: int, n_steps: int) -> float:
        return start * (end / start) ** (k / max(n_steps - 1, 1))

    return schedule


def is_schedule(value) -> bool:
    return callable(value) and not isinstance(value, torch.Tensor)


def check_step_value(value, name: str, *, allow_zero: bool) -> None:
    """Check a step_size / noise_scale / temperature argument where the chains are not known yet:
    a number must be finite and > 0 (>= 0 with allow_zero); tensors and schedules are checked
    per call (the chains' dtype and count decide)."""
    if not (isinstance(value, torch.Tensor) or is_schedule(value)):
        validation.real(value, name, low=0.0, low_open=not allow_zero)


def blocks(n_steps: int) -> Iterator[tuple[int, int]]:
    """(first step, number of steps) of each block of a call's n_steps."""
    for first in range(0, n_steps, BLOCK_STEPS):
        yield first, min(BLOCK_STEPS, n_steps - first)


def step_counters(counter: torch.Tensor, first: int, n: int) -> tuple[torch.Tensor, ...]:
    """The noise steps counter + first + j of a block's n updates, as 0-dim device tensors made
    by two ops per block (an in-place increment per step cost ~10-20 us on a CPU thread)."""
    return (counter + torch.arange(first, first + n, device=counter.device)).unbind(0)


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor made on the host, on the chains' device. PyTorch synchronises the stream for a
    copy from pageable host memory; a pinned, non-blocking copy is queued like a kernel."""
    if device.type == "cuda" and table.device.type == "cpu":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _chain_value(value, name: str, x: torch.Tensor, allow_zero: bool) -> torch.Tensor:
    """A number or tensor value (0-dim or per chain (B,)) on x's device in its compute dtype,
    contiguous (the kernels take it as it is)."""
    checked = validation.chain_param(value, name, x, allow_zero=allow_zero)
    if not isinstance(value, torch.Tensor):
        # A number: filled on the device (no host-to-device copy to wait for).
        return torch.full((), float(value), dtype=checked.dtype, device=x.device)
    checked = _on_device(checked.detach(), x.device)
    return checked if checked.is_contiguous() else checked.contiguous()


def _schedule_block(
    schedule: Callable,
    name: str,
    x: torch.Tensor,
    allow_zero: bool,
    n_steps: int,
    first: int,
    n: int,
) -> torch.Tensor:
    """Rows first .. first + n - 1 of a schedule, (n,) or (n, B), on x's device."""
    rows = [schedule(k, n_steps) for k in range(first, first + n)]
    names = [f"{name} (schedule at step {k})" for k in range(first, first + n)]
    if any(isinstance(row, torch.Tensor) for row in rows):
        values = [_chain_value(row, row_name, x, allow_zero) for row, row_name in zip(rows, names)]
        return torch.stack(torch.broadcast_tensors(*values))
    for row, row_name in zip(rows, names):  # the rule, in x's compute dtype (1e300: inf)
        validation.chain_param(row, row_name, x, allow_zero=allow_zero)
    # Numbers only: one host tensor, one copy.
    table = torch.tensor([float(row) for row in rows], dtype=validation.compute_dtype(x.dtype))
    return _on_device(table, x.device)


@dataclasses.dataclass(frozen=True)
class StepValues:
    """One parameter's value at each step of a call, served a block of steps at a time.

    values: with per_step False, the value of every step (0-dim, or per chain (B,)); with
    per_step True, a table whose row k is step k's value ((K,) or (K, B)): the form a CUDA graph
    takes as input. evaluate: instead of values, (first, n) -> the block's rows, evaluating a
    schedule on the host. Exactly one of values and evaluate is given.
    """

    values: torch.Tensor | None
    per_step: bool = False
    evaluate: Callable[[int, int], torch.Tensor] | None = None

    @property
    def table(self) -> torch.Tensor:
        """values, for one that holds them (a schedule evaluated on the host has none)."""
        if self.values is None:
            raise ValueError("these step values are evaluated on the host: tabulate them first")
        return self.values

    def block(self, first: int, n: int) -> torch.Tensor:
        """The values of steps first .. first + n - 1: (n,) or (n, B)."""
        if self.evaluate is not None:
            return self.evaluate(first, n)
        values = self.table
        if self.per_step:
            return values[first : first + n]
        return values.expand(n, *values.shape)

    def for_chains(self, lo: int, hi: int) -> StepValues:
        """The values of chains lo:hi only (a chunk)."""
        if self.evaluate is not None:
            evaluate = self.evaluate
            return StepValues(
                None, evaluate=lambda first, n: _chains_of(evaluate(first, n), lo, hi)
            )
        values = self.table
        chain_axis = 1 if self.per_step else 0
        if values.dim() == chain_axis + 1:
            return dataclasses.replace(self, values=values.narrow(chain_axis, lo, hi - lo))
        return self

    def tabulated(self, n_steps: int) -> StepValues:
        """The same values held in a tensor (a schedule evaluated for all steps)."""
        if self.evaluate is None:
            return self
        rows = [self.evaluate(first, n) for first, n in blocks(n_steps)]
        chains = max((row.shape[1] for row in rows if row.dim() == 2), default=None)
        if chains is not None:  # blocks of shared values among per-chain ones
            rows = [row if row.dim() == 2 else row[:, None].expand(-1, chains) for row in rows]
        return StepValues(torch.cat(rows), per_step=True)


def _chains_of(rows: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    return rows[:, lo:hi] if rows.dim() == 2 else rows


def step_values(value, name: str, n_steps: int, x: torch.Tensor, *, allow_zero: bool) -> StepValues:
    """A step_size / noise_scale / temperature value for a call on the chains x.

    value: a number (finite and > 0, or >= 0 with allow_zero, in x's compute dtype), a 0-dim or
    per-chain (B,) floating tensor (its values are not read: that would synchronise with the
    device), or a schedule f(k, n_steps) returning either, evaluated a block at a time (a bad
    value is reported when its block is reached).
    """
    if is_schedule(value):
        return StepValues(
            None,
            evaluate=lambda first, n: _schedule_block(
                value, name, x, allow_zero, n_steps, first, n
            ),
        )
    return StepValues(_chain_value(value, name, x, allow_zero))
