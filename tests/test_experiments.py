"""The experiments layer's models (the study's tests are in test_study.py)."""

import torch

from ebm_fast.datasets import ring_of_gaussians
from ebm_fast.exact2d import exact_nll
from ebm_fast.experiments.models import make_energy, train_exact_ml


def test_make_energy_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = make_energy(4, hidden=8), make_energy(4, hidden=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, make_energy(5, hidden=8)[0].weight)


def test_exact_ml_training_lowers_the_exact_nll():
    data = ring_of_gaussians(500, torch.Generator().manual_seed(0))
    energy = make_energy(1, hidden=8)
    before = exact_nll(energy, data, cells=40)
    train_exact_ml(energy, data, 20, lr=1e-2, cells=20)
    assert exact_nll(energy, data, cells=40) < before - 0.1
