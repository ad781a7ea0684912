"""ebm_fast/kernels/triton/langevin_update.py against the reference: every option of
langevin_update_out, the two-pass norm reduction, the tile layout at sizes that span several
programs in every tiled dimension (chains straddling program edges, per-chain parameters, norm
clipping, nonzero chain_offset), and its PTX for sm_90. Runs under TRITON_INTERPRET=1 on the CPU
or on a GPU. Backend-parametrised comparisons live in tests/kernels/test_langevin_update.py."""

import pytest
import torch
from hypothesis import given, strategies as st

from ebm_fast.backends import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton") is not None,
    reason=f"triton backend unavailable: {unavailable_reason('triton')}",
)


import ebm_fast  # noqa: E402
from ebm_fast.kernels.triton import langevin_update as triton_langevin  # noqa: E402
from ebm_fast.reference.langevin_update import langevin_update_ref  # noqa: E402
from tests.helpers import (  # noqa: E402
    assert_within_eager_error,
    compile_for_sm90,
    counter,
    examples,
    kernel_device,
)

DEVICE = kernel_device("triton")
SEEDS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1, 2**32 - 1]))
STEPS = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
CHAIN_OFFSETS = st.sampled_from([0, 1, 2, 3, 5, 2**31 + 1, 2**40 + 3])
# Gradients are 3 * N(0, 1): per-chain norms of 3 to 44 for 1 to 216 elements, so "norm"
# clipping at 0.05 or 1.0 is active on every chain (and on none at 1e4).
GRAD_CLIPS = st.sampled_from(
    [
        (None, "value"),
        (0.05, "value"),
        (1.0, "value"),
        (0.05, "norm"),
        (1.0, "norm"),
        (1.0, "norm"),
        (1e4, "norm"),
    ]
)


def _update_inputs(shape, dtype, per_chain_params, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(dtype)
    grad = (torch.randn(shape, generator=gen) * 3).to(dtype)
    chains = shape[0]
    step_size = torch.rand(chains, generator=gen) + 0.05 if per_chain_params else torch.tensor(0.3)
    noise_scale = torch.rand(chains, generator=gen) if per_chain_params else torch.tensor(0.7)
    return x, grad, step_size, noise_scale


def _assert_update_close(out, x, grad, step_size, noise_scale, seed, step, options):
    """float32: within 2x the eager float32 error of the float64 reference. float16/bfloat16:
    the float32 reference rounded once, to one unit in the last place."""
    want = langevin_update_ref(x, grad, step_size, noise_scale, seed, step, *options)
    if out.dtype == torch.float32:
        exact = langevin_update_ref(
            x.double(),
            grad.double(),
            step_size.double(),
            noise_scale.double(),
            seed,
            step,
            *options,
            noise_dtype=torch.float64,
        )
        assert_within_eager_error(out, want, exact, atol=1e-6)
    else:
        eps = torch.finfo(out.dtype).eps
        torch.testing.assert_close(out.cpu().float(), want.float(), rtol=eps, atol=eps)


def _run_update(
    x, grad, step_size, noise_scale, seed, step, options, *, in_place=False, params_on_device=True
):
    """langevin_update_out on copies of the inputs on the kernel's device; returns out."""
    device = DEVICE if params_on_device else None
    x_dev = x.clone().to(DEVICE)  # x itself stays the reference's input
    out = x_dev if in_place else torch.empty_like(x_dev)
    triton_langevin.langevin_update_out(
        out,
        x_dev,
        grad.to(DEVICE),
        step_size.to(device or "cpu"),
        noise_scale.to(device or "cpu"),
        counter(seed, device),
        counter(step, device),
        *options,
    )
    return out


@pytest.mark.parametrize("per_chain", [1, 5, 3000])
def test_norm_clip_scales_match_reference(per_chain):
    """Per-chain c / max(norm, c), with one or several partial sums per chain and a zero chain."""
    gen = torch.Generator().manual_seed(per_chain)
    grad = torch.randn(3, per_chain, generator=gen) * torch.tensor([[0.01], [3.0], [0.0]])
    scales = triton_langevin._norm_clip_scales(grad.to(DEVICE), 0.5)
    norms = torch.linalg.vector_norm(grad.double(), dim=1)
    torch.testing.assert_close(scales.cpu().double(), 0.5 / norms.clamp(min=0.5), rtol=1e-5, atol=0)


@pytest.mark.parametrize("reduce_block, max_splits, scale_chains", [(4, 3, 2), (16, 2, 4)])
def test_norm_clip_scales_over_several_blocks_splits_and_scale_programs(
    monkeypatch, reduce_block, max_splits, scale_chains
):
    """The two-pass reduction with every loop and grid dimension above one: several blocks per
    chunk, several chunks (splits) per chain, several chains per scale program and several
    scale programs (small constants patched in, so the interpreter stays fast)."""
    monkeypatch.setattr(triton_langevin, "REDUCE_BLOCK", reduce_block)
    monkeypatch.setattr(triton_langevin, "MAX_SPLITS", max_splits)
    monkeypatch.setattr(triton_langevin, "SCALE_CHAINS", scale_chains)
    gen = torch.Generator().manual_seed(reduce_block)
    chains, per_chain = 7, 45
    grad = torch.randn(chains, per_chain, generator=gen) * torch.linspace(0, 2, chains)[:, None]
    grad[3, -1] = 40.0  # the last element of a chain counts
    scales = triton_langevin._norm_clip_scales(grad.to(DEVICE), 1.5)
    norms = torch.linalg.vector_norm(grad.double(), dim=1)
    torch.testing.assert_close(scales.cpu().double(), 1.5 / norms.clamp(min=1.5), rtol=1e-5, atol=0)


@examples(20)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    per_chain_params=st.booleans(),
    params_on_device=st.booleans(),
    grad_clip=GRAD_CLIPS,
    clamp=st.sampled_from([(None, None), (-1.0, None), (None, 0.5), (-0.5, 0.5), (0.2, 0.2)]),
    chain_offset=CHAIN_OFFSETS,
    seed=SEEDS,
    step=STEPS,
    stream=st.integers(0, 5),
    in_place=st.booleans(),
    groups=st.sampled_from([1, 2, triton_langevin.GROUPS]),
)
def test_langevin_update_out_matches_reference(
    shape,
    dtype,
    per_chain_params,
    params_on_device,
    grad_clip,
    clamp,
    chain_offset,
    seed,
    step,
    stream,
    in_place,
    groups,
):
    """Every option; tiles of 4 and 8 elements as well as the real one, so most of these small
    shapes span several programs with chains straddling their edges."""
    x, grad, step_size, noise_scale = _update_inputs(shape, dtype, per_chain_params, seed % 1000)
    options = (stream, chain_offset, *grad_clip, *clamp)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_langevin, "GROUPS", groups)
        patch.setattr(triton_langevin, "REDUCE_BLOCK", 4)  # several partial sums per chain
        out = _run_update(
            x,
            grad,
            step_size,
            noise_scale,
            seed,
            step,
            options,
            in_place=in_place,
            params_on_device=params_on_device,
        )
    _assert_update_close(out, x, grad, step_size, noise_scale, seed, step, options)


