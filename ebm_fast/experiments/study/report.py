"""The study's outputs: results.json, one PNG figure per experiment, report.md.

Every sentence of report.md that states a finding is computed from the measured numbers (a
comparison is called a difference only when it exceeds twice its standard error)."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

from ebm_fast.experiments.study import (  # noqa: E402
    e1_gradients,
    e2_cd_objective,
    e3_training,
    e4_short_run,
    e5_temperature,
)
from ebm_fast.experiments.study.common import ESTIMATORS, MODEL_NAMES  # noqa: E402

__all__ = ["write", "compare"]

UNSETTLED_SHOWN = 12  # unresolved comparisons listed by name in report.md

LABELS = {
    "exact_ml": "exact ML",
    "cd": "CD-k",
    "pcd": "persistent CD",
    "persistent_ml": "persistent ML",
    "short_run_ml": "short-run ML",
    "kl_persistent_ml": "KL persistent ML",
    "exact_samples": "exact samples",
    e3_training.VARIANT: "persistent ML, more steps",
}
DENSITY_LABELS = {"ring": "ring of 8 Gaussians", "two_spirals": "two spirals"}


def _save(fig, path: Path, title: str) -> None:
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pm(value: dict, digits: int = 3) -> str:
    return f"{value['mean']:.{digits}f} ± {value['se']:.{digits}f}"


def compare(a: float, a_se: float, b: float, b_se: float) -> str:
    """ "lower than" / "higher than" when |a - b| > 2 SE of the difference, else
    "indistinguishable from"."""
    if abs(a - b) > 2 * math.hypot(a_se, b_se):
        return "lower than" if a < b else "higher than"
    return "indistinguishable from"


# -- E1 ---------------------------------------------------------------------------------------
def _e1_figure(result: dict, path: Path, density: str) -> None:
    steps = sorted({int(k) for row in result["cd"].values() for k in row})
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True)
    for col, model in enumerate(MODEL_NAMES):
        for row, key in enumerate(("bias", "variance")):
            ax = axes[row, col]
            exact = result["exact_samples"][model]
            ax.axhspan(
                exact[key] - exact[f"{key}_se"], exact[key] + exact[f"{key}_se"], color="0.85"
            )
            ax.axhline(exact[key], color="0.4", ls="--", label=LABELS["exact_samples"])
            for name in ESTIMATORS:
                cells = [result[name][model][str(k)] for k in steps]
                ax.errorbar(
                    steps,
                    [c[key] for c in cells],
                    [c[f"{key}_se"] for c in cells],
                    marker="o",
                    capsize=3,
                    label=LABELS[name],
                )
            ax.set_xscale("log")
            ax.set_yscale("symlog", linthresh=1e-2)
            ax.set_title(f"{model} model" if row == 0 else "")
            ax.set_ylabel(
                "relative bias |E d| / |E_p grad E|"
                if key == "bias"
                else "relative variance E|d - E d|^2 / |E_p grad E|^2"
            )
            if row == 1:
                ax.set_xlabel("sampler steps k")
    axes[0, 0].legend(fontsize=8)
    _save(
        fig,
        path,
        f"E1 ({DENSITY_LABELS[density]}): gradient error d = estimate - exact ML "
        "gradient (mean ± bootstrap SE)",
    )


def _e1_text(result: dict, setup: dict, density: str) -> list[str]:
    steps = setup["steps"]
    lines = [
        f"Setup: models after {setup['checkpoints']} Adam steps of exact ML; "
        f"{setup['replicas']} independent estimates of {setup['batch']} chains each per "
        f"cell; persistent estimators first take ceil({setup['warm_steps']} / k) calls at "
        f"the model; SE from {setup['bootstrap']} bootstrap resamples of the estimates. "
        "Bias and variance are relative to |E_p[grad E]| (the exact model term, which stays "
        "away from 0 at convergence, unlike the full gradient). The KL estimator is "
        "measured with its KL term and without the entropy term.",
        "",
        "| model | exact KL(p_data‖p) | \\|E_p grad E\\| | \\|exact gradient\\| |",
        "|---|---|---|---|",
    ]
    for model, info in setup["models"][density].items():
        lines.append(
            f"| {model} | {info['exact_kl']:.3f} | {info['model_term_norm']:.3g} | "
            f"{info['exact_gradient_norm']:.3g} |"
        )
    lines += [
        "",
        "Relative bias (± SE) / relative variance (± SE):",
        "",
        "| estimator | k | " + " | ".join(MODEL_NAMES) + " |",
        "|---|---|" + "---|" * len(MODEL_NAMES),
    ]

    def cell(c):
        return (
            f"{c['bias']:.3f} ± {c['bias_se']:.3f} / {c['variance']:.3g} ± {c['variance_se']:.2g}"
        )

    lines.append(
        "| exact samples | - | "
        + " | ".join(cell(result["exact_samples"][m]) for m in MODEL_NAMES)
        + " |"
    )
    for name in ESTIMATORS:
        for k in steps:
            lines.append(
                f"| {LABELS[name]} | {k} | "
                + " | ".join(cell(result[name][m][str(k)]) for m in MODEL_NAMES)
                + " |"
            )
    # Every pair of estimators at the same model and k (exact samples against each k).
    pairs = settled = 0
    unsettled = []
    for model in MODEL_NAMES:
        for k in steps:
            cells = {name: result[name][model][str(k)] for name in ESTIMATORS}
            cells["exact_samples"] = result["exact_samples"][model]
            for a, b in itertools.combinations(cells, 2):
                pairs += 1
                verdict = compare(
                    cells[a]["bias"], cells[a]["bias_se"], cells[b]["bias"], cells[b]["bias_se"]
                )
                if verdict == "indistinguishable from":
                    unsettled.append(f"{LABELS[a]} vs {LABELS[b]} ({model}, k={k})")
                else:
                    settled += 1
    cd = {m: [result["cd"][m][str(k)]["missing_term_norm"] for k in steps] for m in MODEL_NAMES}
    shown = "; ".join(unsettled[:UNSETTLED_SHOWN]) + (
        f"; and {len(unsettled) - UNSETTLED_SHOWN} more" if len(unsettled) > UNSETTLED_SHOWN else ""
    )
    lines += [
        "",
        f"Of the {pairs} pairwise bias differences (same model and k, exact samples "
        f"included), {settled} exceed twice their standard error"
        + (f"; not resolved: {shown}." if unsettled else "."),
        "",
        "CD's missing term |E_q_k[grad E] - E_p[grad E]| (absolute, k = "
        + ", ".join(map(str, steps))
        + "): "
        + "; ".join(f"{m} " + ", ".join(f"{v:.3g}" for v in values) for m, values in cd.items())
        + ".",
    ]
    k = str(steps[-1])
    lines += [
        "",
        "**Bearing on the claim.** Gagnon & Lajoie: buffer chains estimate the ML "
        "gradient's model term, CD-k's do not (their gradient lacks the missing term). "
        f"Measured at k = {k}: "
        + "; ".join(
            f"{m} model, persistent ML's bias is " + compare(*_bias_pair(result, m, k)) + " CD-k's"
            for m in MODEL_NAMES
        )
        + ".",
    ]
    return lines


def _bias_pair(result: dict, model: str, k: str) -> tuple:
    """(persistent ML's bias, its SE, CD-k's bias, its SE) at a model and k."""
    pml, cd = result["persistent_ml"][model][k], result["cd"][model][k]
    return pml["bias"], pml["bias_se"], cd["bias"], cd["bias_se"]


# -- E2 ---------------------------------------------------------------------------------------
def _e2_figure(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, model in zip(axes, MODEL_NAMES):
        row = result[model]
        for start in e2_cd_objective.STARTS:
            steps = [int(k) for k in row[start]]
            ax.errorbar(
                steps,
                [row[start][str(k)]["objective"] for k in steps],
                [row[start][str(k)]["objective_se"] for k in steps],
                marker="o",
                capsize=3,
                label=f"chains from {start}",
            )
        ax.axhline(0, color="k", lw=0.8)
        ax.axhline(row["kl_data_model_binned"], color="0.5", ls="--", label="KL(p_data‖p) (binned)")
        ax.set_xscale("symlog", linthresh=1)
        ax.set_xlim(-0.3, 1.5 * max(steps))  # k >= 0: no negative decade
        ax.set_xlabel("Langevin steps k")
        ax.set_ylabel("KL(p_data‖p) − KL(q_k‖p)  [nats]")
        ax.set_title(f"{model} model")
    axes[0].legend(fontsize=8)
    _save(fig, path, "E2: the CD objective (histogram KL, SE from disjoint subsets of the chains)")


def _e2_text(result: dict, setup: dict) -> list[str]:
    lines = [
        f"Setup: {setup['chains']} chains per start, histograms of {setup['bins']}² cells "
        f"on the box (Miller-Madow corrected; KL between binned distributions), SE from "
        f"{setup['subsets']} disjoint subsets. Buffer start: a "
        f"{setup['buffer']['capacity']}-slot persistent-ML buffer run "
        f"{setup['buffer']['warmup_calls']} calls of {setup['buffer']['batch']} chains x "
        f"{setup['buffer']['steps']} steps at the model, drawn with reinit "
        f"{setup['buffer']['reinit_prob']}.",
        "",
        "| model | start | " + " | ".join(f"k={k}" for k in setup["steps"]) + " |",
        "|---|---|" + "---|" * len(setup["steps"]),
    ]
    # From the data at k = 0 the objective is 0 by definition: what the estimate reads there is
    # the histogram estimator's residual bias, added to the margin for calling a value negative.
    negative = []
    for model in MODEL_NAMES:
        row = result[model]
        control = abs(row["data"]["0"]["objective"]) if "0" in row["data"] else 0.0
        for start in e2_cd_objective.STARTS:
            cells = [row[start][str(k)] for k in setup["steps"]]
            lines.append(
                f"| {model} (KL {row['kl_data_model_binned']:.3f}) | {start} | "
                + " | ".join(f"{c['objective']:.3f} ± {c['objective_se']:.3f}" for c in cells)
                + " |"
            )
            for k, c in zip(setup["steps"], cells):
                if (start, k) != ("data", 0) and c["objective"] < -(
                    2 * c["objective_se"] + control
                ):
                    negative.append((model, start, k))
    by_start = {
        start: [f"{m} k={k}" for m, s, k in negative if s == start]
        for start in e2_cd_objective.STARTS
    }
    lines += [
        "",
        "From the data at k = 0 (objective 0 by definition) the estimate reads the "
        "histogram estimator's residual bias: "
        + ", ".join(
            f"{m} {result[m]['data']['0']['objective']:+.3f}"
            for m in MODEL_NAMES
            if "0" in result[m]["data"]
        )
        + ". Measured below zero by more than 2 SE "
        "plus that residual: "
        + "; ".join(
            f"chains from {start}: " + (", ".join(cells) if cells else "never")
            for start, cells in by_start.items()
        )
        + ".",
        "",
        "**Bearing on the claim.** CD-k's objective is a divergence (>= 0) because "
        "Langevin from p_data moves toward p; the paper argues that replay-buffer training "
        "is not CD, so its chains need not satisfy this. Measured: the objective from the "
        "data was " + ("never" if not by_start["data"] else "sometimes") + " significantly "
        "negative; from the buffer "
        + ("never" if not by_start["buffer"] else "sometimes")
        + "; from noise "
        + ("never" if not by_start["noise"] else "sometimes")
        + ".",
    ]
    return lines


# -- E3 ---------------------------------------------------------------------------------------
def _band(ax, x, curve, label):
    ax.errorbar(x, curve["mean"], curve["se"], marker=".", capsize=2, label=label)


def _e3_figure(result: dict, path: Path, density: str) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method, row in result.items():
        if method == "comparisons":
            continue
        # iteration 0 left out of the log axis
        _band(axes[0], row["iterations"][1:], _tail(row["kl"]), LABELS[method])
        _band(axes[1], row["iterations"][1:], _tail(row["nll"]), LABELS[method])
        if "gap" in row:
            _band(axes[2], row["gap_iterations"], row["gap"], LABELS[method])
    for ax, label in zip(
        axes, ("exact KL(p_data‖p) [nats]", "held-out NLL [nats]", "buffer-to-model KL(q‖p) [nats]")
    ):
        ax.set_xlabel("training iteration")
        ax.set_xscale("log")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    _save(fig, path, f"E3 ({DENSITY_LABELS[density]}): training outcomes (mean ± SE over seeds)")


def _tail(curve: dict) -> dict:
    return {"mean": curve["mean"][1:], "se": curve["se"][1:]}


def _e3_budget_figure(results: dict, path: Path) -> None:
    """Excess exact KL over exact ML (paired by seed) against the energy evaluations spent."""
    densities = list(results)
    fig, axes = plt.subplots(1, len(densities), figsize=(6.5 * len(densities), 4.5), squeeze=False)
    for ax, density in zip(axes[0], densities):
        for method, row in results[density].items():
            if method in ("exact_ml", "comparisons"):
                continue
            cells = list(row["budgets"].values())
            ax.errorbar(
                [c["energy_evaluations"] for c in cells],
                [c["kl_minus_exact_ml"]["mean"] for c in cells],
                [c["kl_minus_exact_ml"]["se"] for c in cells],
                marker="o",
                capsize=3,
                label=LABELS[method],
            )
        ax.set_xscale("log")
        lows = [
            c["kl_minus_exact_ml"]["mean"] - c["kl_minus_exact_ml"]["se"]
            for row in results[density].values()
            if "budgets" in row
            for c in row["budgets"].values()
            if "kl_minus_exact_ml" in c
        ]
        if min(lows) > 0:
            ax.set_yscale("log")
        else:  # a difference at or below 0 needs the linear part around it
            ax.axhline(0, color="k", lw=0.8)
            ax.set_yscale("symlog", linthresh=0.05)
        ax.set_xlabel("energy evaluations spent (iterations × batch × steps)")
        ax.set_ylabel("exact KL minus exact ML's after as many iterations [nats]")
        ax.set_title(DENSITY_LABELS[density])
        ax.legend(fontsize=8)
    _save(fig, path, "E3: excess KL over exact ML against the budget (mean ± SE, paired by seed)")


def _e3_figures(results: dict, out: Path) -> list[Path]:
    paths = [out / "e3_budgets.png"]
    _e3_budget_figure(results, paths[0])
    for density, result in results.items():
        paths.append(out / f"e3_{density}.png")
        _e3_figure(result, paths[-1], density)
    return paths


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _diff(value: dict) -> str:
    """A paired difference with its verdict against 0."""
    verdict = compare(value["mean"], value["se"], 0.0, 0.0)
    return _pm(value) + (
        " (not resolved from 0)"
        if verdict == "indistinguishable from"
        else " (below 0)"
        if verdict == "lower than"
        else " (above 0)"
    )


def _e3_text(result: dict, setup: dict, density: str) -> list[str]:
    budgets = [str(b) for b in setup["budgets"][density]]
    factor = setup["variant_factor"]
    lines = [
        f"Setup: {setup['seeds']} seeds per method (same start and batches for every "
        f"method of a seed), Adam iterations {', '.join(budgets)} (one run per seed read "
        f"along the way: at a constant learning rate a shorter budget is a longer run's "
        f"prefix), batch {setup['batch']}, {setup['sampler_steps']} Langevin steps per "
        f"iteration; exact ML on a {setup['exact_ml_cells']}² grid (the same energy-gradient "
        f"evaluations per iteration); buffers of {setup['buffer_size']} slots. "
        f"{_capital(LABELS[e3_training.VARIANT])}: persistent ML with {factor}x the steps "
        f"per iteration for 1/{factor} of the iterations, the same energy evaluations. "
        f"{_capital(', '.join(LABELS[m] for m in setup['base_only']))}: the base budget "
        "only. "
        f"Held-out NLL of the data's own density: "
        f"{setup['heldout_nll_of_the_data_density'][density]:.3f}.",
        "",
        "Final exact KL(p_data‖p) minus exact ML's after as many iterations, paired by "
        "seed (columns: the energy evaluations of the base budget times 1, "
        + ", ".join(str(int(b) // int(budgets[0])) for b in budgets[1:])
        + "):",
        "",
        "| method | " + " | ".join(f"{b} iterations' evaluations" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method, row in result.items():
        if method in ("exact_ml", "comparisons"):
            continue
        cells = list(row["budgets"].items())
        lines.append(
            f"| {LABELS[method]} | "
            + " | ".join(
                f"{_pm(cell['kl_minus_exact_ml'])} ({iteration} it.)" for iteration, cell in cells
            )
            + " |" * (len(budgets) - len(cells))
            + " |"
        )
    lines += [
        "",
        "Exact KL(p_data‖p), held-out NLL and buffer gap KL(q‖p) at each budget (iterations):",
        "",
        "| method | iterations | exact KL(p_data‖p) | held-out NLL | buffer gap KL(q‖p) |",
        "|---|---|---|---|---|",
    ]
    for method, row in result.items():
        if method == "comparisons":
            continue
        for iteration, cell in row["budgets"].items():
            gap = _pm(cell["gap"]) if "gap" in cell else "-"
            lines.append(
                f"| {LABELS[method]} | {iteration} | {_pm(cell['kl'])} | "
                f"{_pm(cell['nll'])} | {gap} |"
            )
    comparisons = result["comparisons"]
    order = comparisons["persistent_ml_minus_cd"]
    reading = {
        "lower than": "persistent ML closer to exact ML",
        "higher than": "CD-k closer to exact ML",
        "indistinguishable from": "not resolved at 2 SE",
    }
    verdicts = {b: reading[compare(v["mean"], v["se"], 0.0, 0.0)] for b, v in order.items()}
    flips = [
        f"at {b} iterations ({verdicts[a]} before, {verdicts[b]} from there)"
        for a, b in zip(budgets, budgets[1:])
        if verdicts[a] != verdicts[b]
    ]
    lines += [
        "",
        "**Bearing on the claim.** If replay-buffer training is approximate ML and "
        "CD-k has a biased fixed point, persistent ML's excess over exact ML should shrink "
        "as the budget grows while CD-k's stays where it is. Paired by seed:",
        "",
        "- Persistent ML's excess minus CD-k's: "
        + "; ".join(f"{b} iterations {_pm(v)} ({verdicts[b]})" for b, v in order.items())
        + ". "
        + (
            f"The reading changes {'; '.join(flips)}."
            if flips
            else "The reading does not change over these budgets."
        ),
    ]
    for method in ("cd", "persistent_ml"):
        changes = comparisons["change_from_base"][method]
        lines.append(
            f"- {_capital(LABELS[method])}'s excess at a budget minus its excess at "
            f"{budgets[0]} iterations: "
            + "; ".join(f"{b} {_diff(v)}" for b, v in changes.items())
            + "."
        )
    lines.append(
        f"- Persistent ML with {factor}x the steps minus persistent ML, after as many "
        "iterations (the variant spending {factor}x the evaluations): ".format(factor=factor)
        + "; ".join(
            f"{b} iterations {_diff(v)}"
            for b, v in comparisons["variant_minus_persistent_ml_same_iterations"].items()
        )
        + "; at the same energy evaluations (each against exact ML after its own "
        "iterations): "
        + "; ".join(
            f"{b} iterations' evaluations {_diff(v)}"
            for b, v in comparisons["variant_minus_persistent_ml_same_evaluations"].items()
        )
        + "."
    )
    skipped = {
        LABELS[m]: row["nonfinite_skipped"]
        for m, row in result.items()
        if m != "comparisons" and row["nonfinite_skipped"]
    }
    if skipped:
        lines.append(f"- Non-finite iterations skipped by the Trainer: {skipped}.")
    return lines


# -- E4 ---------------------------------------------------------------------------------------
def _e4_figure(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    methods = list(result)
    width = 0.38
    for offset, (key, label) in zip(
        (-width / 2, width / 2),
        (
            ("kl_short_run_data", "short-run samples: KL(q_k‖p_data)"),
            ("kl_model_data", "model density: KL(p‖p_data)"),
        ),
    ):
        axes[0].bar(
            [i + offset for i in range(len(methods))],
            [result[m][key]["mean"] for m in methods],
            width,
            yerr=[result[m][key]["se"] for m in methods],
            capsize=4,
            label=label,
        )
    for offset, (key, label) in zip(
        (-width / 2, width / 2),
        (
            ("second_moment_error_short_run", "short-run samples"),
            ("second_moment_error_model", "model density"),
        ),
    ):
        axes[1].bar(
            [i + offset for i in range(len(methods))],
            [result[m][key]["mean"] for m in methods],
            width,
            yerr=[result[m][key]["se"] for m in methods],
            capsize=4,
            label=label,
        )
    for ax, label in zip(axes, ("KL to the data [nats, binned]", "E|x|² − E_data|x|²")):
        ax.set_xticks(range(len(methods)), [f"trained by\n{LABELS[m]}" for m in methods])
        ax.set_ylabel(label)
        ax.axhline(0, color="k", lw=0.8)
        ax.legend(fontsize=8)
    _save(fig, path, "E4: short-run samples versus the model density (mean ± SE over seeds)")


def _e4_text(result: dict, setup: dict) -> list[str]:
    lines = [
        f"Setup: E3's trained models after {setup['iterations']} iterations; "
        f"{setup['samples']} short-run samples "
        f"({setup['short_run_steps']} Langevin steps from uniform noise) and as many exact "
        f"samples of the model density per model; KL in {setup['bins']}² cells; data "
        f"E|x|² = {setup['data_second_moment']:.3f}.",
        "",
        "| trained by | KL(short-run‖data) | KL(model‖data) | exact KL(data‖model) | "
        "E\\|x\\|² error, short-run | E\\|x\\|² error, model |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in result.items():
        lines.append(
            f"| {LABELS[method]} | {_pm(row['kl_short_run_data'])} | "
            f"{_pm(row['kl_model_data'])} | {_pm(row['kl_data_model'])} | "
            f"{_pm(row['second_moment_error_short_run'])} | "
            f"{_pm(row['second_moment_error_model'])} |"
        )
    short = result["short_run_ml"]
    samples, density = short["kl_short_run_data"], short["kl_model_data"]
    closeness = {
        "lower than": "closer to the data than",
        "higher than": "farther from the data than",
        "indistinguishable from": "as close to the data (within 2 SE) as",
    }
    lines += [
        "",
        "**Bearing on the claim.** Short-run ML fits a sampler, not the density "
        "(Nijkamp et al.); the paper's ML reading applies to persistent chains only. "
        "Measured: the short-run-trained model's short-run samples are "
        + closeness[compare(samples["mean"], samples["se"], density["mean"], density["se"])]
        + " its own density is (KL to the data, binned).",
    ]
    return lines


# -- E5 ---------------------------------------------------------------------------------------
def _e5_figure(result: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    temps = [float(t) for t in result["trained"]]
    for key, label in (
        ("kl_data_model", "KL(p_data ‖ exp(−E)/Z)"),
        ("kl_data_tempered", "KL(p_data ‖ exp(−E/T)/Z_T), the chains' target"),
    ):
        ax.errorbar(
            temps,
            [result["trained"][str(t)][key]["mean"] for t in temps],
            [result["trained"][str(t)][key]["se"] for t in temps],
            marker="o",
            capsize=3,
            label=label,
        )
    for name, row in result["implied"].items():
        ax.axvline(row["temperature"], color="0.5", ls=":")
        ax.annotate(
            f"{name} default\nT={row['temperature']:.2g}",
            (row["temperature"], 0.5),
            xycoords=("data", "axes fraction"),
            fontsize=8,
            rotation=90,
        )
    ax.set_xscale("log")
    ax.set_xlabel("temperature T = σ²/(2ε)")
    ax.set_ylabel("exact KL [nats]")
    ax.legend(fontsize=8)
    _save(fig, path, "E5: persistent ML trained at temperature T (mean ± SE over seeds)")


def _e5_text(result: dict, setup: dict) -> list[str]:
    lines = [
        "Implied temperatures: "
        + "; ".join(
            f"{name} (ε = {row['step_size']}, σ = {row['noise_scale']}): T = "
            f"{row['temperature']:.3g}"
            for name, row in result["implied"].items()
        )
        + ".",
        "",
        f"Persistent ML as in E3 ({setup['seeds']} seeds, {setup['iterations']} "
        f"iterations, ε = {setup['step_size']}, σ = sqrt(2 ε T)):",
        "",
        "| T | exact KL(p_data ‖ exp(−E)/Z) | exact KL(p_data ‖ exp(−E/T)/Z_T) |",
        "|---|---|---|",
    ]
    for temp, row in result["trained"].items():
        lines.append(f"| {temp} | {_pm(row['kl_data_model'])} | {_pm(row['kl_data_tempered'])} |")
    one = result["trained"]["1.0"]["kl_data_model"]
    lines += [
        "",
        "**Bearing on the claim.** Read as ML, chains that reach their target exp(-E/T) "
        "fit exp(-E/T) to the data, so exp(-E) itself would be a tempered model unless "
        "T = 1; the published defaults imply T far from 1 (above). Measured:",
        "",
    ]
    for temp, row in result["trained"].items():
        if temp == "1.0":
            continue
        plain, tempered = row["kl_data_model"], row["kl_data_tempered"]
        lines.append(
            f"- T = {temp}: the KL of exp(-E) is "
            + compare(plain["mean"], plain["se"], one["mean"], one["se"])
            + " T = 1's; the KL "
            "of exp(-E/T), the chains' target, is "
            + compare(tempered["mean"], tempered["se"], plain["mean"], plain["se"])
            + " that of exp(-E)."
        )
    return lines


# name -> (title, question, figure(result, path[, density]), text(result, setup[, density]))
SECTIONS: dict[str, tuple[str, str, Callable, Callable]] = {
    "E1": ("E1 gradient audit", e1_gradients.QUESTION, _e1_figure, _e1_text),
    "E2": ("E2 the CD objective", e2_cd_objective.QUESTION, _e2_figure, _e2_text),
    "E3": ("E3 training outcomes", e3_training.QUESTION, _e3_figure, _e3_text),
    "E4": ("E4 short-run fixed point", e4_short_run.QUESTION, _e4_figure, _e4_text),
    "E5": ("E5 temperature", e5_temperature.QUESTION, _e5_figure, _e5_text),
}
PER_DENSITY = ("E1", "E3")  # results keyed by density first


# -- verdicts ---------------------------------------------------------------------------------
def _verdict(value: float, se: float, *, holds_below: bool) -> str:
    """ "holds" when value is beyond 0 by 2 SE on the claim's side, "does not hold" when beyond
    it on the other side, else "not resolved at 2 SE"."""
    verdict = compare(value, se, 0.0, 0.0)
    if verdict == "indistinguishable from":
        return "not resolved at 2 SE"
    return "holds" if (verdict == "lower than") == holds_below else "does not hold"


def _cell(value: dict, *, holds_below: bool) -> str:
    return f"{_verdict(value['mean'], value['se'], holds_below=holds_below)} ({_pm(value)})"


def _flat(change: dict, excess: dict) -> str:
    """CD-k's biased fixed point: its excess above 0 and no change beyond 2 SE from the base."""
    if compare(change["mean"], change["se"], 0.0, 0.0) != "indistinguishable from":
        verdict = "does not hold"
    elif compare(excess["mean"], excess["se"], 0.0, 0.0) == "higher than":
        verdict = "holds"
    else:
        verdict = "not resolved at 2 SE"
    return f"{verdict} (change {_pm(change)}; excess {_pm(excess)})"


