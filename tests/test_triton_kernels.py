"""Triton-specific checks: the @triton.jit noise-spec helpers, how scalars reach the kernels, the
tile layout (chain and 4-alignment boundaries), the norm reduction and every langevin_update option
against the reference. Runs under TRITON_INTERPRET=1 on the CPU (tiny shapes) or on a GPU.
Backend-parametrised comparisons live in test_noise_backends.py / test_langevin_update_backends.py.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ebm_fast.backends import unavailable_reason

pytestmark = pytest.mark.skipif(unavailable_reason("triton") is not None,
                                reason=f"triton backend unavailable: {unavailable_reason('triton')}")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import ebm_fast  # noqa: E402
from ebm_fast import noise  # noqa: E402
from ebm_fast.kernels.triton import langevin_update as triton_langevin  # noqa: E402
from ebm_fast.kernels.triton._noise import (  # noqa: E402
    read_scalar, scalar_arg, spec_normal, spec_uniform, spec_words)
from ebm_fast.kernels.triton.philox import GROUPS, philox_out  # noqa: E402
from ebm_fast.ops._dispatch import as_int64_scalar  # noqa: E402
from ebm_fast.reference.langevin_update import langevin_update_ref  # noqa: E402
from helpers import assert_within_eager_error, kernel_device  # noqa: E402

DEVICE = kernel_device("triton")
SEEDS = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1, 2**32 - 1]))
STEPS = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2**31, 2**32 - 1]))
CHAIN_OFFSETS = st.sampled_from([0, 1, 2, 3, 5, 2**31 + 1, 2**40 + 3])


def _counter(value: int, bits: int, on_device: bool) -> torch.Tensor:
    """A seed/step as the op passes it: a 0-dim int64 tensor on the CPU or on the kernel's device."""
    t = as_int64_scalar(value, "counter", bits)
    return t.to(DEVICE) if on_device else t


def _as_uint32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


@triton.jit(do_not_specialize=["seed", "step"])
def _spec_helpers_kernel(words_ptr, uniform_ptr, normal_ptr, n_ptr, seed, step, stream, count,
                         IS_POINTER: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    mask = i < count
    n = tl.load(n_ptr + i, mask=mask, other=0)
    seed = read_scalar(seed, IS_POINTER)
    step = read_scalar(step, IS_POINTER)
    tl.store(words_ptr + i, spec_words(seed, step, stream, n).to(tl.int32, bitcast=True), mask=mask)
    tl.store(uniform_ptr + i, spec_uniform(seed, step, stream, n), mask=mask)
    tl.store(normal_ptr + i, spec_normal(seed, step, stream, n), mask=mask)


@pytest.mark.parametrize("is_pointer", [False, True], ids=["by_value", "by_pointer"])
@pytest.mark.parametrize("seed,step", [(0, 0), (7, 3), (2**63 + 12345, 2**32 - 1),
                                       (2**64 - 1, 2**31)])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_per_element_spec_helpers_match_reference(is_pointer, seed, step, index_dtype):
    """spec_words/uniform/normal on arbitrary indices: across 4-alignment and chain boundaries
    (chains of 3 elements), out of order, and beyond 2**32 (the counter's high word) for int64
    indices; int32 indices (e.g. chain numbers) give the same draws."""
    stream = 5
    n = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 2, 2**31 - 1, 2**32 + 1, 2**32 + 6,
                      2**41 + 3, 3 * (2**31 + 1) + 2], dtype=torch.int64)
    n = n[n <= torch.iinfo(index_dtype).max]
    if is_pointer:
        seed_arg, step_arg = _counter(seed, 64, True), _counter(step, 32, True)
    else:
        seed_arg, step_arg = as_int64_scalar(seed, "seed", 64).item(), step
    words = torch.empty(n.numel(), dtype=torch.int32, device=DEVICE)
    uniform = torch.empty(n.numel(), dtype=torch.float32, device=DEVICE)
    normal = torch.empty(n.numel(), dtype=torch.float32, device=DEVICE)
    _spec_helpers_kernel[(1,)](words, uniform, normal, n.to(index_dtype).to(DEVICE), seed_arg, step_arg, stream,
                               n.numel(), IS_POINTER=is_pointer, BLOCK=32)

    blocks = noise.philox_blocks_ref(n, seed, step, stream)
    expected_words = torch.stack(blocks).gather(0, (n % 4)[None])[0]
    assert torch.equal(_as_uint32(words.cpu()), expected_words)
    assert torch.equal(uniform.cpu(), noise.uniform_from_bits(expected_words))
    pair = (n % 4) // 2
    u_a = noise.uniform_from_bits(torch.stack(blocks).gather(0, (2 * pair)[None])[0]).double()
    u_b = noise.uniform_from_bits(torch.stack(blocks).gather(0, (2 * pair + 1)[None])[0]).double()
    rho = torch.sqrt(-2 * torch.log(u_a.clamp(min=1e-7)))
    exact = torch.where(n % 2 == 0, rho * torch.cos(2 * math.pi * u_b),
                        rho * torch.sin(2 * math.pi * u_b))
    torch.testing.assert_close(normal.cpu().double(), exact, rtol=1e-5, atol=1e-5)


