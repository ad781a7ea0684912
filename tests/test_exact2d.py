"""ebm_fast.exact2d against first principles: Gaussian closed forms, finite differences."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from ebm_fast import exact2d
from ebm_fast.datasets import ring_of_gaussians
from ebm_fast.experiments.study.common import ring_log_density
from ebm_fast.samplers.energy import trainable_parameters


class Gaussian(nn.Module):
    """E(x) = |x - mu|^2 / (2 s^2): an isotropic normal, Z = 2 pi s^2."""

    def __init__(self, mu, s, dtype=torch.float64):
        super().__init__()
        self.mu = nn.Parameter(torch.tensor(mu, dtype=dtype))
        self.log_s = nn.Parameter(torch.tensor(math.log(s), dtype=dtype))

    def forward(self, x):
        return ((x - self.mu) ** 2).sum(1) / (2 * torch.exp(2 * self.log_s))


def gaussian_ml_gradient(model: Gaussian, data: torch.Tensor) -> list:
    """Closed form of grad [mean E(data) + log(2 pi s^2)]: d/dmu = -(mean x - mu) / s^2,
    d/dlog s = 2 - mean |x - mu|^2 / s^2."""
    mu, s2 = model.mu.detach(), torch.exp(2 * model.log_s.detach())
    return [-(data.mean(0) - mu) / s2, 2 - ((data - mu) ** 2).sum(1).mean() / s2]


def cosine(a: list, b: list) -> float:
    a, b = (torch.cat([t.reshape(-1) for t in g]).double() for g in (a, b))
    return float(torch.dot(a, b) / (a.norm() * b.norm()))


# Midpoint rule with 200 cells on [-4, 4]^2 for s = 0.7: relative quadrature error ~ h^2/(24 s^2)
# ~ 1.4e-4; the box holds the mass up to ~1e-8.
GRID_TOL = 1e-3


def test_grid_is_the_cell_centres():
    points, area = exact2d.grid(1.0, 4)
    assert points.shape == (16, 2) and area == pytest.approx(0.25)
    assert torch.equal(points[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert float(points.sum()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("s", [0.7, 1.1])
def test_log_partition_of_a_gaussian(s):
    model = Gaussian([0.3, -0.2], s)
    assert float(exact2d.log_partition(model, 4.0, 200).detach()) == pytest.approx(
        math.log(2 * math.pi * s * s), abs=GRID_TOL
    )


def test_exact_expectation_of_a_gaussian():
    model = Gaussian([0.3, -0.2], 0.7)
    mean = exact2d.exact_expectation(model, lambda x: x, 4.0, 200)
    torch.testing.assert_close(mean, model.mu.detach(), atol=GRID_TOL, rtol=0)
    second = exact2d.exact_expectation(
        model, lambda x: ((x - model.mu.detach()) ** 2).sum(1), 4.0, 200
    )
    assert float(second) == pytest.approx(2 * 0.49, rel=GRID_TOL)


def test_exact_ml_gradient_of_a_gaussian_matches_the_closed_form():
    model = Gaussian([0.3, -0.2], 0.7)
    data = 0.5 * torch.randn(
        500, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    ) + torch.tensor([1.0, -0.5], dtype=torch.float64)
    got = exact2d.exact_ml_gradient(model, data, 4.0, 200)
    for g, expected in zip(got, gaussian_ml_gradient(model, data)):
        torch.testing.assert_close(g, expected, atol=5 * GRID_TOL, rtol=GRID_TOL)


def test_exact_nll_of_a_gaussian():
    model = Gaussian([0.3, -0.2], 0.7)
    data = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = float(model(data).detach().mean()) + math.log(2 * math.pi * 0.49)
    assert exact2d.exact_nll(model, data) == pytest.approx(expected, abs=GRID_TOL)


def test_grid_tools_reject_bad_input():
    with pytest.raises(ValueError, match="energy must return one value per point"):
        exact2d.log_partition(lambda x: x, 4.0, 10)  # (N, 2): two "energies" per point
    with pytest.raises(ValueError, match="cells must be"):
        exact2d.grid(4.0, 1)
    with pytest.raises(ValueError, match="box must be"):
        exact2d.grid(-1.0, 10)
    with pytest.raises(ValueError, match="n must be"):
        exact2d.exact_samples(Gaussian([0.0, 0.0], 1.0), 0, seed=0, step=0, cells=10)


def test_exact_ml_gradient_is_the_derivative_of_the_exact_nll():
    """Central differences of the grid NLL of a tiny float64 MLP, every parameter."""
    energy = nn.Sequential(
        nn.Linear(2, 6), nn.SiLU(), nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 1)
    ).double()
    data = ring_of_gaussians(64, torch.Generator().manual_seed(1)).double()
    box, cells, eps = 4.0, 30, 1e-6
    grads = exact2d.exact_ml_gradient(energy, data, box, cells)
    for param, grad in zip(energy.parameters(), grads):
        flat, numeric = param.data.view(-1), torch.empty(param.numel(), dtype=torch.float64)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            up = exact2d.exact_nll(energy, data, box, cells)
            flat[i] = old - eps
            down = exact2d.exact_nll(energy, data, box, cells)
            flat[i] = old
            numeric[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(grad.reshape(-1), numeric, atol=1e-6, rtol=1e-5)


def test_exact_samples_follow_the_grid_density():
    model = Gaussian([0.3, -0.2], 0.7, dtype=torch.float32)
    x = exact2d.exact_samples(model, 20000, seed=5, step=0, cells=200)
    sem = 0.7 / math.sqrt(20000)
    torch.testing.assert_close(x.mean(0), model.mu.detach(), atol=5 * sem, rtol=0)
    assert float(x.var(0).mean()) == pytest.approx(0.49, rel=0.05)
    assert not torch.equal(x, exact2d.exact_samples(model, 20000, seed=5, step=1, cells=200))


def test_exact_samples_follow_a_mixture_with_an_empty_half():
    """E = +30 on the left half (weight ~1e-13 per cell): every draw lands on the right half."""
    x = exact2d.exact_samples(lambda p: 30.0 * (p[:, 0] < 0), 2000, seed=1, step=0, cells=40)
    assert (x[:, 0] > 0).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["everywhere", "one point"])
def test_grid_tools_refuse_a_non_finite_energy_naming_it(bad, where):
    """A NaN or infinite energy on the grid makes Z and the draws meaningless: before the check,
    exact_samples returned the box corner for every draw of an all-NaN energy."""

    def energy(p):
        values = (p**2).sum(1)
        if where == "everywhere":
            return torch.full_like(values, bad)
        return torch.where(
            (p[:, 0] - 1.4).abs().lt(0.1) & (p[:, 1] - 1.4).abs().lt(0.1),
            torch.full_like(values, bad),
            values,
        )

    count = 400 if where == "everywhere" else 1
    message = f"energy must be finite on the grid, got {bad} at .* at {count} of 400 points"
    with pytest.raises(ValueError, match=message):
        exact2d.exact_samples(energy, 10, seed=0, step=0, cells=20)
    for tool in (
        exact2d.log_partition,
        lambda e, *grid: exact2d.exact_expectation(e, lambda p: p, *grid),
        lambda e, *grid: exact2d.exact_nll(e, torch.zeros(3, 2), *grid),
    ):
        with pytest.raises(ValueError, match="energy must be finite on the grid"):
            tool(energy, 4.0, 20)


def test_trainable_parameters_in_order_and_none_is_an_error():
    model = Gaussian([0.0, 0.0], 1.0)
    assert trainable_parameters(model) == [model.mu, model.log_s]
    model.mu.requires_grad_(False)
    assert trainable_parameters(model) == [model.log_s]
    model.log_s.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        exact2d.exact_ml_gradient(model, torch.zeros(3, 2, dtype=torch.float64), 4.0, 10)


def test_grid_arguments_follow_the_validation_policy():
    with pytest.raises(TypeError, match="cells must be an int"):
        exact2d.grid(4.0, 10.0)
    with pytest.raises(TypeError, match="box must be a float"):
        exact2d.grid(True, 10)
    with pytest.raises(ValueError, match="box must not be NaN"):
        exact2d.grid(math.nan, 10)
    points, _ = exact2d.grid(np.float64(1.0), np.int64(4))
    assert points.shape == (16, 2)


def test_log_partition_of_a_gaussian_mixture():
    """E = -log of the ring's normalised 8-component mixture density: log Z = 0 (the box
    holds all but ~1e-9 of the mass; the midpoint rule on a Gaussian converges faster than
    any power of the cell width)."""

    def energy(x):
        return -ring_log_density(x.double())

    assert float(exact2d.log_partition(energy, 4.0, 200)) == pytest.approx(0.0, abs=1e-4)
    assert float(exact2d.log_partition(energy, 4.0, 60)) == pytest.approx(0.0, abs=1e-4)


def gaussian_log_density(mean, s):
    """log N(mean, s^2 I) up to its constant, which exact_kl's normalisation drops."""
    mean = torch.tensor(mean, dtype=torch.float64)
    return lambda x: -((x - mean) ** 2).sum(1) / (2 * s * s)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_exact_kl_of_two_gaussians_matches_the_closed_form(temperature):
    """Data N(m1, s1^2 I) as a log density, model exp(-E / T) with E = |x - m2|^2 / (2 s2^2),
    i.e. N(m2, T s2^2 I): in 2-D, KL = 2 log(s / s1) + (2 s1^2 + |m1 - m2|^2) / (2 s^2) - 1
    with s^2 = T s2^2."""
    m1, s1, m2, s2 = [0.5, 0.0], 0.6, [0.0, 0.2], 0.5
    s = math.sqrt(temperature) * s2
    expected = 2 * math.log(s / s1) + (2 * s1**2 + 0.29) / (2 * s * s) - 1
    got = exact2d.exact_kl(
        gaussian_log_density(m1, s1), Gaussian(m2, s2), 4.0, 200, temperature=temperature
    )
    assert got == pytest.approx(expected, abs=GRID_TOL)


