"""Triton ``mala_accept_out``: fused MALA accept/reject, in place for the accepted chains.

Semantics: ebm_fast/reference/mala_accept.py. Each program owns CHAINS whole chains and walks
them in (CHAINS, BLOCK) tiles twice: first reducing
s = sum((g_x + g_y) * (eps (g_y - g_x) - 2 (y - x))) per chain, then, after the accept decision
against the spec's per-chain uniform, copying y and grad_y over x and grad_x for the accepted
chains only (the loads of rejected chains are masked off, so they cost one read of four rows).
Arithmetic in float32; states in float32, bfloat16 or float16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ebm_fast.kernels.triton._launch import counter_args, read_scalar
from ebm_fast.kernels.triton._noise_spec import spec_uniform
from ebm_fast.kernels.triton.langevin_update import (
    SUPPORTED_DTYPES,
    chain_param_arg,
    read_chain_param,
)

TILE_ELEMENTS = 2048  # CHAINS * BLOCK per program
MAX_BLOCK = 1024
NUM_WARPS = 4


@triton.jit(do_not_specialize=["seed", "step", "chain_offset", "chains", "per_chain"])
def _mala_accept_kernel(
    accepted_ptr,
    accept_prob_ptr,
    x_ptr,
    y_ptr,
    grad_x_ptr,
    grad_y_ptr,
    energy_x_ptr,
    energy_y_ptr,
    step_size,
    temperature,
    seed,
    step,
    stream,
    chain_offset,
    chains,
    per_chain,
    SEED_IS_POINTER: tl.constexpr,
    STEP_IS_POINTER: tl.constexpr,
    STEP_SIZE_MODE: tl.constexpr,
    TEMPERATURE_MODE: tl.constexpr,
    CHAINS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    seed = read_scalar(seed, SEED_IS_POINTER)
    step = read_scalar(step, STEP_IS_POINTER)
    chain = tl.program_id(0).to(tl.int64) * CHAINS + tl.arange(0, CHAINS)
    live = chain < chains
    row = chain[:, None] * per_chain
    column = tl.arange(0, BLOCK)[None, :]
    zeros = tl.zeros((CHAINS,), dtype=tl.float32)  # shared parameters broadcast to (CHAINS,)
    eps = (zeros + read_chain_param(step_size, chain, live, STEP_SIZE_MODE))[:, None]

    terms = tl.zeros((CHAINS, BLOCK), dtype=tl.float32)
    for start in range(0, per_chain, BLOCK):
        mask = live[:, None] & (start + column < per_chain)
        offset = row + start + column
        x = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(y_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        grad_x = tl.load(grad_x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        grad_y = tl.load(grad_y_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        terms += (grad_x + grad_y) * (eps * (grad_y - grad_x) - 2 * (y - x))
    total = tl.sum(terms, axis=1)

    # Lanes past the last chain get T = 1, not a masked-load 0 to divide by.
    temp = tl.where(live, zeros + read_chain_param(temperature, chain, live, TEMPERATURE_MODE), 1.0)
    energy_x = tl.load(energy_x_ptr + chain, mask=live, other=0.0)
    energy_y = tl.load(energy_y_ptr + chain, mask=live, other=0.0)
    log_alpha = -(energy_y - energy_x) / temp - total / (4 * temp)
    valid = (tl.abs(energy_y) < float("inf")) & (log_alpha == log_alpha)
    accept_prob = tl.where(valid, tl.exp(tl.minimum(log_alpha, 0.0)), 0.0)
    take = spec_uniform(seed, step, stream, chain_offset + chain) < accept_prob
    tl.store(accept_prob_ptr + chain, accept_prob, mask=live)
    tl.store(accepted_ptr + chain, take, mask=live)
    tl.store(energy_x_ptr + chain, energy_y, mask=live & take)

    copy_rows = (live & take)[:, None]
    for start in range(0, per_chain, BLOCK):
        mask = copy_rows & (start + column < per_chain)
        offset = row + start + column
        tl.store(x_ptr + offset, tl.load(y_ptr + offset, mask=mask), mask=mask)
        tl.store(grad_x_ptr + offset, tl.load(grad_y_ptr + offset, mask=mask), mask=mask)


def mala_accept_out(
    accepted: torch.Tensor,
    accept_prob: torch.Tensor,
    x: torch.Tensor,
    y: torch.Tensor,
    grad_x: torch.Tensor,
    grad_y: torch.Tensor,
    energy_x: torch.Tensor,
    energy_y: torch.Tensor,
    step_size: torch.Tensor,
    temperature: torch.Tensor,
    seed: torch.Tensor,
    step: torch.Tensor,
    stream: int,
    chain_offset: int,
) -> None:
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"the Triton mala_accept kernel takes x of dtype {SUPPORTED_DTYPES} "
            f"(it computes in float32), got {x.dtype}; use the cpu or reference "
            "backend"
        )
    device = x.device
    chains = x.shape[0]
    per_chain = x.numel() // chains
    block = min(MAX_BLOCK, triton.next_power_of_2(max(per_chain, 1)))
    chains_per_program = min(TILE_ELEMENTS // block, triton.next_power_of_2(chains))
    seed_arg, step_arg, counter_flags = counter_args(seed, step, device)
    step_size_arg, step_size_mode = chain_param_arg(step_size, device, "step_size")
    temperature_arg, temperature_mode = chain_param_arg(temperature, device, "temperature")
    _mala_accept_kernel[(triton.cdiv(chains, chains_per_program),)](
        accepted,
        accept_prob,
        x,
        y,
        grad_x,
        grad_y,
        energy_x,
        energy_y,
        step_size_arg,
        temperature_arg,
        seed_arg,
        step_arg,
        stream,
        chain_offset,
        chains,
        per_chain,
        **counter_flags,
        STEP_SIZE_MODE=step_size_mode,
        TEMPERATURE_MODE=temperature_mode,
        CHAINS=chains_per_program,
        BLOCK=block,
        num_warps=NUM_WARPS,
    )