@settings(max_examples=12)
@given(chains=st.integers(1, 5), per_chain=st.integers(1, 9), chain_offset=CHAIN_OFFSETS,
       seed=SEEDS, step=STEPS, stream=st.integers(0, 2**32 - 1),
       distribution=st.sampled_from(["bits", "uniform", "normal"]),
       on_device=st.booleans())
def test_philox_out_matches_reference(chains, per_chain, chain_offset, seed, step, stream,
                                      distribution, on_device):
    """The tiled kernel for every alignment n0 % 4, seeds >= 2**63, counters on host or device."""
    dtype = torch.int32 if distribution == "bits" else torch.float32
    out = torch.empty((chains, per_chain), dtype=dtype, device=DEVICE)
    philox_out(out, _counter(seed, 64, on_device), _counter(step, 32, on_device), stream,
               chain_offset, distribution)
    draw = {"bits": noise.philox_bits_ref, "uniform": noise.philox_uniform_ref,
            "normal": noise.philox_normal_ref}[distribution]
    want = draw(out.shape, seed=seed, step=step, stream=stream, chain_offset=chain_offset)
    if distribution == "normal":
        exact = noise.philox_normal_ref(out.shape, seed=seed, step=step, stream=stream,
                                        chain_offset=chain_offset, dtype=torch.float64)
        assert_within_eager_error(out, want, exact, atol=1e-6)
    else:
        assert torch.equal(out.cpu(), want)


@pytest.mark.parametrize("chain_offset", [0, 1, 2, 3])
def test_philox_out_across_program_tiles(chain_offset):
    """Several programs (tiles of 4 * GROUPS elements), chains straddling tile edges."""
    shape = (3, 4 * GROUPS // 3 + 1)
    out = torch.empty(shape, dtype=torch.int32, device=DEVICE)
    philox_out(out, _counter(99, 64, True), _counter(4, 32, True), 2, chain_offset, "bits")
    want = noise.philox_bits_ref(shape, seed=99, step=4, stream=2, chain_offset=chain_offset)
    assert torch.equal(out.cpu(), want)


def test_public_draws_dispatch_to_triton_and_split_into_chunks():
    """philox_normal under use_backend("triton"): two chunks with chain_offset equal the whole,
    seed/step given as 0-dim tensors."""
    seed, step = torch.tensor(-5, device=DEVICE), torch.tensor(11, device=DEVICE)
    with ebm_fast.use_backend("triton"):
        whole = noise.philox_normal((5, 7), seed=seed, step=step, device=DEVICE)
        head = noise.philox_normal((2, 7), seed=seed, step=step, device=DEVICE)
        tail = noise.philox_normal((3, 7), seed=seed, step=step, chain_offset=2, device=DEVICE)
    assert torch.equal(torch.cat([head, tail]), whole)
    want = noise.philox_normal_ref((5, 7), seed=2**64 - 5, step=11)
    torch.testing.assert_close(whole.cpu(), want, rtol=1e-5, atol=1e-5)


def test_scalar_arg_reads_cpu_values_on_the_host_and_passes_device_ones_by_pointer():
    seed = torch.tensor(2**63 - 1 - 2**64 + 1)
    assert scalar_arg(seed, torch.device("cuda", 0), "seed") == (seed.item(), False)
    on_kernel_device = torch.tensor(3, device=DEVICE)
    arg, is_pointer = scalar_arg(on_kernel_device, DEVICE, "step")
    assert arg is on_kernel_device and is_pointer
    with pytest.raises(ValueError, match="step is on meta"):
        scalar_arg(torch.tensor(3, device="meta"), DEVICE, "step")


@pytest.mark.parametrize("per_chain", [1, 5, 3000])
def test_norm_clip_scales_match_reference(per_chain):
    """Per-chain c / max(norm, c), with one or several partial sums per chain and a zero chain."""
    gen = torch.Generator().manual_seed(per_chain)
    grad = torch.randn(3, per_chain, generator=gen) * torch.tensor([[0.01], [3.0], [0.0]])
    scales = triton_langevin._norm_clip_scales(grad.to(DEVICE), 0.5)
    norms = torch.linalg.vector_norm(grad.double(), dim=1)
    torch.testing.assert_close(scales.cpu().double(), 0.5 / norms.clamp(min=0.5),
                               rtol=1e-5, atol=0)


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
        exact = langevin_update_ref(x.double(), grad.double(), step_size.double(),
                                    noise_scale.double(), seed, step, *options,
                                    noise_dtype=torch.float64)
        assert_within_eager_error(out, want, exact, atol=1e-6)
    else:
        eps = torch.finfo(out.dtype).eps
        torch.testing.assert_close(out.cpu().float(), want.float(), rtol=eps, atol=eps)


@settings(max_examples=20)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       per_chain_params=st.booleans(), params_on_device=st.booleans(),
       grad_clip=st.sampled_from([None, 0.05, 1.0]), grad_clip_mode=st.sampled_from(["value", "norm"]),
       clamp=st.sampled_from([(None, None), (-1.0, None), (None, 0.5), (-0.5, 0.5), (0.2, 0.2)]),
       chain_offset=CHAIN_OFFSETS, seed=SEEDS, step=STEPS, stream=st.integers(0, 5),
       in_place=st.booleans())