# Shapes of 3 to 4 real programs (2048 elements each): chains of 999 and 1000 elements straddle
# the program edges; chain offsets that shift the tiles by 0 (1000 per chain) or by 1 to 3.
MULTI_PROGRAM_CASES = [
    # shape, dtype, per-chain params, (grad_clip, mode), clamp, chain_offset
    ((5, 3, 333), torch.float32, True, (None, "value"), (None, None), 0),
    ((5, 3, 333), torch.float32, True, (2.0, "norm"), (-2.0, 2.0), 3),
    ((7, 1000), torch.float32, False, (2.0, "norm"), (None, None), 2**31 + 1),
    ((7, 1000), torch.float32, True, (0.5, "value"), (-1.0, None), 5),
    ((5, 999), torch.bfloat16, True, (2.0, "norm"), (None, 1.5), 1),
    ((3, 2049), torch.float16, True, (None, "value"), (None, None), 2),
]


@pytest.mark.parametrize(
    "shape, dtype, per_chain_params, grad_clip, clamp, chain_offset", MULTI_PROGRAM_CASES
)
def test_update_across_several_programs(
    shape, dtype, per_chain_params, grad_clip, clamp, chain_offset
):
    """The real tile size: element n's chain, per-chain parameters and clip scale are found in
    every program, not only the first."""
    numel = shape[0] * shape[1] * (shape[2] if len(shape) > 2 else 1)
    assert numel > 2 * 4 * triton_langevin.GROUPS
    x, grad, step_size, noise_scale = _update_inputs(shape, dtype, per_chain_params, numel)
    grad[1] = 0.0  # a zero chain: its norm scale is 1
    options = (0, chain_offset, *grad_clip, *clamp)
    out = _run_update(x, grad, step_size, noise_scale, 21, 8, options)
    _assert_update_close(out, x, grad, step_size, noise_scale, 21, 8, options)


