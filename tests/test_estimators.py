"""ebm_fast.estimators: each estimator's definition (where its chains start, what it returns)."""

import pytest
import torch
from test_exact2d import Gaussian, cosine, gaussian_ml_gradient

from ebm_fast import LangevinSampler, ReplayBuffer, exact2d
from ebm_fast.datasets import ring_of_gaussians
from ebm_fast.estimators import contrastive_divergence, persistent_ml, short_run_ml
from ebm_fast.experiments.models import make_energy


def small_setup():
    energy = make_energy(0, hidden=16)
    data = ring_of_gaussians(32, torch.Generator().manual_seed(0))
    return energy, data


def sampler_for(energy, seed=7, **kwargs):
    return LangevinSampler(energy, step_size=0.01, n_steps=5, clamp=(-4.0, 4.0), seed=seed,
                           **kwargs)


def check_structure(estimate, energy, data):
    params = list(energy.parameters())
    assert len(estimate.grads) == len(params)
    for g, p in zip(estimate.grads, params):
        assert g.shape == p.shape and torch.isfinite(g).all()
    assert estimate.negatives.shape == data.shape
    assert all(p.grad is None for p in params)  # estimators return gradients, never accumulate


def test_cd0_gradient_is_exactly_zero():
    energy, data = small_setup()
    estimate = contrastive_divergence(energy, data, 0, sampler_for(energy))
    check_structure(estimate, energy, data)
    assert torch.equal(estimate.negatives, data)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in estimate.grads)


def test_cd_k_chains_start_at_the_data():
    energy, data = small_setup()
    estimate = contrastive_divergence(energy, data, 3, sampler_for(energy))
    check_structure(estimate, energy, data)
    torch.testing.assert_close(estimate.negatives, sampler_for(energy).sample(data, 3), rtol=0,
                               atol=0)
    assert not torch.equal(estimate.negatives, data)
    assert any(g.abs().sum() > 0 for g in estimate.grads)


def test_persistent_ml_draws_runs_and_pushes_back():
    energy, data = small_setup()

    def buffer():
        return ReplayBuffer(100, (2,), init_range=(-4.0, 4.0), reinit_prob=0.2, seed=3)

    used, twin, twin_sampler = buffer(), buffer(), sampler_for(energy)
    estimate = persistent_ml(energy, data, used, sampler_for(energy), n_steps=4)
    check_structure(estimate, energy, data)
    x0, slots = twin.sample(len(data))
    expected = twin_sampler.sample(x0, 4)
    twin.push(expected, slots)
    torch.testing.assert_close(estimate.negatives, expected, rtol=0, atol=0)
    for key, value in twin.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(used.state_dict()[key], value), key


def test_short_run_ml_starts_from_init_each_call():
    energy, data = small_setup()
    calls = []

    def init(n):
        calls.append(n)
        return torch.full((n, 2), -3.0 + len(calls))

    estimate = short_run_ml(energy, data, sampler_for(energy), init, n_steps=2)
    check_structure(estimate, energy, data)
    torch.testing.assert_close(estimate.negatives,
                               sampler_for(energy).sample(torch.full((32, 2), -2.0), 2),
                               rtol=0, atol=0)
    short_run_ml(energy, data, sampler_for(energy), init)
    assert calls == [32, 32]


def test_frozen_parameters_are_left_out_in_the_same_order_everywhere():
    """The study compares estimator and exact gradients tensor by tensor after flattening: both
    must list the same (trainable) parameters in the same order."""
    energy, data = small_setup()
    energy[0].requires_grad_(False)
    trainable = [p for p in energy.parameters() if p.requires_grad]
    exact = exact2d.exact_ml_gradient(energy, data, 4.0, 20)
    estimate = contrastive_divergence(energy, data, 1, sampler_for(energy))
    assert len(exact) == len(estimate.grads) == len(trainable) == 4
    for p, g, g_exact in zip(trainable, estimate.grads, exact):
        assert g.shape == g_exact.shape == p.shape


def test_estimators_reject_bad_arguments():
    energy, data = small_setup()
    sampler = sampler_for(energy)
    with pytest.raises(ValueError, match="k must be >= 0"):
        contrastive_divergence(energy, data, -1, sampler)
    with pytest.raises(TypeError, match="k must be an int"):
        contrastive_divergence(energy, data, 1.0, sampler)
    with pytest.raises(TypeError, match="sampler must be"):
        contrastive_divergence(energy, data, 1, "langevin")
    with pytest.raises(TypeError, match="buffer must be"):
        persistent_ml(energy, data, torch.zeros(10, 2), sampler)
    with pytest.raises(ValueError, match="init\\(batch_size\\) must return"):
        short_run_ml(energy, data, sampler, lambda n: torch.zeros(n, 3))
    with pytest.raises(TypeError, match="data_batch must be"):
        short_run_ml(energy, [0.0, 1.0], sampler, lambda n: torch.zeros(n, 2))


def test_persistent_ml_with_a_long_budget_approaches_the_exact_gradient():
    model = Gaussian([0.0, 0.0], 1.0, dtype=torch.float32)
    data = 0.5 * torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor(
        [1.0, -0.5])
    buffer = ReplayBuffer(512, (2,), init_range=(-3.0, 3.0), reinit_prob=0.0, seed=1)
    sampler = LangevinSampler(model, step_size=0.05, n_steps=200, seed=2)
    for _ in range(2):  # warm the persistent chains
        persistent_ml(model, data, buffer, sampler)
    estimate = persistent_ml(model, data, buffer, sampler)
    assert cosine(estimate.grads, gaussian_ml_gradient(model, data.double())) > 0.9
    # CD-1 from the data barely moves: its model term is the data term, nearly cancelling.
    cd1 = contrastive_divergence(model, data, 1, sampler)
    assert sum(float(g.norm() ** 2) for g in cd1.grads) < 0.1 * sum(
        float(g.norm() ** 2) for g in estimate.grads)