def test_langevin_update_out_matches_reference(shape, dtype, per_chain_params, params_on_device,
                                               grad_clip, grad_clip_mode, clamp, chain_offset,
                                               seed, step, stream, in_place):
    x, grad, step_size, noise_scale = _update_inputs(shape, dtype, per_chain_params, seed % 1000)
    if params_on_device:
        step_size, noise_scale = step_size.to(DEVICE), noise_scale.to(DEVICE)
    options = (stream, chain_offset, grad_clip, grad_clip_mode, *clamp)
    x_dev = x.clone().to(DEVICE)  # x itself stays the reference's input
    out = x_dev if in_place else torch.empty_like(x_dev)
    triton_langevin.langevin_update_out(
        out, x_dev, grad.to(DEVICE), step_size, noise_scale,
        _counter(seed, 64, params_on_device), _counter(step, 32, params_on_device), *options)
    _assert_update_close(out, x, grad, step_size.cpu(), noise_scale.cpu(), seed, step, options)


def test_long_chain_index_path(monkeypatch):
    """The 64-bit chain-index arithmetic (chains near 2**31 elements), forced on a small input."""
    monkeypatch.setattr(triton_langevin, "INT32_CHAIN_LIMIT", 0)
    x, grad, step_size, noise_scale = _update_inputs((4, 3, 3), torch.float32, True, 1)
    options = (0, 3, 1.0, "norm", -1.0, 1.0)
    out = torch.empty_like(x, device=DEVICE)
    triton_langevin.langevin_update_out(out, x.to(DEVICE), grad.to(DEVICE), step_size.to(DEVICE),
                                        noise_scale.to(DEVICE), _counter(8, 64, False),
                                        _counter(2, 32, False), *options)
    _assert_update_close(out, x, grad, step_size, noise_scale, 8, 2, options)


def test_langevin_update_dispatches_to_triton_in_place():
    """The public op under use_backend("triton"), in place, non-contiguous grad, tensor counters."""
    x, grad, step_size, noise_scale = _update_inputs((5, 6), torch.float32, True, 3)
    x_dev, grad_t = x.clone().to(DEVICE), grad.to(DEVICE).t().contiguous().t()
    with ebm_fast.use_backend("triton"):
        ebm_fast.langevin_update(x_dev, grad_t, step_size.to(DEVICE), 0.25,
                                 seed=torch.tensor(17, device=DEVICE), step=torch.tensor(4),
                                 chain_offset=2, grad_clip=0.5, clamp=(-2.0, 2.0), out=x_dev)
    options = (0, 2, 0.5, "value", -2.0, 2.0)
    _assert_update_close(x_dev, x, grad, step_size, torch.tensor(0.25), 17, 4, options)


