"""Statistical tests sized to catch the bugs they are about (fixed seeds; tolerances from the
standard error, at SIGMAS standard errors, so a correct sampler fails with probability < 1e-6):

* ULA's stationary variance on a Gaussian against its closed form, with enough samples that a
  2% error in the noise scale (4% in the variance) lands outside the tolerance band;
* MALA started in the minor mode of a tilted double well must cross to the major one: the mode
  masses and moments of the grid, the acceptance rate inside stated bounds (so a sampler that
  rejects or accepts everything fails);
* under autocast the chain state stays in x0's precision: the trajectory equals the one built by
  hand with bfloat16 energy gradients and a float32 state (rounding the state to bfloat16 at
  any step changes it).
"""

import math

import pytest
import torch

from ebm_fast import LangevinSampler, MALASampler
from ebm_fast.reference.langevin_update import langevin_update_ref

SIGMAS = 5.0
NOISE_SCALE_ERROR = 0.02  # the smallest relative error of the noise scale the variance test sees


def samples_to_detect(relative_change: float) -> int:
    """Independent normals needed so that a sample variance within SIGMAS standard errors
    (v sqrt(2 / n)) of v is more than SIGMAS standard errors from v (1 + relative_change)."""
    return math.ceil(2 * (2 * SIGMAS / relative_change) ** 2)


def gaussian_energy(s2):
    def energy(x):
        return (x * x).sum(1) / (2 * s2)

    return energy


@pytest.mark.parametrize(
    "s2, eps, sigma", [(1.0, 0.4, None), (2.0, 0.5, 0.6)], ids=["temperature", "noise_scale"]
)
def test_ula_variance_detects_a_two_percent_noise_scale_error(s2, eps, sigma):
    """x <- (1 - eps / s2) x + sigma xi is AR(1) with stationary variance
    v = sigma^2 / (1 - (1 - eps / s2)^2) (sigma = sqrt(2 eps) in the temperature form, T = 1).
    Elements of different chains and dimensions are independent; 40 steps from 0 leave
    (1 - eps / s2)^80 < 1e-9 of the transient."""
    dim = 32
    n = samples_to_detect((1 + NOISE_SCALE_ERROR) ** 2 - 1)
    chains = -(-n // dim)
    kwargs = {"temperature": 1.0} if sigma is None else {"noise_scale": sigma}
    sampler = LangevinSampler(gaussian_energy(s2), step_size=eps, n_steps=40, seed=7, **kwargs)
    x = sampler.sample(torch.zeros(chains, dim))
    noise_scale = math.sqrt(2 * eps) if sigma is None else sigma
    exact = noise_scale**2 / (1.0 - (1.0 - eps / s2) ** 2)
    tolerance = SIGMAS * exact * math.sqrt(2.0 / (chains * dim))
    assert tolerance <= exact * ((1 + NOISE_SCALE_ERROR) ** 2 - 1) / 2  # the stated power
    variance = x.double().pow(2).mean().item()  # the mean is 0 exactly
    assert abs(variance - exact) < tolerance, (variance, exact, tolerance)


def tilted_double_well(x):
    """E = 2 (x^2 - 1)^2 + 0.6 x: modes near -1 (74% of the mass) and +1, barrier 2 at 0."""
    return (2 * (x * x - 1) ** 2 + 0.6 * x).sum(1)


def grid_moments():
    """P(x < 0), E[x], Var[x] under exp(-E) by quadrature on a fine grid."""
    x = torch.linspace(-4, 4, 200_001, dtype=torch.float64)[:, None]
    weights = torch.exp(-tilted_double_well(x))
    weights = weights / weights.sum()
    x = x[:, 0]
    mean = (weights * x).sum().item()
    return weights[x < 0].sum().item(), mean, (weights * x * x).sum().item() - mean**2


def test_mala_started_in_the_minor_mode_reaches_the_mode_masses():
    """4000 chains start at x = +1 (the minor mode); after 300 steps of eps = 0.1 their final
    states are independent draws (mixing checked against the grid). The acceptance rate of this
    step size on this target is about 0.66 per chain: bounds [0.5, 0.8] on the mean, every
    chain in (0.3, 0.95)."""
    chains = 4000
    left_mass, mean, variance = grid_moments()
    sampler = MALASampler(tilted_double_well, step_size=0.1, n_steps=300, seed=5)
    x, info = sampler.sample(torch.ones(chains, 1), return_info=True)
    x = x.double()[:, 0]
    left = (x < 0).double().mean().item()
    assert abs(left - left_mass) < SIGMAS * math.sqrt(left_mass * (1 - left_mass) / chains), (
        left,
        left_mass,
    )
    assert abs(x.mean().item() - mean) < SIGMAS * math.sqrt(variance / chains)
    fourth = ((x - mean) ** 4).mean().item()  # the standard error of a sample variance
    assert abs(x.var().item() - variance) < SIGMAS * math.sqrt((fourth - variance**2) / chains)
    assert 0.5 < info.accept_rate.mean().item() < 0.8
    assert 0.3 < info.accept_rate.min().item() and info.accept_rate.max().item() < 0.95


def test_autocast_keeps_the_chain_state_in_full_precision():
    """The energy runs in bfloat16, the state and the update in float32: the sampler's path is
    the hand-built one exactly, and differs from a path whose state is rounded to bfloat16."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))
    x0 = torch.randn(8, 4, generator=torch.Generator().manual_seed(1))
    n_steps, eps, sigma = 6, 0.01, 0.01  # steps below bfloat16's resolution near |x| ~ 1
    sampler = LangevinSampler(
        model,
        step_size=eps,
        noise_scale=sigma,
        n_steps=n_steps,
        seed=3,
        autocast=torch.bfloat16,
        backend="reference",
    )
    got = sampler.sample(x0)

    def by_hand(round_state):
        x = x0.clone()
        for step in range(n_steps):
            x_var = x.detach().requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                value = model(x_var)
            (grad,) = torch.autograd.grad(value.sum(), x_var)
            x = langevin_update_ref(x, grad, torch.tensor(eps), torch.tensor(sigma), 3, step)
            if round_state:
                x = x.bfloat16().float()
        return x

    assert got.dtype == torch.float32
    assert torch.equal(got, by_hand(round_state=False))
    assert not torch.allclose(got, by_hand(round_state=True), rtol=0, atol=1e-3)
