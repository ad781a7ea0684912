"""Warnings a user can act on, from the metrics a Trainer logs.

:class:`DivergenceMonitor` reads each logged record and warns (``TrainingWarning``) when:

* the energy gap |E+ - E-| grows past ``growth`` times its first logged size (at least 1): the
  energies are running away from each other;
* the chains' mean input-gradient norm grows past ``growth`` times its first logged value: the
  energy is getting steep where the chains are and Langevin steps become unstable;
* the energies' level, |mean E+|, grows past ``growth`` times its size at the run's first
  iteration (:meth:`start`; the first logged record's when not given; at least 1): nothing holds
  the level (alpha = 0, a JEM classifier's logits), the model grows overconfident as it drifts,
  and its negatives may be noise it cannot tell from data. Measured on issue 23's JEM run on the
  MLP energy (E+ -2.9 at the start, -270 at the first log): this is the one check that fires
  there, since sparse logs see the gap and the chain gradients grow little between them;
* E- stays more than ``margin`` below E+ for ``patience`` logs in a row: the sampler keeps
  finding states the model rates likelier than the data (spurious modes, or chains collapsing);
* steps were skipped for a non-finite loss or gradient.

Each condition warns once when it starts (again if it clears and comes back), with what to try.
"""

from __future__ import annotations

import math
import warnings

from ebm_fast import validation

__all__ = ["TrainingWarning", "DivergenceMonitor"]


class TrainingWarning(RuntimeWarning):
    """A training run shows a sign of divergence or instability."""


class DivergenceMonitor:
    def __init__(self, *, growth: float = 10.0, margin: float = 1.0, patience: int = 5):
        self.growth = validation.real(growth, "growth", low=1.0, low_open=True)
        self.margin = validation.real(margin, "margin", low=0.0)
        self.patience = validation.integer(patience, "patience", low=1)
        self.first_gap: float | None = None
        self.first_chain_grad: float | None = None
        self.start_level: float | None = None
        self.below_streak = 0
        self.skipped = 0
        self.active: set[str] = set()

    def start(self, energy_pos: float) -> None:
        """The mean E+ of the run's first iteration: the baseline of the level check (kept if
        one is set already, e.g. by a resumed run)."""
        if self.start_level is None and math.isfinite(energy_pos):
            self.start_level = float(energy_pos)

    def update(self, record: dict) -> list[str]:
        """Check one logged record (keys as the Trainer's metrics.jsonl); returns the warnings
        issued for it, each also sent through warnings.warn."""
        found = {}
        gap = record["energy_gap"]
        if math.isfinite(gap):
            if self.first_gap is None:
                self.first_gap = abs(gap)
            limit = self.growth * max(self.first_gap, 1.0)
            if abs(gap) > limit:
                found["energy_gap"] = (
                    f"the energy gap |E+ - E-| = {abs(gap):.3g} grew past {limit:.3g} "
                    f"({self.growth:g}x its first logged size): raise alpha (the energy-magnitude "
                    f"penalty), lower the learning rate, or clip the parameter gradients "
                    f"(grad_clip)"
                )
        level = record["energy_pos"]
        if math.isfinite(level):
            self.start(level)
            start_level = self.start_level
            assert start_level is not None  # start() keeps a finite level
            limit = self.growth * max(abs(start_level), 1.0)
            if abs(level) > limit:
                found["energy_level"] = (
                    f"the energies' level drifted: mean E+ = {level:.3g}, past {limit:.3g} "
                    f"({self.growth:g}x its size at the start, {start_level:.3g}); nothing "
                    f"holds it (alpha = 0, or a JEM classifier's logits), so the model grows "
                    f"overconfident and its negatives may be noise it cannot tell from data (look "
                    f"at the samples): raise alpha where the loss has one, lower the learning "
                    f"rate, or use sampler settings made for this data (ebm-fast train's defaults "
                    f"follow the data set)"
                )
        chain_grad = record.get("chain_grad_norm")
        if chain_grad is not None and math.isfinite(chain_grad):
            if self.first_chain_grad is None:
                self.first_chain_grad = chain_grad
            limit = self.growth * self.first_chain_grad
            if chain_grad > limit:
                found["chain_grad_norm"] = (
                    f"the chains' mean input-gradient norm {chain_grad:.3g} grew past {limit:.3g} "
                    f"({self.growth:g}x its first logged value): the energy is getting steep where "
                    f"the chains are; lower the sampler's step_size or clip its gradients "
                    f"(grad_clip), raise alpha, or lower the learning rate"
                )
        self.below_streak = self.below_streak + 1 if gap > self.margin else 0
        if self.below_streak >= self.patience:
            found["negatives_below"] = (
                f"E- has been more than {self.margin:g} below E+ for {self.below_streak} logs in a "
                f"row (E+ {record['energy_pos']:.3g}, E- {record['energy_neg']:.3g}): the sampler "
                f"keeps finding states the model rates likelier than the data; look at the "
                f"samples, raise the buffer's reinit_prob or the sampler's steps, or lower the "
                f"learning rate"
            )
        skipped = record["nonfinite_skipped"] - self.skipped
        self.skipped = record["nonfinite_skipped"]
        if skipped:
            found[f"nonfinite@{record['iteration']}"] = (
                f"{skipped} steps skipped since the last log for a non-finite loss or gradient "
                f"({self.skipped} in all): lower the learning rate or the sampler's step_size, "
                f"raise alpha, or clip gradients"
            )
        issued = [message for kind, message in found.items() if kind not in self.active]
        self.active = set(found)
        for message in issued:
            warnings.warn(
                f"iteration {record['iteration']}: {message}", TrainingWarning, stacklevel=3
            )
        return issued

    def state_dict(self) -> dict:
        """The baselines, streaks and active warnings (plain values: a checkpoint resumes them)."""
        return {
            "first_gap": self.first_gap,
            "first_chain_grad": self.first_chain_grad,
            "start_level": self.start_level,
            "below_streak": self.below_streak,
            "skipped": self.skipped,
            "active": sorted(self.active),
        }

    def load_state_dict(self, state: dict) -> None:
        self.first_gap, self.first_chain_grad = state["first_gap"], state["first_chain_grad"]
        self.start_level, self.below_streak = state["start_level"], state["below_streak"]
        self.skipped, self.active = state["skipped"], set(state["active"])
