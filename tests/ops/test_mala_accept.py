"""The mala_accept op: the reference against first principles, every backend against the
reference (hypothesis), registration (opcheck), bad input, and a MALA chain built from
langevin_update + mala_accept that must sample the target's variance."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

import ebm_fast
from ebm_fast import use_backend
from ebm_fast.noise import STREAM_MALA_ACCEPT
from ebm_fast.ops.mala_accept import _mala_accept_op, mala_accept
from ebm_fast.reference.mala_accept import mala_accept_ref
from ebm_fast.reference.philox import philox_normal_ref, philox_uniform_ref
from ebm_fast.validation import compute_dtype
from tests.helpers import kernel_backends, kernel_device

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53}


def _gaussian_proposal(
    chains, shape, dtype, step_size, temperature, curvature, seed, device="cpu", layout_stride=1
):
    """A real MALA proposal for E(x) = curvature |x|^2 / 2: (x, y, grad_x, grad_y, energy_x,
    energy_y), states in ``dtype`` (every ``layout_stride``-th chain of a larger tensor, so
    layout_stride > 1 gives non-contiguous tensors), energies in the compute dtype."""
    gen = torch.Generator().manual_seed(seed)
    full = (chains * layout_stride, *shape)
    x = torch.randn(full, generator=gen, dtype=torch.float64)
    y = (
        x
        - step_size * curvature * x
        + math.sqrt(2 * step_size * temperature)
        * torch.randn(full, generator=gen, dtype=torch.float64)
    )
    x, y = x.to(dtype), y.to(dtype)
    cdt = compute_dtype(dtype)

    def energy(t):
        return curvature * (t.to(torch.float64) ** 2).reshape(t.shape[0], -1).sum(1) / 2

    tensors = (
        x,
        y,
        (curvature * x.double()).to(dtype),
        (curvature * y.double()).to(dtype),
        energy(x).to(cdt),
        energy(y).to(cdt),
    )
    return tuple(t[::layout_stride].to(device) for t in tensors)


# ---------------------------------------------------------------------------------------------
# The reference against first principles.


def _log_alpha_by_hand(x, y, eps, temp):
    """1-D Gaussian E = x^2 / 2 (so grad = x), the textbook MALA ratio in Python floats."""
    forward = (y - x + eps * x) ** 2  # |y - x + eps grad(x)|^2
    reverse = (x - y + eps * y) ** 2  # |x - y + eps grad(y)|^2
    return -(y * y / 2 - x * x / 2) / temp - (reverse - forward) / (4 * eps * temp)


@pytest.mark.parametrize("eps,temp", [(0.05, 1.0), (1.5, 0.3), (0.7, 4.0)])
def test_reference_matches_hand_computed_gaussian_ratio(eps, temp):
    chains = 64
    x, y, gx, gy, ex, ey = _gaussian_proposal(chains, (1,), torch.float64, eps, temp, 1.0, 5)
    accepted, prob = mala_accept_ref(
        x,
        y,
        gx,
        gy,
        ex,
        ey,
        torch.tensor(eps, dtype=torch.float64),
        torch.tensor(temp, dtype=torch.float64),
        17,
        4,
    )
    u = philox_uniform_ref((chains,), seed=17, step=4, stream=STREAM_MALA_ACCEPT)
    expected = [
        min(1.0, math.exp(_log_alpha_by_hand(a, b, eps, temp)))
        for a, b in zip(x[:, 0].tolist(), y[:, 0].tolist())
    ]
    torch.testing.assert_close(
        prob, torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-12
    )
    assert torch.equal(accepted, u.double() < prob)
    if eps > 1:  # a step this large must reject a fair share, so both branches are exercised
        assert 0 < accepted.sum() < chains


def test_reference_multidimensional_ratio_by_hand():
    eps, temp, curvature = 0.4, 0.8, 1.7
    x, y, gx, gy, ex, ey = _gaussian_proposal(3, (2, 3), torch.float64, eps, temp, curvature, 9)
    _, prob = mala_accept_ref(
        x,
        y,
        gx,
        gy,
        ex,
        ey,
        torch.tensor(eps, dtype=torch.float64),
        torch.tensor(temp, dtype=torch.float64),
        1,
        2,
    )
    for chain in range(3):
        xs, ys = x[chain].flatten().tolist(), y[chain].flatten().tolist()
        forward = math.fsum((b - a + eps * curvature * a) ** 2 for a, b in zip(xs, ys))
        reverse = math.fsum((a - b + eps * curvature * b) ** 2 for a, b in zip(xs, ys))
        energy_change = curvature * math.fsum(b * b - a * a for a, b in zip(xs, ys)) / 2
        log_alpha = -energy_change / temp - (reverse - forward) / (4 * eps * temp)
        assert prob[chain].item() == pytest.approx(min(1.0, math.exp(log_alpha)), rel=1e-9)


def test_non_finite_energy_or_nan_ratio_rejects_and_infinite_current_energy_accepts():
    x, y, gx, gy, ex, ey = _gaussian_proposal(5, (3,), torch.float32, 0.1, 1.0, 1.0, 2)
    ey[0], ey[1] = float("inf"), float("nan")
    ey[2] = float("-inf")
    gy[3, 1] = float("nan")
    ex[4] = float("inf")
    x0, gx0, ex0 = x.clone(), gx.clone(), ex.clone()
    with use_backend("reference"):
        accepted, prob = mala_accept(x, y, gx, gy, ex, ey, 0.1, 1.0, seed=0, step=0)
    assert prob.tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    assert accepted.tolist() == [False, False, False, False, True]
    assert torch.equal(x[:4], x0[:4]) and torch.equal(gx[:4], gx0[:4])
    assert torch.equal(ex[:4], ex0[:4]) and torch.equal(x[4], y[4]) and ex[4] == ey[4]


# ---------------------------------------------------------------------------------------------
# Every backend against the reference.


def _accept_prob_error_bound(x, y, gx, gy, ex, ey, eps, temp, dtype):
    """A forward-error bound for accept_prob evaluated in the compute dtype of ``dtype``: the
    rounding of each term of the per-chain sum relative to its operands' magnitude, the
    summation's (D - 1) u, the energy difference, and a few ulps of exp."""
    cdt = compute_dtype(dtype)
    u = UNIT_ROUNDOFF[cdt]
    chains = x.shape[0]
    x64, y64, gx64, gy64 = (t.double().reshape(chains, -1) for t in (x, y, gx, gy))
    eps64 = eps.double().reshape(-1, 1)
    temp64 = temp.double()
    magnitude = (
        ((gx64 + gy64).abs() * (eps64 * (gy64 - gx64).abs() + 2 * (y64 - x64).abs()))
        .nan_to_num(0)
        .sum(1)
    )
    per_chain = x64.shape[1]
    energies = (ex.double().abs() + ey.double().abs()).nan_to_num(0, posinf=0)
    return u * ((per_chain + 8) * magnitude / (4 * temp64) + 4 * energies / temp64 + 16)


