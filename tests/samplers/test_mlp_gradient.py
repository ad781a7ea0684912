"""The samplers' direct route for MLP energies (ebm_fast/samplers/mlp_gradient.py): the same bits
as autograd for every activation it covers, the same samples as the autograd route, and autograd
for everything it does not cover."""

import pytest
import torch
from hypothesis import example, given, strategies as st
from torch import nn

from ebm_fast import LangevinSampler, MALASampler
from ebm_fast.samplers.inputs import Conditioning
from ebm_fast.samplers.mlp_gradient import ACTIVATION_BACKWARD, MLPGradient

ACTIVATIONS = [
    lambda: nn.SiLU(),
    lambda: nn.Tanh(),
    lambda: nn.Sigmoid(),
    lambda: nn.ReLU(),
    lambda: nn.Softplus(beta=2.0, threshold=3.0),
    lambda: nn.ELU(alpha=0.7),
    lambda: nn.LeakyReLU(0.2),
    lambda: nn.GELU(),
    lambda: nn.GELU("tanh"),
]
NO_CONDITIONING = Conditioning()


def mlp(widths, activation, flatten=False, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    layers = [nn.Flatten()] if flatten else []
    for i, (d_in, d_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(widths) - 2:
            layers.append(activation())
    return nn.Sequential(*layers).to(dtype)


def autograd_value_and_grad(energy, x):
    x_var = x.detach().requires_grad_(True)
    value = energy(x_var)
    return value.detach(), torch.autograd.grad(value.sum(), x_var)[0]


def test_every_activation_is_exercised():
    assert {type(make()) for make in ACTIVATIONS} == set(ACTIVATION_BACKWARD)


@given(
    activation=st.sampled_from(ACTIVATIONS),
    hidden=st.lists(st.integers(1, 40), min_size=0, max_size=3),
    d=st.integers(1, 30),
    batch=st.integers(1, 17),
    image=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
# A 1 x 1 input reads as column-major, where autograd's addmm backward rounds another way.
@example(
    activation=ACTIVATIONS[0], hidden=[12], d=1, batch=1, image=False, dtype=torch.float32, seed=0
)
def test_direct_route_gives_autograds_bits(activation, hidden, d, batch, image, dtype, seed):
    shape = (batch, 1, d, 2) if image else (batch, d)
    features = 2 * d if image else d
    energy = mlp([features, *hidden, 1], activation, flatten=image, dtype=dtype, seed=seed)
    x = 3 * torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    direct = MLPGradient.of(energy)
    assert direct is not None and direct.covers(x, NO_CONDITIONING)
    value, grad = direct(x)
    want_value, want_grad = autograd_value_and_grad(energy, x)
    assert grad.shape == x.shape
    assert torch.equal(value, want_value)
    assert torch.equal(grad, want_grad)


@given(
    activation=st.sampled_from(ACTIVATIONS),
    hidden=st.lists(st.integers(1, 40), min_size=0, max_size=3),
    d=st.integers(1, 30),
    batch=st.integers(1, 17),
    image=st.booleans(),
    autocast=st.sampled_from([torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
@example(
    activation=ACTIVATIONS[0],
    hidden=[12],
    d=1,
    batch=1,
    image=False,
    autocast=torch.bfloat16,
    seed=0,
)
def test_direct_route_under_autocast_gives_autograds_bits(
    activation, hidden, d, batch, image, autocast, seed
):
    """float32 chains, the passes under autocast: the route follows autocast's casts."""
    shape = (batch, 1, d, 2) if image else (batch, d)
    energy = mlp([2 * d if image else d, *hidden, 1], activation, flatten=image, seed=seed)
    x = 3 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    value, grad = MLPGradient.of(energy)(x, autocast)
    x_var = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast, cache_enabled=False):
        want_value = energy(x_var)
    (want_grad,) = torch.autograd.grad(want_value.sum(), x_var)
    assert value.dtype == want_value.dtype and grad.dtype == torch.float32
    assert torch.equal(value, want_value.detach())
    assert torch.equal(grad, want_grad)


@pytest.mark.parametrize("sampler_cls", [LangevinSampler, MALASampler])
def test_samplers_give_the_autograd_routes_samples(sampler_cls):
    energy = mlp([6, 32, 32, 1], nn.SiLU, flatten=True)
    x0 = torch.rand(20, 2, 3) * 2 - 1
    runs = {}
    for direct in (True, False):
        sampler = sampler_cls(energy, step_size=0.01, n_steps=7, seed=5, mlp_gradient=direct)
        assert (sampler._energy._mlp is not None) == direct
        runs[direct] = sampler.sample(x0, return_info=True)
    (x_direct, info_direct), (x_autograd, info_autograd) = runs[True], runs[False]
    assert torch.equal(x_direct, x_autograd)
    assert torch.equal(info_direct.final_energy, info_autograd.final_energy)
    assert torch.equal(info_direct.mean_grad_norm, info_autograd.mean_grad_norm)


def test_the_direct_route_is_taken_unless_switched_off(monkeypatch):
    """A sampler with an MLP energy calls autograd only with mlp_gradient=False."""
    energy = mlp([3, 16, 1], nn.Tanh)
    calls = []
    original = torch.autograd.grad

    def counted_grad(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counted_grad)
    LangevinSampler(energy, step_size=0.01, n_steps=4, seed=0).sample(torch.rand(5, 3))
    assert calls == []
    LangevinSampler(energy, step_size=0.01, n_steps=4, seed=0, mlp_gradient=False).sample(
        torch.rand(5, 3)
    )
    assert len(calls) == 4


class Custom(nn.Module):
    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "make, why",
    [
        (
            lambda: nn.Sequential(nn.Linear(3, 8), nn.SiLU(inplace=True), nn.Linear(8, 1)),
            "in-place activation",
        ),
        (lambda: nn.Sequential(nn.Linear(3, 8), nn.Dropout(), nn.Linear(8, 1)), "other module"),
        (lambda: nn.Sequential(nn.Linear(3, 8), Custom(), nn.Linear(8, 1)), "user module"),
        (lambda: nn.Sequential(nn.Linear(3, 8), nn.Linear(8, 1)), "no activation between"),
        (lambda: nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2)), "two outputs"),
        (lambda: nn.Sequential(nn.Linear(3, 8), nn.SiLU()), "ends in an activation"),
        (lambda: nn.Sequential(nn.Flatten(0), nn.Linear(3, 1)), "flatten of other dims"),
        (lambda: nn.Sequential(), "empty"),
        (lambda: nn.Linear(3, 1), "not a Sequential"),
    ],
)
def test_energies_it_does_not_cover_use_autograd(make, why):
    assert MLPGradient.of(make()) is None, why


def _doubling_forward_hook(energy):
    energy[0].register_forward_hook(lambda m, i, o: o * 2)


def _parametrized(energy):
    torch.nn.utils.parametrizations.spectral_norm(energy[2])


def _doubling_pre_hook(energy):
    energy[2].register_forward_pre_hook(lambda m, args: (args[0] * 2,))


def _replaced_linear_forward(energy):
    layer = energy[0]
    layer.forward = lambda h: torch.nn.functional.linear(h, 2 * layer.weight, layer.bias)


def _replaced_activation_forward(energy):
    energy[1].forward = torch.sin


@pytest.mark.parametrize(
    "change",
    [
        _doubling_forward_hook,
        _parametrized,
        _doubling_pre_hook,
        _replaced_linear_forward,
        _replaced_activation_forward,
    ],
)
def test_hooks_and_parametrisations_fall_back_to_autograd_with_their_effect(change):
    energy = mlp([3, 8, 1], nn.SiLU)
    change(energy)
    energy.eval()  # spectral_norm's power iteration would otherwise move between the two calls
    x = torch.randn(4, 3)
    assert not MLPGradient(energy).covers(x, NO_CONDITIONING)
    sampler = LangevinSampler(energy, step_size=0.01, n_steps=3, seed=1)
    reference = LangevinSampler(energy, step_size=0.01, n_steps=3, seed=1, mlp_gradient=False)
    assert torch.equal(sampler.sample(x), reference.sample(x))


def test_a_global_module_hook_falls_back_to_autograd():
    energy = mlp([3, 8, 1], nn.SiLU)
    x = torch.randn(4, 3)
    handle = nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        assert not MLPGradient(energy).covers(x, NO_CONDITIONING)
    finally:
        handle.remove()
    assert MLPGradient(energy).covers(x, NO_CONDITIONING)


def test_other_dtype_conditioning_or_image_without_flatten_fall_back():
    energy = mlp([3, 8, 1], nn.SiLU)
    direct = MLPGradient(energy)
    assert not direct.covers(torch.randn(4, 3, dtype=torch.float64), NO_CONDITIONING)
    assert not direct.covers(torch.randn(4, 3), Conditioning(y=torch.zeros(4)))
    assert not direct.covers(torch.randn(4, 3), Conditioning(kwargs={"t": 1.0}))
    assert not direct.covers(torch.randn(4, 1, 3), NO_CONDITIONING)
    assert direct.covers(torch.randn(4, 3), NO_CONDITIONING)


def test_an_edited_sequential_is_followed():
    """Replacing a layer after the sampler was built changes the samples as with autograd."""
    energy = mlp([3, 8, 1], nn.SiLU)
    sampler = LangevinSampler(energy, step_size=0.05, n_steps=3, seed=2)
    reference = LangevinSampler(energy, step_size=0.05, n_steps=3, seed=2, mlp_gradient=False)
    x = torch.randn(6, 3)
    energy[1] = nn.Tanh()
    assert torch.equal(sampler.sample(x), reference.sample(x))
    energy[1] = Custom()  # no longer covered: autograd, still the same samples
    assert torch.equal(sampler.sample(x), reference.sample(x))


def test_the_samplers_autocast_takes_the_direct_route_with_autograds_samples():
    energy = mlp([6, 32, 32, 1], nn.SiLU, flatten=True)
    x0 = torch.rand(20, 2, 3) * 2 - 1
    runs = [
        LangevinSampler(
            energy, step_size=0.01, n_steps=7, seed=5, autocast=torch.bfloat16, mlp_gradient=direct
        ).sample(x0)
        for direct in (True, False)
    ]
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("option", [dict(negate=True), dict(compile=True)])
def test_negated_or_compiled_energies_use_autograd(option):
    sampler = LangevinSampler(mlp([3, 8, 1], nn.SiLU), step_size=0.01, **option)
    assert sampler._energy._mlp is None


def test_an_enclosing_autocast_falls_back_to_autograd():
    """Under a caller's torch.autocast the route's float32 gradient would not match the bf16
    chain state autograd produces; autograd follows autocast's casts."""
    energy = mlp([3, 8, 1], nn.SiLU)
    x = torch.randn(4, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not MLPGradient(energy).covers(x, NO_CONDITIONING)
        sampled = LangevinSampler(energy, step_size=0.01, n_steps=3, seed=1).sample(x)
        reference = LangevinSampler(
            energy, step_size=0.01, n_steps=3, seed=1, mlp_gradient=False
        ).sample(x)
    assert torch.equal(sampled, reference)
