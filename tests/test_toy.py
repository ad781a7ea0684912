"""Exact 2-D tools against first principles, the estimators' definitions, and the study."""

import json
import math

import pytest
import torch
from torch import nn

from ebm_fast import LangevinSampler, ReplayBuffer, cli, toy
from ebm_fast.estimators import contrastive_divergence, persistent_ml, short_run_ml


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
    points, area = toy.grid(1.0, 4)
    assert points.shape == (16, 2) and area == pytest.approx(0.25)
    assert torch.equal(points[:4, 1], torch.tensor([-0.75, -0.25, 0.25, 0.75]))
    assert float(points.sum()) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("s", [0.7, 1.1])
def test_log_partition_of_a_gaussian(s):
    model = Gaussian([0.3, -0.2], s)
    assert float(toy.log_partition(model, 4.0, 200).detach()) == pytest.approx(
        math.log(2 * math.pi * s * s), abs=GRID_TOL)


def test_exact_expectation_of_a_gaussian():
    model = Gaussian([0.3, -0.2], 0.7)
    mean = toy.exact_expectation(model, lambda x: x, 4.0, 200)
    torch.testing.assert_close(mean, model.mu.detach(), atol=GRID_TOL, rtol=0)
    second = toy.exact_expectation(model, lambda x: ((x - model.mu.detach()) ** 2).sum(1), 4.0, 200)
    assert float(second) == pytest.approx(2 * 0.49, rel=GRID_TOL)


def test_exact_ml_gradient_of_a_gaussian_matches_the_closed_form():
    model = Gaussian([0.3, -0.2], 0.7)
    data = 0.5 * torch.randn(500, 2, generator=torch.Generator().manual_seed(0),
                             dtype=torch.float64) + torch.tensor([1.0, -0.5], dtype=torch.float64)
    got = toy.exact_ml_gradient(model, data, 4.0, 200)
    for g, expected in zip(got, gaussian_ml_gradient(model, data)):
        torch.testing.assert_close(g, expected, atol=5 * GRID_TOL, rtol=GRID_TOL)