def _as_param(value, kind, chains, dtype, gen):
    """A step_size / temperature as a float, a 0-dim tensor or a per-chain tensor (B,)."""
    if kind == "float":
        return value
    if kind == "scalar":
        return torch.tensor(value, dtype=dtype)
    return value * (0.5 + torch.rand(chains, generator=gen, dtype=torch.float64)).to(dtype)


def _param_tensor(value, chains, dtype):
    """Any form _as_param gives, as a per-chain tensor (B,)."""
    return torch.as_tensor(value, dtype=dtype).expand(chains)


@st.composite
def _cases(draw):
    return dict(
        chains=draw(st.integers(1, 6)),
        shape=draw(st.sampled_from([(), (1,), (3,), (2, 3), (4, 1, 2)])),
        dtype=draw(st.sampled_from(FLOAT_DTYPES)),
        layout_stride=draw(st.sampled_from([1, 2])),
        eps=draw(st.floats(1e-3, 2.0)),
        temp=draw(st.floats(0.05, 5.0)),
        curvature=draw(st.floats(0.1, 3.0)),
        eps_kind=draw(st.sampled_from(["float", "scalar", "per_chain"])),
        temp_kind=draw(st.sampled_from(["float", "scalar", "per_chain"])),
        data_seed=draw(st.integers(0, 2**31 - 1)),
        seed=draw(st.integers(0, 2**64 - 1)),
        step=draw(st.integers(0, 2**32 - 1)),
        stream=draw(st.integers(0, 7)),
        chain_offset=draw(st.integers(0, 2**40)),
        seed_as_tensor=draw(st.booleans()),
        inject=draw(
            st.sampled_from([None, "inf energy_y", "nan energy_y", "nan grad_y", "inf energy_x"])
        ),
    )


