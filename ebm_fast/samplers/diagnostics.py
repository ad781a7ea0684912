"""Per-chain diagnostics of a chain and its non-finite check, kept on the device."""

from __future__ import annotations

import torch


class ChainDiagnostics:
    """Per-chain diagnostics of one chunk, kept on the device and reduced once at the end.

    Non-finite detection never reads the device from the host and costs one small copy per
    step: check() copies the step's energies into a (FOLD_EVERY, chains) block allocated once;
    every FOLD_EVERY steps (and in finish(), with the final state) the block is folded in place
    into a per-chain score: 0 while a chain is finite, else n_steps + 1 - k for the first local
    step k at which it was not (k = 0: the initial state, k = n_steps: the final state), so
    folds combine by a maximum. Memory stays O(FOLD_EVERY x chains) however long the chain.
    """

    # A fold per step was ~8 small ops (70-100 us per step on one CPU thread, 3% of a
    # 784-256-256-1 MLP step); a copy per step and a fold per 32 steps cost a few us per step.
    FOLD_EVERY = 32

    def __init__(self, x: torch.Tensor, n_steps: int, check_finite: bool, track: bool):
        self.check_finite, self.track, self.n_steps = check_finite, track, n_steps
        self.pending = 0  # rows of the block awaiting a fold
        # Made at the first check.
        self.block: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None
        self.score: torch.Tensor | None = None
        # Whether check() or measure() read the step's energies (else a chain may skip them).
        self.needs_energy = check_finite or track
        self.grad_norm_sum: torch.Tensor | None = (
            torch.zeros(x.shape[0], dtype=torch.float32, device=x.device) if track else None
        )
        self.evaluations = 0
        self.initial_energy: torch.Tensor | None = None

    def check(self, energy: torch.Tensor) -> None:
        """Record the energies of the next local step (0, 1, ...) for the non-finite check."""
        if self.check_finite:
            block = self.block if self.block is not None else self._allocate(energy)
            block[self.pending].copy_(energy)
            self.pending += 1
            if self.pending == block.shape[0]:
                self._fold()

    def _allocate(self, like: torch.Tensor) -> torch.Tensor:
        """Make the block, the weights and the score for chains like ``like``; the block."""
        # Weights are integers up to n_steps + 1: exact in float32 below 2**24, else float64.
        dtype = like.dtype if self.n_steps < 2**24 else torch.float64
        rows = min(self.FOLD_EVERY, self.n_steps)
        self.block = block = like.new_empty((rows, like.shape[0]), dtype=dtype)
        # The weights of the next fold's local steps k: n_steps + 1 - k, lowered in place by
        # each fold (a table of all n_steps + 1 weights would grow with the chain).
        self.weights = torch.arange(
            self.n_steps + 1, self.n_steps + 1 - rows, -1, dtype=dtype, device=like.device
        )
        self.score = like.new_zeros(like.shape[0], dtype=dtype)
        return block

    def _fold(self) -> None:
        n = self.pending
        if n == 0:
            return
        # A pending row means check() has allocated all three.
        assert self.block is not None and self.weights is not None and self.score is not None
        # In place (a fresh block-sized temporary per op would page-fault on a CPU): x * 0 is
        # 0 where x is finite and NaN where it is not, so `bad` is 1 there and 0 elsewhere.
        bad = self.block[:n].mul_(0).nan_to_num_(nan=1.0)
        rows = bad.mul_(self.weights[:n, None]).amax(dim=0)
        torch.maximum(self.score, rows, out=self.score)
        self.weights.sub_(n)
        self.pending = 0

    def measure(self, energy: torch.Tensor, grad: torch.Tensor) -> None:
        """Accumulate the return_info statistics of one energy+gradient evaluation."""
        if self.grad_norm_sum is not None:  # track
            if self.initial_energy is None:
                self.initial_energy = energy.clone()
            self.grad_norm_sum += torch.linalg.vector_norm(
                grad.reshape(grad.shape[0], -1).float(), dim=1
            )
            self.evaluations += 1

    def finish(
        self, x: torch.Tensor, energy: torch.Tensor | None
    ) -> dict[str, torch.Tensor | None]:
        """The chunk's results; with check_finite, "nonfinite_score" (see the class docstring)
        includes the final state x and, when given, its energies."""
        results: dict[str, torch.Tensor | None] = {}
        if self.check_finite:
            self._fold()
            # x * 0 sums to 0 exactly when all of a chain's elements are finite (a plain sum
            # could overflow), else NaN; adding the final energies keeps that property.
            final = (x.reshape(x.shape[0], -1) * 0).sum(dim=1)
            if energy is not None:
                final = (final + energy).mul_(0)
            final = final.nan_to_num_(nan=1.0)
            # No step checked (a chunk of no steps): the final state is all there is to score.
            score = self.score if self.score is not None else torch.zeros_like(final)
            # Weight 1, the lowest: the final state counts only for chains finite until then.
            torch.maximum(score, final.to(score.dtype), out=score)
            results["nonfinite_score"] = score
        if self.grad_norm_sum is not None:  # track
            results.update(
                initial_energy=self.initial_energy,
                final_energy=energy,
                mean_grad_norm=self.grad_norm_sum / self.evaluations,
            )
        return results
