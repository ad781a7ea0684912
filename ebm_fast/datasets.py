"""Data sets generated on the fly (nothing downloaded): 2-D densities for toy EBMs."""

from __future__ import annotations

import math

import torch

__all__ = ["ring_of_gaussians"]


def ring_of_gaussians(n: int, generator: torch.Generator, modes: int = 8, radius: float = 2.5,
                      std: float = 0.25) -> torch.Tensor:
    """n points (n, 2) from an equal mixture of ``modes`` isotropic Gaussians (standard deviation
    ``std``) whose centres are evenly spaced on a circle of ``radius`` around the origin."""
    angle = 2 * math.pi * torch.randint(modes, (n,), generator=generator) / modes
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)
