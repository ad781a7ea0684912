"""E1, the gradient audit: each estimator's gradient against the exact ML gradient."""

from __future__ import annotations

import math
from typing import Any

import torch

from ebm_fast.exact2d import exact_samples, log_partition
from ebm_fast.experiments.study.common import ESTIMATORS, MODEL_NAMES, Context, flat, run_jobs
from ebm_fast.samplers.energy import trainable_parameters
from ebm_fast.training import KLPersistentML

__all__ = ["run", "audit", "summarise", "BOOTSTRAP"]

QUESTION = (
    "How far is each estimator's gradient from the exact ML gradient (bias) and how much "
    "does it scatter (variance), at an early, a middle and a converged model? How large "
    "is CD's missing term E_q_k[grad E] - E_p[grad E]?"
)
BOOTSTRAP = 400  # bootstrap resamples of the replicas for the standard errors


class _KeptKL(KLPersistentML):
    """KLPersistentML that keeps its last KL chains x_kl (a function of the parameters), so
    that each replica's KL-term gradient can be taken from its own chains."""

    def kl_term(self, x_prev, step):
        kl, x_kl = super().kl_term(x_prev, step)
        self.x_kl = x_kl
        return kl, x_kl


def summarise(errors: torch.Tensor, scale: float, generator: torch.Generator) -> dict:
    """Bias and variance of R independent gradient errors d_r = g_r - g*_r (rows), relative
    to ``scale``, with bootstrap standard errors over the replicas.

    bias = sqrt(max(|mean d|^2 - tr(cov d) / R, 0)): the norm of the mean error, less the part
    of |mean d|^2 that is the noise of averaging R replicas (so an unbiased estimator reads ~0).
    variance = mean squared deviation of one estimate from the mean, E|d - E d|^2 (unbiased).
    Everything comes from the Gram matrix of the rows, so resampling is cheap.
    """
    replicas = errors.shape[0]
    gram = errors @ errors.T
    counts = torch.cat(
        [
            torch.ones(1, replicas, dtype=gram.dtype),
            torch.nn.functional.one_hot(
                torch.randint(replicas, (BOOTSTRAP, replicas), generator=generator), replicas
            )
            .sum(1)
            .to(gram.dtype),
        ]
    )
    mean_sq = ((counts @ gram) * counts).sum(1) / replicas**2  # |mean d|^2 per resample
    spread = (counts * gram.diagonal()).sum(1) / replicas - mean_sq
    variance = spread * replicas / (replicas - 1)
    bias = (mean_sq - variance / replicas).clamp_min(0).sqrt()
    return {
        "bias": float(bias[0]) / scale,
        "bias_se": float(bias[1:].std()) / scale,
        "variance": float(variance[0]) / scale**2,
        "variance_se": float(variance[1:].std()) / scale**2,
        "replicas": replicas,
    }


def _negative_term_errors(
    energy, negatives: torch.Tensor, model_term: torch.Tensor, replicas: int
) -> torch.Tensor:
    """(R, P): per replica, E_p[grad E] - mean over its negatives of grad E, the error of
    E_data[grad E] - E_neg[grad E] against the exact gradient on the same data."""
    params = trainable_parameters(energy)
    return torch.stack(
        [
            model_term - flat(torch.autograd.grad(energy(chunk).mean(), params))
            for chunk in negatives.chunk(replicas)
        ]
    )


def _kl_term_gradients(loss: _KeptKL, replicas: int) -> torch.Tensor:
    """(R, P): per replica, kl_weight * grad of mean E_theta_bar(x_kl) over its KL chains."""
    energy, params = loss.energy, loss.parameters
    frozen = {name: p.detach() for name, p in energy.named_parameters()}
    values = torch.func.functional_call(energy, frozen, (loss.x_kl,)).reshape(-1)
    # A parameter that does not move the chains (the last bias) gets a zero gradient.
    return torch.stack(
        [
            loss.kl_weight
            * flat(
                torch.autograd.grad(
                    chunk.mean(),
                    params,
                    retain_graph=True,
                    allow_unused=True,
                    materialize_grads=True,
                )
            )
            for chunk in values.chunk(replicas)
        ]
    )


