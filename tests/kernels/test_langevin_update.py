"""Every kernel backend's langevin_update against the reference
(ebm_fast/reference/langevin_update.py), through the public ebm_fast.langevin_update: shapes,
layouts, per-chain parameters, every option, dtypes, counters.

Tolerance (flash-attention's rule): float32/float64 results are within 2x the eager reference's own
error against the float64 evaluation (float64 inputs, float64 noise), plus one ulp of the result
and four float32 ulps of the noise term (the spec's normals agree to float32 rounding); bfloat16 and
float16 results are within one ulp of that dtype of the reference at the same dtype.
"""

import pytest
import torch
from hypothesis import given, strategies as st

import ebm_fast
from ebm_fast import use_backend
from ebm_fast.backends import unavailable_reason
from ebm_fast.ops.langevin_update import _langevin_update_op
from ebm_fast.reference.langevin_update import langevin_update_ref, per_chain
from ebm_fast.reference.philox import philox_normal_ref
from ebm_fast.validation import compute_dtype
from tests.helpers import assert_within_eager_error, kernel_backends, kernel_device

MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10}


def _dtypes(backend):
    """float64 is a reference and cpu feature; the Triton kernel computes in float32."""
    low = [torch.float32, torch.bfloat16, torch.float16]
    return low if backend == "triton" else low + [torch.float64]


def _max_per_chain(backend: str) -> int:
    """Triton runs in the (slow) interpreter on the CPU: keep its tensors small."""
    return 30 if backend == "triton" else 600


def _ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    magnitude = values.double().abs().clamp(min=torch.finfo(dtype).tiny)
    return torch.exp2(torch.floor(torch.log2(magnitude)) - MANTISSA_BITS[dtype])


def assert_matches_reference(got, x, grad, step_size, noise_scale, options):
    """options: the reference's keyword arguments (seed, step, stream, chain_offset, grad_clip,
    grad_clip_mode, clamp_lo, clamp_hi)."""
    got = got.cpu()
    x, grad, step_size, noise_scale = (t.cpu() for t in (x, grad, step_size, noise_scale))
    options = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    eager = langevin_update_ref(x, grad, step_size, noise_scale, **options)
    assert got.dtype == x.dtype and got.shape == x.shape
    if x.dtype in MANTISSA_BITS:
        ulp = torch.maximum(_ulp(got, x.dtype), _ulp(eager, x.dtype))
        excess = (got.double() - eager.double()).abs() - ulp
        assert excess.max().item() <= 0, f"{(excess > 0).sum().item()} elements beyond one ulp"
        return
    exact = langevin_update_ref(
        x.double(),
        grad.double(),
        step_size.double(),
        noise_scale.double(),
        noise_dtype=torch.float64,
        **options,
    )
    # atol: one ulp of the largest value (where the eager expression happens to be exact) plus
    # four float32 ulps of the largest noise term: the spec's normals are float32 values that
    # agree across backends to float rounding, so on a few elements the eager noise can be
    # luckier than 1/2 the kernel's (float64 x makes that the whole error).
    xi = philox_normal_ref(
        x.shape,
        seed=options["seed"],
        step=options["step"],
        stream=options["stream"],
        chain_offset=options["chain_offset"],
        dtype=torch.float64,
    )
    noise_term = (per_chain(noise_scale.double(), xi) * xi).abs().max().item()
    atol = (
        torch.finfo(x.dtype).eps * exact.abs().max().item()
        + 4 * torch.finfo(torch.float32).eps * noise_term
    )
    assert_within_eager_error(got, eager, exact, atol=atol)


def _chain_param(draw, values, per_chain: bool, chains: int, dtype, device):
    if per_chain:
        return torch.tensor(
            draw(st.lists(values, min_size=chains, max_size=chains)), dtype=dtype, device=device
        )
    return torch.tensor(draw(values), dtype=dtype, device=device)


