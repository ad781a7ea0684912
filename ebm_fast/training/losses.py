"""Training losses: one callable object per gradient estimator, each named for what it is.

``loss = est(x_pos)`` (``est(x_pos, y)`` with a per-class buffer) draws negatives with the
estimator's sampler and returns

    mean E(x+) - mean E(x-) + alpha * (mean E(x+)^2 + mean E(x-)^2)

(the IGEBM energy-magnitude regulariser with weight alpha), whose gradient in the energy's
parameters is the estimator's gradient: E_data[grad E] - E_negatives[grad E] plus the
regulariser's. Sampling runs with the parameters frozen (the samplers switch requires_grad off),
so only the returned loss carries gradients to them. The loss's own energy passes (positives,
negatives, the KL step) are the sampler's (``sampler.energies``: the one energy path, with its
negate, autocast and output check), their energies in float32 (the compute dtype of the batch)
before any mean is taken. ``est.last`` holds the iteration's statistics (:class:`LossStats`).
The estimators differ in where the chains start:

* :class:`ContrastiveDivergence` (CD-k, Hinton 2002): at the positive batch, k steps. Not the ML
  gradient in general; CD-0's gradient is exactly 0.
* :class:`PersistentCD` (Tieleman 2008): one persistent chain per batch slot, never restarted.
* :class:`PersistentML`: IGEBM/JEM replay-buffer training (Du & Mordatch 2019; Grathwohl et al.
  2020): chains drawn from a ReplayBuffer (fresh noise with its reinit_prob), run, written back.
  Gagnon & Lajoie (2022, arXiv 2202.12176) show this is approximate maximum likelihood, not CD:
  the chains never restart at the data, they persist toward the model distribution.
* :class:`ShortRunML` (Nijkamp et al. 2019): fresh chains from ``init(batch)`` every iteration.
* :class:`KLPersistentML` (Du et al. 2021): PersistentML plus the KL term of the sampler's
  distribution, its last step differentiated through ``langevin_update``'s autograd, and a
  nearest-neighbour entropy term (see docs/training.md for what they optimise).
"""

from __future__ import annotations

import abc
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import torch

from ebm_fast import validation
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.samplers import LangevinSampler, MALASampler
from ebm_fast.samplers.energy import frozen_parameters, trainable_parameters

__all__ = [
    "LossStats",
    "EBMLoss",
    "ContrastiveDivergence",
    "PersistentCD",
    "PersistentML",
    "ShortRunML",
    "KLPersistentML",
    "nearest_distances",
]

# The samplers a loss drives.
AnySampler = LangevinSampler | MALASampler
# An iteration's statistics as a loss gathers them: keyword arguments of LossStats.
Stats = dict[str, torch.Tensor]


@dataclasses.dataclass
class LossStats:
    """Statistics of one loss evaluation; tensors are detached 0-dim tensors on the energy's
    device (reading them synchronises with it, so a trainer reads them only when it logs).

    negatives: the iteration's negatives x- (detached). energy_pos / energy_neg: mean E(x+)
    and mean E(x-). sampler_seconds: host wall-clock time spent drawing negatives (not
    synchronised with an asynchronous device).
    With ``track_chains`` on (one extra energy evaluation in the sampler): chain_grad_norm, the
    chains' mean input-gradient norm averaged over chains; chain_displacement, the mean
    |x_K - x_0| of the chains. reinit_fraction: fraction of buffer draws replaced by fresh noise
    (buffer losses, when the buffer reports it). KLPersistentML: kl (mean E of the KL chains,
    parameters frozen) and entropy (mean log nearest-neighbour distance; None until the buffer
    holds enough samples).
    """

    negatives: torch.Tensor
    energy_pos: torch.Tensor
    energy_neg: torch.Tensor
    sampler_seconds: float
    chain_grad_norm: torch.Tensor | None = None
    chain_displacement: torch.Tensor | None = None
    reinit_fraction: torch.Tensor | None = None
    kl: torch.Tensor | None = None
    entropy: torch.Tensor | None = None


