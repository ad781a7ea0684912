"""E5, temperature: with step size eps and noise sigma decoupled, Langevin targets
exp(-E / T) with T = sigma^2 / (2 eps); what that means for the model persistent ML trains."""

from __future__ import annotations

from ebm_fast.experiments.study.common import Context, mean_se
from ebm_fast.experiments.study.e3_training import train

__all__ = ["run", "units", "QUESTION", "DEFAULTS", "implied_temperature"]

QUESTION = (
    "Which temperature T = sigma^2 / (2 eps) do the IGEBM and JEM defaults imply, and how "
    "does the exact KL(p_data || p) of a model trained by persistent ML depend on T?"
)
# (step size eps, noise sigma) of the published samplers: IGEBM (Du & Mordatch 2019: step_lr
# 10, noise 0.005) and JEM (Grathwohl et al. 2020: sgld_lr 1, sgld_std 0.01).
DEFAULTS = {"IGEBM": (10.0, 0.005), "JEM": (1.0, 0.01)}


def implied_temperature(step_size: float, noise_scale: float) -> float:
    """T = sigma^2 / (2 eps): x <- x - eps grad E + sigma xi is the Euler step of the Langevin
    diffusion of exp(-E / T)."""
    return noise_scale**2 / (2 * step_size)


def run(ctx: Context, progress) -> tuple[dict, dict]:
    """({"implied": {name: {"step_size", "noise_scale", "temperature"}}, "trained": {T: {
    "kl_data_model", "kl_data_tempered"}}}, setup). kl_data_model is the exact KL to
    exp(-E) / Z, kl_data_tempered to exp(-E / T) / Z_T, the density the chains targeted."""
    cfg = ctx.config
    trained = {}
    for temperature in cfg.temperatures:
        rows = []
        for energy in train(ctx, "persistent_ml", temperature)["energies"][str(cfg.iterations)]:
            rows.append((ctx.exact_kl_to_model(energy), ctx.exact_kl_to_model(energy, temperature)))
        progress.update(1)
        trained[str(temperature)] = {
            "kl_data_model": mean_se(r[0] for r in rows),
            "kl_data_tempered": mean_se(r[1] for r in rows),
        }
    implied = {
        name: {
            "step_size": eps,
            "noise_scale": sigma,
            "temperature": implied_temperature(eps, sigma),
        }
        for name, (eps, sigma) in DEFAULTS.items()
    }
    setup = {
        "density": ctx.density,
        "temperatures": list(cfg.temperatures),
        "step_size": cfg.step_size,
        "seeds": cfg.seeds,
        "iterations": cfg.iterations,
    }
    return {"implied": implied, "trained": trained}, setup


def units(cfg) -> int:
    return len(cfg.temperatures)
