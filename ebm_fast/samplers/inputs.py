"""What a chain reads that may change from call to call, in one place: the state, the noise
counter and seed, the per-step values, and the energy's conditioning.

A chunk of chains takes its slice of them (for_chains); a CUDA graph holds static copies that
each replay refills (static_copy, copy_), and a capture is reused only for inputs of the same
structure (key), since it bakes in shapes, dtypes and non-tensor arguments.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ebm_fast.samplers.schedules import StepValues


def _tensor_key(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """What the energy is called with besides x: ``energy(x, y, **kwargs)``, or
    ``energy(x, **kwargs)`` when y is None.

    y: per-chain conditioning (class labels, ...); a tensor has one entry per chain and is split
    with the chains. kwargs: passed to every chunk as given.
    """

    y: object = None
    kwargs: dict = dataclasses.field(default_factory=dict)

    def call(self, energy: Callable, x: torch.Tensor):
        if self.y is None:
            return energy(x, **self.kwargs)
        return energy(x, self.y, **self.kwargs)

    def for_chains(self, lo: int, hi: int) -> Conditioning:
        if isinstance(self.y, torch.Tensor):
            return dataclasses.replace(self, y=self.y[lo:hi])
        return self

    def _map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Conditioning:
        def apply(v):
            return fn(v) if isinstance(v, torch.Tensor) else v

        return Conditioning(apply(self.y), {name: apply(v) for name, v in self.kwargs.items()})

    def static_copy(self) -> Conditioning:
        return self._map_tensors(torch.Tensor.clone)

    def copy_(self, other: Conditioning) -> None:
        """Refill this static copy's tensors with other's (same key)."""
        for static, value in zip(self._tensors(), other._tensors()):
            static.copy_(value)

    def _tensors(self) -> list[torch.Tensor]:
        return [v for v in (self.y, *self.kwargs.values()) if isinstance(v, torch.Tensor)]

    def key(self) -> tuple:
        """Tensors by shape, dtype and device (a capture reads them from its static copies);
        anything else by value (a capture bakes it in), so it must be hashable."""

        def part(name, value):
            if isinstance(value, torch.Tensor):
                return name, _tensor_key(value)
            try:
                hash(value)
            except TypeError:
                raise TypeError(
                    f"energy argument {name!r} must be a tensor or hashable to be "
                    f"part of a CUDA graph's key, got {type(value).__name__}"
                ) from None
            return name, value

        return (
            part("y", self.y),
            *(part(name, value) for name, value in sorted(self.kwargs.items())),
        )


NO_CONDITIONING = Conditioning()  # energy(x)


@dataclasses.dataclass(frozen=True)
class ChainInputs:
    """A chunk's inputs: x (updated in place), the step counter and seed (0-dim int64 tensors on
    x's device), the per-step values and the conditioning."""

    x: torch.Tensor
    counter: torch.Tensor
    seed: torch.Tensor
    tables: tuple[StepValues, ...]
    conditioning: Conditioning

    def for_chains(self, lo: int, hi: int) -> ChainInputs:
        # x[lo:hi] of a contiguous tensor is a contiguous view: updated in place.
        return dataclasses.replace(
            self,
            x=self.x[lo:hi],
            tables=tuple(t.for_chains(lo, hi) for t in self.tables),
            conditioning=self.conditioning.for_chains(lo, hi),
        )

    def tabulated(self, n_steps: int) -> ChainInputs:
        """Every per-step value held in a tensor (a graph's inputs are tensors)."""
        return dataclasses.replace(self, tables=tuple(t.tabulated(n_steps) for t in self.tables))

    def static_copy(self) -> ChainInputs:
        return ChainInputs(
            self.x.clone(),
            self.counter.clone(),
            self.seed.clone(),
            tuple(dataclasses.replace(t, values=t.table.clone()) for t in self.tables),
            self.conditioning.static_copy(),
        )

    def copy_(self, other: ChainInputs) -> None:
        """Refill this static copy with other's values (same key)."""
        self.x.copy_(other.x)
        self.counter.copy_(other.counter)
        self.seed.copy_(other.seed)
        for static, table in zip(self.tables, other.tables):
            static.table.copy_(table.table)
        self.conditioning.copy_(other.conditioning)

    def key(self) -> tuple:
        """The structure a capture bakes in (tabulated inputs only)."""
        return (
            _tensor_key(self.x),
            tuple((t.per_step, *_tensor_key(t.table)) for t in self.tables),
            self.conditioning.key(),
        )
