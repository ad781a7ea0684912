"""ebm_fast/kernels/triton/philox.py, _noise_spec.py and _launch.py: the @triton.jit noise-spec
helpers, how scalars reach the kernels, the tiled philox_out kernel across program tiles, and its
PTX for sm_90. Runs under TRITON_INTERPRET=1 on the CPU or on a GPU. Backend-parametrised
comparisons of the public draws live in tests/kernels/test_philox.py."""

import math

import pytest
import torch
from hypothesis import given, strategies as st

from ebm_fast.backends import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton") is not None,
    reason=f"triton backend unavailable: {unavailable_reason('triton')}",
)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

import ebm_fast  # noqa: E402
from ebm_fast.kernels.triton import philox as triton_philox  # noqa: E402
from ebm_fast.kernels.triton._launch import read_scalar, scalar_arg  # noqa: E402
from ebm_fast.kernels.triton._noise_spec import spec_normal, spec_uniform, spec_words  # noqa: E402
from ebm_fast.ops.philox import philox_normal  # noqa: E402
from ebm_fast.reference import philox as ref  # noqa: E402
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


def _as_uint32(words: torch.Tensor) -> torch.Tensor:
    return words.to(torch.int64) & 0xFFFFFFFF


@triton.jit(do_not_specialize=["seed", "step"])
def _spec_helpers_kernel(
    words_ptr,
    uniform_ptr,
    normal_ptr,
    n_ptr,
    seed,
    step,
    stream,
    count,
    IS_POINTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    i = tl.arange(0, BLOCK)
    mask = i < count
    n = tl.load(n_ptr + i, mask=mask, other=0)
    seed = read_scalar(seed, IS_POINTER)
    step = read_scalar(step, IS_POINTER)
    tl.store(words_ptr + i, spec_words(seed, step, stream, n).to(tl.int32, bitcast=True), mask=mask)
    tl.store(uniform_ptr + i, spec_uniform(seed, step, stream, n), mask=mask)
    tl.store(normal_ptr + i, spec_normal(seed, step, stream, n), mask=mask)


@pytest.mark.parametrize("is_pointer", [False, True], ids=["by_value", "by_pointer"])
@pytest.mark.parametrize(
    "seed,step", [(0, 0), (7, 3), (2**63 + 12345, 2**32 - 1), (2**64 - 1, 2**31)]
)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_per_element_spec_helpers_match_reference(is_pointer, seed, step, index_dtype):
    """spec_words/uniform/normal on arbitrary indices: across 4-alignment and chain boundaries
    (chains of 3 elements), out of order, and beyond 2**32 (the counter's high word) for int64
    indices; int32 indices (e.g. chain numbers) give the same draws."""
    stream = 5
    n = torch.tensor(
        [
            0,
            1,
            2,
            3,
            4,
            5,
            6,
            7,
            8,
            11,
            12,
            13,
            2,
            2**31 - 1,
            2**32 + 1,
            2**32 + 6,
            2**41 + 3,
            3 * (2**31 + 1) + 2,
        ],
        dtype=torch.int64,
    )
    n = n[n <= torch.iinfo(index_dtype).max]
    if is_pointer:
        seed_arg, step_arg = counter(seed, DEVICE), counter(step, DEVICE)
    else:
        seed_arg, step_arg = counter(seed).item(), step
    words = torch.empty(n.numel(), dtype=torch.int32, device=DEVICE)
    uniform = torch.empty(n.numel(), dtype=torch.float32, device=DEVICE)
    normal = torch.empty(n.numel(), dtype=torch.float32, device=DEVICE)
    _spec_helpers_kernel[(1,)](
        words,
        uniform,
        normal,
        n.to(index_dtype).to(DEVICE),
        seed_arg,
        step_arg,
        stream,
        n.numel(),
        IS_POINTER=is_pointer,
        BLOCK=32,
    )

    blocks = ref.philox_blocks_ref(n, seed, step, stream)
    expected_words = torch.stack(blocks).gather(0, (n % 4)[None])[0]
    assert torch.equal(_as_uint32(words.cpu()), expected_words)
    assert torch.equal(uniform.cpu(), ref.uniform_from_bits(expected_words))
    pair = (n % 4) // 2
    u_a = ref.uniform_from_bits(torch.stack(blocks).gather(0, (2 * pair)[None])[0]).double()
    u_b = ref.uniform_from_bits(torch.stack(blocks).gather(0, (2 * pair + 1)[None])[0]).double()
    rho = torch.sqrt(-2 * torch.log(u_a.clamp(min=1e-7)))
    exact = torch.where(
        n % 2 == 0, rho * torch.cos(2 * math.pi * u_b), rho * torch.sin(2 * math.pi * u_b)
    )
    torch.testing.assert_close(normal.cpu().double(), exact, rtol=1e-5, atol=1e-5)


def _assert_philox_out_matches_reference(out, seed, step, stream, chain_offset, distribution):
    draw = {
        "bits": ref.philox_bits_ref,
        "uniform": ref.philox_uniform_ref,
        "normal": ref.philox_normal_ref,
    }[distribution]
    want = draw(out.shape, seed=seed, step=step, stream=stream, chain_offset=chain_offset)
    if distribution == "normal":
        exact = ref.philox_normal_ref(
            out.shape,
            seed=seed,
            step=step,
            stream=stream,
            chain_offset=chain_offset,
            dtype=torch.float64,
        )
        assert_within_eager_error(out, want, exact, atol=1e-6)
    else:
        assert torch.equal(out.cpu(), want)


@examples(12)
@given(
    chains=st.integers(1, 5),
    per_chain=st.integers(1, 9),
    chain_offset=CHAIN_OFFSETS,
    seed=SEEDS,
    step=STEPS,
    stream=st.integers(0, 2**32 - 1),
    distribution=st.sampled_from(["bits", "uniform", "normal"]),
    on_device=st.booleans(),
    groups=st.sampled_from([1, 2, triton_philox.GROUPS]),
)
def test_philox_out_matches_reference(
    chains, per_chain, chain_offset, seed, step, stream, distribution, on_device, groups
):
    """The tiled kernel for every alignment n0 % 4, seeds >= 2**63, counters on host or device,
    with tiles of 4 and 8 elements too (several programs for these small shapes)."""
    dtype = torch.int32 if distribution == "bits" else torch.float32
    out = torch.empty((chains, per_chain), dtype=dtype, device=DEVICE)
    device = DEVICE if on_device else None
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_philox, "GROUPS", groups)
        triton_philox.philox_out(
            out, counter(seed, device), counter(step, device), stream, chain_offset, distribution
        )
    _assert_philox_out_matches_reference(out, seed, step, stream, chain_offset, distribution)


