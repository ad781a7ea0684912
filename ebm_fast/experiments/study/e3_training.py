"""E3, training outcomes: the same energies from the same starts trained with each estimator and
with the exact ML gradient, exact KL and held-out NLL along the way, over several seeds, budgets
and densities."""

from __future__ import annotations

import math

import torch

from ebm_fast.exact2d import exact_nll, grid
from ebm_fast.experiments.models import make_energy
from ebm_fast.experiments.study.common import (
    ESTIMATORS,
    Context,
    MLPStack,
    bin_log_probs,
    histogram_kl,
    mean_se,
    run_jobs,
)
from ebm_fast.training import Trainer
from ebm_fast.training.data import batch_stream

__all__ = [
    "run",
    "train",
    "units",
    "budgets_of",
    "evaluation_points",
    "QUESTION",
    "METHODS",
    "VARIANT",
    "BASE_ONLY",
    "ONE_SEED_AT_A_TIME",
    "GAP_BINS",
]

QUESTION = (
    "Trained from the same start for the same number of energy evaluations, where does "
    "each estimator land in exact KL(p_data || p) and held-out NLL, at the base budget "
    "and at longer ones? Does persistent ML approach exact ML as the budget grows while "
    "CD-k stays where it is? How far are the persistent chains from the model along the "
    "way, and does giving them more steps per iteration (at the same energy "
    "evaluations) close the gap?"
)
#: persistent ML with variant_factor times the steps per iteration, for 1 / variant_factor of
#: the iterations: the same energy evaluations, chains that lag the model less
VARIANT = "persistent_ml_more_steps"
METHODS = ("exact_ml",) + ESTIMATORS + (VARIANT,)
# Trained to the base budget only, to keep the full run within its time (90 minutes on a shared
# 2-core machine): the budget questions are CD-k's and persistent ML's (short-run chains start
# from noise every time, persistent CD keeps no buffer, the KL estimator is persistent ML plus
# two terms).
BASE_ONLY = ("pcd", "short_run_ml", "kl_persistent_ml")
# Trained one seed at a time: its entropy term's nearest neighbours would mix an MLPStack's
# members.
ONE_SEED_AT_A_TIME = ("kl_persistent_ml",)
GAP_BINS = 25  # histogram cells per axis for the buffer-to-model gap (a few thousand samples)


def budget_cells(cfg) -> int:
    """Grid cells per axis that give exact ML the sampling estimators' energy-gradient
    evaluations per iteration, train_batch * train_steps (at least 2)."""
    return max(2, round(math.sqrt(cfg.train_batch * cfg.train_steps)))


def steps_of(cfg, method: str) -> int:
    return cfg.train_steps * (cfg.variant_factor if method == VARIANT else 1)


