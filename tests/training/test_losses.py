"""The training losses against first principles: CD's chains, CD-0, the MLE of a Gaussian, the
KL term's parameter gradient (pure-torch create_graph reference and finite differences),
per-class buffers, and clear errors for bad input."""

import pytest
import torch
from torch import nn

from ebm_fast import LangevinSampler, MALASampler, ReplayBuffer
from ebm_fast.reference.philox import philox_normal_ref
from ebm_fast.training import (
    ContrastiveDivergence,
    KLPersistentML,
    PersistentCD,
    PersistentML,
    ShortRunML,
    Trainer,
)
from tests.test_exact2d import Gaussian, cosine, gaussian_ml_gradient


def mlp(seed=0, dims=2, hidden=16, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dims, hidden), nn.SiLU(), nn.Linear(hidden, 1)).to(dtype)


def langevin(energy, **kw):
    return LangevinSampler(
        energy, **{"step_size": 0.01, "noise_scale": 0.1, "n_steps": 4, "seed": 3, **kw}
    )


def test_cd_chains_start_at_the_data_and_cd0_gradient_is_exactly_zero():
    energy = mlp()
    x = torch.randn(32, 2)
    loss = ContrastiveDivergence(langevin(energy, seed=7), k=3)
    value = loss(x)
    expected = langevin(mlp(), seed=7).sample(x, 3)  # same model, same noise: from the data
    assert torch.equal(loss.last.negatives, expected)
    assert all(p.grad is None for p in energy.parameters())  # sampling left no gradients
    value.backward()
    cd0 = ContrastiveDivergence(langevin(energy), k=0)  # alpha 0: the regulariser has a gradient
    energy.zero_grad()
    cd0(x).backward()
    assert all(torch.count_nonzero(p.grad) == 0 for p in energy.parameters())


def test_loss_is_ml_surrogate_plus_igebm_regulariser():
    energy = mlp()
    buffer = ReplayBuffer(64, (2,), seed=1)
    loss = PersistentML(langevin(energy), buffer, alpha=0.3)
    x = torch.randn(16, 2)
    value = loss(x)
    e_pos, e_neg = energy(x).squeeze(1), energy(loss.last.negatives).squeeze(1)
    expected = e_pos.mean() - e_neg.mean() + 0.3 * ((e_pos**2).mean() + (e_neg**2).mean())
    torch.testing.assert_close(value, expected)
    assert float(loss.last.energy_pos) == pytest.approx(float(e_pos.detach().mean()))


def test_gaussian_trained_with_exact_negatives_reaches_the_mle():
    """MALA started at exact draws of p_theta stays exact: the loss's gradient is the exact ML
    gradient in expectation, so training ends at the MLE (sample mean and RMS deviation)."""
    torch.manual_seed(0)
    data = torch.tensor([1.0, -0.5]) + 0.7 * torch.randn(4096, 2)
    energy = Gaussian([0.0, 0.0], 1.0, dtype=torch.float32)
    draws = torch.Generator().manual_seed(1)

    def exact(n):
        with torch.no_grad():
            return energy.mu + torch.exp(energy.log_s) * torch.randn(n, 2, generator=draws)

    sampler = MALASampler(energy, step_size=0.05, n_steps=1, seed=2)
    trainer = Trainer(
        energy,
        ShortRunML(sampler, exact),
        torch.optim.Adam(energy.parameters(), lr=0.05),
        progress=False,
        data_seed=0,
    )
    trainer.fit(data, 400, batch_size=1024)
    mle_mu = data.mean(0)
    mle_s = ((data - mle_mu) ** 2).sum(1).mean().div(2).sqrt()
    torch.testing.assert_close(energy.mu.detach(), mle_mu, atol=0.04, rtol=0)
    assert float(energy.log_s.detach().exp()) == pytest.approx(float(mle_s), abs=0.03)