def _verdict_rows(results: dict) -> list[tuple]:
    """(claim, density, {budget: cell}) for every claim the experiments that ran measure."""
    rows = []
    if "E1" in results:
        k = str(results["setup"]["experiments"]["E1"]["steps"][-1])
        for density, result in results["E1"].items():
            pml, pml_se, cd, cd_se = _bias_pair(result, "converged", k)
            diff = {"mean": pml - cd, "se": math.hypot(pml_se, cd_se)}
            rows.append(
                (
                    "E1: buffer chains estimate the ML gradient, CD-k's do not (persistent "
                    f"ML's relative bias minus CD-k's, converged model, k = {k})",
                    density,
                    {"base": _cell(diff, holds_below=True)},
                )
            )
    if "E2" in results:
        negative = [
            f"{m} k={k}"
            for m in MODEL_NAMES
            for k, c in results["E2"][m]["data"].items()
            if k != "0"
            and c["objective"]
            < -(2 * c["objective_se"] + abs(results["E2"][m]["data"]["0"]["objective"]))
        ]
        density = results["setup"]["experiments"]["E2"]["density"]
        rows.append(
            (
                "E2: CD-k's objective from the data is a divergence (never below 0 beyond 2 "
                "SE plus the k = 0 residual)",
                density,
                {"base": "does not hold (" + ", ".join(negative) + ")" if negative else "holds"},
            )
        )
    if "E3" in results:
        for density, result in results["E3"].items():
            comparisons = result["comparisons"]
            rows.append(
                (
                    "E3: persistent ML lands closer to exact ML than CD-k (its excess KL "
                    "minus CD-k's)",
                    density,
                    {
                        b: _cell(v, holds_below=True)
                        for b, v in comparisons["persistent_ml_minus_cd"].items()
                    },
                )
            )
            rows.append(
                (
                    "E3: persistent ML's excess over exact ML shrinks as the budget grows "
                    "(minus its excess at the base budget)",
                    density,
                    {
                        b: _cell(v, holds_below=True)
                        for b, v in comparisons["change_from_base"]["persistent_ml"].items()
                    },
                )
            )
            cd = result["cd"]["budgets"]
            rows.append(
                (
                    "E3: CD-k's excess stays above 0 and flat, a biased fixed point "
                    "(change from the base budget)",
                    density,
                    {
                        b: _flat(v, cd[b]["kl_minus_exact_ml"])
                        for b, v in comparisons["change_from_base"]["cd"].items()
                    },
                )
            )
            rows.append(
                (
                    "E3: persistent ML's excess is chain lag: more steps per iteration at "
                    "the same energy evaluations bring it closer to exact ML (variant minus "
                    "persistent ML)",
                    density,
                    {
                        b: _cell(v, holds_below=True)
                        for b, v in comparisons[
                            "variant_minus_persistent_ml_same_evaluations"
                        ].items()
                    },
                )
            )
    if "E4" in results:
        short = results["E4"]["short_run_ml"]
        samples, model = short["kl_short_run_data"], short["kl_model_data"]
        diff = {
            "mean": samples["mean"] - model["mean"],
            "se": math.hypot(samples["se"], model["se"]),
        }
        rows.append(
            (
                "E4: short-run ML fits a sampler, not the density (its short-run samples' "
                "KL to the data minus its density's)",
                results["setup"]["experiments"]["E4"]["density"],
                {"base": _cell(diff, holds_below=True)},
            )
        )
    if "E5" in results:
        for temp, row in results["E5"]["trained"].items():
            if temp == "1.0":
                continue
            plain, tempered = row["kl_data_model"], row["kl_data_tempered"]
            diff = {
                "mean": tempered["mean"] - plain["mean"],
                "se": math.hypot(tempered["se"], plain["se"]),
            }
            rows.append(
                (
                    f"E5: chains at T = {temp} fit exp(-E/T) to the data, not exp(-E) "
                    "(KL of exp(-E/T) minus KL of exp(-E))",
                    results["setup"]["experiments"]["E5"]["density"],
                    {"base": _cell(diff, holds_below=True)},
                )
            )
    return rows