def budgets_of(ctx: Context, method: str) -> tuple:
    """The iterations at which ``method``'s outcome is read: ctx.budgets (the density's), the
    variant's divided by variant_factor (the same energy evaluations), the base budget alone
    for BASE_ONLY."""
    cfg = ctx.config
    if method in BASE_ONLY:
        return (cfg.iterations,)
    if method == VARIANT:
        return tuple(max(1, budget // cfg.variant_factor) for budget in ctx.budgets)
    return ctx.budgets


def evaluation_points(ctx: Context) -> list[int]:
    """Every run's evaluation iterations (up to its last): 0 and eval_points evenly spaced
    points up to each budget, the variant's included, so that exact ML has every point."""
    cfg = ctx.config
    budgets = set(ctx.budgets) | set(budgets_of(ctx, VARIANT))
    return sorted(
        {0}
        | {
            budget * j // cfg.eval_points
            for budget in budgets
            for j in range(1, cfg.eval_points + 1)
        }
    )


def _or_nan(measure, energy, *args) -> float:
    """measure(energy, *args), or NaN where the energy is not finite on the grid (the exact
    tools refuse it): a diverged run shows as NaN in its numbers instead of ending the study."""
    try:
        return measure(energy, *args)
    except ValueError:
        return math.nan


def _buffer_contents(buffer) -> torch.Tensor:
    state = buffer.state_dict()
    return state["storage"][state["written"] > 0].reshape(-1, buffer.sample_shape[0]).float()


def _train_stack(ctx: Context, method: str, seeds: tuple, temperature: float, last: int) -> dict:
    """The seeds' runs of one method side by side (an MLPStack) up to iteration ``last``:
    {"iterations", "kl", "nll", "gap" (per seed, per evaluation), "energies" ({budget: [member
    MLPs]}), "nonfinite_skipped"}. A seed's start (weights) and data order depend on its index
    only, so every method and temperature of a seed starts from the same energy and sees the
    same batches, in any stack."""
    cfg = ctx.config
    budgets = [b for b in budgets_of(ctx, method) if b <= last]
    points = {i for i in evaluation_points(ctx) if i <= last}
    energy = MLPStack([make_energy(ctx.seed_for("E3", "start", s), cfg.hidden) for s in seeds])
    optimiser = torch.optim.Adam(energy.parameters(), lr=cfg.lr, betas=(0.0, 0.999))
    # One row order for the stack, the training set permuted per seed: seed s's batches are
    # train[order_s[rows]] in any stack.
    n = ctx.train.shape[0]
    data = torch.cat(
        [
            ctx.train[
                torch.randperm(
                    n, generator=torch.Generator().manual_seed(ctx.seed_for("E3", "data order", s))
                )
            ]
            for s in seeds
        ],
        dim=1,
    )
    data_seed = ctx.seed_for("E3", "batches")
    record: dict = {
        "iterations": [],
        "kl": [],
        "nll": [],
        "gap_iterations": [],
        "gap": [],
        "energies": {},
    }

    def evaluate(iteration: int, loss=None):
        if iteration not in points:
            return
        models = [energy.member(i) for i in range(len(seeds))]
        with torch.no_grad():
            record["iterations"].append(iteration)
            record["kl"].append([_or_nan(ctx.exact_kl_to_model, m) for m in models])
            record["nll"].append(
                [_or_nan(exact_nll, m, ctx.heldout, cfg.box, cfg.cells) for m in models]
            )
            buffer = getattr(loss, "buffer", None)
            if buffer is not None:
                chains = _buffer_contents(buffer)
                record["gap_iterations"].append(iteration)
                record["gap"].append(
                    [
                        histogram_kl(
                            chains[:, 2 * i : 2 * i + 2],
                            bin_log_probs(
                                lambda x, m=m: -m(x).reshape(-1) / temperature, cfg.box, GAP_BINS
                            ),
                            cfg.box,
                            GAP_BINS,
                        )
                        for i, m in enumerate(models)
                    ]
                )
        if iteration in budgets:
            record["energies"][str(iteration)] = models

    evaluate(0)
    if method == "exact_ml":
        cell_points, area = grid(cfg.box, budget_cells(cfg))
        tiled = cell_points.repeat(1, len(seeds))  # every member at every cell
        batches = batch_stream(data, cfg.train_batch, data_seed)
        for iteration in range(1, last + 1):
            x, _ = next(batches)
            optimiser.zero_grad(set_to_none=True)
            log_z = torch.logsumexp(-energy.energies(tiled), 0) + math.log(area)  # per member
            (energy(x).mean() + log_z.sum()).backward()
            optimiser.step()
            evaluate(iteration)
        record["nonfinite_skipped"] = 0
    else:
        loss = ctx.loss(
            "persistent_ml" if method == VARIANT else method,
            energy,
            steps_of(cfg, method),
            "E3",
            method,
            seeds,
            temperature,
            buffer_size=cfg.train_buffer_size,
            temperature=temperature,
            sample_shape=(2 * len(seeds),),
        )
        trainer = Trainer(
            energy,
            loss,
            optimiser,
            log_every=last,
            progress=False,
            data_seed=data_seed,
            step_callbacks=(lambda trainer: evaluate(trainer.iteration, loss),),
        )
        trainer.fit(data, last, cfg.train_batch)
        record["nonfinite_skipped"] = trainer.nonfinite_skipped
    for key in ("kl", "nll", "gap"):  # per evaluation -> per seed
        record[key] = [list(row) for row in zip(*record[key])]
    return record


def train(ctx: Context, method: str, temperature: float = 1.0, budgets=None) -> dict:
    """All config.seeds runs of one method (cached in ctx.runs) up to the last of ``budgets``
    (default: the method's, budgets_of): {"iterations", "kl", "nll", "gap" (per seed, per
    evaluation), "energies" ({budget: [one MLP per seed]}), "nonfinite_skipped"}. The
    seeds train side by side as one MLPStack (ONE_SEED_AT_A_TIME: a stack of one per seed)."""
    cfg = ctx.config
    budgets = budgets_of(ctx, method) if budgets is None else budgets
    key = (method, temperature)
    cached = ctx.runs.get(key)
    if cached is not None and all(str(b) in cached["energies"] for b in budgets):
        return cached
    stacks = (
        [(s,) for s in range(cfg.seeds)]
        if method in ONE_SEED_AT_A_TIME
        else [tuple(range(cfg.seeds))]
    )
    parts = [_train_stack(ctx, method, seeds, temperature, budgets[-1]) for seeds in stacks]
    record: dict = {
        "iterations": parts[0]["iterations"],
        "gap_iterations": parts[0]["gap_iterations"],
        **{key: [row for part in parts for row in part[key]] for key in ("kl", "nll", "gap")},
        "energies": {
            b: [m for part in parts for m in part["energies"][b]] for b in parts[0]["energies"]
        },
        "nonfinite_skipped": sum(part["nonfinite_skipped"] for part in parts),
    }
    ctx.runs[key] = record
    return record


def _train_job(config, seed: int, density: str, method: str) -> dict:
    return train(Context(config, seed, density), method)


def _curves(rows: list) -> dict:
    values = torch.tensor(rows, dtype=torch.float64)
    return {"mean": values.mean(0).tolist(), "se": (values.std(0) / math.sqrt(len(rows))).tolist()}


def _paired(values) -> dict:
    """mean_se of per-seed values, the values kept."""
    values = list(values)
    return {**mean_se(values), "values": values}


def _at(record: dict, key: str, iteration: int) -> list:
    """Each seed's value of ``key`` at ``iteration``."""
    index = record["gap_iterations" if key == "gap" else "iterations"].index(iteration)
    return [row[index] for row in record[key]]


def _excess(ctx: Context, method: str, iteration: int) -> list:
    """Each seed's exact KL after ``iteration`` minus exact ML's after as many iterations (same
    start and batches)."""
    exact = _at(ctx.runs[("exact_ml", 1.0)], "kl", iteration)
    return [kl - ref for kl, ref in zip(_at(ctx.runs[(method, 1.0)], "kl", iteration), exact)]


def summarise(ctx: Context) -> dict:
    """One density's E3 results (see run) from the cached runs."""
    cfg = ctx.config
    result = {}
    for method in METHODS:
        record = ctx.runs[(method, 1.0)]
        row = {
            "iterations": record["iterations"],
            "kl": _curves(record["kl"]),
            "nll": _curves(record["nll"]),
            "steps_per_iteration": steps_of(cfg, method),
            "budgets": {},
            "nonfinite_skipped": record["nonfinite_skipped"],
        }
        if record["gap"]:
            row["gap"] = _curves(record["gap"])
            row["gap_iterations"] = record["gap_iterations"]
        for budget in budgets_of(ctx, method):
            cell = {
                "energy_evaluations": budget * steps_of(cfg, method) * cfg.train_batch,
                "kl": mean_se(_at(record, "kl", budget)),
                "nll": mean_se(_at(record, "nll", budget)),
            }
            if method != "exact_ml":
                cell["kl_minus_exact_ml"] = _paired(_excess(ctx, method, budget))
            if record["gap"]:
                cell["gap"] = mean_se(_at(record, "gap", budget))
            row["budgets"][str(budget)] = cell
        result[method] = row
    # Paired by seed: the same seed's start and batches in both terms of each difference.
    base = cfg.iterations
    result["comparisons"] = {
        # persistent ML's excess minus CD-k's (exact ML's cancels), per budget
        "persistent_ml_minus_cd": {
            str(b): _paired(
                p - c for p, c in zip(_excess(ctx, "persistent_ml", b), _excess(ctx, "cd", b))
            )
            for b in ctx.budgets
        },
        # each method's excess at a budget minus its excess at the base budget
        "change_from_base": {
            method: {
                str(b): _paired(
                    now - then
                    for now, then in zip(_excess(ctx, method, b), _excess(ctx, method, base))
                )
                for b in ctx.budgets[1:]
            }
            for method in ("cd", "persistent_ml")
        },
        # the variant minus persistent ML after as many iterations (4x its evaluations) ...
        "variant_minus_persistent_ml_same_iterations": {
            str(b): _paired(
                v - p for v, p in zip(_excess(ctx, VARIANT, b), _excess(ctx, "persistent_ml", b))
            )
            for b in budgets_of(ctx, VARIANT)
        },
        # ... and at the same energy evaluations (variant_factor times its iterations), each
        # against exact ML after its own iterations
        "variant_minus_persistent_ml_same_evaluations": {
            str(b): _paired(
                v - p
                for v, p in zip(_excess(ctx, VARIANT, variant), _excess(ctx, "persistent_ml", b))
            )
            for b, variant in zip(ctx.budgets, budgets_of(ctx, VARIANT))
        },
    }
    return result


def run(ctx: Context, progress) -> tuple[dict, dict]:
    """({density: {method: {"iterations", "kl", "nll", ("gap"), "steps_per_iteration",
    "budgets": {iterations: {"energy_evaluations", "kl", "nll", "kl_minus_exact_ml", ("gap")}},
    ("gap_iterations"),
    "nonfinite_skipped"}, "comparisons": {...}}}, setup); curves are mean and SE over the seeds,
    differences paired by seed. The runs go to ctx.processes processes."""
    cfg = ctx.config
    jobs = [(density, method) for method in JOB_ORDER for density in cfg.densities]
    records = run_jobs(
        _train_job,
        [(cfg, ctx.seed, density, method) for density, method in jobs],
        ctx.processes,
        ctx.threads,
        progress,
    )
    for (density, method), record in zip(jobs, records):
        ctx.on(density).runs[(method, 1.0)] = record
    result = {density: summarise(ctx.on(density)) for density in cfg.densities}
    setup = {
        "densities": list(cfg.densities),
        "seeds": cfg.seeds,
        "iterations": cfg.iterations,
        "budgets": {density: list(ctx.on(density).budgets) for density in cfg.densities},
        "variant_factor": cfg.variant_factor,
        "base_only": list(BASE_ONLY),
        "one_seed_at_a_time": list(ONE_SEED_AT_A_TIME),
        "batch": cfg.train_batch,
        "sampler_steps": cfg.train_steps,
        "exact_ml_cells": budget_cells(cfg),
        "buffer_size": cfg.train_buffer_size,
        "gap_bins": GAP_BINS,
        "eval_points": cfg.eval_points,
        "heldout_nll_of_the_data_density": {
            density: -float(ctx.on(density).log_density(ctx.on(density).heldout).mean())
            for density in cfg.densities
        },
    }
    return result, setup


# Longest runs first, so that a pool of 2 processes ends its jobs about together.
JOB_ORDER = ("exact_ml", VARIANT, "persistent_ml", "cd", "kl_persistent_ml", "pcd", "short_run_ml")


def units(cfg) -> int:
    return len(METHODS) * len(cfg.densities)
