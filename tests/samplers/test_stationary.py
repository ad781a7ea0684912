"""Samplers against known densities, with fixed seeds and tolerances from the sampling error.

* ULA on E = |x|^2 / (2 s^2): x <- (1 - eps/s^2) x + sigma xi is an AR(1) process whose stationary
  variance is v = sigma^2 / (1 - (1 - eps/s^2)^2). With sigma^2 = 2 eps T (temperature form) this
  is T s^2 / (1 - eps / (2 s^2)), the closed form of the issue (there with T = 1).
* MALA on a 2-D Gaussian mixture: moments and mode masses against a fine grid of exp(-E).
* ULA's bias shrinks with eps; MALA stays unbiased at both step sizes.
"""

import math

import pytest
import torch

from ebm_fast import LangevinSampler, MALASampler

SIGMAS_OF_TOLERANCE = 5.0


def gaussian_energy(s2):
    def energy(x):
        return (x * x).sum(1) / (2 * s2)

    return energy


def variance_tolerance(v, n):
    """SIGMAS_OF_TOLERANCE standard errors of a sample variance of n independent normals."""
    return SIGMAS_OF_TOLERANCE * v * math.sqrt(2.0 / n)


def ula_stationary_variance(s2, eps, sigma):
    return sigma**2 / (1.0 - (1.0 - eps / s2) ** 2)


@pytest.mark.parametrize("s2, eps, sigma", [(1.0, 0.4, None), (2.0, 0.5, 0.6), (0.5, 0.3, None)])
def test_ula_stationary_variance_matches_the_closed_form(s2, eps, sigma):
    chains, dim = 2000, 4
    kwargs = {"temperature": 1.0} if sigma is None else {"noise_scale": sigma}
    sampler = LangevinSampler(gaussian_energy(s2), step_size=eps, n_steps=40, seed=7, **kwargs)
    x = sampler.sample(torch.zeros(chains, dim))
    exact = ula_stationary_variance(s2, eps, math.sqrt(2 * eps) if sigma is None else sigma)
    if sigma is None:  # the form for sigma^2 = 2 eps, T = 1
        assert exact == pytest.approx(s2 / (1 - eps / (2 * s2)))
    var = x.double().pow(2).mean().item()  # the mean is 0 exactly
    assert abs(var - exact) < variance_tolerance(exact, chains * dim)
    assert abs(exact - s2) > 2 * variance_tolerance(exact, chains * dim)  # the bias is visible


def test_ula_bias_shrinks_with_eps_while_mala_stays_unbiased():
    chains, dim, s2 = 2000, 4, 1.0
    x0 = torch.randn(chains, dim, generator=torch.Generator().manual_seed(0))  # exact draws
    n = chains * dim
    ula_bias, mala_error = {}, {}
    for eps in (0.4, 0.1):
        ula = LangevinSampler(gaussian_energy(s2), step_size=eps, n_steps=40, seed=1).sample(x0)
        mala = MALASampler(gaussian_energy(s2), step_size=eps, n_steps=40, seed=1).sample(x0)
        ula_bias[eps] = ula.double().pow(2).mean().item() - s2
        mala_error[eps] = abs(mala.double().pow(2).mean().item() - s2)
        expected = ula_stationary_variance(s2, eps, math.sqrt(2 * eps)) - s2
        assert abs(ula_bias[eps] - expected) < variance_tolerance(s2 + expected, n)
        assert mala_error[eps] < variance_tolerance(s2, n), eps
    assert ula_bias[0.1] < ula_bias[0.4] - 2 * variance_tolerance(s2, n)


MEANS = torch.tensor([[-1.5, 0.0], [1.5, 0.0], [0.0, 1.6]], dtype=torch.float64)
STDS = torch.tensor([0.6, 0.5, 0.7], dtype=torch.float64)
WEIGHTS = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)


def mixture_energy(x):
    """-log sum_i w_i N(x; mu_i, std_i^2 I) for a batch of 2-D points (unnormalised is fine)."""
    means, stds, weights = (t.to(x.dtype) for t in (MEANS, STDS, WEIGHTS))
    sq = ((x[:, None, :] - means[None]) ** 2).sum(-1)
    log_terms = torch.log(weights) - 2 * torch.log(stds) - sq / (2 * stds**2)
    return -torch.logsumexp(log_terms, dim=1)


def nearest_mode(x):
    return ((x[:, None, :].double() - MEANS[None]) ** 2).sum(-1).argmin(1)


def grid_statistics(n=801, half_width=6.0):
    """E[x], E[x x^T] and the mass of each mode's Voronoi cell under exp(-E), on a grid."""
    axis = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    points = torch.cartesian_prod(axis, axis)
    weights = torch.exp(-mixture_energy(points))
    weights = weights / weights.sum()
    mean = (weights[:, None] * points).sum(0)
    second = (weights[:, None, None] * points[:, :, None] * points[:, None, :]).sum(0)
    masses = torch.zeros(len(MEANS), dtype=torch.float64)
    masses.index_add_(0, nearest_mode(points), weights)
    return mean, second, masses


def mixture_draws(chains, seed):
    gen = torch.Generator().manual_seed(seed)
    component = torch.multinomial(WEIGHTS, chains, replacement=True, generator=gen)
    noise = torch.randn(chains, 2, generator=gen, dtype=torch.float64)
    return (MEANS[component] + STDS[component, None] * noise).float()


def test_mala_on_a_2d_mixture_matches_grid_moments_and_mode_masses():
    chains = 4000
    mean, second, masses = grid_statistics()
    x0 = mixture_draws(chains, seed=3)
    x = MALASampler(mixture_energy, step_size=0.15, n_steps=120, seed=11).sample(x0).double()
    # Chains started from exact draws stay exact under MALA; their final states are independent.
    cov = second - mean[:, None] * mean[None, :]
    for i in range(2):
        se = math.sqrt(cov[i, i].item() / chains)
        assert abs(x[:, i].mean().item() - mean[i].item()) < SIGMAS_OF_TOLERANCE * se
    got_second = (x[:, :, None] * x[:, None, :]).mean(0)
    fourth = x.pow(2)  # the sample's own spread of x_i^2 sets the standard error
    for i in range(2):
        se = fourth[:, i].std().item() / math.sqrt(chains)
        assert abs(got_second[i, i].item() - second[i, i].item()) < SIGMAS_OF_TOLERANCE * se
    got_masses = torch.bincount(nearest_mode(x), minlength=3).double() / chains
    se = torch.sqrt(masses * (1 - masses) / chains)
    assert bool(((got_masses - masses).abs() < SIGMAS_OF_TOLERANCE * se).all()), (
        got_masses,
        masses,
    )
    # And the chains really moved: many switched mode, and x0 is nearly forgotten.
    assert (nearest_mode(x) != nearest_mode(x0)).double().mean() > 0.15
    assert torch.corrcoef(torch.stack([x0[:, 0].double(), x[:, 0]]))[0, 1] < 0.6
