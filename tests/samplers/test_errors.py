"""LangevinSampler / MALASampler: every bad argument and bad energy output gets an error naming
it, by the project's rule (ebm_fast/validation.py): a wrong type raises TypeError, a wrong value
ValueError."""

import math

import numpy as np
import pytest
import torch

from ebm_fast import LangevinSampler, MALASampler


def quadratic(x):
    return 0.5 * (x * x).reshape(x.shape[0], -1).sum(1)


def mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


@pytest.mark.parametrize(
    "energy, error, match",
    [
        (lambda x: x.sum(), ValueError, r"shape \(4,\) or \(4, 1\).*got \(\)"),
        (lambda x: x, ValueError, r"shape \(4,\) or \(4, 1\).*got \(4, 3\)"),
        (lambda x: [1.0], TypeError, "must return a tensor"),
        (lambda x: torch.zeros(4), ValueError, "does not depend on x"),
        (lambda x: (x > 0).sum(1), TypeError, "floating"),
    ],
)
def test_bad_energy_outputs_get_clear_errors(energy, error, match):
    with pytest.raises(error, match=match):
        LangevinSampler(energy, step_size=0.1, n_steps=2).sample(torch.randn(4, 3))


def test_energy_returning_b_by_1_is_accepted():
    model = mlp()
    x = LangevinSampler(model, step_size=0.1, n_steps=2).sample(torch.randn(4, 3))
    assert x.shape == (4, 3)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: LangevinSampler(quadratic, step_size=0.0), ValueError, "step_size"),
        (lambda: LangevinSampler(quadratic, step_size=-1.0), ValueError, "step_size"),
        (lambda: LangevinSampler(quadratic, step_size="big"), TypeError, "step_size"),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, noise_scale=-0.1),
            ValueError,
            "noise_scale",
        ),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, noise_scale=0.1, temperature=1.0),
            ValueError,
            "not both",
        ),
        (lambda: LangevinSampler(quadratic, step_size=0.1, n_steps=-1), ValueError, "n_steps"),
        (lambda: LangevinSampler(quadratic, step_size=0.1, chunk_size=0), ValueError, "chunk_size"),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, cuda_graph="yes"),
            ValueError,
            "cuda_graph",
        ),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, grad_clip_mode="max"),
            ValueError,
            "grad_clip_mode",
        ),
        (lambda: LangevinSampler(quadratic, step_size=0.1, clamp=1.0), TypeError, "clamp"),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, clamp=(math.nan, 1.0)),
            ValueError,
            "NaN",
        ),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, clamp=(2.0, 1.0)),
            ValueError,
            "lo > hi",
        ),
        (lambda: LangevinSampler(quadratic, step_size=0.1, grad_clip=True), TypeError, "grad_clip"),
        (lambda: LangevinSampler(quadratic, step_size=0.1, grad_clip=0.0), ValueError, "grad_clip"),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, grad_clip=math.nan),
            ValueError,
            "grad_clip",
        ),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, autocast=torch.int8),
            TypeError,
            "autocast",
        ),
        (lambda: LangevinSampler(quadratic, step_size=math.nan), ValueError, "step_size"),
        (lambda: LangevinSampler(quadratic, step_size=math.inf), ValueError, "step_size"),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, temperature=True),
            TypeError,
            "temperature",
        ),
        (lambda: LangevinSampler(quadratic, step_size=0.1, n_steps=2.5), TypeError, "n_steps"),
        (lambda: LangevinSampler(quadratic, step_size=0.1, n_steps=True), TypeError, "n_steps"),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, chunk_size=2.0),
            TypeError,
            "chunk_size",
        ),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, chain_offset=-1),
            ValueError,
            "chain_offset",
        ),
        (lambda: LangevinSampler(quadratic, step_size=0.1, seed="1"), TypeError, "seed"),
        (lambda: LangevinSampler(quadratic, step_size=0.1, seed=2**64), ValueError, "seed"),
        (
            lambda: LangevinSampler(quadratic, step_size=0.1, not_an_option=1),
            TypeError,
            "not_an_option",
        ),
        (lambda: LangevinSampler(quadratic, step_size=0.1, backend="gpu"), ValueError, "backend"),
        (lambda: LangevinSampler(quadratic, step_size=0.1, seed=-1), ValueError, "seed"),
        (
            lambda: LangevinSampler("not callable", step_size=0.1),
            TypeError,
            "energy must be callable",
        ),
        (
            lambda: MALASampler(quadratic, step_size=0.1, clamp=(0, 1)),
            ValueError,
            "detailed balance",
        ),
        (
            lambda: MALASampler(quadratic, step_size=0.1, grad_clip=1.0),
            ValueError,
            "detailed balance",
        ),
        (lambda: MALASampler(quadratic, step_size=0.1, temperature=0.0), ValueError, "temperature"),
        (
            lambda: MALASampler(quadratic, step_size=0.1, target_accept=1.5),
            ValueError,
            "target_accept",
        ),
        (
            lambda: MALASampler(quadratic, step_size=0.1, target_accept=math.nan),
            ValueError,
            "target_accept",
        ),
        (
            lambda: MALASampler(quadratic, step_size=0.1, adapt_rate=math.inf),
            ValueError,
            "adapt_rate",
        ),
        (lambda: MALASampler(quadratic, step_size=0.1, adapt_rate=0.0), ValueError, "adapt_rate"),
        (lambda: MALASampler(quadratic, step_size=0.1, adapt_steps=-1), ValueError, "adapt_steps"),
        (lambda: MALASampler(quadratic, step_size=0.1, adapt_steps=1.0), TypeError, "adapt_steps"),
    ],
)
def test_bad_constructor_arguments_get_clear_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s: s.sample([[1.0]]), TypeError, "x0 must be a tensor"),
        (lambda s: s.sample(torch.ones(3, 2, dtype=torch.int64)), TypeError, "x0 must be one of"),
        (lambda s: s.sample(torch.ones(())), ValueError, "leading chain axis"),
        (lambda s: s.sample(torch.ones(0, 2)), ValueError, "at least one chain"),
        (lambda s: s.sample(torch.ones(3, 0)), ValueError, "one element per chain"),
        (lambda s: s.sample(torch.ones(3, 2), n_steps=-2), ValueError, "n_steps"),
        (
            lambda s: s.sample(torch.ones(3, 2), step_size=torch.ones(4)),
            ValueError,
            "step_size has 4 entries but x has 3 chains",
        ),
        (
            lambda s: s.sample(torch.ones(3, 2), step_size=1e300),
            ValueError,
            "step_size must be > 0 and finite in torch.float32",
        ),
        (lambda s: s.sample(torch.ones(3, 2), n_steps=2.0), TypeError, "n_steps"),
        (
            lambda s: s.sample(torch.ones(3, 2), step_size=torch.ones(3, dtype=torch.int64)),
            TypeError,
            "step_size",
        ),
        (
            lambda s: s.sample(torch.ones(3, 2), step_size=torch.ones(3, device="meta")),
            ValueError,
            "step_size is on meta but x is on cpu",
        ),
        (
            lambda s: s.sample(torch.ones(3, 2), step_size=lambda k, n: -1.0),
            ValueError,
            r"step_size \(schedule at step 0\)",
        ),
        (
            lambda s: s.sample(torch.ones(3, 2), step_size=lambda k, n: 1e300 if k == 1 else 0.1),
            ValueError,
            r"step_size \(schedule at step 1\).*finite in torch.float32",
        ),
        (
            lambda s: s.sample(torch.ones(3, 2), step_size=lambda k, n: "big"),
            TypeError,
            r"step_size \(schedule at step 0\)",
        ),
    ],
)
def test_bad_sample_arguments_get_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(LangevinSampler(quadratic, step_size=0.1, n_steps=2))


