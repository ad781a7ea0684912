"""MALASampler pinned to the noise spec: trajectories built by hand from the reference ops equal
the sampler's. Step k of a sampler's life (k = 0, 1, ... continuing across sample() calls) is

    y   = x - eps grad E(x) + sqrt(2 eps T) xi,   xi the spec's normal on stream 0 at step k
    accept with probability min(1, alpha) against the spec's uniform on stream 1 at step k
    (reference mala_accept), x, grad E(x), E(x) <- y, grad E(y), E(y) where accepted,

with the energy and gradient evaluated once at x0 and once per proposal: K + 1 evaluations for
K steps. Temperatures (scalar, per chain, scheduled) enter both the proposal and the ratio."""

import pytest
import torch

from ebm_fast import MALASampler
from ebm_fast.reference.langevin_update import langevin_update_ref
from ebm_fast.reference.mala_accept import mala_accept_ref
from ebm_fast.samplers import linear_schedule

SEED = 2**63 + 7
SHAPE = (16, 2, 3)


def double_well(x):
    """A non-Gaussian energy (B, ...) -> (B,): accept probabilities strictly between 0 and 1."""
    return ((x * x - 1.0) ** 2 + 0.3 * x).reshape(x.shape[0], -1).sum(1)


def energy_and_grad(energy, x):
    x_var = x.detach().requires_grad_(True)
    value = energy(x_var)
    (grad,) = torch.autograd.grad(value.sum(), x_var)
    return value.detach(), grad


def mala_by_hand(energy, x0, eps_rows, temperature_rows, *, seed, first_step, chain_offset=0):
    """The spec's MALA trajectory from x0 for one sample() call; eps_rows / temperature_rows are
    float32 0-dim or (B,) tensors per step. Returns (x, number of acceptances per chain)."""
    x = x0.clone()
    energy_x, grad_x = energy_and_grad(energy, x)
    accepted_count = torch.zeros(x.shape[0])
    for k, (eps, temperature) in enumerate(zip(eps_rows, temperature_rows)):
        step = first_step + k
        eps = eps.expand(x.shape[0])
        y = langevin_update_ref(
            x,
            grad_x,
            eps,
            (2 * eps * temperature).sqrt(),
            seed,
            step,
            stream=0,
            chain_offset=chain_offset,
        )
        energy_y, grad_y = energy_and_grad(energy, y)
        accepted, _ = mala_accept_ref(
            x,
            y,
            grad_x,
            grad_y,
            energy_x,
            energy_y,
            eps,
            temperature,
            seed,
            step,
            stream=1,
            chain_offset=chain_offset,
        )
        take = accepted.reshape(-1, *([1] * (x.dim() - 1)))
        x, grad_x = torch.where(take, y, x), torch.where(take, grad_y, grad_x)
        energy_x = torch.where(accepted, energy_y, energy_x)
        accepted_count += accepted
    return x, accepted_count


def rows(value, n_steps):
    """A step_size / temperature as the per-step float32 rows the spec uses."""
    if callable(value):
        return [torch.tensor(float(value(k, n_steps))) for k in range(n_steps)]
    return [torch.as_tensor(value, dtype=torch.float32)] * n_steps


def x_start(seed=3):
    return 1.2 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_trajectory_equals_the_hand_built_one_with_steps_continuing_across_calls():
    """Two calls (4 then 3 steps) use steps 0..3 and 4..6; per-chain step sizes, T != 1, a
    nonzero chain_offset; every acceptance count strictly between 0 and K somewhere."""
    eps = torch.linspace(0.01, 0.1, SHAPE[0])
    sampler = MALASampler(
        double_well,
        step_size=eps,
        temperature=0.7,
        n_steps=4,
        seed=SEED,
        chain_offset=5,
        backend="reference",
    )
    x0 = x_start()
    first, info = sampler.sample(x0, return_info=True)
    second = sampler.sample(first, n_steps=3)
    assert sampler.step == 7

    want_first, accepted = mala_by_hand(
        double_well, x0, rows(eps, 4), rows(0.7, 4), seed=SEED, first_step=0, chain_offset=5
    )
    want_second, _ = mala_by_hand(
        double_well, want_first, rows(eps, 3), rows(0.7, 3), seed=SEED, first_step=4, chain_offset=5
    )
    assert torch.equal(first, want_first)
    assert torch.equal(second, want_second)
    assert torch.equal(info.accept_rate, accepted / 4)
    assert ((accepted > 0) & (accepted < 4)).any()


@pytest.mark.parametrize(
    "temperature",
    [
        pytest.param(2.5, id="scalar"),
        pytest.param(torch.linspace(0.3, 4.0, SHAPE[0]), id="per_chain"),
        pytest.param(linear_schedule(3.0, 0.4), id="schedule"),
    ],
)
def test_temperature_enters_the_proposal_and_the_ratio_as_the_formula_says(temperature):
    """Each form of temperature gives the hand-built trajectory, which differs from T = 1's."""
    n_steps = 5
    x0 = x_start(4)
    sampler = MALASampler(
        double_well,
        step_size=0.05,
        temperature=temperature,
        n_steps=n_steps,
        seed=SEED,
        backend="reference",
    )
    got = sampler.sample(x0)
    want, accepted = mala_by_hand(
        double_well, x0, rows(0.05, n_steps), rows(temperature, n_steps), seed=SEED, first_step=0
    )
    assert torch.equal(got, want)
    assert ((accepted > 0) & (accepted < n_steps)).any()  # the ratio decides some moves
    at_t1, _ = mala_by_hand(
        double_well, x0, rows(0.05, n_steps), rows(1.0, n_steps), seed=SEED, first_step=0
    )
    assert not torch.equal(got, at_t1)


def test_the_default_backend_follows_the_same_trajectory():
    """The kernels the sampler picks by default (C++ on a CPU) walk the hand-built path to
    float32 rounding: same streams, counters and chain offsets as the reference."""
    eps = torch.linspace(0.01, 0.1, SHAPE[0])
    x0 = x_start(5)
    sampler = MALASampler(
        double_well, step_size=eps, temperature=0.8, n_steps=6, seed=SEED, chain_offset=2
    )
    got = sampler.sample(sampler.sample(x0, n_steps=2), n_steps=4)
    want, _ = mala_by_hand(
        double_well, x0, rows(eps, 2), rows(0.8, 2), seed=SEED, first_step=0, chain_offset=2
    )
    want, _ = mala_by_hand(
        double_well, want, rows(eps, 4), rows(0.8, 4), seed=SEED, first_step=2, chain_offset=2
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class CountingEnergy:
    """double_well, counting its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x):
        self.calls += 1
        return double_well(x)


@pytest.mark.parametrize("return_info", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_the_energy_is_evaluated_k_plus_1_times_per_chunk(return_info, chunk_size):
    """Once at x0 and once per proposal: the current state's energy and gradient are reused
    (also for the final energies of return_info)."""
    energy = CountingEnergy()
    sampler = MALASampler(energy, step_size=0.1, n_steps=7, seed=1, chunk_size=chunk_size)
    sampler.sample(x_start(), return_info=return_info)
    chunks = 1 if chunk_size is None else -(-SHAPE[0] // chunk_size)
    assert energy.calls == 8 * chunks
    energy.calls = 0
    sampler.sample(x_start(), n_steps=3, return_info=return_info)
    assert energy.calls == 4 * chunks
