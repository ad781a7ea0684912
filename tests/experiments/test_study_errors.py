"""The study's standard errors held to their definitions, computed by hand beside it.

* Over seeds (E3's curves and budgets, E4, E5): the standard error of a mean of n values is the
  sample standard deviation (n - 1 in the denominator) over sqrt(n); E3's differences (to exact
  ML, persistent ML minus CD-k, a budget against the base one) are paired by seed, their SE that
  of the per-seed differences.
* E2: the SE of a histogram estimate over n chains from m disjoint subsets of them: the sample
  standard deviation of the m subset estimates over sqrt(m).
* E1: bootstrap standard errors, which for Gaussian gradient errors approach the closed forms
  sigma / sqrt(R) (bias) and sqrt(2 P / R) sigma^2 (variance).

E3 and E5 are fed training records through the context's documented cache (``ctx.runs``), so
no training runs; the values are arbitrary numbers whose statistics the test computes with
Python's ``statistics`` module.
"""

import dataclasses
import math
import random
import statistics

import pytest
import torch

from ebm_fast.experiments.models import make_energy
from ebm_fast.experiments.study import (
    common,
    e1_gradients,
    e2_cd_objective,
    e3_training,
    e5_temperature,
)
from ebm_fast.experiments.study.config import FULL

TINY = dataclasses.replace(
    FULL,
    hidden=8,
    cells=12,
    train_size=100,
    heldout_size=100,
    buffer_size=64,
    checkpoints=(0, 1, 2),
    e2_chains=400,
    e2_steps=(0, 1),
    e2_subsets=5,
    e2_buffer_calls=0,
    bins=8,
    seeds=4,
    iterations=2,
    budget_factors=(1, 2),
    variant_factor=2,
    train_batch=8,
    train_steps=1,
    eval_points=1,
    temperatures=(0.5, 1.0),
)


class Progress:
    def update(self, n):
        pass


def se(values):
    values = list(values)
    return statistics.stdev(values) / math.sqrt(len(values))


def assert_mean_se(got, values):
    values = list(values)
    assert got["n"] == len(values)
    assert got["mean"] == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-15)
    assert got["se"] == pytest.approx(se(values), rel=1e-12)


def test_mean_se_by_hand():
    # [1, 2, 4, 7]: mean 3.5, squared deviations 6.25 + 2.25 + 0.25 + 12.25 = 21,
    # sample variance 21 / 3 = 7, SE sqrt(7) / sqrt(4).
    assert common.mean_se([1.0, 2.0, 4.0, 7.0]) == pytest.approx(
        {"mean": 3.5, "se": math.sqrt(7) / 2, "n": 4}
    )
    # Two values a, b: SE = |a - b| / 2.
    assert common.mean_se([0.0, 1.0])["se"] == pytest.approx(0.5)


def fake_records(ctx, rng):
    """E3's cache filled with one record per method: per seed, arbitrary numbers at every
    evaluation point (what summarise reads), no training."""
    points = e3_training.evaluation_points(ctx)
    seeds = ctx.config.seeds

    def rows(low, high):
        return [[rng.uniform(low, high) for _ in points] for _ in range(seeds)]

    for method in e3_training.METHODS:
        ctx.runs[(method, 1.0)] = {
            "iterations": points,
            "gap_iterations": points,
            "kl": rows(0, 2),
            "nll": rows(2, 4),
            "gap": rows(0, 1),
            "energies": {},
            "nonfinite_skipped": 0,
        }
    return points


def test_e3_curves_budgets_and_paired_differences_are_mean_and_se_over_the_seeds():
    ctx = common.Context(TINY, seed=0)
    points = fake_records(ctx, random.Random(1))
    result = e3_training.summarise(ctx)

    def at(method, key, iteration):  # each seed's value
        return [row[points.index(iteration)] for row in ctx.runs[(method, 1.0)][key]]

    def excess(method, iteration):  # paired by seed with exact ML
        return [a - b for a, b in zip(at(method, "kl", iteration), at("exact_ml", "kl", iteration))]

    for method in e3_training.METHODS:
        row = result[method]
        for key in ("kl", "nll", "gap"):
            for t, iteration in enumerate(points):
                values = at(method, key, iteration)
                assert row[key]["mean"][t] == pytest.approx(statistics.fmean(values), rel=1e-12)
                assert row[key]["se"][t] == pytest.approx(se(values), rel=1e-12)
        for budget in e3_training.budgets_of(ctx, method):
            cell = row["budgets"][str(budget)]
            assert_mean_se(cell["kl"], at(method, "kl", budget))
            assert_mean_se(cell["nll"], at(method, "nll", budget))
            if method != "exact_ml":
                assert_mean_se(cell["kl_minus_exact_ml"], excess(method, budget))
    comparisons = result["comparisons"]
    for budget in ctx.budgets:
        assert_mean_se(
            comparisons["persistent_ml_minus_cd"][str(budget)],
            [p - c for p, c in zip(excess("persistent_ml", budget), excess("cd", budget))],
        )
    for method in ("cd", "persistent_ml"):
        for budget in ctx.budgets[1:]:
            assert_mean_se(
                comparisons["change_from_base"][method][str(budget)],
                [b - a for b, a in zip(excess(method, budget), excess(method, TINY.iterations))],
            )