def _check_batch(x: object, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(
            f"{name} must have a leading batch axis with at least one sample, got "
            f"shape {tuple(x.shape)}"
        )


class EBMLoss(abc.ABC):
    """Shared machinery: the loss from positives and negatives, statistics, state.

    Subclasses define :meth:`negatives`. ``track_chains`` (default False) asks the sampler for
    per-chain diagnostics (an extra energy evaluation); a Trainer switches it on for the
    iterations it logs.
    """

    #: whether the loss takes class labels y (a per-class buffer)
    conditional = False

    def __init__(self, sampler: AnySampler, alpha: float) -> None:
        if not isinstance(sampler, (LangevinSampler, MALASampler)):
            raise TypeError(
                f"sampler must be an ebm_fast.LangevinSampler or MALASampler, got "
                f"{type(sampler).__name__}"
            )
        self.sampler = sampler
        energy = sampler.energy
        self.parameters = trainable_parameters(energy)  # refuses anything but an nn.Module
        assert isinstance(energy, torch.nn.Module)
        self.energy = energy
        self.alpha = validation.real(alpha, "alpha", low=0.0)
        self.track_chains = False
        self.last: LossStats | None = None

    # -- the loss ---------------------------------------------------------------------------
    def __call__(self, x_pos: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        _check_batch(x_pos, "x_pos")
        if y is not None and not self.conditional:
            raise ValueError(
                f"y was given but {type(self).__name__} takes no labels (only a "
                "per-class replay buffer uses them)"
            )
        if y is None and self.conditional:
            raise ValueError(
                f"y (the class of each positive sample) is required: the buffer of "
                f"{type(self).__name__} is per-class (n_classes is set)"
            )
        start = time.perf_counter()
        stats: Stats = {}
        x_neg = self.negatives(x_pos, y, stats).detach()
        sampler_seconds = time.perf_counter() - start
        e_pos = self.energies(x_pos)
        e_neg = self.energies(x_neg)
        mean_pos, mean_neg = e_pos.mean(), e_neg.mean()
        loss = mean_pos - mean_neg
        if self.alpha:
            loss = loss + self.alpha * ((e_pos**2).mean() + (e_neg**2).mean())
        extra = self.extra_terms(stats)
        if extra is not None:
            loss = loss + extra
        self.last = LossStats(
            negatives=x_neg,
            energy_pos=mean_pos.detach(),
            energy_neg=mean_neg.detach(),
            sampler_seconds=sampler_seconds,
            **stats,
        )
        return loss

    @abc.abstractmethod
    def negatives(self, x_pos: torch.Tensor, y: torch.Tensor | None, stats: Stats) -> torch.Tensor:
        """The negatives for the positive batch x_pos (no graph); statistics go into ``stats``
        (keys of LossStats)."""

    def energies(self, x: torch.Tensor) -> torch.Tensor:
        """The (B,) energies at x as the sampler sees the energy (``sampler.energies``)."""
        return self.sampler.energies(x)

    def extra_terms(self, stats: Stats) -> torch.Tensor | None:
        """Terms added to the loss beyond the ML surrogate and the regulariser (None: none)."""
        return None

    def _run(
        self,
        x0: torch.Tensor,
        stats: Stats,
        n_steps: int | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The sampler's chains from x0 (y passed to a conditional energy), recording chain
        statistics when tracking."""
        if not self.track_chains:
            return self.sampler.sample(x0, n_steps, y=y)
        x, info = self.sampler.sample(x0, n_steps, y=y, return_info=True)
        stats["chain_grad_norm"] = info.mean_grad_norm.mean()
        stats["chain_displacement"] = info.displacement.mean()
        return x

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a resumed loss needs to continue the same run (loadable with weights_only)."""
        return {"sampler": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise ValueError(
                f"{type(self).__name__} state_dict is missing {sorted(missing)} "
                "(saved from another kind of loss?)"
            )
        self.sampler.load_state_dict(state["sampler"])


class ContrastiveDivergence(EBMLoss):
    """CD-k (Hinton 2002): k sampler steps from the positive batch itself; k = 0 uses the
    positives as negatives (gradient exactly 0: the two energies are evaluated separately)."""

    def __init__(self, sampler: AnySampler, k: int, alpha: float = 0.0) -> None:
        super().__init__(sampler, alpha)
        self.k = validation.integer(k, "k", low=0)

    def negatives(self, x_pos: torch.Tensor, y: torch.Tensor | None, stats: Stats) -> torch.Tensor:
        if self.k == 0:
            return x_pos.detach()
        return self._run(x_pos, stats, self.k)


class PersistentCD(EBMLoss):
    """Persistent CD (Tieleman 2008): one chain per batch slot, continued from where the last
    iteration left it and never restarted. The chains start at the first positive batch, or at
    ``init(batch_size)`` when given. The batch size cannot change between calls."""

    def __init__(
        self,
        sampler: AnySampler,
        alpha: float = 0.0,
        *,
        init: Callable[[int], torch.Tensor] | None = None,
    ) -> None:
        super().__init__(sampler, alpha)
        if init is not None and not callable(init):
            raise TypeError(
                f"init must be None or a callable batch_size -> initial states, got "
                f"{type(init).__name__}"
            )
        self.init = init
        self.chains: torch.Tensor | None = None

    def negatives(self, x_pos: torch.Tensor, y: torch.Tensor | None, stats: Stats) -> torch.Tensor:
        if self.chains is None:
            self.chains = (
                x_pos.detach().clone() if self.init is None else _initial_states(self.init, x_pos)
            )
        elif self.chains.shape != x_pos.shape:
            raise ValueError(
                f"x_pos has shape {tuple(x_pos.shape)} but the persistent chains "
                f"have {tuple(self.chains.shape)}: persistent CD keeps one chain per "
                "batch slot (use full batches, e.g. DataLoader(drop_last=True))"
            )
        self.chains = self._run(self.chains, stats)
        return self.chains

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "chains": self.chains}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        chains = state.get("chains") if isinstance(state, dict) else None
        if chains is not None and not isinstance(chains, torch.Tensor):
            raise ValueError(
                f"state_dict['chains'] must be None or a tensor, got {type(chains).__name__}"
            )
        super().load_state_dict(state)
        self.chains = None if chains is None else chains.clone()


def _initial_states(init: Callable[[int], torch.Tensor], x_pos: torch.Tensor) -> torch.Tensor:
    """init(batch) checked against the positive batch's shape and device."""
    x0 = init(x_pos.shape[0])
    _check_batch(x0, "init(batch_size)")
    if x0.shape != x_pos.shape:
        raise ValueError(
            f"init(batch_size) must return the positive batch's shape "
            f"{tuple(x_pos.shape)}, got {tuple(x0.shape)}"
        )
    validation.same_device(x_pos.device, "x_pos", **{"init(batch_size)": x0})
    return x0


class ShortRunML(EBMLoss):
    """Short-run ML (Nijkamp et al. 2019): fresh chains from ``init(batch_size)`` (noise) every
    iteration, run the sampler's n_steps. Its randomness is init's (save the generator it uses
    with the run; the Trainer saves torch's global generator)."""

    def __init__(
        self, sampler: AnySampler, init: Callable[[int], torch.Tensor], alpha: float = 0.0
    ) -> None:
        super().__init__(sampler, alpha)
        if not callable(init):
            raise TypeError(
                f"init must be a callable batch_size -> initial states, got {type(init).__name__}"
            )
        self.init = init

    def negatives(self, x_pos: torch.Tensor, y: torch.Tensor | None, stats: Stats) -> torch.Tensor:
        return self._run(_initial_states(self.init, x_pos), stats)


class PersistentML(EBMLoss):
    """Replay-buffer approximate ML (IGEBM/JEM): draw len(x_pos) chains from the buffer (each
    replaced by fresh init noise with the buffer's reinit_prob), run the sampler, push them
    back. With a per-class buffer (n_classes set) call ``est(x_pos, y)``: chain i is drawn from
    and pushed into class y[i].

    push: how the chains go back. "slots" writes each chain back to the slot it was drawn from
    (JEM); "append" appends them by the buffer's policy (IGEBM's FIFO, ICD's reservoir
    sampling). None (default): "append" for a reservoir buffer, else "slots". A reservoir
    buffer with "slots" is refused: its policy would be silently ignored.
    """

    # Whether y also conditions the energy (sampler.sample(x0, y=y)), as JEM's E(x, y) does;
    # here y only picks the buffer's class.
    energy_takes_y = False

    def __init__(
        self,
        sampler: AnySampler,
        buffer: ReplayBuffer,
        alpha: float = 0.0,
        *,
        push: str | None = None,
    ) -> None:
        super().__init__(sampler, alpha)
        if not isinstance(buffer, ReplayBuffer):
            raise TypeError(f"buffer must be an ebm_fast.ReplayBuffer, got {type(buffer).__name__}")
        self.buffer = buffer
        self.conditional = buffer.n_classes is not None
        default = "append" if buffer.policy == "reservoir" else "slots"
        self.push = validation.choice(
            default if push is None else push, "push", ("slots", "append")
        )
        if self.push == "slots" and buffer.policy == "reservoir":
            raise ValueError(
                'push="slots" writes chains back to their slots, which ignores the '
                'buffer\'s policy="reservoir"; use push="append" (ICD) or a fifo '
                "buffer"
            )

    def draw(
        self, x_pos: torch.Tensor, y: torch.Tensor | None, stats: Stats
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial states and slots for the positive batch from the buffer (with track_chains,
        the fraction re-initialised goes into stats)."""
        if tuple(x_pos.shape[1:]) != self.buffer.sample_shape:
            raise ValueError(
                f"x_pos has samples of shape {tuple(x_pos.shape[1:])} but the buffer "
                f"holds samples of shape {self.buffer.sample_shape}"
            )
        if not self.track_chains:
            return self.buffer.sample(x_pos.shape[0], y=y)
        x0, slots, reinit = self.buffer.sample(x_pos.shape[0], y=y, return_reinit=True)
        stats["reinit_fraction"] = reinit.float().mean()
        return x0, slots

    def negatives(self, x_pos: torch.Tensor, y: torch.Tensor | None, stats: Stats) -> torch.Tensor:
        x0, slots = self.draw(x_pos, y, stats)
        x = self._run(x0, stats, y=y if self.energy_takes_y else None)
        self.push_chains(x, slots, y)
        return x

    def push_chains(self, x: torch.Tensor, slots: torch.Tensor, y: torch.Tensor | None) -> None:
        """The chains back into the buffer: to their slots, or appended (see ``push``)."""
        if self.push == "slots":
            self.buffer.push(x, slots)
        else:
            self.buffer.push(x, y=y)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "buffer": self.buffer.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The buffer first: it refuses a differently configured state before copying anything.
        if isinstance(state, dict) and "buffer" in state:
            self.buffer.load_state_dict(state["buffer"])
        super().load_state_dict(state)


def nearest_distances(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(B,) Euclidean distance from each sample of x to its nearest one in reference (samples
    flattened), differentiable in x. From the differences, not cdist's matrix-product route,
    which rounds distances below ~1e-4 to 0 (log -> -inf, NaN gradients) and is ~20% off at
    1e-3."""
    return torch.cdist(
        x.flatten(1), reference.flatten(1).to(x.dtype), compute_mode="donot_use_mm_for_euclid_dist"
    ).amin(1)


class KLPersistentML(PersistentML):
    """Du et al. (2021), "Improved contrastive divergence training of energy-based models".

    PersistentML's loss plus ``kl_weight * L_KL - entropy_weight * H``:

    * the sampler runs K - 1 steps without a graph, then the last step is taken again on at most
      ``kl_chains`` chains through ``langevin_update``'s autograd with the energy gradient kept
      in the graph (create_graph), so the sample x_kl depends on the parameters theta;
    * L_KL = mean E_theta_bar(x_kl), the energy evaluated with its parameters frozen: the gradient
      reaches theta only through the sample (it trains the last step to lower the energy of what
      it produces);
    * H = mean_i log min_j |x_kl,i - b_j|, the nearest-neighbour distance to ``entropy_samples``
      buffer draws (an entropy estimate of the samples, up to constants), used once the buffer
      holds more than 1000 written samples;
    * ``augment``: an optional callable applied to the buffer draws before sampling (Du et al.
      use crops, flips and colour jitter on images); it must return the same shape.

    Needs a LangevinSampler with a step size and noise that are numbers or per-chain tensors;
    the last step is the sampler's own (``LangevinSampler.differentiable_step``). ``push`` as
    for PersistentML.
    """

    #: the entropy term starts once the buffer holds more written samples than this
    ENTROPY_MIN_FILLED = 1000

    sampler: LangevinSampler  # its differentiable_step is the KL term's last step

    def __init__(
        self,
        sampler: LangevinSampler,
        buffer: ReplayBuffer,
        alpha: float = 0.0,
        *,
        kl_weight: float = 1.0,
        entropy_weight: float = 0.3,
        kl_chains: int = 128,
        entropy_samples: int = 100,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        push: str | None = None,
    ) -> None:
        if not isinstance(sampler, LangevinSampler):
            raise TypeError(
                f"KLPersistentML needs an ebm_fast.LangevinSampler (its last step is "
                f"differentiated through langevin_update), got "
                f"{type(sampler).__name__}"
            )
        for value, name in (
            (sampler.step_size, "step_size"),
            (sampler.noise_scale, "noise_scale"),
            (sampler.temperature, "temperature"),
        ):
            if callable(value) and not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"KLPersistentML needs the sampler's {name} as a number or a "
                    "tensor, not a schedule (its chains run K - 1 steps, then one: "
                    "a schedule would not be the K-step chain's)"
                )
        super().__init__(sampler, buffer, alpha, push=push)
        self.kl_weight = validation.real(kl_weight, "kl_weight", low=0.0)
        self.entropy_weight = validation.real(entropy_weight, "entropy_weight", low=0.0)
        self.kl_chains = validation.integer(kl_chains, "kl_chains", low=1)
        self.entropy_samples = validation.integer(entropy_samples, "entropy_samples", low=1)
        if augment is not None and not callable(augment):
            raise TypeError(
                f"augment must be None or a callable x -> x, got {type(augment).__name__}"
            )
        self.augment = augment
        self._filled = False  # the buffer held > ENTROPY_MIN_FILLED samples (stays true)
        # This iteration's (x_prev, last step's noise counter, entropy reference), from
        # negatives to extra_terms.
        self._kl_inputs: tuple[torch.Tensor, int, torch.Tensor | None]

    def negatives(self, x_pos: torch.Tensor, y: torch.Tensor | None, stats: Stats) -> torch.Tensor:
        x0, slots = self.draw(x_pos, y, stats)
        if self.augment is not None:
            augmented = self.augment(x0)
            if not isinstance(augmented, torch.Tensor) or augmented.shape != x0.shape:
                raise ValueError(
                    f"augment must return a tensor of the draw's shape "
                    f"{tuple(x0.shape)}, got "
                    f"{getattr(augmented, 'shape', type(augmented).__name__)}"
                )
            x0 = augmented
        # Drawn before the push: the chains' own new states are not their neighbours.
        reference = self._entropy_reference()
        k = self.sampler.n_steps
        x_prev = x0 if k == 1 else self._run(x0, stats, k - 1)
        last_step = self.sampler.step  # the noise counter of the chains' last step
        x = self.sampler.sample(x_prev, 1)
        self.push_chains(x, slots, y)
        self._kl_inputs = (x_prev, last_step, reference)
        return x

    def _entropy_reference(self) -> torch.Tensor | None:
        """entropy_samples buffer draws (over all slots, of every class), or None before the
        buffer holds enough samples. The draws are re-initialised with the buffer's reinit_prob
        like any other: a fresh noise sample is rarely anyone's nearest neighbour."""
        if self.entropy_weight == 0:
            return None
        if not self._filled:
            # A host read per iteration until true; written slots are never unwritten.
            self._filled = self.buffer.n_written > self.ENTROPY_MIN_FILLED
            if not self._filled:
                return None
        return self.buffer.sample(self.entropy_samples)[0]

    def kl_term(self, x_prev: torch.Tensor, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_KL = mean E_theta_bar(x_kl), x_kl): x_kl the sampler's differentiable last step
        from the first kl_chains chains of x_prev at noise counter step (the chains' own last
        step, redone in the graph), its energy evaluated with the parameters frozen."""
        x_kl = self.sampler.differentiable_step(x_prev, step, chains=self.kl_chains)
        with frozen_parameters(self.parameters):
            return self.energies(x_kl).mean(), x_kl

    def extra_terms(self, stats: Stats) -> torch.Tensor:
        x_prev, step, reference = self._kl_inputs
        del self._kl_inputs  # the graph it belongs to ends with this iteration
        kl, x_kl = self.kl_term(x_prev, step)
        stats["kl"] = kl.detach()
        extra = self.kl_weight * kl
        if reference is not None:
            entropy = nearest_distances(x_kl, reference).log().mean()
            stats["entropy"] = entropy.detach()
            extra = extra - self.entropy_weight * entropy
        return extra
