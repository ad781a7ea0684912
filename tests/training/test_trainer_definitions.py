"""The Trainer's update rules held to their definitions, computed by hand beside it.

* EMA: ``ema_1 = theta_1`` (the first update copies, as torch's AveragedModel does), then
  ``ema_t = decay * ema_{t-1} + (1 - decay) * theta_t`` after each optimiser step; a skipped
  step moves nothing.
* Gradient clipping: the total L2 norm over all parameter gradients, ``g * min(1, c / |g|_2)``;
  the logged ``grad_norm`` is the norm before clipping.
* The non-finite policy: a NaN or infinite parameter gradient under a finite loss skips the step
  (weights, optimiser state, EMA untouched, counted) or raises.

The loss is CD-0 with the energy-magnitude regulariser, alpha * (mean E(x+)^2 + mean E(x-)^2):
no sampling, a deterministic non-zero gradient. The raw gradient is read by hooks that run as
backward accumulates it, before the Trainer touches it; the step the optimiser took is read
from the weights (SGD, lr 1, no momentum: theta_new = theta_old - g_used).
"""

import math

import pytest
import torch
from torch import nn

from ebm_fast import LangevinSampler
from ebm_fast.training import ContrastiveDivergence, Trainer, TrainingWarning


def small_energy(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))


def make_trainer(energy, *, lr=1.0, optimizer=None, **kw):
    sampler = LangevinSampler(energy, step_size=0.01, noise_scale=0.0, seed=0)
    optimizer = optimizer or torch.optim.SGD(energy.parameters(), lr=lr)
    kw = {"progress": False, "log_every": 1, "data_seed": 0, **kw}
    return Trainer(energy, ContrastiveDivergence(sampler, k=0, alpha=0.5), optimizer, **kw)


def batch(seed=1, n=16):
    return 2 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def record_raw_gradients(energy):
    """A list that each backward fills with the parameters' gradients as accumulated."""
    raw = {}
    for i, p in enumerate(energy.parameters()):
        p.register_post_accumulate_grad_hook(lambda p, i=i: raw.__setitem__(i, p.grad.clone()))
    return raw


# -- EMA -----------------------------------------------------------------------------------
def test_ema_is_the_exponential_average_of_the_weights_after_each_step():
    decay = 0.8  # not 0.5: decay and 1 - decay must not read the same
    energy = small_energy()
    trainer = make_trainer(energy, lr=0.2, ema=decay)
    expected = None
    for i in range(4):
        trainer.step(batch(seed=10 + i))
        theta = snapshot(energy)
        expected = (
            theta
            if expected is None
            else [decay * e + (1 - decay) * t for e, t in zip(expected, theta)]
        )
        for got, want in zip(trainer.ema_model.module.parameters(), expected):
            torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
    # The average differs from the weights (the test would pass trivially otherwise).
    assert any((a - b).abs().max() > 1e-3 for a, b in zip(expected, snapshot(energy)))


def test_ema_skips_a_skipped_step():
    energy = Switchable()
    trainer = make_trainer(energy, lr=0.2, ema=0.8)
    for i in range(2):
        trainer.step(batch(seed=20 + i))
    ema_before = snapshot(trainer.ema_model.module)
    energy.nan_grad = True
    with pytest.warns(TrainingWarning, match="non-finite"):
        trainer.step(batch(seed=30))
    assert trainer.nonfinite_skipped == 1
    for got, want in zip(trainer.ema_model.module.parameters(), ema_before):
        assert torch.equal(got.detach(), want)


