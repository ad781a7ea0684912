"""The study's settings: one dataclass, the full run and the --quick run."""

from __future__ import annotations

import dataclasses

from ebm_fast import validation
from ebm_fast.datasets import TOY_2D
from ebm_fast.exact2d import BOX

__all__ = ["StudyConfig", "FULL", "QUICK"]


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Everything a study run depends on besides its seed (written into results.json).

    Shared: an MLP energy 2-hidden-hidden-1 on 2-D data with an exact density (``densities``,
    names of ebm_fast.datasets.TOY_2D: E1 and E3 run on each, E2, E4 and E5 on the first),
    Langevin with step_size
    at temperature 1 (sigma = sqrt(2 step_size)) clamped to the box, Adam(lr, betas (0, 0.999)),
    exact quantities on a cells x cells grid.
    E1: at the exact-ML iterations ``checkpoints`` (early, middle, converged), ``e1_replicas``
    independent gradient estimates of ``e1_batch`` chains per estimator and k in ``e1_steps``;
    persistent estimators first take ceil(e1_warm_steps / k) calls at that model.
    E2: ``e2_chains`` chains per start, histograms of ``bins`` x ``bins`` cells, the SE from
    ``e2_subsets`` disjoint subsets of the chains; the buffer start is a persistent-ML buffer of
    ``buffer_size`` slots run ``e2_buffer_calls`` calls at the model.
    E3-E5: ``seeds`` training runs per method of ``iterations`` Adam steps (E3's base budget),
    batch ``train_batch``, ``train_steps`` sampler steps per iteration, buffers of
    ``train_buffer_size`` slots (small enough that each slot is run every ~16 iterations in
    these short runs; still above KLPersistentML's 1000 for its entropy term); E3 trains on to
    the longer ``budgets``, iterations times ``budget_factors`` on the first density and times
    ``other_budget_factors`` on the others (at the same lr a longer run's prefix is the shorter
    run), and a persistent-ML variant takes ``variant_factor`` times the
    steps per iteration for 1 / variant_factor of the iterations (the same energy evaluations);
    each budget b is evaluated ``eval_points`` times (every b / eval_points iterations);
    E4 draws ``e4_samples`` short-run samples per model; E5 trains persistent ML at each of
    ``temperatures``.
    """

    densities: tuple = ("ring", "two_spirals")
    hidden: int = 32
    step_size: float = 0.01
    lr: float = 3e-3
    box: float = BOX
    cells: int = 100
    train_size: int = 2000
    heldout_size: int = 2000
    buffer_size: int = 10_000
    train_buffer_size: int = 2048
    reinit_prob: float = 0.05
    checkpoints: tuple = (25, 150, 1000)
    e1_steps: tuple = (1, 10, 50)
    e1_replicas: int = 100
    e1_batch: int = 128
    e1_warm_steps: int = 200
    e2_chains: int = 100_000
    e2_steps: tuple = (0, 1, 5, 10, 50)
    e2_subsets: int = 5
    e2_buffer_calls: int = 100
    bins: int = 50
    seeds: int = 5
    iterations: int = 800
    budget_factors: tuple = (1, 4, 16)
    other_budget_factors: tuple = (1, 4)
    variant_factor: int = 4
    train_batch: int = 128
    train_steps: int = 10
    eval_points: int = 8
    e4_samples: int = 20_000
    temperatures: tuple = (0.1, 0.3, 1.0)

    def __post_init__(self):
        for name, low in (
            ("hidden", 1),
            ("cells", 2),
            ("train_size", 1),
            ("heldout_size", 1),
            ("buffer_size", 1),
            ("train_buffer_size", 1),
            ("e1_replicas", 2),
            ("e1_batch", 1),
            ("e1_warm_steps", 0),
            ("e2_chains", 2),
            ("e2_subsets", 2),
            ("e2_buffer_calls", 0),
            ("bins", 2),
            ("seeds", 2),
            ("iterations", 1),
            ("train_batch", 1),
            ("train_steps", 1),
            ("eval_points", 1),
            ("e4_samples", 2),
            ("variant_factor", 1),
        ):
            validation.integer(getattr(self, name), name, low=low)
        for name in ("step_size", "lr", "box"):
            validation.real(getattr(self, name), name, low=0.0, low_open=True)
        validation.real(self.reinit_prob, "reinit_prob", low=0.0, high=1.0)
        if self.e2_chains % self.e2_subsets:
            raise ValueError(
                f"e2_chains ({self.e2_chains}) must be a multiple of e2_subsets ({self.e2_subsets})"
            )
        for name, low in (
            ("checkpoints", 0),
            ("e1_steps", 1),
            ("e2_steps", 0),
            ("budget_factors", 1),
            ("other_budget_factors", 1),
        ):
            values = getattr(self, name)
            if not isinstance(values, tuple) or not values:
                raise ValueError(f"{name} must be a non-empty tuple, got {values!r}")
            for value in values:
                validation.integer(value, name, low=low)
            if list(values) != sorted(set(values)):
                raise ValueError(f"{name} must be increasing, got {values!r}")
        if len(self.checkpoints) != 3:
            raise ValueError(
                f"checkpoints must name 3 iteration counts (early, middle, "
                f"converged), got {self.checkpoints!r}"
            )
        for name in ("budget_factors", "other_budget_factors"):
            if getattr(self, name)[0] != 1:
                raise ValueError(
                    f"{name} must start at 1 (the base budget, iterations), got "
                    f"{getattr(self, name)!r}"
                )
        exact = [name for name, toy in TOY_2D.items() if toy.log_density is not None]
        if (
            not isinstance(self.densities, tuple)
            or not self.densities
            or any(name not in exact for name in self.densities)
        ):
            raise ValueError(
                f"densities must be a non-empty tuple of data sets with an exact "
                f"density ({', '.join(exact)}), got {self.densities!r}"
            )
        if not isinstance(self.temperatures, tuple) or 1.0 not in self.temperatures:
            raise ValueError(
                f"temperatures must be a tuple holding 1.0 (E3's persistent ML "
                f"runs), got {self.temperatures!r}"
            )
        for value in self.temperatures:
            validation.real(value, "temperatures", low=0.0, low_open=True)

    @property
    def budgets(self) -> tuple:
        """E3's budgets in Adam iterations on the first density: iterations times each of
        budget_factors (the longest of all densities')."""
        return tuple(self.iterations * factor for factor in self.budget_factors)


FULL = StudyConfig()
# Same structure, fewer repetitions: 20 replicas in E1, 20k chains in E2, 2 seeds of 160
# iterations in E3-E5 (E3's budgets 160 and 640) and two temperatures.
QUICK = dataclasses.replace(
    FULL,
    e1_replicas=20,
    e1_warm_steps=100,
    e2_chains=20_000,
    e2_steps=(0, 1, 10, 50),
    seeds=2,
    iterations=160,
    budget_factors=(1, 4),
    other_budget_factors=(1, 4),
    e4_samples=5000,
    temperatures=(0.1, 1.0),
)
