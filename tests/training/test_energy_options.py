"""Every energy option works in the losses as in the samplers, by construction: each loss's
energies are the sampler's (``Sampler.energies``), checked here against each option's definition
computed by hand, for every loss. Fails when a loss evaluates the energy its own way (the sign
error of a loss that ignored ``negate``)."""

import pytest
import torch

from ebm_fast import LangevinSampler, ReplayBuffer
from ebm_fast.training import (
    JEM,
    ContrastiveDivergence,
    KLPersistentML,
    LogitsEnergy,
    PersistentCD,
    PersistentML,
    ShortRunML,
)

DIM = 3


class Net(torch.nn.Module):
    """f(x): a small MLP with a (B, 1) output, or (B,) / () with squeeze (ebm-anatomy's nets)."""

    def __init__(self, outputs: int = 1, squeeze: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(DIM, 16), torch.nn.SiLU(), torch.nn.Linear(16, outputs)
        )
        self.squeeze = squeeze

    def forward(self, x):
        out = self.body(x)
        return out.squeeze() if self.squeeze else out


class NegLogSumExp(torch.nn.Module):
    """A JEM model's forward: logsumexp of the logits, i.e. -E (sampled with negate=True)."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x):
        return self.classifier(x).logsumexp(1)


# option -> (sampler keyword arguments, energy the sampler is given (from f), batch size,
# E(x) by the option's definition, in float32)
def plain(f):
    return {}, f, 5, lambda x: f(x).reshape(-1)


def negate(f):
    return {"negate": True}, lambda_module(lambda x: -f(x), f), 5, lambda x: f(x).reshape(-1)


def autocast(f):
    def by_hand(x):
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            value = f(x)
        return value.float().reshape(-1)

    return {"autocast": torch.bfloat16}, f, 5, by_hand


def scalar_output(f):
    g = Net(squeeze=True)
    g.load_state_dict(f.state_dict())
    return {}, g, 1, lambda x: g(x).reshape(-1)


def eval_mode(f):
    # The loss's passes run in the module's own mode (eval_mode is the chains' option): with a
    # dropout layer in train mode the loss's energies are the train-mode ones.
    return {"eval_mode": True}, f, 5, lambda x: f(x).reshape(-1)


class Bound(torch.nn.Module):
    """A Module whose forward is a function of another module's parameters."""

    def __init__(self, function, owner):
        super().__init__()
        self.owner, self.function = owner, function

    def forward(self, x):
        return self.function(x)


def lambda_module(function, owner):
    return Bound(function, owner)


OPTIONS = [plain, negate, autocast, scalar_output, eval_mode]


def sampler_for(energy, **options):
    return LangevinSampler(energy, step_size=0.01, noise_scale=0.05, n_steps=2, seed=3, **options)


def losses(sampler):
    buffer = ReplayBuffer(32, (DIM,), seed=4)
    return {
        "cd": ContrastiveDivergence(sampler, k=2, alpha=0.1),
        "pcd": PersistentCD(sampler, alpha=0.1),
        "persistent_ml": PersistentML(sampler, buffer, alpha=0.1),
        "short_run": ShortRunML(sampler, lambda b: torch.rand(b, DIM), alpha=0.1),
        "kl": KLPersistentML(sampler, buffer, alpha=0.1, kl_chains=4, entropy_weight=0.0),
    }


@pytest.mark.parametrize("loss_name", ["cd", "pcd", "persistent_ml", "short_run", "kl"])
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.__name__)
def test_each_loss_uses_the_energy_as_each_option_defines_it(option, loss_name):
    f = Net()
    kwargs, energy, batch, by_hand = option(f)
    sampler = sampler_for(energy, **kwargs)
    loss = losses(sampler)[loss_name]
    x_pos = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(1))
    value = loss(x_pos)
    x_neg = loss.last.negatives
    e_pos, e_neg = by_hand(x_pos), by_hand(x_neg)
    expected = e_pos.mean() - e_neg.mean() + 0.1 * ((e_pos**2).mean() + (e_neg**2).mean())
    if loss_name == "kl":
        expected = expected + loss.last.kl
    torch.testing.assert_close(loss.last.energy_pos, e_pos.mean().detach())
    torch.testing.assert_close(value, expected)
    # The parameter gradient is the one of the loss written by hand.
    params = list(energy.parameters())
    got = torch.autograd.grad(
        value, params, allow_unused=True, materialize_grads=True, retain_graph=True
    )
    if loss_name != "kl":  # the KL term's gradient is pinned in test_losses.py
        want = torch.autograd.grad(expected, params, allow_unused=True, materialize_grads=True)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: o.__name__)
def test_differentiable_step_is_the_samplers_step_under_each_option(option):
    """The KL term's last step is the chains' own step, whatever the energy option."""
    f = Net()
    kwargs, energy, batch, _ = option(f)
    sampler = sampler_for(energy, clamp=(-1.0, 1.0), **kwargs)
    x = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(2))
    step = sampler.step
    x_graph = sampler.differentiable_step(x, step)
    assert x_graph.requires_grad
    # A create_graph backward may decompose an activation's derivative into other ops: equal
    # to float32 rounding, and to bfloat16 rounding of eps * grad under autocast.
    atol = 1e-4 if "autocast" in kwargs else 1e-6
    torch.testing.assert_close(x_graph.detach(), sampler.sample(x, 1), rtol=0, atol=atol)


@pytest.mark.parametrize("option", [plain, autocast, eval_mode], ids=lambda o: o.__name__)
def test_jem_energies_follow_the_samplers_options(option):
    classifier = Net(outputs=4)
    kwargs, _, batch, _ = option(classifier)
    sampler = sampler_for(LogitsEnergy(classifier), **kwargs)
    loss = JEM(classifier, sampler, ReplayBuffer(32, (DIM,), seed=4), p_y_given_x_weight=0.0)
    x_pos = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(1))
    value = loss(x_pos)

    def by_hand(x):
        with torch.autocast(
            "cpu", dtype=torch.bfloat16, cache_enabled=False, enabled="autocast" in kwargs
        ):
            logits = classifier(x)
        return -logits.float().logsumexp(1)

    expected = by_hand(x_pos).mean() - by_hand(loss.last.negatives).mean()
    torch.testing.assert_close(value, expected)


def test_jem_model_with_negate_samples_its_energy():
    """A JEM model returning logsumexp (= -E) sampled with negate=True gives the chains of
    LogitsEnergy, whose energy is -logsumexp."""
    classifier = Net(outputs=4)
    x = torch.randn(5, DIM, generator=torch.Generator().manual_seed(1))
    by_negate = sampler_for(NegLogSumExp(classifier), negate=True)
    by_logits = sampler_for(LogitsEnergy(classifier))
    torch.testing.assert_close(by_negate.energies(x), by_logits.energies(x))
    torch.testing.assert_close(by_negate.sample(x), by_logits.sample(x))


def test_eval_mode_is_the_chains_option_the_loss_passes_run_in_the_modules_mode():
    f = torch.nn.Sequential(torch.nn.Linear(DIM, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 1))
    sampler = sampler_for(f, eval_mode=True)
    x = torch.randn(64, DIM)
    # Train mode: dropout draws a mask, two passes differ; the chains ran in eval mode (same
    # samples for the same seed whatever torch's generator does).
    assert not torch.equal(sampler.energies(x), sampler.energies(x))
    assert f.training
