"""The samplers' MLP route held to the definition of a Langevin step: the chains follow the
gradient of the energy as calling it computes it, ``energy(x)`` with its hooks and any
``forward`` replaced on an instance. Whatever the route (direct or autograd), a noiseless
sampler's chains must be plain gradient descent on that energy, computed here with torch
autograd on ``energy(x)`` itself. Float64, so the only difference is the update's rounding.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ebm_fast import LangevinSampler

EPS, STEPS = 0.05, 4


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
    ).double()


def gradient_descent(energy, x):
    """STEPS steps of x <- x - EPS grad_x sum energy(x), autograd through the module call."""
    for _ in range(STEPS):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(energy(x).sum(), x)
        x = x.detach() - EPS * grad
    return x


def pre_hook_on_a_linear(m):
    m[2].register_forward_pre_hook(lambda module, args: (2 * args[0],))


def pre_hook_on_an_activation(m):
    m[1].register_forward_pre_hook(lambda module, args: (args[0] + 0.5,))


def pre_hook_on_the_sequential(m):
    m.register_forward_pre_hook(lambda module, args: (args[0] ** 2,))


def forward_hook_on_a_linear(m):
    m[0].register_forward_hook(lambda module, args, out: 3 * out)


def replaced_linear_forward(m):
    lin = m[2]
    lin.forward = lambda h: F.linear(h, 2 * lin.weight, lin.bias)


def replaced_activation_forward(m):
    m[1].forward = torch.sin


def global_pre_hook(m):
    handle = nn.modules.module.register_module_forward_pre_hook(
        lambda module, args: (args[0] * 1.5,) if isinstance(module, nn.Linear) else None
    )
    return handle


ALTERATIONS = [
    pre_hook_on_a_linear,
    pre_hook_on_an_activation,
    pre_hook_on_the_sequential,
    forward_hook_on_a_linear,
    replaced_linear_forward,
    replaced_activation_forward,
    global_pre_hook,
]


@pytest.mark.parametrize("alter", ALTERATIONS, ids=lambda f: f.__name__)
def test_chains_follow_the_gradient_of_the_altered_energy(alter):
    energy = mlp()
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    unaltered = gradient_descent(energy, x0)
    handle = alter(energy)
    try:
        expected = gradient_descent(energy, x0)
        # The premise: the alteration changes the chains.
        assert (expected - unaltered).abs().max() > 1e-3
        sampler = LangevinSampler(energy, step_size=EPS, noise_scale=0.0, n_steps=STEPS, seed=0)
        torch.testing.assert_close(sampler.sample(x0), expected, rtol=1e-12, atol=1e-12)
    finally:
        if handle is not None:
            handle.remove()


def test_the_unaltered_energy_is_plain_gradient_descent():
    energy = mlp()
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sampler = LangevinSampler(energy, step_size=EPS, noise_scale=0.0, n_steps=STEPS, seed=0)
    torch.testing.assert_close(
        sampler.sample(x0), gradient_descent(energy, x0), rtol=1e-12, atol=1e-12
    )