def audit(ctx: Context) -> tuple[dict, dict, dict]:
    """One density's audit: (results keyed by estimator, then model, then k; the models' exact
    numbers; the models themselves, which E2 reuses)."""
    cfg = ctx.config
    replicas, batch = cfg.e1_replicas, cfg.e1_batch
    chains = replicas * batch
    generator = torch.Generator().manual_seed(ctx.seed_for("E1", "bootstrap"))
    result: dict = {name: {} for name in ESTIMATORS + ("exact_samples",)}
    models = {}
    for model_name, energy in ctx.models().items():
        params = trainable_parameters(energy)
        with torch.enable_grad():  # E_p[grad E] = -grad log Z, summed exactly on the grid
            model_term = -flat(
                torch.autograd.grad(log_partition(energy, cfg.box, cfg.cells), params)
            )
        scale = float(model_term.norm())
        full_gradient = flat(torch.autograd.grad(energy(ctx.train).mean(), params))
        models[model_name] = {
            "exact_kl": ctx.exact_kl_to_model(energy),
            "model_term_norm": scale,
            "exact_gradient_norm": float((full_gradient - model_term).norm()),
        }
        positives = ctx.data(chains, "E1", model_name)
        negatives = exact_samples(
            energy,
            chains,
            seed=ctx.seed_for("E1", "exact", model_name),
            step=0,
            box=cfg.box,
            cells=cfg.cells,
        )
        result["exact_samples"][model_name] = summarise(
            _negative_term_errors(energy, negatives, model_term, replicas), scale, generator
        )
        for name in ESTIMATORS:
            result[name][model_name] = {}
            for k in cfg.e1_steps:
                # One loss serves all replicas side by side: at a frozen model the chains (and
                # a buffer's slots) evolve independently, so slice r of R * batch chains is an
                # estimate with batch chains. The KL chains are all chains (kl_chains = batch
                # per replica); the entropy term is left out (see the report).
                options: dict[str, Any] = (
                    {"kl_chains": chains, "entropy_weight": 0.0}
                    if name == "kl_persistent_ml"
                    else {}
                )
                loss = ctx.loss(
                    name,
                    energy,
                    k,
                    "E1",
                    model_name,
                    buffer_size=chains,
                    loss_class=_KeptKL,
                    **options,
                )
                persistent = name in ("pcd", "persistent_ml", "kl_persistent_ml")
                for _ in range(math.ceil(cfg.e1_warm_steps / k) if persistent else 0):
                    loss(positives)
                loss(positives)
                errors = _negative_term_errors(energy, loss.last.negatives, model_term, replicas)
                if name == "kl_persistent_ml":
                    errors = errors + _kl_term_gradients(loss, replicas)
                row = summarise(errors, scale, generator)
                if name == "cd":  # its bias is the missing term E_q_k[grad E] - E_p[grad E]
                    row["missing_term_norm"] = row["bias"] * scale
                result[name][model_name][str(k)] = row
    return result, models, ctx.models()


def _audit_job(config, seed: int, density: str) -> tuple[dict, dict, dict]:
    return audit(Context(config, seed, density))


def run(ctx: Context, progress) -> tuple[dict, dict]:
    """({density: results keyed by estimator, then model, then k}, setup with each density's
    models' exact numbers). The densities go to ctx.processes processes."""
    cfg = ctx.config
    audits = run_jobs(
        _audit_job,
        [(cfg, ctx.seed, density) for density in cfg.densities],
        ctx.processes,
        ctx.threads,
        progress,
    )
    result, models = {}, {}
    for density, (rows, numbers, energies) in zip(cfg.densities, audits):
        result[density], models[density] = rows, numbers
        ctx.on(density).keep_models(energies)
    setup = {
        "replicas": cfg.e1_replicas,
        "batch": cfg.e1_batch,
        "steps": list(cfg.e1_steps),
        "warm_steps": cfg.e1_warm_steps,
        "bootstrap": BOOTSTRAP,
        "checkpoints": dict(zip(MODEL_NAMES, cfg.checkpoints)),
        "models": models,
    }
    return result, setup


def units(cfg) -> int:
    return len(cfg.densities)
