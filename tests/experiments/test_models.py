"""The experiments layer's models and plain loop (the study's tests are in
tests/experiments/test_study.py, the demo's in tests/experiments/test_readme_and_demo.py)."""

import pytest
import torch

from ebm_fast.datasets import ring_of_gaussians
from ebm_fast.exact2d import exact_nll
from ebm_fast.experiments.models import make_energy, train_exact_ml
from ebm_fast.experiments.plain_loop import PlainLoop


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


def test_plain_loop_iteration_against_first_principles():
    """E(x) = w |x|^2 / 2, one noise-free step of size eps: every negative is (1 - eps w) times a
    buffer sample (clamped), written back to its slot; then Adam's first step moves w by -lr *
    sign of dL/dw, with dL/dw = (mean |x+|^2 - mean |x-|^2) / 2 at alpha 0."""

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return 0.5 * self.w * (x**2).sum(-1)

    energy = Quadratic()
    loop = PlainLoop(
        energy,
        (2,),
        steps=1,
        step_size=0.1,
        noise_scale=0.0,
        clamp=(-1.0, 1.0),
        buffer_size=50,
        reinit_prob=0.0,
        lr=0.01,
        alpha=0.0,
    )
    before = loop.storage.clone()
    x_pos = torch.full((8, 2), 0.1)
    x_neg = loop(x_pos)
    moved = 0.8 * before  # 1 - 0.1 * 2
    # each negative is one of the moved buffer samples, and the buffer holds it now
    match = (x_neg[:, None, :] - moved[None]).abs().amax(-1) < 1e-6
    assert match.any(1).all()
    assert all(torch.equal(loop.storage[match[i].nonzero()[0, 0]], x_neg[i]) for i in range(8))
    grad_w = 0.5 * ((x_pos**2).sum(-1).mean() - (x_neg**2).sum(-1).mean())
    assert energy.w.detach().item() == pytest.approx(2.0 - 0.01 * torch.sign(grad_w).item())