def test_exact_nll_of_a_gaussian():
    model = Gaussian([0.3, -0.2], 0.7)
    data = torch.randn(1000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = float(model(data).detach().mean()) + math.log(2 * math.pi * 0.49)
    assert toy.exact_nll(model, data) == pytest.approx(expected, abs=GRID_TOL)


def test_grid_tools_reject_bad_input():
    with pytest.raises(ValueError, match="energy must return one value per point"):
        toy.log_partition(lambda x: x, 4.0, 10)  # (N, 2): two "energies" per point
    with pytest.raises(ValueError, match="cells must be"):
        toy.grid(4.0, 1)
    with pytest.raises(ValueError, match="box must be"):
        toy.grid(-1.0, 10)
    with pytest.raises(ValueError, match="n must be"):
        toy.exact_samples(Gaussian([0.0, 0.0], 1.0), 0, seed=0, step=0, cells=10)


def test_make_energy_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = toy.make_energy(4, hidden=8), toy.make_energy(4, hidden=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, toy.make_energy(5, hidden=8)[0].weight)


def test_similarity_flattens_every_parameter_in_order():
    """g = (1, 2 | 2), g* = (1, 2 | 0): cosine 5 / (3 sqrt 5), relative error 2 / sqrt 5."""
    estimate = [torch.tensor([1.0, 2.0]), torch.tensor([[2.0]])]
    exact = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    cos, rel = toy._similarity(estimate, exact)
    assert cos == pytest.approx(5 / (3 * math.sqrt(5)), rel=1e-12)
    assert rel == pytest.approx(2 / math.sqrt(5), rel=1e-12)
    assert toy._similarity(exact, exact) == pytest.approx((1.0, 0.0))
    assert toy._similarity(estimate[::-1], exact)[0] != pytest.approx(cos)


def test_exact_ml_gradient_is_the_derivative_of_the_exact_nll():
    """Central differences of the grid NLL of a tiny float64 MLP, every parameter."""
    energy = toy.make_energy(3, hidden=6).double()
    data = toy.ring_of_gaussians(64, torch.Generator().manual_seed(1)).double()
    box, cells, eps = 4.0, 30, 1e-6
    grads = toy.exact_ml_gradient(energy, data, box, cells)
    for param, grad in zip(energy.parameters(), grads):
        flat, numeric = param.data.view(-1), torch.empty(param.numel(), dtype=torch.float64)
        for i in range(flat.numel()):
            old = float(flat[i])
            flat[i] = old + eps
            up = toy.exact_nll(energy, data, box, cells)
            flat[i] = old - eps
            down = toy.exact_nll(energy, data, box, cells)
            flat[i] = old
            numeric[i] = (up - down) / (2 * eps)
        torch.testing.assert_close(grad.reshape(-1), numeric, atol=1e-6, rtol=1e-5)


def test_exact_samples_follow_the_grid_density():
    model = Gaussian([0.3, -0.2], 0.7, dtype=torch.float32)
    x = toy.exact_samples(model, 20000, seed=5, step=0, cells=200)
    sem = 0.7 / math.sqrt(20000)
    torch.testing.assert_close(x.mean(0), model.mu.detach(), atol=5 * sem, rtol=0)
    assert float(x.var(0).mean()) == pytest.approx(0.49, rel=0.05)
    assert not torch.equal(x, toy.exact_samples(model, 20000, seed=5, step=1, cells=200))


# ----------------------------------------------------------------------------- estimators


def small_setup():
    energy = toy.make_energy(0, hidden=16)
    data = toy.ring_of_gaussians(32, torch.Generator().manual_seed(0))
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
    exact = toy.exact_ml_gradient(energy, data, 4.0, 20)
    estimate = contrastive_divergence(energy, data, 1, sampler_for(energy))
    assert len(exact) == len(estimate.grads) == len(trainable) == 4
    for p, g, g_exact in zip(trainable, estimate.grads, exact):
        assert g.shape == g_exact.shape == p.shape


def test_estimators_reject_bad_arguments():
    energy, data = small_setup()
    sampler = sampler_for(energy)
    with pytest.raises(ValueError, match="k must be"):
        contrastive_divergence(energy, data, -1, sampler)
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


# ----------------------------------------------------------------------------- the study


TINY = dict(steps=(2,), repetitions=2, batch=64, train_iterations=5, hidden=8,
            warmup_iterations=2, buffer_size=128, cells=40, train_cells=20)


def test_study_reports_finite_numbers_and_is_deterministic():
    result = toy.estimator_study(**TINY)
    again = toy.estimator_study(**TINY)

    def numbers(res):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in res["rows"]]

    assert numbers(again) == numbers(result)  # docs/estimators.md's table is reproducible
    names = [(row["estimator"], row["steps"]) for row in result["rows"]]
    assert names == [("exact samples", "-"), ("CD", 2), ("short-run ML", 2), ("persistent ML", 2)]
    for row in result["rows"]:
        cos, rel = row["cosine"], row["rel_error"]
        assert -1 - 1e-9 <= cos["mean"] <= 1 + 1e-9 and cos["std"] >= 0
        assert math.isfinite(rel["mean"]) and rel["mean"] >= 0 and math.isfinite(rel["std"])
    assert math.isfinite(result["model"]["train_nll"])


def test_study_rejects_bad_settings():
    with pytest.raises(ValueError, match="steps must be"):
        toy.estimator_study(**{**TINY, "steps": (0,)})
    with pytest.raises(ValueError, match="repetitions must be"):
        toy.estimator_study(**{**TINY, "repetitions": 0})
    with pytest.raises(ValueError, match="batch must be"):
        toy.estimator_study(**{**TINY, "batch": 0})
    with pytest.raises(ValueError, match="train_cells must be"):
        toy.estimator_study(**{**TINY, "train_cells": 1})


def test_study_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "study.json"
    assert cli.main(["study", "--steps", "1", "--repetitions", "2", "--batch", "32",
                     "--train-iterations", "3", "--hidden", "8", "--warmup-iterations", "1",
                     "--buffer-size", "64", "--cells", "30", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training: 3 Adam steps" in printed and "persistent ML" in printed
    assert "cosine (mean ± std)" in printed
    assert len(json.loads(out.read_text())["rows"]) == 4