@pytest.mark.parametrize("distribution", ["bits", "normal"])
@pytest.mark.parametrize("chain_offset", [0, 1, 2, 3])
def test_philox_out_across_program_tiles(chain_offset, distribution):
    """Several programs of the real tile (4 * GROUPS elements), chains straddling tile edges;
    2 * 4 * GROUPS - 1 elements, so an alignment shift of 2 or 3 needs a third program."""
    shape = (3, (2 * 4 * triton_philox.GROUPS - 1) // 3)
    assert shape[0] * shape[1] == 2 * 4 * triton_philox.GROUPS - 1
    dtype = torch.int32 if distribution == "bits" else torch.float32
    out = torch.empty(shape, dtype=dtype, device=DEVICE)
    triton_philox.philox_out(
        out, counter(99, DEVICE), counter(4, DEVICE), 2, chain_offset, distribution
    )
    _assert_philox_out_matches_reference(out, 99, 4, 2, chain_offset, distribution)


def test_public_draws_dispatch_to_triton_and_split_into_chunks():
    """philox_normal under use_backend("triton"): two chunks with chain_offset equal the whole,
    seed/step given as 0-dim tensors."""
    seed, step = torch.tensor(-5, device=DEVICE), torch.tensor(11, device=DEVICE)
    with ebm_fast.use_backend("triton"):
        whole = philox_normal((5, 7), seed=seed, step=step, device=DEVICE)
        head = philox_normal((2, 7), seed=seed, step=step, device=DEVICE)
        tail = philox_normal((3, 7), seed=seed, step=step, chain_offset=2, device=DEVICE)
    assert torch.equal(torch.cat([head, tail]), whole)
    want = ref.philox_normal_ref((5, 7), seed=2**64 - 5, step=11)
    torch.testing.assert_close(whole.cpu(), want, rtol=1e-5, atol=1e-5)


def test_scalar_arg_reads_cpu_values_on_the_host_and_passes_device_ones_by_pointer():
    seed = torch.tensor(2**63 - 1 - 2**64 + 1)
    assert scalar_arg(seed, torch.device("cuda", 0), "seed") == (seed.item(), False)
    on_kernel_device = torch.tensor(3, device=DEVICE)
    arg, is_pointer = scalar_arg(on_kernel_device, DEVICE, "step")
    assert arg is on_kernel_device and is_pointer
    with pytest.raises(ValueError, match="step is on meta"):
        scalar_arg(torch.tensor(3, device="meta"), DEVICE, "step")


_PHILOX_PTX = r"""
from ebm_fast.kernels.triton import philox as ph

def philox(out, seed, step, distribution, shift, aligned):
    types = {"out_ptr": out, "seed": seed, "step": step, "first_group": "i64"}
    constexprs = {"SEED_IS_POINTER": seed.startswith("*"), "STEP_IS_POINTER": step.startswith("*"),
                  "DISTRIBUTION": distribution, "SHIFT": shift, "GROUPS": ph.GROUPS}
    return vector_counts(compile_ptx(ph._philox_kernel, types, constexprs, aligned))

print(json.dumps({
    "normal_aligned": philox("*fp32", "i64", "*i64", 2, 0, ["out_ptr", "numel"]),
    "uniform": philox("*fp32", "*i64", "i64", 1, 1, []),
    "bits": philox("*i32", "*i64", "i64", 0, 2, []),
}))
"""


def test_philox_kernel_compiles_for_sm90():
    """Every distribution lowers to PTX; aligned float32 tiles store 128-bit words."""
    counts = compile_for_sm90(_PHILOX_PTX)
    assert counts["normal_aligned"]["v4_stores"] > 0, counts