def test_persistent_ml_draws_runs_and_pushes_back():
    energy = mlp()

    def buffer():
        return ReplayBuffer(100, (2,), init_range=(-4.0, 4.0), reinit_prob=0.2, seed=3)

    used, twin = buffer(), buffer()
    loss = PersistentML(langevin(energy, seed=7), used)
    x = torch.randn(32, 2)
    loss(x)
    x0, slots = twin.sample(32)
    expected = langevin(mlp(), seed=7).sample(x0)
    twin.push(expected, slots)
    assert torch.equal(loss.last.negatives, expected)
    for key, value in twin.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(used.state_dict()[key], value), key


def test_chain_statistics_when_tracking():
    energy = mlp()
    loss = PersistentML(langevin(energy), ReplayBuffer(64, (2,), reinit_prob=1.0, seed=1))
    x = torch.randn(16, 2)
    loss(x)
    assert loss.last.reinit_fraction is None and loss.last.chain_grad_norm is None
    loss.track_chains = True
    loss(x)
    assert float(loss.last.reinit_fraction) == 1.0
    assert float(loss.last.chain_grad_norm) > 0 and float(loss.last.chain_displacement) > 0


def test_persistent_ml_with_a_long_budget_approaches_the_exact_gradient():
    model = Gaussian([0.0, 0.0], 1.0, dtype=torch.float32)
    data = 0.5 * torch.randn(512, 2, generator=torch.Generator().manual_seed(0)) + torch.tensor(
        [1.0, -0.5]
    )
    buffer = ReplayBuffer(512, (2,), init_range=(-3.0, 3.0), reinit_prob=0.0, seed=1)
    loss = PersistentML(LangevinSampler(model, step_size=0.05, n_steps=200, seed=2), buffer)
    for _ in range(2):  # warm the persistent chains
        loss(data)
    grads = torch.autograd.grad(loss(data), list(model.parameters()))
    assert cosine(grads, gaussian_ml_gradient(model, data.double())) > 0.9
    # CD-1 from the data barely moves: its model term is the data term, nearly cancelling.
    cd1 = torch.autograd.grad(
        ContrastiveDivergence(loss.sampler, k=1)(data), list(model.parameters())
    )
    assert sum(float(g.norm() ** 2) for g in cd1) < 0.1 * sum(float(g.norm() ** 2) for g in grads)


def test_frozen_parameters_get_no_gradient():
    energy = mlp()
    energy[0].requires_grad_(False)
    loss = ContrastiveDivergence(langevin(energy), k=1)
    assert loss.parameters == [p for p in energy.parameters() if p.requires_grad]
    loss(torch.randn(8, 2)).backward()
    assert energy[0].weight.grad is None and energy[2].weight.grad is not None


def test_persistent_cd_continues_its_chains():
    energy = mlp()
    loss = PersistentCD(langevin(energy, seed=5))
    x = torch.randn(8, 2)
    loss(x)
    first = loss.last.negatives
    loss(torch.randn(8, 2))
    reference = langevin(mlp(), seed=5)
    torch.testing.assert_close(
        loss.last.negatives, reference.sample(reference.sample(x)), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="persistent chains"):
        loss(torch.randn(4, 2))
    assert first.shape == (8, 2)


def test_short_run_starts_from_init_every_call():
    energy = mlp()
    starts = iter([torch.zeros(8, 2), torch.ones(8, 2)])
    loss = ShortRunML(langevin(energy, seed=9), lambda n: next(starts))
    loss(torch.randn(8, 2))
    loss(torch.randn(8, 2))
    reference = langevin(mlp(), seed=9)
    reference.sample(torch.zeros(8, 2))
    torch.testing.assert_close(
        loss.last.negatives, reference.sample(torch.ones(8, 2)), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="init"):
        ShortRunML(langevin(energy), lambda n: torch.zeros(n, 3))(torch.randn(8, 2))