def _verdict_table(results: dict) -> list[str]:
    config = results["setup"]["config"]
    budgets = [str(config["iterations"] * factor) for factor in config["budget_factors"]]
    lines = [
        "## Verdicts",
        "",
        "Each claim of Gagnon & Lajoie's reading (and the short-run and temperature "
        "readings the study adds), measured per density and budget (Adam iterations; E1, "
        'E2, E4 and E5 at the base budget or on the base models): "holds" or "does not '
        'hold" when the measured difference (in brackets, mean ± SE, paired by seed where '
        'seeds pair) is beyond 0 by more than 2 SE, else "not resolved at 2 SE".',
        "",
        "| claim | density | " + " | ".join(f"{b} it." for b in budgets) + " |",
        "|---|---|" + "---|" * len(budgets),
    ]
    for claim, density, cells in _verdict_rows(results):
        cells = {budgets[0] if b == "base" else b: v for b, v in cells.items()}
        lines.append(
            f"| {claim} | {DENSITY_LABELS.get(density, density)} | "
            + " | ".join(cells.get(b, "-") for b in budgets)
            + " |"
        )
    return lines + [""]


def _cost(results: dict) -> list[str]:
    """What the run left out or shared to fit its time, from its settings."""
    setup, config = results["setup"], results["setup"]["config"]
    densities = [DENSITY_LABELS.get(d, d) for d in config["densities"]]
    lines = [
        f"What keeps the run short: a method's {config['seeds']} seeds train side by side as "
        "one stacked energy (common.MLPStack: one batched call per step instead of "
        f"{config['seeds']}); E1's densities and E3's training runs go to "
        f"{setup['processes']} process(es); E2, E4 and E5 run on the {densities[0]} only"
    ]
    if "E3" in results:
        e3 = setup["experiments"]["E3"]
        lines[0] += (
            f"; {', '.join(LABELS[m] for m in e3['base_only'])} train to the base "
            f"budget ({e3['iterations']} iterations) only, the longer budgets being "
            "CD-k's and persistent ML's questions; E3's budgets: "
            + "; ".join(
                f"{DENSITY_LABELS.get(d, d)} {', '.join(map(str, b))} iterations"
                for d, b in e3["budgets"].items()
            )
        )
    return [lines[0] + ".", ""]