def test_e5_kl_is_mean_and_se_over_the_seeds():
    ctx = common.Context(TINY, seed=0)
    models = {}
    for i, temperature in enumerate(TINY.temperatures):
        models[temperature] = [make_energy(100 * i + s, TINY.hidden) for s in range(TINY.seeds)]
        # E3's cached persistent-ML runs at this temperature (read at the base budget)
        ctx.runs[("persistent_ml", temperature)] = {
            "energies": {str(b): models[temperature] for b in ctx.budgets}
        }
    result, _ = e5_temperature.run(ctx, Progress())
    for temperature in TINY.temperatures:
        row = result["trained"][str(temperature)]
        assert_mean_se(
            row["kl_data_model"], [ctx.exact_kl_to_model(e) for e in models[temperature]]
        )
        assert_mean_se(
            row["kl_data_tempered"],
            [ctx.exact_kl_to_model(e, temperature) for e in models[temperature]],
        )


def test_e2_se_is_the_spread_of_disjoint_subsets_over_sqrt_m(monkeypatch):
    """histogram_kl replaced by a recording statistic (the mean first coordinate): the study
    must estimate on all chains, on m disjoint subsets covering them, and report
    stdev(subset estimates) / sqrt(m)."""
    calls = []

    def statistic(x, log_probs, box, bins):
        value = float(x[:, 0].double().mean()) + float(x[:, 1].double().mean()) ** 2
        calls.append((x.detach().clone(), value))
        return value

    monkeypatch.setattr(e2_cd_objective, "histogram_kl", statistic)
    ctx = common.Context(TINY, seed=0)
    result, _ = e2_cd_objective.run(ctx, Progress())
    n, m = TINY.e2_chains, TINY.e2_subsets
    groups = iter(calls)
    checked = 0
    for model in common.MODEL_NAMES:
        for start in e2_cd_objective.STARTS:
            for k in TINY.e2_steps:
                full, full_value = next(groups)
                parts = [next(groups) for _ in range(m)]
                assert full.shape[0] == n
                # Disjoint subsets that together are the chains.
                assert sum(p.shape[0] for p, _ in parts) == n
                assert torch.equal(
                    torch.sort(torch.cat([p for p, _ in parts])[:, 0]).values,
                    torch.sort(full[:, 0]).values,
                )
                row = result[model][start][str(k)]
                assert row["kl_chains"] == full_value
                expected = statistics.stdev(v for _, v in parts) / math.sqrt(m)
                assert row["kl_chains_se"] == pytest.approx(expected, rel=1e-9)
                assert row["objective_se"] == pytest.approx(expected, rel=1e-9)
                checked += 1
    assert checked == len(common.MODEL_NAMES) * len(e2_cd_objective.STARTS) * len(TINY.e2_steps)


def test_e1_bootstrap_errors_approach_the_gaussian_closed_forms():
    """Rows c + N(0, sigma^2 I_P), |c| = 1 >> sigma / sqrt(R): the bias estimate is about |c|
    with SE sigma / sqrt(R) (the mean's spread along c); the variance estimate is the mean of
    sigma^2 chi^2_P over R rows, SE sqrt(2 P / R) sigma^2. Both scaled by 1 / scale and
    1 / scale^2. The bootstrap's own noise (400 resamples) and the finite R keep them within
    about 10 %."""
    g = torch.Generator().manual_seed(0)
    replicas, dims, sigma, scale = 400, 50, 0.5, 2.0
    noise = sigma * torch.randn(replicas, dims, generator=g, dtype=torch.float64)
    noise[:, 0] += 1.0
    row = e1_gradients.summarise(noise, scale, g)
    assert row["bias_se"] == pytest.approx(sigma / math.sqrt(replicas) / scale, rel=0.2)
    assert row["variance_se"] == pytest.approx(
        math.sqrt(2 * dims / replicas) * sigma**2 / scale**2, rel=0.2
    )
