"""Resumable batch streams for the Trainer: a tensor, (x, y) tensors, a Dataset or a DataLoader.

Tensors and Datasets are read in a fresh random order each epoch, epoch e's order drawn from a
generator seeded with seed + e, incomplete last batches dropped (persistent chains keep one per
batch slot); the state is (seed, epoch, position), so a resumed run reads exactly the batches
the uninterrupted run would. A user's DataLoader is cycled as it is; its order is restored on
resume when it has a ``generator`` (its state at the start of the epoch is kept and the batches
already read are skipped), otherwise the resumed order differs (a warning says so).
"""

from __future__ import annotations

import warnings

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from ebm_fast import validation

__all__ = ["batch_stream", "split_batch"]


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x, y or None) from a batch: a tensor, or a (x,) / (x, y) tuple or list of tensors."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if (
        isinstance(batch, (tuple, list))
        and len(batch) in (1, 2)
        and all(isinstance(t, torch.Tensor) for t in batch)
    ):
        return batch[0], (batch[1] if len(batch) == 2 else None)
    raise TypeError(
        f"a data batch must be a tensor x or a pair (x, y) of tensors, got "
        f"{type(batch).__name__}"
        + (f" of {len(batch)} items" if isinstance(batch, (tuple, list)) else "")
    )


class _EpochBatches:
    """Batches of a tensor, tensors or Dataset in a reshuffled order each epoch."""

    kind = "epochs"

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.size = len(data[0]) if isinstance(data, tuple) else len(data)
        if batch_size > self.size:
            raise ValueError(
                f"batch_size ({batch_size}) exceeds the number of samples in data ({self.size})"
            )
        self.epoch, self.position = 0, 0
        self._order: torch.Tensor | None = None  # this epoch's permutation, made at first use

    def _indices(self) -> torch.Tensor:
        if self.position + self.batch_size > self.size:
            self.epoch, self.position, self._order = self.epoch + 1, 0, None
        if self._order is None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._order = torch.randperm(self.size, generator=generator)
        indices = self._order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return indices

    def __next__(self):
        indices = self._indices()
        if isinstance(self.data, torch.Tensor):
            return self.data[indices], None
        if isinstance(self.data, tuple):
            return self.data[0][indices], self.data[1][indices]
        return split_batch(default_collate([self.data[i] for i in indices.tolist()]))

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "size": self.size,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("kind", "size", "batch_size"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(
                    f"the checkpoint's data order was for {key}={state.get(key)!r}, "
                    f"but fit() got {key}={self.state_dict()[key]!r}: resume with "
                    "the same data and batch_size"
                )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = None  # redrawn from seed + epoch at the next batch


class _LoaderBatches:
    """A user's DataLoader, cycled; resumable when it has a generator."""

    kind = "loader"

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.epoch, self.position = 0, 0
        self._start_epoch()

    def _start_epoch(self) -> None:
        generator = self.loader.generator
        self._epoch_rng = None if generator is None else generator.get_state()
        self._iterator = iter(self.loader)

    def __next__(self):
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._start_epoch()
            batch = next(self._iterator, None)
            if batch is None:
                raise ValueError("the DataLoader yields no batches") from None
        self.position += 1
        return split_batch(batch)

    def state_dict(self) -> dict:
        return {
            "kind": self.kind,
            "epoch": self.epoch,
            "position": self.position,
            "rng": self._epoch_rng,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(
                f"the checkpoint's data came from a {state.get('kind')!r} stream, "
                "but fit() got a DataLoader: resume with the same kind of data"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        if state["rng"] is None or self.loader.generator is None:
            warnings.warn(
                "the DataLoader has no generator (DataLoader(..., generator=g)) in the "
                "checkpoint or now: the resumed run reads batches in another order",
                RuntimeWarning,
                stacklevel=3,
            )
        else:
            self.loader.generator.set_state(state["rng"])
        self._iterator = iter(self.loader)
        self._epoch_rng = state["rng"]
        for _ in range(self.position):  # the batches the run had read in this epoch
            next(self._iterator)


def batch_stream(data, batch_size, seed: int):
    """A resumable stream of (x, y or None) batches over data (see the module docstring)."""
    if isinstance(data, DataLoader):
        if batch_size is not None and batch_size != data.batch_size:
            raise ValueError(
                f"batch_size={batch_size} but the DataLoader makes batches of "
                f"{data.batch_size}: leave batch_size=None for a DataLoader"
            )
        return _LoaderBatches(data)
    if batch_size is None:
        raise ValueError("batch_size is required unless data is a DataLoader")
    batch_size = validation.integer(batch_size, "batch_size", low=1)
    if isinstance(data, (tuple, list)):
        x, y = split_batch(data)
        if y is None:
            data = x
        elif len(y) != len(x):
            raise ValueError(f"data's x and y differ in length: {len(x)} and {len(y)}")
        else:
            data = (x, y)
    elif not isinstance(data, (torch.Tensor, Dataset)):
        raise TypeError(
            f"data must be a tensor, an (x, y) pair of tensors, a Dataset or a "
            f"DataLoader, got {type(data).__name__}"
        )
    if isinstance(data, torch.Tensor) and data.dim() < 1:
        raise ValueError("data must have a leading sample axis, got a 0-dim tensor")
    return _EpochBatches(data, batch_size, seed)
