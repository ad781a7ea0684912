"""E4, the short-run fixed point (Nijkamp et al. 2019): short-run samples match the data while
the model density itself is far from it."""

from __future__ import annotations

import torch

from ebm_fast.exact2d import exact_samples, grid
from ebm_fast.experiments.study.common import (
    Context,
    bin_log_probs,
    binned_kl,
    histogram_kl,
    mean_se,
)
from ebm_fast.experiments.study.e3_training import train

__all__ = ["run", "units", "QUESTION", "METHODS"]

QUESTION = (
    "After short-run ML training, do the short-run samples (k steps from noise) match "
    "the data while the model density exp(-E) / Z is far from it? Compared with the "
    "exact-ML and persistent-ML models trained alongside (E3's runs)."
)
METHODS = ("short_run_ml", "persistent_ml", "exact_ml")


def data_second_moment(ctx: Context) -> float:
    """The data's E|x|^2, summed on the grid (6.375 = radius^2 + 2 std^2 for the ring)."""
    points, _ = grid(ctx.config.box, ctx.config.cells, dtype=torch.float64)
    weights = torch.softmax(ctx.log_density(points), 0)
    return float((weights * (points**2).sum(1)).sum())


def _measure(ctx: Context, energy, method: str, seed_index: int, moment: float) -> dict:
    """The short-run samples' and the model density's distance to the data, for one model."""
    cfg = ctx.config
    n = cfg.e4_samples
    sampler = ctx.sampler(energy, cfg.train_steps, "E4", method, seed_index)
    short_run = sampler.sample(ctx.uniform_init("E4", method, seed_index)(n))
    model = exact_samples(
        energy,
        n,
        seed=ctx.seed_for("E4", "exact", method, seed_index),
        step=0,
        box=cfg.box,
        cells=cfg.cells,
    )
    log_data = bin_log_probs(ctx.log_density, cfg.box, cfg.bins)
    with torch.no_grad():
        return {
            "kl_short_run_data": histogram_kl(short_run, log_data, cfg.box, cfg.bins),
            # binned like the samples' histogram KL, so that the two compare
            "kl_model_data": binned_kl(
                bin_log_probs(lambda x: -energy(x).reshape(-1), cfg.box, cfg.bins), log_data
            ),
            "kl_data_model": ctx.exact_kl_to_model(energy),
            "second_moment_error_short_run": float((short_run**2).sum(1).mean()) - moment,
            "second_moment_error_model": float((model**2).sum(1).mean()) - moment,
            "mean_norm_short_run": float(short_run.mean(0).norm()),
            "mean_norm_model": float(model.mean(0).norm()),
        }


def run(ctx: Context, progress) -> tuple[dict, dict]:
    """({method: {measure: {"mean", "se", "n"}}}, setup) over E3's seeds, its models after
    config.iterations (the base budget)."""
    cfg = ctx.config
    moment = data_second_moment(ctx)
    result = {}
    for method in METHODS:
        rows = []
        models = train(ctx, method)["energies"][str(cfg.iterations)]
        for seed_index, energy in enumerate(models):
            rows.append(_measure(ctx, energy, method, seed_index, moment))
            progress.update(1)
        result[method] = {key: mean_se(row[key] for row in rows) for key in rows[0]}
    setup = {
        "density": ctx.density,
        "iterations": cfg.iterations,
        "samples": cfg.e4_samples,
        "short_run_steps": cfg.train_steps,
        "bins": cfg.bins,
        "data_second_moment": moment,
    }
    return result, setup


def units(cfg) -> int:
    return len(METHODS) * cfg.seeds
