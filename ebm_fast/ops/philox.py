"""Op ``ebm_fast::philox``: a tensor of counter-based draws (normal, uniform or raw bits), and the
public draws :func:`philox_normal`, :func:`philox_uniform` and :func:`philox_bits`.

The spec is ebm_fast/noise.py, its reference ebm_fast/reference/philox.py; this file registers
the op and routes it to the backend serving ``device``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ebm_fast import validation
from ebm_fast.ops._dispatch import kernel_for, run_op

DISTRIBUTION_DTYPES = {"normal": torch.float32, "uniform": torch.float32, "bits": torch.int32}


def philox_impl(
    shape: list[int],
    seed: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    chain_offset: int,
    distribution: str,
    device: torch.device,
) -> torch.Tensor:
    """A new tensor of draws, arguments as :func:`philox` normalises them."""
    out = torch.empty(shape, dtype=DISTRIBUTION_DTYPES[distribution], device=device)
    if out.numel():
        kernel_for("philox", out)(
            out=out,
            seed=seed,
            step=step,
            stream=stream,
            chain_offset=chain_offset,
            distribution=distribution,
        )
    return out


_philox_op = torch.library.custom_op("ebm_fast::philox", philox_impl, mutates_args=())


@_philox_op.register_fake
def _(shape, seed, step, stream, chain_offset, distribution, device):
    return torch.empty(shape, dtype=DISTRIBUTION_DTYPES[distribution], device=device)


def philox(
    shape: int | Sequence[int],
    *,
    seed: validation.Counter,
    step: validation.Counter,
    stream: int = 0,
    chain_offset: int = 0,
    distribution: str = "normal",
    device: torch.device | str | int | None = None,
) -> torch.Tensor:
    """Draw a (chains, ...) tensor per the noise spec on the backend serving ``device``.

    shape: an int or a sequence of ints >= 0 (Python or numpy ints; 2.5 is refused, not
    truncated), the first being the chain axis.
    """
    distribution = validation.choice(distribution, "distribution", tuple(DISTRIBUTION_DTYPES))
    entries = shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,)
    shape = [validation.integer(size, f"shape[{i}]", low=0) for i, size in enumerate(entries)]
    if not shape:
        raise ValueError("shape must have a leading chain axis, got ()")
    stream = validation.integer(stream, "stream", low=0, high=1 << 32)
    chain_offset = validation.chain_offset(chain_offset, shape)
    device = (
        torch.device(device)
        if device is not None
        else (seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu"))
    )
    return run_op(
        _philox_op,
        philox_impl,
        shape=shape,
        seed=validation.counter(seed, "seed", 64),
        step=validation.counter(step, "step", 32),
        stream=stream,
        chain_offset=chain_offset,
        distribution=distribution,
        device=device,
    )


def philox_normal(
    shape: int | Sequence[int],
    *,
    seed: validation.Counter,
    step: validation.Counter,
    stream: int = 0,
    chain_offset: int = 0,
    device: torch.device | str | int | None = None,
) -> torch.Tensor:
    """Standard normals (float32) per the noise spec; shape[0] is the chain axis.

    seed (64-bit) and step (32-bit) are ints or 0-dim integer tensors on the target device.
    """
    return philox(
        shape,
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
        distribution="normal",
        device=device,
    )


def philox_uniform(
    shape: int | Sequence[int],
    *,
    seed: validation.Counter,
    step: validation.Counter,
    stream: int = 0,
    chain_offset: int = 0,
    device: torch.device | str | int | None = None,
) -> torch.Tensor:
    """Uniforms in [0, 1) (float32) per the noise spec; arguments as :func:`philox_normal`."""
    return philox(
        shape,
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
        distribution="uniform",
        device=device,
    )


def philox_bits(
    shape: int | Sequence[int],
    *,
    seed: validation.Counter,
    step: validation.Counter,
    stream: int = 0,
    chain_offset: int = 0,
    device: torch.device | str | int | None = None,
) -> torch.Tensor:
    """The raw Philox word of each element (int32 bitcast of uint32); bit-exact on every backend."""
    return philox(
        shape,
        seed=seed,
        step=step,
        stream=stream,
        chain_offset=chain_offset,
        distribution="bits",
        device=device,
    )