def test_long_chain_index_path(monkeypatch):
    """The 64-bit chain-index arithmetic (chains near 2**31 elements), forced on a small input
    over several programs."""
    monkeypatch.setattr(triton_langevin, "INT32_CHAIN_LIMIT", 0)
    monkeypatch.setattr(triton_langevin, "GROUPS", 2)
    x, grad, step_size, noise_scale = _update_inputs((4, 3, 3), torch.float32, True, 1)
    options = (0, 3, 1.0, "norm", -1.0, 1.0)
    out = _run_update(x, grad, step_size, noise_scale, 8, 2, options, params_on_device=False)
    _assert_update_close(out, x, grad, step_size, noise_scale, 8, 2, options)


def test_langevin_update_dispatches_to_triton_in_place():
    """The public op under use_backend("triton"), in place, non-contiguous grad, tensor counters."""
    x, grad, step_size, noise_scale = _update_inputs((5, 6), torch.float32, True, 3)
    x_dev, grad_t = x.clone().to(DEVICE), grad.to(DEVICE).t().contiguous().t()
    with ebm_fast.use_backend("triton"):
        ebm_fast.langevin_update(
            x_dev,
            grad_t,
            step_size.to(DEVICE),
            0.25,
            seed=torch.tensor(17, device=DEVICE),
            step=torch.tensor(4),
            chain_offset=2,
            grad_clip=0.5,
            clamp=(-2.0, 2.0),
            out=x_dev,
        )
    options = (0, 2, 0.5, "value", -2.0, 2.0)
    _assert_update_close(x_dev, x, grad, step_size, torch.tensor(0.25), 17, 4, options)


def test_float64_is_refused_with_its_dtype_named():
    x = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    args = (
        torch.tensor(0.1),
        torch.tensor(0.1),
        torch.tensor(0),
        torch.tensor(0),
        0,
        0,
        None,
        "value",
        None,
        None,
    )
    with pytest.raises(TypeError, match="float64"):
        triton_langevin.langevin_update_out(torch.empty_like(x), x, x, *args)
    with ebm_fast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        ebm_fast.langevin_update(x, x, 0.1, 0.1, seed=0, step=0)


_UPDATE_PTX = r"""
from ebm_fast.kernels.triton import langevin_update as lu

def update(dtype, per_chain, clip, shift):
    types = {"out_ptr": "*" + dtype, "x_ptr": "*" + dtype, "grad_ptr": "*" + dtype,
             "step_size": "*fp32" if per_chain else "fp32", "noise_scale": "*fp32",
             "clip_scale_ptr": "*fp32", "seed": "*i64", "step": "i64", "first_group": "i64",
             "grad_clip": "fp32", "clamp_lo": "fp32", "clamp_hi": "fp32"}
    constexprs = {"SEED_IS_POINTER": True, "STEP_IS_POINTER": False,
                  "STEP_SIZE_MODE": 2 if per_chain else 0, "NOISE_SCALE_MODE": 1,
                  "CLIP_MODE": clip, "CLAMP_LO": True, "CLAMP_HI": False,
                  "LONG_CHAINS": per_chain, "SHIFT": shift, "GROUPS": lu.GROUPS}
    return vector_counts(compile_ptx(lu._langevin_update_kernel, types, constexprs,
                                     ["out_ptr", "x_ptr", "grad_ptr", "numel"]))

print(json.dumps({
    "update_fp32_aligned": update("fp32", False, 0, 0),
    "update_bf16_per_chain_norm": update("bf16", True, 2, 3),
    "update_fp16_value": update("fp16", False, 1, 1),
    "chain_sumsq": vector_counts(compile_ptx(
        lu._chain_sumsq_kernel, {"partial_ptr": "*fp32", "grad_ptr": "*bf16"},
        {"BLOCK": lu.REDUCE_BLOCK})),
    "norm_scale": vector_counts(compile_ptx(
        lu._norm_scale_kernel, {"scale_ptr": "*fp32", "partial_ptr": "*fp32", "grad_clip": "fp32"},
        {"CHAINS": lu.SCALE_CHAINS, "SPLITS": 64})),
}))
"""


def test_update_kernels_compile_for_sm90():
    """Every clip mode, dtype and parameter mode lowers to PTX; aligned float32 tiles move
    128-bit words."""
    counts = compile_for_sm90(_UPDATE_PTX)
    aligned = counts["update_fp32_aligned"]
    assert aligned["v4_loads"] > 0 and aligned["v4_stores"] > 0, counts
