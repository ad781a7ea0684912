"""Op ``ebm_fast::buffer_push``: store chains into the replay buffer (write-back, FIFO, reservoir).

The semantics (slot choice, last writer wins, quantisation) are specified by
ebm_fast/reference/buffer_push.py. The user-facing API is :class:`ebm_fast.ReplayBuffer`;
:func:`buffer_push` validates what it forwards and runs the backend serving the storage's device.
The op mutates storage, written and count in place (all on the device: no host sync).

Eager calls run the backend kernel directly; under torch.compile the registered op is traced
(ops/_dispatch.run_op: the custom-op dispatcher with its in-place bookkeeping costs about a fifth
of a whole sample+push cycle of 256 CIFAR-sized chains on a CPU).
"""

from __future__ import annotations

import torch

from ebm_fast import validation
from ebm_fast.ops._dispatch import kernel_for, run_op
from ebm_fast.reference.buffer_push import POLICIES


def buffer_push_impl(
    storage: torch.Tensor,
    written: torch.Tensor,
    count: torch.Tensor,
    x: torch.Tensor,
    idx: torch.Tensor | None,
    y: torch.Tensor | None,
    seed: torch.Tensor,
    step: torch.Tensor,
    chain_offset: int,
    slots_per_class: int,
    policy: str,
    lo: float,
    hi: float,
    stochastic: bool,
) -> None:
    """Store x into storage in place, arguments as :func:`buffer_push` normalises them."""
    if x.shape[0]:
        kernel_for("buffer_push", storage)(
            storage=storage,
            written=written,
            count=count,
            x=x,
            idx=idx,
            y=y,
            seed=seed,
            step=step,
            chain_offset=chain_offset,
            slots_per_class=slots_per_class,
            policy=policy,
            lo=lo,
            hi=hi,
            stochastic=stochastic,
        )


_buffer_push_op = torch.library.custom_op(
    "ebm_fast::buffer_push", buffer_push_impl, mutates_args=("storage", "written", "count")
)


@_buffer_push_op.register_fake
def _(
    storage,
    written,
    count,
    x,
    idx,
    y,
    seed,
    step,
    chain_offset,
    slots_per_class,
    policy,
    lo,
    hi,
    stochastic,
):
    return None


def buffer_push(
    storage: torch.Tensor,
    written: torch.Tensor,
    count: torch.Tensor,
    x: torch.Tensor,
    *,
    seed: torch.Tensor,
    step: torch.Tensor,
    chain_offset: int = 0,
    slots_per_class: int,
    policy: str,
    lo: float,
    hi: float,
    stochastic: bool = False,
    idx: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> None:
    """Store x (batch, D) into a (capacity, D) storage, in place.

    count: int64 (capacity // slots_per_class,) chains ever appended per class (FIFO head =
    count % slots_per_class). idx: int64 (batch,) slots to write back to (policy unused);
    otherwise chains are appended by ``policy`` ("fifo" or "reservoir") into class y (int64
    (batch,), required with several classes). uint8 storage quantises over [lo, hi], to nearest
    or, with ``stochastic``, by unbiased stochastic rounding.
    """
    capacity, features = storage.shape
    if not storage.is_contiguous() or not written.is_contiguous() or not count.is_contiguous():
        raise ValueError("storage, written and count must be contiguous (written in place)")
    if x.dim() != 2 or x.shape[1] != features:
        raise ValueError(f"x must have shape (batch, {features}), got {tuple(x.shape)}")
    if count.shape != (capacity // slots_per_class,) or count.dtype != torch.int64:
        raise ValueError(
            f"count must be int64 of shape ({capacity // slots_per_class},), got "
            f"{tuple(count.shape)} {count.dtype}"
        )
    validation.choice(policy, "policy", POLICIES)
    for name, labels in (("idx", idx), ("y", y)):
        if labels is not None and (labels.shape != (x.shape[0],) or labels.dtype != torch.int64):
            raise ValueError(
                f"{name} must be int64 of shape ({x.shape[0]},), got "
                f"{tuple(labels.shape)} {labels.dtype}"
            )
    if idx is None and y is None and count.shape[0] != 1:
        raise ValueError("y is required to append to a storage holding several classes")
    validation.same_device(
        storage.device, "storage", written=written, count=count, x=x, idx=idx, y=y
    )
    run_op(
        _buffer_push_op,
        buffer_push_impl,
        storage=storage,
        written=written,
        count=count,
        x=x.contiguous(),
        idx=None if idx is None else idx.contiguous(),
        y=None if y is None or idx is not None else y.contiguous(),
        seed=seed,
        step=step,
        chain_offset=int(chain_offset),
        slots_per_class=int(slots_per_class),
        policy=policy,
        lo=float(lo),
        hi=float(hi),
        stochastic=bool(stochastic),
    )