def test_exact_kl_of_a_density_to_itself_is_zero():
    model = Gaussian([0.3, -0.2], 0.7)
    assert exact2d.exact_kl(gaussian_log_density([0.3, -0.2], 0.7), model) == pytest.approx(
        0.0, abs=1e-12
    )


def test_exact_kl_skips_cells_outside_the_data_support():
    """Data: N(0, I) cut to x > 0 (log density -inf elsewhere), model N(0, I): KL = log 2 (the
    cut falls on cell edges, so the grid halves the mass exactly)."""

    def half_normal(x):
        return torch.where(x[:, 0] > 0, -(x**2).sum(1) / 2, -math.inf)

    assert exact2d.exact_kl(half_normal, Gaussian([0.0, 0.0], 1.0), 5.0, 200) == pytest.approx(
        math.log(2), abs=1e-9
    )


def test_exact_kl_rejects_bad_input():
    model, log_density = Gaussian([0.0, 0.0], 1.0), gaussian_log_density([0.0, 0.0], 1.0)
    with pytest.raises(ValueError, match="log_density must return one value per point"):
        exact2d.exact_kl(lambda x: x, model, 4.0, 10)
    with pytest.raises(ValueError, match="log_density must be finite or -inf"):
        exact2d.exact_kl(lambda x: torch.full_like(x[:, 0], math.nan), model, 4.0, 10)
    with pytest.raises(ValueError, match="log_density is -inf on every grid cell"):
        exact2d.exact_kl(lambda x: torch.full_like(x[:, 0], -math.inf), model, 4.0, 10)
    with pytest.raises(ValueError, match="temperature must be"):
        exact2d.exact_kl(log_density, model, 4.0, 10, temperature=0.0)
    with pytest.raises(ValueError, match="energy must be finite on the grid"):
        exact2d.exact_kl(log_density, lambda x: torch.full_like(x[:, 0], math.nan), 4.0, 10)
