"""KLPersistentML's whole loss call held to its definition (Du et al. 2021), recomputed in pure
torch beside it:

    loss = mean E(x+) - mean E(x-) + kl_weight * L_KL - entropy_weight * H

* x- are the K-step chains from the buffer draw; the last step is x_K = x_{K-1} - eps
  grad_x E(x_{K-1}) + sigma xi_K.
* L_KL = mean over the first kl_chains chains of E_theta_bar(x_kl), x_kl that same last step
  (same x_{K-1}, same noise xi_K: the chains' own last step, so x_kl == x_K in value) with
  grad_x E kept in the graph, and the energy E_theta_bar with its parameters frozen: the gradient
  reaches theta only through x_kl, i.e. through -eps d/dtheta grad_x E_theta(x_{K-1}).
* H = mean_i log min_j |x_kl,i - b_j|, b the entropy_samples buffer draws taken after the
  chains' draw and before the chains go back into the buffer: a chain's new state is never its
  own neighbour, nor is any other chain of the batch.

The test draws the chains' starts and the references from a twin of the buffer (its public
sample(), same state), runs the first K - 1 steps and the last one on a twin of the sampler,
and takes the last step's noise as what the twin's step added beyond the drift (x_K - drift).
Everything else (the drift, the gradients, the nearest neighbours) is plain torch autograd.
Each loss is checked on its second call too, where the step counter no longer starts at 0.
"""

import copy

import pytest
import torch
from torch import nn

from ebm_fast import LangevinSampler, ReplayBuffer
from ebm_fast.training import KLPersistentML

DTYPE = torch.float64
EPS, SIGMA = 0.05, 0.1
BATCH, KL_CHAINS, REFERENCES = 64, 24, 200
KL_WEIGHT, ENTROPY_WEIGHT = 0.7, 0.45  # neither 1 nor each other: sign and weight both show


def make_energy():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1)
    ).to(DTYPE)


def make_sampler(energy, k):
    return LangevinSampler(energy, step_size=EPS, noise_scale=SIGMA, n_steps=k, seed=11)


def make_buffer(capacity=1024, filled=1024):
    buffer = ReplayBuffer(capacity, (2,), dtype=DTYPE, init_range=(-2, 2), reinit_prob=0.0, seed=12)
    if filled:  # written slots: the entropy term starts above 1000 of them
        buffer.push(
            3 * torch.rand(filled, 2, generator=torch.Generator().manual_seed(13), dtype=DTYPE)
            - 1.5
        )
    return buffer


def twin(obj, make):
    copy_ = make()
    copy_.load_state_dict(obj.state_dict())
    return copy_


def energy_values(net, x):
    return net(x).reshape(-1)


def expected_loss(energy, x_pos, x_prev, x_k, references):
    """The definition, in pure torch, as a function of the energy's parameters."""
    frozen = copy.deepcopy(energy).requires_grad_(False)
    ml = energy_values(energy, x_pos).mean() - energy_values(energy, x_k).mean()
    x = x_prev[:KL_CHAINS].clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(energy_values(energy, x).sum(), x, create_graph=True)
    drift = x.detach() - EPS * grad_x
    x_kl = drift + (x_k[:KL_CHAINS] - drift).detach()  # plus the chain's own noise sigma xi_K
    kl = energy_values(frozen, x_kl).mean()
    loss = ml + KL_WEIGHT * kl
    entropy = None
    if references is not None:
        distances = ((x_kl[:, None, :] - references[None, :, :]) ** 2).sum(-1).sqrt()
        entropy = distances.amin(1).log().mean()
        loss = loss - ENTROPY_WEIGHT * entropy
    return loss, kl, entropy


