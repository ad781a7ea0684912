"""E2, the CD objective: KL(p_data || p) - KL(q_k || p) from histograms of many chains."""

from __future__ import annotations

import torch

from ebm_fast.experiments.study.common import Context, bin_log_probs, binned_kl, histogram_kl
from ebm_fast.training import PersistentML

__all__ = ["run", "units", "QUESTION", "STARTS"]

QUESTION = (
    "CD-k minimises KL(p_data || p) - KL(q_k || p), q_k the chains after k steps. Is it "
    "non-negative (a divergence) only when the chains start at the data, as the theory "
    "says, and not from a replay buffer or from noise?"
)
STARTS = ("data", "buffer", "noise")
# The buffer start: a persistent-ML buffer of config.buffer_size slots run at the model for
# config.e2_buffer_calls calls of BUFFER_BATCH chains x BUFFER_STEPS steps, then drawn from
# (with reinit).
BUFFER_BATCH, BUFFER_STEPS = 1000, 10


def _buffer_start(ctx: Context, energy, model_name: str, n: int) -> torch.Tensor:
    loss = PersistentML(
        ctx.sampler(energy, BUFFER_STEPS, "E2", "buffer", model_name),
        ctx.buffer(ctx.config.buffer_size, "E2", model_name),
    )
    positives = ctx.data(BUFFER_BATCH, "E2", "buffer", model_name)  # only their shape matters
    for _ in range(ctx.config.e2_buffer_calls):
        loss.negatives(positives, None, {})
    return loss.buffer.sample(n)[0]


def run(ctx: Context, progress) -> tuple[dict, dict]:
    """({model: {"kl_data_model", "kl_data_model_binned", start: {k: {"kl_chains",
    "kl_chains_se", "objective", "objective_se"}}}}, setup)."""
    cfg = ctx.config
    n, subsets = cfg.e2_chains, cfg.e2_subsets
    result = {}
    for model_name, energy in ctx.models().items():
        log_model = bin_log_probs(
            lambda x, energy=energy: -energy(x).reshape(-1), cfg.box, cfg.bins
        )
        binned = binned_kl(bin_log_probs(ctx.log_density, cfg.box, cfg.bins), log_model)
        row: dict = {"kl_data_model": ctx.exact_kl_to_model(energy), "kl_data_model_binned": binned}
        starts = {
            "data": ctx.data(n, "E2", model_name),
            "buffer": _buffer_start(ctx, energy, model_name, n),
            "noise": ctx.uniform_init("E2", model_name)(n),
        }
        for start, x in starts.items():
            sampler = ctx.sampler(energy, 1, "E2", start, model_name)
            row[start] = {}
            done = 0
            for k in cfg.e2_steps:
                if k > done:
                    x = sampler.sample(x, k - done)
                    done = k
                kl = histogram_kl(x, log_model, cfg.box, cfg.bins)
                parts = torch.tensor(
                    [histogram_kl(part, log_model, cfg.box, cfg.bins) for part in x.chunk(subsets)],
                    dtype=torch.float64,
                )
                # Each part's estimate has subsets times the full estimate's variance.
                se = float(parts.std()) / subsets**0.5
                row[start][str(k)] = {
                    "kl_chains": kl,
                    "kl_chains_se": se,
                    "objective": binned - kl,
                    "objective_se": se,
                }
            progress.update(1)
        result[model_name] = row
    setup = {
        "density": ctx.density,
        "chains": n,
        "steps": list(cfg.e2_steps),
        "bins": cfg.bins,
        "subsets": subsets,
        "buffer": {
            "capacity": cfg.buffer_size,
            "warmup_calls": cfg.e2_buffer_calls,
            "batch": BUFFER_BATCH,
            "steps": BUFFER_STEPS,
            "reinit_prob": cfg.reinit_prob,
        },
    }
    return result, setup


def units(cfg) -> int:
    return 3 * len(STARTS)