def test_persistent_ml_per_class_buffer_uses_labels():
    energy = mlp()
    buffer = ReplayBuffer(40, (2,), n_classes=4, seed=1)
    loss = PersistentML(langevin(energy), buffer)
    y = torch.tensor([2, 2, 3, 3, 2])
    loss(torch.randn(5, 2), y)
    written = buffer.state_dict()["written"].nonzero().flatten()
    assert set((written // 10).tolist()) <= {2, 3} and len(written) > 0
    with pytest.raises(ValueError, match="y"):
        loss(torch.randn(5, 2))
    with pytest.raises(ValueError, match="y"):
        loss(torch.randn(5, 2), torch.tensor([0, 1, 2, 3, 4]))
    with pytest.raises(ValueError, match="y was given"):
        PersistentML(langevin(energy), ReplayBuffer(8, (2,), seed=0))(
            torch.randn(2, 2), torch.tensor([0, 1])
        )


def test_bad_input_errors_name_the_problem():
    energy = mlp()
    with pytest.raises(ValueError, match="sample.*shape"):
        PersistentML(langevin(energy), ReplayBuffer(8, (3,), seed=0))(torch.randn(4, 2))
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ContrastiveDivergence(langevin(frozen), k=1)
    with pytest.raises(TypeError, match="sampler"):
        ContrastiveDivergence(energy, k=1)
    with pytest.raises(ValueError, match="k must be"):
        ContrastiveDivergence(langevin(energy), k=-1)
    with pytest.raises(TypeError, match="k must be an int"):
        ContrastiveDivergence(langevin(energy), k=1.0)
    with pytest.raises(TypeError, match="buffer must be"):
        PersistentML(langevin(energy), torch.zeros(10, 2))
    with pytest.raises(TypeError, match="energy must be a torch.nn.Module"):
        ContrastiveDivergence(langevin(lambda x: x.sum(1)), k=1)
    with pytest.raises(TypeError, match="alpha"):
        ContrastiveDivergence(langevin(energy), k=1, alpha=True)
    with pytest.raises(TypeError, match="x_pos"):
        ContrastiveDivergence(langevin(energy), k=1)([[0.0, 1.0]])
    with pytest.raises(TypeError, match="LangevinSampler"):
        KLPersistentML(MALASampler(energy, step_size=0.1, seed=0), ReplayBuffer(8, (2,), seed=0))


def test_state_dict_round_trip_continues_the_chains():
    energy = mlp()
    loss = PersistentML(langevin(energy), ReplayBuffer(32, (2,), seed=4))
    x = torch.randn(8, 2)
    loss(x)
    state = loss.state_dict()
    loss(x)
    after = loss.last.negatives
    other = PersistentML(langevin(energy), ReplayBuffer(32, (2,), seed=99))
    other.load_state_dict(state)
    other(x)
    assert torch.equal(other.last.negatives, after)
    with pytest.raises(ValueError, match="missing"):
        ContrastiveDivergence(langevin(energy), k=1).load_state_dict({})


# ----------------------------------------------------------------------------- KL term


def kl_setup(clamp=None, dtype=torch.float64):
    energy = mlp(seed=4, hidden=8, dtype=dtype)
    sampler = LangevinSampler(
        energy,
        step_size=0.05,
        noise_scale=0.2,
        n_steps=3,
        seed=11,
        chain_offset=5,
        clamp=clamp,
        backend="reference",
    )
    loss = KLPersistentML(
        sampler, ReplayBuffer(64, (2,), dtype=dtype, seed=2), kl_chains=6, entropy_weight=0.0
    )
    x_prev = torch.randn(10, 2, dtype=dtype, generator=torch.Generator().manual_seed(3))
    return energy, sampler, loss, x_prev


def test_differentiable_step_equals_the_samplers_step():
    energy, sampler, loss, x_prev = kl_setup(clamp=(-0.5, 0.5))
    x_kl = sampler.differentiable_step(x_prev, sampler.step, chains=6)
    torch.testing.assert_close(x_kl.detach(), sampler.sample(x_prev, 1)[:6], rtol=0, atol=1e-12)


def test_kl_term_gradient_matches_create_graph_reference_and_finite_differences():
    energy, sampler, loss, x_prev = kl_setup()
    step = 7
    kl, _ = loss.kl_term(x_prev, step)
    got = torch.autograd.grad(kl, list(energy.parameters()), materialize_grads=True)

    # Pure torch: x_kl = x - eps grad_x E_theta(x) + sigma xi; L = mean E_theta_bar(x_kl).
    x = x_prev[:6].clone().requires_grad_(True)
    (grad_x,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    xi = philox_normal_ref((6, 2), seed=11, step=7, chain_offset=5).double()  # float32 normals
    x_kl = x.detach() - 0.05 * grad_x + 0.2 * xi
    frozen = {name: p.detach() for name, p in energy.named_parameters()}
    reference = torch.func.functional_call(energy, frozen, (x_kl,)).mean()
    expected = torch.autograd.grad(reference, list(energy.parameters()), materialize_grads=True)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)

    # Finite differences of theta -> E_theta0(x_kl(theta)) in one weight.
    weight = energy[0].weight
    h = 1e-6

    values = []
    for sign in (1, -1):
        with torch.no_grad():
            weight[0, 1] += sign * h
        # the sample at the moved weight
        point = sampler.differentiable_step(x_prev, step, chains=6).detach()
        with torch.no_grad():
            weight[0, 1] -= sign * h
            values.append(float(energy(point).mean()))
    assert got[0][0, 1].item() == pytest.approx(
        (values[0] - values[1]) / (2 * h), rel=1e-5, abs=1e-9
    )


def test_kl_loss_adds_kl_and_entropy_terms():
    energy = mlp(seed=1)
    buffer = ReplayBuffer(2048, (2,), seed=2)
    buffer.push(torch.randn(1500, 2))
    sampler = langevin(energy)
    loss = KLPersistentML(
        sampler, buffer, kl_chains=4, entropy_samples=50, augment=lambda x: x.flip(1)
    )
    value = loss(torch.randn(16, 2))
    assert loss.last.kl is not None and loss.last.entropy is not None
    value.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in energy.parameters())
    with pytest.raises(ValueError, match="augment"):
        KLPersistentML(langevin(energy), buffer, augment=lambda x: x[:1])(torch.randn(4, 2))


@pytest.mark.parametrize("gap", [1e-6, 1e-4, 1e-3, 0.5])
def test_entropy_distances_are_exact_next_to_a_reference(gap):
    """The entropy term's nearest-neighbour distance is |x - b| of the nearest b, with gradient
    (x - b) / |x - b|, also for a sample within 1e-4 of a reference (where cdist's
    matrix-product route returns 0: log -inf, NaN gradients)."""
    from ebm_fast.training.losses import nearest_distances

    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(50, 3, 4, generator=generator) * 3
    direction = torch.tensor([0.6, 0.0, 0.8] + [0.0] * 9).reshape(3, 4)
    x = (reference[7] + gap * direction).unsqueeze(0).requires_grad_(True)
    difference = x.detach()[0] - reference[7]  # gap * direction, as float32 rounds it
    distance = nearest_distances(x, reference)
    assert distance.item() == pytest.approx(difference.norm().item(), rel=1e-5)
    (grad,) = torch.autograd.grad(distance.log().sum(), x)
    torch.testing.assert_close(grad[0], difference / difference.norm() ** 2, rtol=1e-4, atol=0)


def test_a_reservoir_buffer_is_appended_to_by_its_policy():
    energy = mlp(seed=1)
    buffer = ReplayBuffer(8, (2,), policy="reservoir", seed=2)
    loss = PersistentML(langevin(energy), buffer)
    assert loss.push == "append"
    for _ in range(3):
        loss(torch.randn(4, 2))
    # Appends count every pushed chain (reservoir sampling needs the count); write-backs to
    # slots count none.
    assert int(buffer.state_dict()["count"].sum()) == 12
    with pytest.raises(ValueError, match="reservoir"):
        PersistentML(langevin(energy), buffer, push="slots")
    fifo = ReplayBuffer(8, (2,), seed=2)
    assert PersistentML(langevin(energy), fifo).push == "slots"
    appended = PersistentML(langevin(energy), fifo, push="append")
    appended(torch.randn(4, 2))
    assert int(fifo.state_dict()["count"].sum()) == 4