def write(results: dict, out: Path, *, quick: bool) -> list[Path]:
    """Write results.json, the figures and report.md into out; returns their paths."""
    out = Path(out)
    setup = results["setup"]
    (out / "results.json").write_text(json.dumps(results, indent=1))
    written = [out / "results.json"]
    total = setup.get("total_seconds", sum(setup["seconds"].values()))
    total_cpu = setup.get("total_cpu_seconds", sum(setup["cpu_seconds"].values()))
    lines = [
        "# ebm-fast study: CD versus maximum likelihood, measured exactly in 2-D",
        "",
        f"Command: `{setup.get('command', 'run_study(...)')}` — {total:.0f} s wall-clock, "
        f"{total_cpu:.0f} s of CPU time ({setup['threads']} torch thread(s) in each of "
        f"{setup['processes']} process(es), torch {setup['torch']})"
        + (" (--quick: fewer repetitions, same structure)." if quick else ".")
        + " Per experiment, wall (CPU) seconds: "
        + ", ".join(
            f"{name} {seconds:.0f} ({setup['cpu_seconds'][name]:.0f})"
            for name, seconds in setup["seconds"].items()
        )
        + ". On a shared machine the wall-clock time exceeds the CPU time by the other "
        f"load. Seed {setup['seed']}; the run is deterministic given it. Settings: "
        'results.json["setup"]. A difference is called one only when it exceeds twice '
        "its standard error.",
        "",
        *_cost(results),
        *_verdict_table(results),
    ]
    for name, (title, question, figure, text) in SECTIONS.items():
        if name not in results:
            continue
        lines += [f"## {title}", "", f"**Question.** {question}", ""]
        experiment = setup["experiments"][name]
        if name == "E3":
            paths = _e3_figures(results[name], out)
            lines += [f"![excess KL against the budget]({paths[0].name})", ""]
            written += paths
        if name not in PER_DENSITY:
            path = out / f"{name.lower()}.png"
            figure(results[name], path)
            written.append(path)
            lines += [*text(results[name], experiment), "", f"![{title}]({path.name})", ""]
            continue
        for density, result in results[name].items():
            path = out / f"{name.lower()}_{density}.png"
            if name == "E1":
                figure(result, path, density)
                written.append(path)
            lines += [
                f"### {DENSITY_LABELS.get(density, density)}",
                "",
                *text(result, experiment, density),
                "",
                f"![{title}, {DENSITY_LABELS.get(density, density)}]({path.name})",
                "",
            ]
    (out / "report.md").write_text("\n".join(lines))
    return written + [out / "report.md"]