def _check_backend_against_reference(backend, case):
    device = kernel_device(backend)
    dtype, chains = case["dtype"], case["chains"]
    cdt = compute_dtype(dtype)
    gen = torch.Generator().manual_seed(case["data_seed"])
    x, y, gx, gy, ex, ey = _gaussian_proposal(
        chains,
        case["shape"],
        dtype,
        case["eps"],
        case["temp"],
        case["curvature"],
        case["data_seed"],
        layout_stride=case["layout_stride"],
    )
    if case["inject"] is not None:
        kind, name = case["inject"].split()
        {"energy_y": ey, "grad_y": gy, "energy_x": ex}[name][0] = float(kind)
    eps = _as_param(case["eps"], case["eps_kind"], chains, cdt, gen)
    temp = _as_param(case["temp"], case["temp_kind"], chains, cdt, gen)
    seed = (
        torch.tensor(case["seed"] - (1 << 64) if case["seed"] >= 1 << 63 else case["seed"])
        if case["seed_as_tensor"]
        else case["seed"]
    )
    options = dict(
        seed=seed, step=case["step"], stream=case["stream"], chain_offset=case["chain_offset"]
    )

    def run(name):
        state = [t.clone().to(device) for t in (x, gx, ex)]
        if case["layout_stride"] > 1:  # keep the mutated tensors non-contiguous
            state = [torch.repeat_interleave(t, 2, dim=0)[::2] for t in state]
        mutated_x, mutated_gx, mutated_ex = state
        with use_backend(name):
            accepted, prob = mala_accept(
                mutated_x,
                y.to(device),
                mutated_gx,
                gy.to(device),
                mutated_ex,
                ey.to(device),
                eps,
                temp,
                **options,
            )
        return [t.cpu() for t in (accepted, prob, mutated_x, mutated_gx, mutated_ex)]

    ref_accepted, ref_prob, *_ = run("reference")
    accepted, prob, new_x, new_gx, new_ex = run(backend)
    assert accepted.dtype == torch.bool and prob.dtype == cdt
    assert accepted.shape == prob.shape == (chains,)

    eps_t, temp_t = _param_tensor(eps, chains, cdt), _param_tensor(temp, chains, cdt)
    _, exact = mala_accept_ref(
        *(t.double() for t in (x, y, gx, gy, ex, ey)),
        eps_t.double(),
        temp_t.double(),
        case["seed"],
        case["step"],
        case["stream"],
        case["chain_offset"],
    )
    bound = _accept_prob_error_bound(x, y, gx, gy, ex, ey, eps_t, temp_t, dtype)
    for got in (prob, ref_prob):
        assert ((got.double() - exact).abs() <= bound).all(), (got, exact, bound)

    u = philox_uniform_ref(
        (chains,),
        seed=case["seed"],
        step=case["step"],
        stream=case["stream"],
        chain_offset=case["chain_offset"],
    ).double()
    decidable = (u - exact).abs() >= torch.clamp(bound, min=1e-5)
    assert torch.equal(accepted[decidable], ref_accepted[decidable])
    assert torch.equal(accepted[decidable], (u < exact)[decidable])

    take = accepted.reshape(-1, *([1] * (x.dim() - 1)))
    exactly = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(new_x, torch.where(take, y, x), **exactly)
    torch.testing.assert_close(new_gx, torch.where(take, gy, gx), **exactly)
    torch.testing.assert_close(new_ex, torch.where(accepted, ey, ex), **exactly)


@pytest.mark.parametrize("backend", kernel_backends())
@given(case=_cases())
def test_backend_matches_reference(backend, case):
    if backend == "triton" and case["dtype"] == torch.float64:
        case["dtype"] = torch.float32  # the Triton kernel computes in float32 only
    _check_backend_against_reference(backend, case)


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
def test_chain_offset_shards_decide_like_the_whole_batch(backend):
    device = kernel_device(backend)
    x, y, gx, gy, ex, ey = _gaussian_proposal(
        7, (3,), torch.float32, 0.8, 1.0, 1.0, 4, device=device
    )
    with use_backend(backend):
        whole, whole_prob = mala_accept(
            x.clone(), y, gx.clone(), gy, ex.clone(), ey, 0.8, 1.0, seed=6, step=3
        )
        head = mala_accept(
            x[:3].clone(),
            y[:3],
            gx[:3].clone(),
            gy[:3],
            ex[:3].clone(),
            ey[:3],
            0.8,
            1.0,
            seed=6,
            step=3,
        )
        tail = mala_accept(
            x[3:].clone(),
            y[3:],
            gx[3:].clone(),
            gy[3:],
            ex[3:].clone(),
            ey[3:],
            0.8,
            1.0,
            seed=6,
            step=3,
            chain_offset=3,
        )
    assert torch.equal(whole, torch.cat([head[0], tail[0]]))
    assert torch.equal(whole_prob, torch.cat([head[1], tail[1]]))