# -- gradient clipping ---------------------------------------------------------------------
@pytest.mark.parametrize("clip_factor", [0.3, 3.0], ids=["clipped", "under_the_bound"])
def test_clipping_scales_the_gradient_by_its_total_l2_norm(clip_factor):
    energy = small_energy(seed=3)
    raw = record_raw_gradients(energy)
    # Probe the raw gradient's norm once, then clip relative to it.
    probe = make_trainer(small_energy(seed=3))
    probe_raw = record_raw_gradients(probe.energy)
    probe.step(batch())
    g = [probe_raw[i] for i in range(len(probe_raw))]
    l2 = math.sqrt(sum(float((t.double() ** 2).sum()) for t in g))
    l1 = sum(float(t.double().abs().sum()) for t in g)
    linf = max(float(t.abs().max()) for t in g)
    assert len({round(l2, 6), round(l1, 6), round(linf, 6)}) == 3  # the norms tell apart
    clip = clip_factor * l2

    trainer = make_trainer(energy, grad_clip=clip)
    before = snapshot(energy)
    trainer.step(batch())
    gradient = [raw[i] for i in range(len(raw))]
    for a, b in zip(gradient, g):
        assert torch.equal(a, b)
    scale = min(1.0, clip / l2)
    for old, new, grad in zip(before, energy.parameters(), gradient):
        torch.testing.assert_close(old - new.detach(), scale * grad, rtol=1e-5, atol=1e-7)
    # The logged norm is the L2 norm before clipping.
    assert trainer.history[-1]["grad_norm"] == pytest.approx(l2, rel=1e-5)


def test_without_a_clip_the_gradient_is_applied_as_is_and_its_l2_norm_logged():
    energy = small_energy(seed=4)
    raw = record_raw_gradients(energy)
    trainer = make_trainer(energy)
    before = snapshot(energy)
    trainer.step(batch())
    gradient = [raw[i] for i in range(len(raw))]
    for old, new, grad in zip(before, energy.parameters(), gradient):
        torch.testing.assert_close(old - new.detach(), grad, rtol=1e-6, atol=1e-7)
    l2 = math.sqrt(sum(float((t.double() ** 2).sum()) for t in gradient))
    assert trainer.history[-1]["grad_norm"] == pytest.approx(l2, rel=1e-5)


# -- a non-finite gradient under a finite loss ----------------------------------------------
class Switchable(nn.Module):
    """A small MLP energy with one more parameter s. With ``nan_grad`` set the energy gains
    0 * sqrt(s - s), which is 0, while its derivative in s is 0 * inf = NaN; with ``inf_grad``
    it gains sqrt(min(s, 1) - 1) at s = 1, which is 0, while its derivative is +inf."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(5)
        self.net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        self.s = nn.Parameter(torch.tensor(1.0))
        self.nan_grad = False
        self.inf_grad = False

    def forward(self, x):
        out = self.net(x)
        if self.nan_grad:
            out = out + 0 * torch.sqrt(self.s - self.s)
        if self.inf_grad:
            # d/ds sqrt(s - 1) at s = 1 is +inf; the value adds 0.
            out = out + torch.sqrt(self.s.clamp(max=1.0) - 1.0)
        return out


@pytest.mark.parametrize("kind", ["nan", "inf"])
@pytest.mark.parametrize("grad_clip", [None, 1.0], ids=["no_clip", "clip"])
def test_a_nonfinite_gradient_with_a_finite_loss_skips_the_whole_step(kind, grad_clip):
    energy = Switchable()
    optimizer = torch.optim.Adam(energy.parameters(), lr=0.1)
    trainer = make_trainer(energy, optimizer=optimizer, ema=0.9, grad_clip=grad_clip)
    trainer.step(batch(seed=40))  # a finite step: the optimiser and the EMA have state
    weights = snapshot(energy)
    ema = snapshot(trainer.ema_model.module)
    adam_steps = [float(s["step"]) for s in optimizer.state.values()]
    setattr(energy, f"{kind}_grad", True)
    raw = record_raw_gradients(energy)
    with pytest.warns(TrainingWarning, match="non-finite"):
        trainer.step(batch(seed=41))
    # The premise: the loss was finite, a gradient was not.
    assert math.isfinite(trainer.history[-1]["loss"])
    assert not all(bool(torch.isfinite(g).all()) for g in raw.values())
    assert trainer.nonfinite_skipped == 1
    assert trainer.history[-1]["nonfinite_skipped"] == 1
    for got, want in zip(energy.parameters(), weights):
        assert torch.equal(got.detach(), want)
    for got, want in zip(trainer.ema_model.module.parameters(), ema):
        assert torch.equal(got.detach(), want)
    assert [float(s["step"]) for s in optimizer.state.values()] == adam_steps
    assert all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in energy.parameters())

    trainer.on_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="not finite"):
        trainer.step(batch(seed=42))
    for got, want in zip(energy.parameters(), weights):
        assert torch.equal(got.detach(), want)
