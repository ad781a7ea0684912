"""Op ``ebm_fast::buffer_sample``: the replay buffer's fused draw (slot, dequantise, reinit).

The semantics and the noise it draws are specified by ebm_fast/reference/buffer_sample.py. The
user-facing API is :class:`ebm_fast.ReplayBuffer`; :func:`buffer_sample` here validates the
arguments it forwards and runs the backend serving the storage's device.

Eager calls run the backend kernel directly; under torch.compile the registered op is traced
(ops/_dispatch.run_op: the custom-op dispatcher costs about a tenth of a whole sample+push cycle
of 256 CIFAR-sized chains on a CPU).
"""

from __future__ import annotations

import torch

from ebm_fast import validation
from ebm_fast.ops._dispatch import kernel_for, run_op
from ebm_fast.reference.buffer_sample import INIT_KINDS

OUTPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


def buffer_sample_impl(
    storage: torch.Tensor,
    written: torch.Tensor,
    y: torch.Tensor | None,
    init_values: torch.Tensor | None,
    batch: int,
    dtype: torch.dtype,
    seed: torch.Tensor,
    step: torch.Tensor,
    chain_offset: int,
    slots_per_class: int,
    reinit_prob: float,
    init_kind: str,
    lo: float,
    hi: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, slots) as new tensors, arguments as :func:`buffer_sample` normalises them."""
    out = torch.empty((batch, storage.shape[1]), dtype=dtype, device=storage.device)
    slots = torch.empty((batch,), dtype=torch.int64, device=storage.device)
    if batch:
        kernel_for("buffer_sample", storage)(
            out=out,
            slots=slots,
            storage=storage,
            written=written,
            y=y,
            init_values=init_values,
            seed=seed,
            step=step,
            chain_offset=chain_offset,
            slots_per_class=slots_per_class,
            reinit_prob=reinit_prob,
            init_kind=init_kind,
            lo=lo,
            hi=hi,
        )
    return out, slots


_buffer_sample_op = torch.library.custom_op(
    "ebm_fast::buffer_sample", buffer_sample_impl, mutates_args=()
)


@_buffer_sample_op.register_fake
def _(
    storage,
    written,
    y,
    init_values,
    batch,
    dtype,
    seed,
    step,
    chain_offset,
    slots_per_class,
    reinit_prob,
    init_kind,
    lo,
    hi,
):
    return (
        storage.new_empty((batch, storage.shape[1]), dtype=dtype),
        storage.new_empty((batch,), dtype=torch.int64),
    )


def buffer_sample(
    storage: torch.Tensor,
    written: torch.Tensor,
    batch: int,
    *,
    dtype: torch.dtype,
    seed: torch.Tensor,
    step: torch.Tensor,
    chain_offset: int = 0,
    slots_per_class: int,
    reinit_prob: float,
    init_kind: str,
    lo: float,
    hi: float,
    y: torch.Tensor | None = None,
    init_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``batch`` chains from a (capacity, D) storage; returns (x (batch, D), slots (batch,)).

    storage: float32 / bfloat16 / uint8 (codes over [lo, hi]); written: uint8 (capacity,) flags.
    y: int64 (batch,) classes when the storage holds capacity // slots_per_class classes.
    init_kind: "uniform" over [lo, hi), "gaussian", or "values" (rows of ``init_values``).
    seed, step: 0-dim int64 tensors (the step may live on the device: no host sync).
    """
    if storage.dim() != 2 or storage.dtype not in STORAGE_DTYPES:
        raise ValueError(
            f"storage must be a 2-D {STORAGE_DTYPES} tensor, got "
            f"{tuple(storage.shape)} {storage.dtype}"
        )
    if written.shape != (storage.shape[0],) or written.dtype != torch.uint8:
        raise ValueError(
            f"written must be uint8 of shape ({storage.shape[0]},), got "
            f"{tuple(written.shape)} {written.dtype}"
        )
    validation.dtype(dtype, "dtype", OUTPUT_DTYPES)
    if not (0 < slots_per_class and storage.shape[0] % slots_per_class == 0):
        raise ValueError(
            f"slots_per_class must divide the capacity {storage.shape[0]}, got {slots_per_class}"
        )
    if y is None and slots_per_class != storage.shape[0]:
        raise ValueError("y is required when the storage holds several classes")
    if y is not None and (y.shape != (batch,) or y.dtype != torch.int64):
        raise ValueError(f"y must be int64 of shape ({batch},), got {tuple(y.shape)} {y.dtype}")
    validation.choice(init_kind, "init_kind", INIT_KINDS)
    if (init_kind == "values") != (init_values is not None):
        raise ValueError("init_values must be given exactly when init_kind is 'values'")
    if init_values is not None and init_values.shape != (batch, storage.shape[1]):
        raise ValueError(
            f"init_values must have shape {(batch, storage.shape[1])}, got "
            f"{tuple(init_values.shape)}"
        )
    reinit_prob = validation.real(reinit_prob, "reinit_prob", low=0.0, high=1.0)
    validation.same_device(storage.device, "storage", written=written, y=y, init_values=init_values)
    if init_values is not None:
        init_values = init_values.to(dtype).contiguous()
    # The kernels index y, like every tensor they read, as a contiguous array.
    return run_op(
        _buffer_sample_op,
        buffer_sample_impl,
        storage=storage.contiguous(),
        written=written.contiguous(),
        y=None if y is None else y.contiguous(),
        init_values=init_values,
        batch=int(batch),
        dtype=dtype,
        seed=seed,
        step=step,
        chain_offset=int(chain_offset),
        slots_per_class=int(slots_per_class),
        reinit_prob=float(reinit_prob),
        init_kind=init_kind,
        lo=float(lo),
        hi=float(hi),
    )