# ---------------------------------------------------------------------------------------------
# Registration and validation.


@pytest.mark.parametrize("backend", ["reference"] + kernel_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_opcheck(backend, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernel computes in float32 only")
    device = kernel_device(backend)
    cdt = compute_dtype(dtype)
    x, y, gx, gy, ex, ey = _gaussian_proposal(3, (4,), dtype, 0.5, 1.0, 1.0, 1, device=device)
    args = (
        x,
        y,
        gx,
        gy,
        ex,
        ey,
        torch.tensor(0.5, dtype=cdt),
        torch.full((3,), 0.9, dtype=cdt, device=device),
        torch.tensor(3),
        torch.tensor(1),
        1,
        2,
    )
    with use_backend(backend):
        torch.library.opcheck(_mala_accept_op, args)


def _valid_inputs():
    x, y, gx, gy, ex, ey = _gaussian_proposal(4, (3,), torch.float32, 0.1, 1.0, 1.0, 0)
    return dict(
        x=x,
        y=y,
        grad_x=gx,
        grad_y=gy,
        energy_x=ex,
        energy_y=ey,
        step_size=0.1,
        temperature=1.0,
        seed=0,
        step=0,
        stream=1,
        chain_offset=0,
    )


BAD_INPUTS = [
    ("x", [1.0, 2.0], TypeError),
    ("x", torch.zeros(4, 3, dtype=torch.int32), TypeError),
    ("x", torch.tensor(1.0), ValueError),
    ("y", torch.zeros(4, 2), ValueError),
    ("y", torch.zeros(4, 3, device="meta"), ValueError),
    ("grad_x", torch.zeros(4, 3, dtype=torch.float64), TypeError),
    ("grad_y", torch.zeros(3, 3), ValueError),
    ("energy_x", torch.zeros(4, 1), ValueError),
    ("energy_x", None, TypeError),
    ("energy_y", torch.zeros(4, dtype=torch.float64), TypeError),
    ("energy_y", torch.zeros(4, device="meta"), ValueError),
    ("step_size", 0.0, ValueError),
    ("step_size", -0.1, ValueError),
    ("step_size", float("nan"), ValueError),
    ("step_size", torch.ones(4, dtype=torch.int64), TypeError),
    ("step_size", torch.ones(5), ValueError),
    ("temperature", 0.0, ValueError),
    ("temperature", float("inf"), ValueError),
    ("temperature", torch.ones(3), ValueError),
    ("temperature", torch.tensor(1.0, device="meta"), ValueError),
    ("temperature", "hot", TypeError),
    ("seed", 1.5, TypeError),
    ("step", -1, ValueError),
    ("stream", -1, ValueError),
    ("stream", 1.0, TypeError),
    ("chain_offset", -1, ValueError),
    ("chain_offset", 2**62 - 1, ValueError),
]


@pytest.mark.parametrize(
    "name,value,error", BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_refused_naming_the_argument(name, value, error):
    inputs = _valid_inputs()
    inputs[name] = value
    positional = [
        inputs.pop(k)
        for k in ("x", "y", "grad_x", "grad_y", "energy_x", "energy_y", "step_size", "temperature")
    ]
    with pytest.raises(error, match=name):
        mala_accept(*positional, **inputs)


def test_mutated_tensors_partially_overlapping_the_proposal_are_refused():
    inputs = _valid_inputs()
    states = torch.cat([inputs["x"], inputs["y"][:1]])
    inputs["x"], inputs["y"] = states[:4], states[1:]
    positional = [
        inputs.pop(k)
        for k in ("x", "y", "grad_x", "grad_y", "energy_x", "energy_y", "step_size", "temperature")
    ]
    with pytest.raises(ValueError, match="x partially overlaps y"):
        mala_accept(*positional, **inputs)


def test_energy_of_half_precision_states_must_be_float32():
    inputs = _valid_inputs()
    x, y, gx, gy = (inputs[k].to(torch.bfloat16) for k in ("x", "y", "grad_x", "grad_y"))
    with pytest.raises(TypeError, match="energy_x"):
        mala_accept(
            x,
            y,
            gx,
            gy,
            inputs["energy_x"].bfloat16(),
            inputs["energy_y"],
            0.1,
            1.0,
            seed=0,
            step=0,
        )


def test_inputs_that_require_grad_are_updated_like_an_optimiser_step():
    x, y, gx, gy, ex, ey = _gaussian_proposal(4, (3,), torch.float32, 2.0, 1.0, 1.0, 3)
    x0 = x.clone()
    x.requires_grad_()
    accepted, _ = mala_accept(x, y, gx, gy, ex, ey, 2.0, 1.0, seed=0, step=0)
    assert 0 < accepted.sum() < 4
    torch.testing.assert_close(x.detach(), torch.where(accepted[:, None], y, x0), rtol=0, atol=0)
    assert x.requires_grad and x.is_leaf


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_no_host_synchronisation_on_cuda():
    x, y, gx, gy, ex, ey = _gaussian_proposal(
        64, (8,), torch.float32, 0.1, 1.0, 1.0, 0, device="cuda"
    )
    seed, step = torch.tensor(3, device="cuda"), torch.tensor(4, device="cuda")
    eps = torch.full((64,), 0.1, device="cuda")
    mala_accept(x, y, gx, gy, ex, ey, eps, 1.0, seed=seed, step=step)  # warm-up (compiles)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mala_accept(x, y, gx, gy, ex, ey, eps, 1.0, seed=seed, step=step)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---------------------------------------------------------------------------------------------
# Sampling: the accept/reject makes an unadjusted Langevin chain exact.


def test_mala_chain_samples_the_target_variance():
    """E = x^2 / 2 at temperature T targets N(0, T). With eps = 1 the unadjusted chain's
    stationary variance is T / (1 - eps / 2) = 2 T, so only a correct accept/reject lands on T.
    The chains are independent: the sample variance has standard error T sqrt(2 / (chains - 1))."""
    chains, steps, eps, temp, seed = 4096, 120, 1.0, 0.5, 21
    noise_scale = math.sqrt(2 * eps * temp)
    x = 3 * philox_normal_ref((chains, 1), seed=seed, step=0, stream=9).double()
    grad_x, energy_x = x.clone(), x[:, 0] ** 2 / 2
    accept_rate = 0.0
    with use_backend("reference"):
        for k in range(1, steps + 1):
            y = ebm_fast.langevin_update(x, grad_x, eps, noise_scale, seed=seed, step=k, stream=0)
            accepted, _ = mala_accept(
                x, y, grad_x, y.clone(), energy_x, y[:, 0] ** 2 / 2, eps, temp, seed=seed, step=k
            )
            accept_rate += accepted.double().mean().item() / steps
    mean, var = x.mean().item(), x.var().item()
    assert abs(mean) < 5 * math.sqrt(temp / chains)
    assert abs(var - temp) < 5 * temp * math.sqrt(2 / (chains - 1)), var
    assert 0.3 < accept_rate < 0.99


def test_compiles_with_fullgraph():
    """Dynamo traces the wrapper (validation, detach) and functionalises the in-place op."""
    x, y, gx, gy, ex, ey = _gaussian_proposal(8, (3,), torch.float32, 1.5, 1.0, 1.0, 6)
    seed, step = torch.tensor(2), torch.tensor(7)

    def mala_step(x, grad_x, energy_x):
        return mala_accept(x, y, grad_x, gy, energy_x, ey, 1.5, 1.0, seed=seed, step=step)

    compiled_state = [t.clone() for t in (x, gx, ex)]
    eager_state = [t.clone() for t in (x, gx, ex)]
    compiled = torch.compile(mala_step, fullgraph=True, backend="aot_eager")(*compiled_state)
    eager = mala_step(*eager_state)
    assert 0 < eager[0].sum() < 8
    for got, expected in zip((*compiled, *compiled_state), (*eager, *eager_state)):
        assert torch.equal(got, expected)