def test_parameters_on_another_device_are_named():
    model = mlp().to("meta")
    with pytest.raises(ValueError, match="parameters are on meta"):
        LangevinSampler(model, step_size=0.1).sample(torch.randn(4, 3))


def test_cuda_graph_true_needs_cuda_tensors():
    with pytest.raises(ValueError, match="cuda_graph=True needs CUDA"):
        LangevinSampler(quadratic, step_size=0.1, cuda_graph=True).sample(torch.randn(4, 3))


def test_an_energy_that_does_not_depend_on_x_is_named_not_left_to_autograd():
    weight = torch.ones((), requires_grad=True)  # the output requires grad, but not through x
    with pytest.raises(ValueError, match="does not depend on x"):
        LangevinSampler(lambda x: weight * torch.ones(x.shape[0]), step_size=0.1, n_steps=2).sample(
            torch.randn(4, 3)
        )


def test_numpy_scalars_are_numbers():
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    plain = LangevinSampler(
        quadratic,
        step_size=0.1,
        noise_scale=0.2,
        n_steps=3,
        seed=4,
        chunk_size=2,
        grad_clip=0.5,
        clamp=(-1, 1),
    ).sample(x0)
    numpy = LangevinSampler(
        quadratic,
        step_size=np.float32(0.1),
        noise_scale=np.float64(0.2),
        n_steps=np.int64(3),
        seed=np.uint64(4),
        chunk_size=np.int32(2),
        grad_clip=np.float64(0.5),
        clamp=(np.int64(-1), np.float32(1)),
    ).sample(x0)
    assert torch.equal(plain, numpy)


@pytest.mark.parametrize("mode", ["value", "norm"])
def test_infinite_clamp_and_grad_clip_mean_no_limit_as_in_the_op(mode):
    x0 = 3 * torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    free = LangevinSampler(quadratic, step_size=0.1, n_steps=3, seed=1).sample(x0)
    unlimited = LangevinSampler(
        quadratic,
        step_size=0.1,
        n_steps=3,
        seed=1,
        grad_clip=math.inf,
        grad_clip_mode=mode,
        clamp=(-math.inf, math.inf),
    ).sample(x0)
    assert torch.equal(free, unlimited)
    one_sided = LangevinSampler(
        quadratic, step_size=0.1, n_steps=3, seed=1, clamp=(-math.inf, 0.5)
    ).sample(x0)
    assert torch.equal(
        one_sided,
        LangevinSampler(quadratic, step_size=0.1, n_steps=3, seed=1, clamp=(None, 0.5)).sample(x0),
    )
    assert bool((one_sided <= 0.5).all()) and not bool((free <= 0.5).all())


def test_inference_mode_is_named_as_the_cause():
    energy = torch.nn.Linear(2, 1)
    sampler = LangevinSampler(energy, step_size=0.1, n_steps=2, seed=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        sampler.sample(torch.randn(3, 2))
