"""Op ``ebm_fast::philox``: a tensor of counter-based draws (normal, uniform or raw bits).

The spec and its reference live in ebm_fast/noise.py; this file registers the op and routes it
to the backend serving ``device``. Public entry points: ebm_fast.noise.philox_normal / _uniform /
_bits.
"""

from __future__ import annotations

import torch

from ebm_fast.ops._dispatch import as_int64_scalar, check_chain_offset, check_int, kernel_for

DISTRIBUTION_DTYPES = {"normal": torch.float32, "uniform": torch.float32, "bits": torch.int32}


@torch.library.custom_op("ebm_fast::philox", mutates_args=())
def _philox_op(shape: list[int], seed: torch.Tensor, step: torch.Tensor, stream: int,
               chain_offset: int, distribution: str, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=DISTRIBUTION_DTYPES[distribution], device=device)
    if out.numel():
        kernel_for("philox", out.device)(out, seed, step, stream, chain_offset, distribution)
    return out


@_philox_op.register_fake
def _(shape, seed, step, stream, chain_offset, distribution, device):
    return torch.empty(shape, dtype=DISTRIBUTION_DTYPES[distribution], device=device)


def philox(shape, *, seed, step, stream=0, chain_offset=0, distribution="normal", device=None):
    """Draw a (chains, ...) tensor per the noise spec on the backend serving ``device``."""
    if distribution not in DISTRIBUTION_DTYPES:
        raise ValueError(f"distribution must be one of {sorted(DISTRIBUTION_DTYPES)}, "
                         f"got {distribution!r}")
    shape = [int(s) for s in (shape if isinstance(shape, (tuple, list, torch.Size)) else (shape,))]
    if len(shape) == 0 or any(s < 0 for s in shape):
        raise ValueError(f"shape must have a leading chain axis and no negative sizes, got {shape}")
    stream = check_int(stream, "stream", 0, 1 << 32)
    chain_offset = check_chain_offset(chain_offset, shape)
    device = torch.device(device) if device is not None else (
        seed.device if isinstance(seed, torch.Tensor) else torch.device("cpu"))
    return _philox_op(shape, as_int64_scalar(seed, "seed", 64), as_int64_scalar(step, "step", 32),
                      stream, chain_offset, distribution, device)
