"""ebm_fast/kernels/triton/mala_accept.py against the reference at sizes that span several
programs and several column blocks per chain (the two-pass walk over each chain: the reduction,
then the copy of accepted rows), and its PTX for sm_90. Runs under TRITON_INTERPRET=1 on the CPU
or on a GPU. Small random cases on every backend live in tests/ops/test_mala_accept.py."""

import pytest
import torch

from ebm_fast.backends import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton") is not None,
    reason=f"triton backend unavailable: {unavailable_reason('triton')}",
)

import triton  # noqa: E402

from ebm_fast.kernels.triton import mala_accept as triton_mala  # noqa: E402
from ebm_fast.reference.mala_accept import mala_accept_ref  # noqa: E402
from ebm_fast.reference.philox import philox_uniform_ref  # noqa: E402
from tests.helpers import compile_for_sm90, counter, kernel_device  # noqa: E402

DEVICE = kernel_device("triton")
SEED, STEP, STREAM, CHAIN_OFFSET = 2**63 + 5, 9, 1, 2**33 + 1


def _gaussian_proposals(chains, per_chain, dtype, gen):
    """MALA proposals for E = |x|^2 / 2 (grad = x) with per-chain step sizes and temperatures
    scaled by the dimension, so accept probabilities spread over (0, 1)."""
    eps = (0.5 + torch.rand(chains, generator=gen)) * 1.2 / per_chain**0.5
    temperature = 0.5 + torch.rand(chains, generator=gen)
    x = torch.randn(chains, per_chain, generator=gen) * temperature[:, None].sqrt()
    y = (
        x
        - eps[:, None] * x
        + (2 * eps * temperature)[:, None].sqrt() * torch.randn(chains, per_chain, generator=gen)
    )
    x, y = x.to(dtype), y.to(dtype)

    def energy(v):
        return 0.5 * v.float().pow(2).sum(1)

    energy_y = energy(y)
    energy_y[-2] = float("inf")  # a non-finite proposal is rejected
    return x, y, x.clone(), y.clone(), energy(x), energy_y, eps, temperature


# (chains, elements per chain, patched MAX_BLOCK, patched TILE_ELEMENTS): the real constants
# with chains of 1500 elements (two blocks of 1024, two chains per program, 4 programs) and of
# 3 elements (512 chains per program, 3 programs); patched tiles of 2 chains x 4 elements
# (3 blocks per chain, 6 programs).
LAYOUTS = [(7, 1500, None, None), (1500, 3, None, None), (11, 10, 4, 8)]


@pytest.mark.parametrize("chains, per_chain, max_block, tile_elements", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_accept_across_several_programs_and_blocks(
    monkeypatch, chains, per_chain, max_block, tile_elements, dtype
):
    if max_block is not None:
        monkeypatch.setattr(triton_mala, "MAX_BLOCK", max_block)
        monkeypatch.setattr(triton_mala, "TILE_ELEMENTS", tile_elements)
    block = min(triton_mala.MAX_BLOCK, triton.next_power_of_2(per_chain))
    chains_per_program = min(triton_mala.TILE_ELEMENTS // block, triton.next_power_of_2(chains))
    assert chains > chains_per_program and (per_chain > block or chains > 2 * chains_per_program)

    gen = torch.Generator().manual_seed(chains * per_chain)
    x, y, grad_x, grad_y, energy_x, energy_y, eps, temperature = _gaussian_proposals(
        chains, per_chain, dtype, gen
    )
    state = [t.clone().to(DEVICE) for t in (x, grad_x, energy_x)]
    accepted = torch.empty(chains, dtype=torch.bool, device=DEVICE)
    accept_prob = torch.empty(chains, dtype=torch.float32, device=DEVICE)
    triton_mala.mala_accept_out(
        accepted,
        accept_prob,
        state[0],
        y.to(DEVICE),
        state[1],
        grad_y.to(DEVICE),
        state[2],
        energy_y.to(DEVICE),
        eps.to(DEVICE),
        temperature.to(DEVICE),
        counter(SEED, DEVICE),
        counter(STEP),
        STREAM,
        CHAIN_OFFSET,
    )
    accepted, accept_prob = accepted.cpu(), accept_prob.cpu()
    new_x, new_grad_x, new_energy_x = (t.cpu() for t in state)

    _, exact = mala_accept_ref(
        *(t.double() for t in (x, y, grad_x, grad_y, energy_x, energy_y)),
        eps.double(),
        temperature.double(),
        SEED,
        STEP,
        STREAM,
        CHAIN_OFFSET,
    )
    # float32 sums of per_chain terms of size ~1: a few 1e-5 at most.
    torch.testing.assert_close(accept_prob.double(), exact, rtol=0, atol=1e-4)
    assert 0.2 < exact.mean() < 0.9  # a mix of likely and unlikely moves
    u = philox_uniform_ref(
        (chains,), seed=SEED, step=STEP, stream=STREAM, chain_offset=CHAIN_OFFSET
    ).double()
    decidable = (u - exact).abs() > 1e-3
    assert torch.equal(accepted[decidable], (u < exact)[decidable])
    assert accepted.any() and not accepted.all() and not accepted[-2]

    take = accepted[:, None]
    assert torch.equal(new_x, torch.where(take, y, x))
    assert torch.equal(new_grad_x, torch.where(take, grad_y, grad_x))
    assert torch.equal(new_energy_x, torch.where(accepted, energy_y, energy_x))


_MALA_PTX = r"""
from ebm_fast.kernels.triton import mala_accept as ma

def accept(dtype, per_chain_params, seed_on_device):
    param = "*fp32" if per_chain_params else "fp32"
    types = {"accepted_ptr": "*i1", "accept_prob_ptr": "*fp32", "x_ptr": "*" + dtype,
             "y_ptr": "*" + dtype, "grad_x_ptr": "*" + dtype, "grad_y_ptr": "*" + dtype,
             "energy_x_ptr": "*fp32", "energy_y_ptr": "*fp32", "step_size": param,
             "temperature": param, "seed": "*i64" if seed_on_device else "i64",
             "step": "*i64", "chain_offset": "i64"}
    constexprs = {"SEED_IS_POINTER": seed_on_device, "STEP_IS_POINTER": True,
                  "STEP_SIZE_MODE": 2 if per_chain_params else 0,
                  "TEMPERATURE_MODE": 2 if per_chain_params else 0,
                  "CHAINS": 2, "BLOCK": ma.MAX_BLOCK}
    return vector_counts(compile_ptx(ma._mala_accept_kernel, types, constexprs,
                                     ["x_ptr", "y_ptr", "grad_x_ptr", "grad_y_ptr", "per_chain"]))

print(json.dumps({
    "fp32_per_chain": accept("fp32", True, True),
    "bf16_shared": accept("bf16", False, False),
    "fp16_per_chain": accept("fp16", True, False),
}))
"""


def test_mala_accept_kernel_compiles_for_sm90():
    """Every state dtype and parameter mode lowers to PTX; aligned float32 rows are read with
    128-bit loads."""
    counts = compile_for_sm90(_MALA_PTX)
    assert counts["fp32_per_chain"]["v4_loads"] > 0, counts