@st.composite
def update_cases(draw, backend):
    device = kernel_device(backend)
    dtype = draw(st.sampled_from(_dtypes(backend)), label="dtype")
    chains = draw(st.integers(1, 6), label="chains")
    # cpu: up to 600 elements per chain, both sides of its short-chain threshold (256).
    largest_axis = 13 if backend == "triton" else 40
    trailing = draw(st.lists(st.integers(1, largest_axis), max_size=2), label="trailing")
    if torch.Size(trailing).numel() > _max_per_chain(backend):
        trailing = [_max_per_chain(backend)]
    shape = (chains, *trailing)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31), label="values"))
    layout = draw(st.sampled_from(["contiguous", "strided", "in_place", "strided_in_place"]))
    strided = layout.startswith("strided")
    # A strided view: every other element of a tensor twice as long in the last axis.
    full_shape = (*shape, 2) if strided else shape
    x = (torch.randn(full_shape, generator=gen, dtype=torch.float64) * 2).to(dtype)
    grad = (torch.randn(full_shape, generator=gen, dtype=torch.float64) * 3).to(dtype)
    if strided:
        x, grad = x[..., 0], grad[..., 0]
    x, grad = x.to(device), grad.to(device)
    cdtype = compute_dtype(dtype)
    step_size = _chain_param(
        draw, st.floats(1e-3, 1.0), draw(st.booleans(), label="eps/chain"), chains, cdtype, device
    )
    noise_values = st.one_of(st.just(0.0), st.floats(0.0, 2.0))
    noise_scale = _chain_param(
        draw, noise_values, draw(st.booleans(), label="sigma/chain"), chains, cdtype, device
    )
    grad_clip = draw(st.one_of(st.none(), st.floats(0.05, 5.0)), label="grad_clip")
    grad_clip_mode = draw(st.sampled_from(["value", "norm"]), label="grad_clip_mode")
    clamp_lo = draw(st.one_of(st.none(), st.floats(-3.0, 0.0)), label="clamp_lo")
    clamp_hi = draw(st.one_of(st.none(), st.floats(0.0, 3.0)), label="clamp_hi")
    seed = draw(st.integers(0, 2**64 - 1), label="seed")
    step = draw(st.integers(0, 2**32 - 1), label="step")
    if draw(st.booleans(), label="counters as tensors"):
        seed = torch.tensor(seed - 2**64 if seed >= 2**63 else seed, device=device)
        step = torch.tensor(step, device=device)
    options = dict(
        seed=seed,
        step=step,
        stream=draw(st.sampled_from([0, 1, 2**32 - 1])),
        chain_offset=draw(st.one_of(st.integers(0, 9), st.integers(0, 2**40))),
        grad_clip=grad_clip,
        grad_clip_mode=grad_clip_mode,
        clamp_lo=clamp_lo,
        clamp_hi=clamp_hi,
    )
    return x, grad, step_size, noise_scale, options, layout.endswith("in_place")


def _call(x, grad, step_size, noise_scale, options, out=None):
    """The public API, from the reference's keyword arguments."""
    kwargs = dict(options)
    lo, hi = kwargs.pop("clamp_lo"), kwargs.pop("clamp_hi")
    clamp = None if lo is None and hi is None else (lo, hi)
    return ebm_fast.langevin_update(x, grad, step_size, noise_scale, clamp=clamp, out=out, **kwargs)


