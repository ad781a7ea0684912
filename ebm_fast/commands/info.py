"""List the backends and why any is unavailable; the devices' capabilities and what the
precision policy "auto" picks on each, and why."""

from __future__ import annotations

import torch

from ebm_fast.backends import KERNEL_BACKENDS, unavailable_reason
from ebm_fast.precision import capability_line, resolve_precision


def add_arguments(parser) -> None:
    """No options."""


def main(args) -> int:
    print(f"torch {torch.__version__}, CUDA available: {torch.cuda.is_available()}")
    for name in KERNEL_BACKENDS:
        reason = unavailable_reason(name)
        print(f"  {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    devices = [torch.device("cpu")] + [
        torch.device("cuda", i) for i in range(torch.cuda.device_count())
    ]
    for device in devices:
        print(capability_line(device))
        # The layout part of the choice needs an energy: a conv one on 4-D states shows it.
        choice = resolve_precision(
            "auto", device, torch.float32, state_dim=4, energy=torch.nn.Conv2d(1, 1, 1)
        )
        print(f"  precision auto, float32 chains, conv energy on images: {choice.reason}")
    return 0
