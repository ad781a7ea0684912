"""E3, training outcomes: the same energy from the same start trained with each estimator and
with the exact ML gradient, exact KL and held-out NLL along the way, over several seeds."""

from __future__ import annotations

import math

import torch

from ebm_fast.exact2d import exact_nll, log_partition
from ebm_fast.experiments.models import make_energy
from ebm_fast.experiments.study.common import (ESTIMATORS, Context, bin_log_probs, histogram_kl,
                                               mean_se, ring_log_density)
from ebm_fast.training import Trainer
from ebm_fast.training.data import batch_stream

__all__ = ["run", "train", "units", "QUESTION", "METHODS", "GAP_BINS"]

QUESTION = ("Trained from the same start for the same number of energy evaluations, where does "
            "each estimator land in exact KL(p_data || p) and held-out NLL? Does persistent ML "
            "land near exact ML and CD-k elsewhere? How far are the persistent chains from the "
            "model along the way?")
METHODS = ("exact_ml",) + ESTIMATORS
GAP_BINS = 25  # histogram cells per axis for the buffer-to-model gap (a few thousand samples)


def budget_cells(cfg) -> int:
    """Grid cells per axis that give exact ML the sampling estimators' energy-gradient
    evaluations per iteration, train_batch * train_steps (at least 2)."""
    return max(2, round(math.sqrt(cfg.train_batch * cfg.train_steps)))


def _buffer_contents(buffer) -> torch.Tensor:
    state = buffer.state_dict()
    return state["storage"][state["written"] > 0].reshape(-1, 2).float()


def train(ctx: Context, method: str, seed_index: int, temperature: float = 1.0) -> dict:
    """One training run (cached in ctx.runs): {"iterations", "kl", "nll", "gap", "energy"}.
    The start (weights) and the data order depend on the seed index only, so every method and
    temperature of a seed starts from the same energy and sees the same batches."""
    key = (method, temperature, seed_index)
    if key in ctx.runs:
        return ctx.runs[key]
    cfg = ctx.config
    energy = make_energy(ctx.seed_for("E3", "start", seed_index), cfg.hidden)
    optimiser = torch.optim.Adam(energy.parameters(), lr=cfg.lr, betas=(0.0, 0.999))
    data_seed = ctx.seed_for("E3", "data order", seed_index)
    every = max(1, cfg.iterations // cfg.eval_points)
    record = {"iterations": [], "kl": [], "nll": [], "gap": []}

    def evaluate(iteration: int, loss=None):
        with torch.no_grad():
            record["iterations"].append(iteration)
            record["kl"].append(ctx.exact_kl_to_model(energy))
            record["nll"].append(exact_nll(energy, ctx.heldout, cfg.box, cfg.cells))
            buffer = getattr(loss, "buffer", None)
            if buffer is not None:
                chains = _buffer_contents(buffer)
                log_model = bin_log_probs(lambda x: -energy(x).reshape(-1) / temperature,
                                          cfg.box, GAP_BINS)
                record["gap"].append(histogram_kl(chains, log_model, cfg.box, GAP_BINS))

    evaluate(0)
    if method == "exact_ml":
        cells = budget_cells(cfg)
        batches = batch_stream(ctx.train, cfg.train_batch, data_seed)
        for iteration in range(1, cfg.iterations + 1):
            x, _ = next(batches)
            optimiser.zero_grad(set_to_none=True)
            (energy(x).mean() + log_partition(energy, cfg.box, cells)).backward()
            optimiser.step()
            if iteration % every == 0:
                evaluate(iteration)
    else:
        loss = ctx.loss(method, energy, cfg.train_steps, "E3", seed_index, temperature,
                        buffer_size=cfg.train_buffer_size, temperature=temperature)
        trainer = Trainer(energy, loss, optimiser, log_every=every, progress=False,
                          data_seed=data_seed,
                          callbacks=(lambda trainer, _: evaluate(trainer.iteration, loss),))
        trainer.fit(ctx.train, cfg.iterations, cfg.train_batch)
        record["nonfinite_skipped"] = trainer.nonfinite_skipped
    record["energy"] = energy
    ctx.runs[key] = record
    return record


def _curves(runs: list[dict], key: str) -> dict:
    values = torch.tensor([run[key] for run in runs], dtype=torch.float64)
    return {"mean": values.mean(0).tolist(),
            "se": (values.std(0) / math.sqrt(len(runs))).tolist()}


def run(ctx: Context, progress) -> tuple[dict, dict]:
    """({method: {"iterations", "kl", "nll", ("gap"), "final_kl", "final_nll",
    "final_kl_minus_exact_ml", "nonfinite_skipped"}}, setup); curves are mean and SE over the
    seeds."""
    cfg = ctx.config
    result = {}
    for method in METHODS:
        runs = []
        for seed_index in range(cfg.seeds):
            runs.append(train(ctx, method, seed_index))
            progress.update(1)
        exact = [train(ctx, "exact_ml", seed_index) for seed_index in range(cfg.seeds)]
        row = {"iterations": runs[0]["iterations"], "kl": _curves(runs, "kl"),
               "nll": _curves(runs, "nll"),
               "final_kl": mean_se(run["kl"][-1] for run in runs),
               "final_nll": mean_se(run["nll"][-1] for run in runs),
               # paired by seed (same start, same batches): the difference's own SE
               "final_kl_minus_exact_ml": mean_se(run["kl"][-1] - ref["kl"][-1]
                                                  for run, ref in zip(runs, exact)),
               "nonfinite_skipped": sum(run.get("nonfinite_skipped", 0) for run in runs)}
        if runs[0]["gap"]:
            row["gap"] = _curves(runs, "gap")
        result[method] = row
    setup = {"seeds": cfg.seeds, "iterations": cfg.iterations, "batch": cfg.train_batch,
             "sampler_steps": cfg.train_steps, "exact_ml_cells": budget_cells(cfg),
             "buffer_size": cfg.train_buffer_size, "gap_bins": GAP_BINS,
             "heldout_nll_of_the_data_density": -float(ring_log_density(ctx.heldout).mean())}
    return result, setup


def units(cfg) -> int:
    return len(METHODS) * cfg.seeds