def test_float64_is_refused_with_its_dtype_named():
    x = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    args = (torch.tensor(0.1), torch.tensor(0.1), torch.tensor(0), torch.tensor(0), 0, 0, None,
            "value", None, None)
    with pytest.raises(TypeError, match="float64"):
        triton_langevin.langevin_update_out(torch.empty_like(x), x, x, *args)
    with ebm_fast.use_backend("triton"), pytest.raises(TypeError, match="float64"):
        ebm_fast.langevin_update(x, x, 0.1, 0.1, seed=0, step=0)


# Compiles the kernels for an H100 (sm_90) without a GPU: the interpreter runs the Python
# semantics only, this checks that they lower to PTX (types, casts, constexpr branches) and that
# aligned float32 tiles move 128-bit words. Runs in a subprocess: the interpreter must be off.
_COMPILE_FOR_SM90 = r"""
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ebm_fast.kernels.triton import langevin_update as lu, philox as ph

def compile_ptx(kernel, types, constexprs, aligned):
    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr" if name in constexprs else "i32") for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]

def update(dtype, per_chain, clip, shift):
    types = {"out_ptr": "*" + dtype, "x_ptr": "*" + dtype, "grad_ptr": "*" + dtype,
             "step_size": "*fp32" if per_chain else "fp32", "noise_scale": "*fp32",
             "clip_scale_ptr": "*fp32", "seed": "*i64", "step": "i64", "first_group": "i64",
             "grad_clip": "fp32", "clamp_lo": "fp32", "clamp_hi": "fp32"}
    constexprs = {"SEED_IS_POINTER": True, "STEP_IS_POINTER": False,
                  "STEP_SIZE_MODE": 2 if per_chain else 0, "NOISE_SCALE_MODE": 1,
                  "CLIP_MODE": clip, "CLAMP_LO": True, "CLAMP_HI": False,
                  "LONG_CHAINS": per_chain, "SHIFT": shift, "GROUPS": lu.GROUPS}
    return compile_ptx(lu._langevin_update_kernel, types, constexprs,
                       ["out_ptr", "x_ptr", "grad_ptr", "numel"])

ptx = {
    "update_fp32_aligned": update("fp32", False, 0, 0),
    "update_bf16_per_chain_norm": update("bf16", True, 2, 3),
    "update_fp16_value": update("fp16", False, 1, 1),
    "philox_normal_aligned": compile_ptx(
        ph._philox_kernel, {"out_ptr": "*fp32", "seed": "i64", "step": "*i64", "first_group": "i64"},
        {"SEED_IS_POINTER": False, "STEP_IS_POINTER": True, "DISTRIBUTION": 2, "SHIFT": 0,
         "GROUPS": ph.GROUPS}, ["out_ptr", "numel"]),
    "philox_bits": compile_ptx(
        ph._philox_kernel, {"out_ptr": "*i32", "seed": "*i64", "step": "i64", "first_group": "i64"},
        {"SEED_IS_POINTER": True, "STEP_IS_POINTER": False, "DISTRIBUTION": 0, "SHIFT": 2,
         "GROUPS": ph.GROUPS}, []),
    "chain_sumsq": compile_ptx(lu._chain_sumsq_kernel, {"partial_ptr": "*fp32", "grad_ptr": "*bf16"},
                               {"BLOCK": lu.REDUCE_BLOCK}, []),
    "norm_scale": compile_ptx(lu._norm_scale_kernel, {"scale_ptr": "*fp32", "partial_ptr": "*fp32",
                                                      "grad_clip": "fp32"},
                              {"CHAINS": lu.SCALE_CHAINS, "SPLITS": 64}, []),
}
print(json.dumps({name: {"v4_loads": len(re.findall(r"ld\.global(\.[a-z]+)*\.v4", text)),
                         "v4_stores": len(re.findall(r"st\.global(\.[a-z]+)*\.v4", text))}
                  for name, text in ptx.items()}))
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the kernels themselves")
def test_kernels_compile_for_sm90():
    import json
    import os
    import subprocess
    import sys

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton ships no ptxas here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default; silences 3.9's warning about it
    done = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True,
                          text=True, timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads(done.stdout.strip().splitlines()[-1])
    assert counts["update_fp32_aligned"]["v4_loads"] > 0 and counts["update_fp32_aligned"]["v4_stores"] > 0
    assert counts["philox_normal_aligned"]["v4_stores"] > 0