@pytest.mark.parametrize("backend", kernel_backends())
@given(data=st.data())
def test_matches_reference(backend, data):
    x, grad, step_size, noise_scale, options, in_place = data.draw(update_cases(backend))
    x_before = x.clone()
    with use_backend(backend):
        if in_place:
            got = _call(x, grad, step_size, noise_scale, options, out=x)
            assert got is x
        else:
            got = _call(x, grad, step_size, noise_scale, options)
            assert torch.equal(x, x_before)  # input untouched
    assert_matches_reference(got, x_before, grad, step_size, noise_scale, options)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize(
    "grad_clip,grad_clip_mode", [(None, "value"), (1.0, "value"), (1.0, "norm")]
)
def test_non_finite_gradients_land_where_the_reference_puts_them(
    backend, grad_clip, grad_clip_mode
):
    """A NaN and two infinite gradient elements, through clipping and a one-sided clamp: NaN and
    inf where the reference has them (norm clipping turns a chain with a NaN gradient NaN whole;
    an infinite norm scales the chain by 0, so its infinite element becomes 0 * inf = NaN)."""
    device = kernel_device(backend)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 5, generator=gen)
    grad = torch.randn(4, 5, generator=gen) * 3
    grad[1, 2], grad[2, 0], grad[3, 1] = float("nan"), float("inf"), -float("inf")
    options = dict(
        seed=5,
        step=1,
        stream=0,
        chain_offset=0,
        grad_clip=grad_clip,
        grad_clip_mode=grad_clip_mode,
        clamp_lo=-4.0,
        clamp_hi=None,
    )
    want = langevin_update_ref(x, grad, torch.tensor(0.1), torch.tensor(0.5), **options)
    if grad_clip_mode == "norm":
        assert want[1].isnan().all() and want[2, 0].isnan() and want[3, 1].isnan()
    with use_backend(backend):
        got = _call(x.to(device), grad.to(device), 0.1, 0.5, options)
    torch.testing.assert_close(got.cpu(), want, equal_nan=True)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunks_with_chain_offset_equal_the_whole_batch(backend, dtype):
    """Shards of a batch, each with its chain_offset and slice of per-chain parameters, produce
    exactly the whole batch's update (7 elements per chain: shards start inside Philox blocks)."""
    device = kernel_device(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(9, 7, generator=gen).to(dtype).to(device)
    grad = torch.randn(9, 7, generator=gen).to(dtype).to(device)
    eps = torch.linspace(0.1, 0.9, 9, device=device)
    sigma = torch.linspace(0.5, 1.5, 9, device=device)
    kwargs = dict(seed=2**63 + 1, step=5, grad_clip=1.0, grad_clip_mode="norm", clamp=(-2, 2))
    with use_backend(backend):
        whole = ebm_fast.langevin_update(x, grad, eps, sigma, **kwargs)
        first = ebm_fast.langevin_update(x[:4], grad[:4], eps[:4], sigma[:4], **kwargs)
        second = ebm_fast.langevin_update(
            x[4:], grad[4:], eps[4:], sigma[4:], chain_offset=4, **kwargs
        )
    assert torch.equal(torch.cat([first, second]), whole)


@pytest.mark.parametrize("backend", kernel_backends())
def test_opcheck(backend):
    device = kernel_device(backend)
    x = torch.randn(3, 5, device=device, requires_grad=True)
    grad = torch.randn(3, 5, device=device)
    params = (
        torch.tensor(0.1, device=device),
        torch.full((3,), 0.2, device=device),
        torch.tensor(3, device=device),
        torch.tensor(1, device=device),
        0,
        2,
    )
    with use_backend(backend):
        torch.library.opcheck(_langevin_update_op, (x, grad, *params, 0.5, "norm", -1.0, 1.0))


EVERY_BACKEND = [pytest.param("reference", id="reference"), *kernel_backends()]


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_out_partially_overlapping_x_or_grad_is_refused(backend):
    """out one row past x (or grad) in the same storage would read rows it already overwrote;
    out exactly x or exactly grad is an in-place update."""
    device = kernel_device(backend)
    gen = torch.Generator().manual_seed(4)
    buf, grad = (
        torch.randn(9, 4, generator=gen).to(device),
        torch.randn(8, 4, generator=gen).to(device),
    )
    args = (0.1, 0.3)
    kwargs = dict(seed=0, step=0, grad_clip=1.0, grad_clip_mode="norm")
    with use_backend(backend):
        want = ebm_fast.langevin_update(buf[:8], grad, *args, **kwargs)
        with pytest.raises(ValueError, match="out partially overlaps x"):
            ebm_fast.langevin_update(buf[:8], grad, *args, out=buf[1:], **kwargs)
        grad_buf = torch.cat([grad, grad[:1]])
        with pytest.raises(ValueError, match="out partially overlaps grad"):
            ebm_fast.langevin_update(buf[:8], grad_buf[:8], *args, out=grad_buf[1:], **kwargs)
        x = buf[:8].clone()
        assert torch.equal(ebm_fast.langevin_update(x, grad, *args, out=x, **kwargs), want)
        g = grad.clone()
        assert torch.equal(ebm_fast.langevin_update(buf[:8], g, *args, out=g, **kwargs), want)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
@pytest.mark.parametrize("grad_clip_mode", ["value", "norm"])
def test_limits_beyond_the_compute_dtype_limit_nothing(backend, grad_clip_mode):
    """grad_clip and clamp bounds are taken in the compute dtype: beyond float32's range they
    round to inf and limit nothing, alike on every backend (1e300 gave NaN on cpu and an
    overflow error on the reference); a grad_clip below the smallest normal is refused."""
    device = kernel_device(backend)
    gen = torch.Generator().manual_seed(5)
    x, grad = (torch.randn(3, 5, generator=gen).to(device) for _ in range(2))
    kwargs = dict(seed=1, step=2, grad_clip_mode=grad_clip_mode)
    with use_backend(backend):
        plain = ebm_fast.langevin_update(x, grad, 0.1, 0.5, **kwargs)
        huge = ebm_fast.langevin_update(
            x, grad, 0.1, 0.5, grad_clip=1e300, clamp=(-1e300, 1e300), **kwargs
        )
        pinned = ebm_fast.langevin_update(x, grad, 0.1, 0.5, clamp=(1e300, None), **kwargs)
        with pytest.raises(ValueError, match="smallest normal"):
            ebm_fast.langevin_update(x, grad, 0.1, 0.5, grad_clip=1e-40, **kwargs)
    assert torch.equal(huge, plain)
    assert (pinned == float("inf")).all()
    if backend != "triton":  # float64: 1e150 is a finite limit there, and clips as one
        x64, grad64 = x.double(), grad.double() * 1e150
        with use_backend(backend):
            clipped = ebm_fast.langevin_update(x64, grad64, 1.0, 0.0, grad_clip=1e150, **kwargs)
        if grad_clip_mode == "value":
            want = x64 - grad64.clamp(-1e150, 1e150)
        else:
            norms = grad64.reshape(3, -1).norm(dim=1, keepdim=True)
            want = x64 - grad64 * (1e150 / norms.clamp(min=1e150))
        torch.testing.assert_close(clipped, want)


CPU_ONLY = pytest.mark.skipif(
    unavailable_reason("cpu") is not None,
    reason=f"cpu backend unavailable: {unavailable_reason('cpu')}",
)


@CPU_ONLY
@pytest.mark.parametrize("shape", [(1, 100_003), (3, 33_337), (257, 391)])
@pytest.mark.parametrize("grad_clip_mode", ["value", "norm"])
def test_large_tensors_on_cpu(shape, grad_clip_mode):
    """Sizes that split over threads within one chain (and its norm reduction) and across many."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=gen)
    grad = torch.randn(shape, generator=gen) * 3
    eps = torch.rand(shape[0], generator=gen) + 0.01
    sigma = torch.rand(shape[0], generator=gen)
    options = dict(
        seed=99,
        step=12,
        stream=0,
        chain_offset=3,
        grad_clip=50.0,
        grad_clip_mode=grad_clip_mode,
        clamp_lo=-1.5,
        clamp_hi=1.0,
    )
    x_before = x.clone()
    with use_backend("cpu"):
        _call(x, grad, eps, sigma, options, out=x)
    assert_matches_reference(x, x_before, grad, eps, sigma, options)


@CPU_ONLY
def test_cpu_kernel_rejects_what_the_wrapper_never_passes():
    """The C++ entry point checks its contract instead of reading out of bounds."""
    from ebm_fast import _cpp

    kernel = _cpp.ops().langevin_update_out
    x = torch.randn(4, 6)
    counters = (torch.tensor(0), torch.tensor(0), 0, 0, None, "value", None, None)
    eps, sigma = torch.tensor(0.1), torch.tensor(0.1)
    with pytest.raises(RuntimeError, match="contiguous"):
        kernel(torch.empty(6, 4).t(), x, x, eps, sigma, *counters)
    with pytest.raises(RuntimeError, match="step_size"):
        kernel(torch.empty_like(x), x, x, torch.ones(3), sigma, *counters)
    with pytest.raises(RuntimeError, match="noise_scale"):
        kernel(torch.empty_like(x), x, x, eps, sigma.double(), *counters)
    with pytest.raises(RuntimeError, match="grad_clip_mode"):
        kernel(torch.empty_like(x), x, x, eps, sigma, *counters[:5], "max", None, None)
