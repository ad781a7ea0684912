"""The langevin_update op: reference semantics from first principles, validation, registration
(opcheck, autograd, torch.compile). Backends against the reference:
tests/kernels/test_langevin_update.py."""

import numpy as np
import pytest
import torch

import ebm_fast
from ebm_fast import use_backend
from ebm_fast.ops.langevin_update import _langevin_update_op, _langevin_update_out_op
from ebm_fast.reference.philox import philox_normal_ref


def _inputs(shape=(4, 3, 5), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(shape, generator=gen, dtype=dtype),
        torch.randn(shape, generator=gen, dtype=dtype) * 3,
    )


@pytest.fixture(autouse=True)
def reference_backend():
    with use_backend("reference"):
        yield


def test_plain_update_is_x_minus_eps_grad_plus_sigma_xi():
    x, g = _inputs()
    xi = philox_normal_ref(x.shape, seed=3, step=9).double()
    got = ebm_fast.langevin_update(x, g, 0.1, 0.02, seed=3, step=9)
    torch.testing.assert_close(got, x - 0.1 * g + 0.02 * xi, rtol=0, atol=1e-15)


def test_zero_noise_is_gradient_descent_and_clamps():
    x, g = _inputs()
    got = ebm_fast.langevin_update(x, g, 0.5, 0.0, seed=0, step=0, clamp=(-0.25, 0.5))
    torch.testing.assert_close(got, (x - 0.5 * g).clamp(-0.25, 0.5), rtol=0, atol=0)
    one_sided = ebm_fast.langevin_update(x, g, 0.5, 0.0, seed=0, step=0, clamp=(None, 0.5))
    torch.testing.assert_close(one_sided, (x - 0.5 * g).clamp(max=0.5), rtol=0, atol=0)


def test_value_and_norm_clipping():
    x, g = _inputs()
    by_value = ebm_fast.langevin_update(x, g, 1.0, 0.0, seed=0, step=0, grad_clip=0.7)
    torch.testing.assert_close(by_value, x - g.clamp(-0.7, 0.7), rtol=0, atol=0)
    g[0] *= 1e-3  # chain 0 below the norm bound: untouched
    by_norm = ebm_fast.langevin_update(
        x, g, 1.0, 0.0, seed=0, step=0, grad_clip=2.0, grad_clip_mode="norm"
    )
    step = x - by_norm
    norms = step.reshape(4, -1).norm(dim=1)
    torch.testing.assert_close(step[0], g[0], rtol=0, atol=1e-15)  # x - (x - g): cancellation
    torch.testing.assert_close(norms[1:], torch.full((3,), 2.0, dtype=torch.float64))
    cosine = (step.reshape(4, -1) * g.reshape(4, -1)).sum(1) / (
        norms * g.reshape(4, -1).norm(dim=1)
    )
    torch.testing.assert_close(cosine, torch.ones(4, dtype=torch.float64))