def check_one_call(loss_fn, energy, sampler, buffer, k, x_pos, expect_entropy=True):
    twin_buffer = twin(buffer, make_buffer)
    twin_sampler = twin(sampler, lambda: make_sampler(energy, k))
    x0, _ = twin_buffer.sample(BATCH)
    references = twin_buffer.sample(REFERENCES)[0] if expect_entropy else None
    x_prev = x0 if k == 1 else twin_sampler.sample(x0, k - 1)
    x_k = twin_sampler.sample(x_prev, 1)

    params = list(energy.parameters())
    loss = loss_fn(x_pos)
    got = torch.autograd.grad(loss, params)
    # The premise: the chains are the K-step chains from the buffer draw.
    torch.testing.assert_close(loss_fn.last.negatives, x_k, rtol=0, atol=1e-12)

    want_loss, want_kl, want_entropy = expected_loss(energy, x_pos, x_prev, x_k, references)
    want = torch.autograd.grad(want_loss, params)
    torch.testing.assert_close(loss_fn.last.kl, want_kl.detach(), rtol=1e-10, atol=1e-12)
    if expect_entropy:
        torch.testing.assert_close(
            loss_fn.last.entropy, want_entropy.detach(), rtol=1e-10, atol=1e-12
        )
    else:
        assert loss_fn.last.entropy is None
    torch.testing.assert_close(loss.detach(), want_loss.detach(), rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k", [1, 3])
def test_the_whole_loss_and_its_gradient_follow_the_definition(k):
    energy = make_energy()
    sampler, buffer = make_sampler(energy, k), make_buffer()
    loss_fn = KLPersistentML(
        sampler,
        buffer,
        kl_weight=KL_WEIGHT,
        entropy_weight=ENTROPY_WEIGHT,
        kl_chains=KL_CHAINS,
        entropy_samples=REFERENCES,
    )
    x_pos = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(14), dtype=DTYPE)
    for _ in range(2):  # the second call's last step is at step counter 2K - 1, not K - 1
        check_one_call(loss_fn, energy, sampler, buffer, k, x_pos)
    assert sampler.step == 2 * k


def test_the_kl_and_entropy_terms_carry_gradient():
    """The premise of the test above: with the ML part removed (x+ = x-), what is left is the
    KL and entropy terms' gradient, and it is not negligible next to the tolerances."""
    energy = make_energy()
    references = 3 * torch.rand(REFERENCES, 2, dtype=DTYPE) - 1.5
    x_prev = torch.randn(BATCH, 2, dtype=DTYPE)
    x_k = x_prev + 0.1 * torch.randn(BATCH, 2, dtype=DTYPE)
    params = list(energy.parameters())
    for refs in (None, references):
        loss, _, _ = expected_loss(energy, x_k, x_prev, x_k, refs)
        norm = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)]).norm()
        assert norm > 1e-3


def test_below_the_fill_threshold_there_is_no_entropy_term():
    """The entropy term starts once more than 1000 slots are written: at exactly 1000 the loss
    is the ML part plus the KL term."""
    energy = make_energy()
    sampler, buffer = make_sampler(energy, 2), make_buffer(capacity=1000, filled=1000)
    loss_fn = KLPersistentML(
        sampler,
        buffer,
        kl_weight=KL_WEIGHT,
        entropy_weight=ENTROPY_WEIGHT,
        kl_chains=KL_CHAINS,
        entropy_samples=REFERENCES,
    )
    x_pos = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(15), dtype=DTYPE)

    twin_buffer = twin(buffer, lambda: make_buffer(capacity=1000, filled=0))
    twin_sampler = twin(sampler, lambda: make_sampler(energy, 2))
    x0, _ = twin_buffer.sample(BATCH)
    x_prev = twin_sampler.sample(x0, 1)
    x_k = twin_sampler.sample(x_prev, 1)
    params = list(energy.parameters())
    loss = loss_fn(x_pos)
    assert loss_fn.last.entropy is None
    want_loss, _, _ = expected_loss(energy, x_pos, x_prev, x_k, None)
    for g, w in zip(torch.autograd.grad(loss, params), torch.autograd.grad(want_loss, params)):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