def test_per_chain_parameters_equal_per_chain_calls():
    x, g = _inputs()
    eps = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    sigma = torch.tensor([0.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    batched = ebm_fast.langevin_update(x, g, eps, sigma, seed=4, step=1)
    for c in range(4):
        single = ebm_fast.langevin_update(
            x[c : c + 1],
            g[c : c + 1],
            float(eps[c]),
            float(sigma[c]),
            seed=4,
            step=1,
            chain_offset=c,
        )
        torch.testing.assert_close(batched[c : c + 1], single, rtol=0, atol=0)


def test_in_place_and_non_contiguous():
    x, g = _inputs((6, 8), dtype=torch.float32)
    expected = ebm_fast.langevin_update(x, g, 0.1, 0.3, seed=1, step=2)
    x_copy = x.clone()
    returned = ebm_fast.langevin_update(x_copy, g, 0.1, 0.3, seed=1, step=2, out=x_copy)
    assert returned is x_copy
    torch.testing.assert_close(x_copy, expected, rtol=0, atol=0)
    # A transposed view holds the same chains in a strided layout: same result, written in place.
    storage = x.t().contiguous()
    view = storage.t()
    assert not view.is_contiguous()
    ebm_fast.langevin_update(view, g, 0.1, 0.3, seed=1, step=2, out=view)
    torch.testing.assert_close(view, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32_and_rounds_once(dtype):
    x, g = _inputs((5, 7), dtype=dtype)
    got = ebm_fast.langevin_update(x, g, 0.1, 0.3, seed=1, step=2)
    exact = ebm_fast.langevin_update(x.float(), g.float(), 0.1, 0.3, seed=1, step=2)
    assert got.dtype == dtype
    torch.testing.assert_close(got, exact.to(dtype), rtol=0, atol=0)


def test_bad_input_names_the_argument():
    x, g = _inputs((4, 3), dtype=torch.float32)

    def call(**kw):
        arguments = dict(x=x, grad=g, step_size=0.1, noise_scale=0.1, seed=0, step=0)
        return ebm_fast.langevin_update(**{**arguments, **kw})

    cases = [
        (dict(grad=g[:, :2]), ValueError, "grad"),
        (dict(grad=g.double()), TypeError, "grad"),
        (
            dict(x=torch.ones(4, 3, dtype=torch.int32), grad=torch.ones(4, 3, dtype=torch.int32)),
            TypeError,
            "x must be",
        ),
        (dict(step_size=0.0), ValueError, "step_size"),
        (dict(step_size=-1.0), ValueError, "step_size"),
        (dict(step_size=float("nan")), ValueError, "step_size"),
        (dict(noise_scale=-0.1), ValueError, "noise_scale"),
        (dict(step_size=torch.ones(3)), ValueError, "step_size"),
        (dict(noise_scale=torch.ones(4, 1)), ValueError, "noise_scale"),
        (dict(step_size=torch.ones(4, dtype=torch.int64)), TypeError, "step_size"),
        (dict(step_size=torch.tensor(0.1, device="meta")), ValueError, "step_size"),
        (dict(clamp=(1.0, -1.0)), ValueError, "clamp"),
        (dict(clamp=(float("nan"), 1.0)), ValueError, r"clamp\[0\] must not be NaN"),
        (dict(clamp=(-1.0, float("nan"))), ValueError, r"clamp\[1\] must not be NaN"),
        (dict(grad_clip=float("nan")), ValueError, "grad_clip must not be NaN"),
        (dict(grad_clip=True), TypeError, "grad_clip"),
        (dict(grad_clip=1e-320), ValueError, "grad_clip must be at least"),  # subnormal
        (dict(step_size=1e309), ValueError, "step_size"),  # inf
        (dict(step=2**32), ValueError, "step"),
        (dict(step=torch.tensor([1])), TypeError, "step"),
        (dict(clamp=1.0), TypeError, "clamp"),
        (dict(grad_clip=0.0), ValueError, "grad_clip"),
        (dict(grad_clip_mode="max"), ValueError, "grad_clip_mode"),
        (dict(seed=1.5), TypeError, "seed"),
        (dict(step=-1), ValueError, "step"),
        (dict(chain_offset=-1), ValueError, "chain_offset"),
        (dict(chain_offset=2**61), ValueError, "chain_offset"),  # 3 elements a chain: n > 2**62
        (dict(chain_offset=1.0), TypeError, "chain_offset"),
        (dict(stream=2**32), ValueError, "stream"),
        (dict(stream=1.5), TypeError, "stream"),
        (dict(out=torch.empty(4, 4)), ValueError, "out"),
    ]
    for kwargs, error, pattern in cases:
        with pytest.raises(error, match=pattern):
            call(**kwargs)


def test_numpy_scalars_are_numbers():
    x, g = _inputs()
    kwargs = dict(seed=5, step=3, stream=1, chain_offset=2, grad_clip=0.5, clamp=(-1.0, 1.0))
    want = ebm_fast.langevin_update(x, g, 0.25, 0.5, **kwargs)
    got = ebm_fast.langevin_update(
        x,
        g,
        np.float32(0.25),
        np.float64(0.5),
        seed=np.uint64(5),
        step=np.int32(3),
        stream=np.int64(1),
        chain_offset=np.int8(2),
        grad_clip=np.float32(0.5),
        clamp=(np.float64(-1.0), np.int64(1)),
    )
    assert torch.equal(got, want)


def test_out_refuses_autograd():
    x, g = _inputs((2, 3), dtype=torch.float32)
    x.requires_grad_()
    with pytest.raises(RuntimeError, match="not differentiable"):
        ebm_fast.langevin_update(x, g, 0.1, 0.1, seed=0, step=0, out=torch.empty_like(x))


@pytest.mark.parametrize("mode", [None, "value", "norm"])
def test_gradient_matches_finite_differences(mode):
    """gradcheck in float64: d/dx and d/dgrad of the update (clamp included)."""
    x, g = _inputs((3, 4))
    x.requires_grad_()
    g.requires_grad_()
    clip = None if mode is None else 1.5

    def update(x, g):
        return ebm_fast.langevin_update(
            x,
            g,
            0.3,
            0.2,
            seed=5,
            step=1,
            clamp=(-1.5, 1.5),
            grad_clip=clip,
            grad_clip_mode=mode or "value",
        )

    assert torch.autograd.gradcheck(update, (x, g))


def _opcheck_args(dtype):
    x, g = _inputs((3, 4), dtype=dtype)
    params = (
        torch.tensor(0.1, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        torch.full((3,), 0.2, dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        torch.tensor(3),
        torch.tensor(1),
        0,
        2,
    )
    return x, g, params


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "options", [(None, "value", None, None), (0.5, "norm", -1.0, 1.0), (0.5, "value", None, 0.3)]
)
def test_opcheck(dtype, options):
    x, g, params = _opcheck_args(dtype)
    x.requires_grad_()
    torch.library.opcheck(_langevin_update_op, (x, g, *params, *options))
    out = torch.empty_like(x)
    torch.library.opcheck(_langevin_update_out_op, (out, x.detach(), g, *params, *options))


def test_compiles_with_fullgraph():
    x, g = _inputs((8, 6), dtype=torch.float32)

    @torch.compile(fullgraph=True)  # the default backend (inductor), as users call it
    def two_steps(x, g, step):
        ebm_fast.langevin_update(x, g, 0.1, 0.05, seed=7, step=step, clamp=(-1, 1), out=x)
        return ebm_fast.langevin_update(x, g, 0.1, 0.05, seed=7, step=step + 1, clamp=(-1, 1))

    eager_x = x.clone()
    ebm_fast.langevin_update(
        eager_x, g, 0.1, 0.05, seed=7, step=torch.tensor(3), clamp=(-1, 1), out=eager_x
    )
    expected = ebm_fast.langevin_update(
        eager_x, g, 0.1, 0.05, seed=7, step=torch.tensor(4), clamp=(-1, 1)
    )
    compiled_x = x.clone()
    got = two_steps(compiled_x, g, torch.tensor(3))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(compiled_x, eager_x, rtol=0, atol=0)
