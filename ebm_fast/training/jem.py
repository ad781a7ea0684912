"""JEM (Grathwohl et al. 2020, "Your classifier is secretly an energy based model"): a
classifier's logits f(x) read as an energy-based model of p(x, y) ∝ exp(f(x)[y]).

* :class:`LogitsEnergy` turns a logits model into the energy the samplers take: E(x) =
  -logsumexp_k f(x)[k] (the marginal p(x)), E(x, y) = -f(x)[y] (the joint p(x, y)).
* :class:`JEM` is the loss of JEM's ``train_wrn_ebm.py``, as one ``ebm_fast.training`` loss:

      p_x_weight * (mean E(x+) - mean E(x-))
    + p_y_given_x_weight * cross_entropy(f(x+), y)
    + p_x_y_weight * (mean E(x+, y) - mean E(x-_y, y))

  x- are unconditional negatives (drawn over all slots of the replay buffer, sampled from E(x)),
  x-_y class-conditional ones (chain i drawn from class y[i]'s slots of a per-class buffer,
  sampled from E(x, y)); both are written back to the slots they came from.
* :func:`expected_calibration_error`, :func:`classifier_metrics`: test accuracy and the
  calibration measure JEM reports.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ebm_fast import validation
from ebm_fast.buffer import ReplayBuffer
from ebm_fast.samplers.energy import autocast_pass, parameters_of
from ebm_fast.training.losses import AnySampler, LossStats, PersistentML, Stats, _check_batch

__all__ = [
    "LogitsEnergy",
    "logits_energy",
    "JEM",
    "JEMStats",
    "expected_calibration_error",
    "classifier_metrics",
]


def _check_labels(y: object, batch: int, device: torch.device, name: str = "y") -> None:
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor of class labels, got {type(y).__name__}")
    if y.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor of class labels, got {y.dtype}")
    if tuple(y.shape) != (batch,):
        raise ValueError(
            f"{name} must have shape ({batch},), one label per sample, got {tuple(y.shape)}"
        )
    validation.same_device(device, "x", **{name: y})


def _check_logits(logits: object, batch: int | None = None, name: str = "classifier(x)") -> None:
    """logits must be a floating (batch, n_classes) tensor (any batch when None)."""
    if not isinstance(logits, torch.Tensor) or not logits.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating tensor of logits, got "
            f"{getattr(logits, 'dtype', type(logits).__name__)}"
        )
    if logits.dim() != 2 or batch not in (None, logits.shape[0]):
        raise ValueError(
            f"{name} must have shape ({'B' if batch is None else batch}, "
            f"n_classes), got {tuple(logits.shape)}"
        )


def logits_energy(logits: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
    """The (B,) energies of logits (B, K): -logsumexp over classes, or -logits[i, y[i]]."""
    _check_logits(logits, name="logits")
    if y is None:
        return -logits.logsumexp(1)
    _check_labels(y, logits.shape[0], logits.device)
    return -logits.gather(1, y.unsqueeze(1)).squeeze(1)


class LogitsEnergy(torch.nn.Module):
    """The energy of a logits model f: ``energy(x)`` = -logsumexp_k f(x)[k],
    ``energy(x, y)`` = -f(x)[y].

    A module holding the classifier, not a lambda: the classifier's parameters are this module's,
    so a sampler built on it switches them off during sampling (no parameter graph, no .grad)
    and a Trainer trains them. Samplers pass y per call: ``sampler.sample(x0, y=y)``.
    """

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        if not isinstance(classifier, torch.nn.Module):
            raise TypeError(
                f"classifier must be a torch.nn.Module returning logits, got "
                f"{type(classifier).__name__}"
            )
        self.classifier = classifier

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.classifier(x)
        _check_logits(logits, x.shape[0])
        return logits_energy(logits, y)


@dataclasses.dataclass
class JEMStats(LossStats):
    """LossStats of a JEM iteration. negatives / energy_pos / energy_neg are the p(x) term's
    (the p(x, y) term's when p_x_weight is 0). With labels: cross_entropy and accuracy of the
    positive batch; with p_x_y_weight > 0: conditional_negatives and the mean E(x+, y),
    E(x-_y, y) as conditional_energy_pos / conditional_energy_neg."""

    cross_entropy: torch.Tensor | None = None
    accuracy: torch.Tensor | None = None
    conditional_negatives: torch.Tensor | None = None
    conditional_energy_pos: torch.Tensor | None = None
    conditional_energy_neg: torch.Tensor | None = None


class JEM(PersistentML):
    """The JEM loss on ``classifier`` (x -> (B, K) logits), ``est(x_pos, y)``.

    Args:
        classifier: the logits model (an nn.Module, or a bound method of one such as a JEM
            model's ``classify``).
        sampler: an ebm_fast LangevinSampler or MALASampler of the classifier's energy,
            normally built on ``LogitsEnergy(classifier)`` (a JEM model whose forward returns
            logsumexp / f(x)[y] with ``negate=True`` works too); it must hold exactly the
            classifier's parameters. It is called as ``sampler.sample(x0, y=y)``.
        buffer: the ReplayBuffer of the chains; with ``p_x_y_weight > 0`` a per-class one
            (``n_classes`` = the number of logits). The p(x) chains are drawn over all its slots.
        p_x_weight, p_y_given_x_weight, p_x_y_weight: the weights of the three terms (>= 0);
            a term of weight 0 is not computed (its chains are not sampled). At least one of
            the two sampled terms must be on.

    The classifier's passes (the positives' logits, the negatives' energies) run under the
    sampler's ``autocast`` like its chains, the logits cast to float32 before the loss.

    ``est.last`` is a :class:`JEMStats`. The state_dict holds the sampler's and the buffer's
    state (a Trainer checkpoint resumes the same chains).
    """

    energy_takes_y = True  # the p(x, y) chains sample E(x, y) = -f(x)[y]

    def __init__(
        self,
        classifier: Callable[[torch.Tensor], torch.Tensor],
        sampler: AnySampler,
        buffer: ReplayBuffer,
        p_x_weight: float = 1.0,
        p_y_given_x_weight: float = 1.0,
        p_x_y_weight: float = 0.0,
    ) -> None:
        super().__init__(sampler, buffer)
        if not callable(classifier):
            raise TypeError(
                f"classifier must be a callable x -> logits (an nn.Module), got "
                f"{type(classifier).__name__}"
            )
        own = {id(p) for p in parameters_of(classifier)}
        if not own or own != {id(p) for p in parameters_of(self.energy)}:
            raise ValueError(
                "sampler must sample the classifier's energy (build it on "
                "ebm_fast.training.LogitsEnergy(classifier)): its energy holds "
                "other parameters than the classifier's"
            )
        self.classifier = classifier
        self.p_x_weight = validation.real(p_x_weight, "p_x_weight", low=0.0)
        self.p_y_given_x_weight = validation.real(p_y_given_x_weight, "p_y_given_x_weight", low=0.0)
        self.p_x_y_weight = validation.real(p_x_y_weight, "p_x_y_weight", low=0.0)
        if self.p_x_weight == 0 and self.p_x_y_weight == 0:
            raise ValueError(
                "p_x_weight and p_x_y_weight are both 0: nothing would be sampled "
                "(train the classifier with cross-entropy alone instead)"
            )
        if self.p_x_y_weight > 0 and buffer.n_classes is None:
            raise ValueError(
                "p_x_y_weight > 0 samples class-conditionally: the buffer needs "
                "n_classes (one block of slots per class)"
            )
        # Labels are needed by the two terms that use them.
        self.conditional = self.p_y_given_x_weight > 0 or self.p_x_y_weight > 0

    def __call__(self, x_pos: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        _check_batch(x_pos, "x_pos")
        if tuple(x_pos.shape[1:]) != self.buffer.sample_shape:
            raise ValueError(
                f"x_pos has samples of shape {tuple(x_pos.shape[1:])} but the buffer "
                f"holds samples of shape {self.buffer.sample_shape}"
            )
        if self.conditional:
            if y is None:
                raise ValueError(
                    "y (the class of each positive sample) is required: "
                    "p_y_given_x_weight or p_x_y_weight is > 0"
                )
            _check_labels(y, x_pos.shape[0], x_pos.device)
        elif y is not None:
            raise ValueError(
                "y was given but this JEM uses no labels (p_y_given_x_weight and "
                "p_x_y_weight are 0)"
            )
        start = time.perf_counter()
        stats: Stats = {}
        tracked = True
        if self.p_x_weight:
            stats["negatives"] = self.negatives(x_pos, None, stats)
            tracked = False  # one set of chain statistics: the p(x) chains'
        if self.p_x_y_weight:
            stats["conditional_negatives"] = self.negatives(x_pos, y, stats if tracked else {})
        sampler_seconds = time.perf_counter() - start

        logits_pos = self.logits(x_pos)
        _check_logits(logits_pos, x_pos.shape[0])
        loss: torch.Tensor | float = 0.0
        if self.p_x_weight:
            e_pos = logits_energy(logits_pos)
            e_neg = logits_energy(self.logits(stats["negatives"]))
            loss = loss + self.p_x_weight * (e_pos.mean() - e_neg.mean())
            stats.update(energy_pos=e_pos.detach().mean(), energy_neg=e_neg.detach().mean())
        if y is not None:
            cross_entropy = F.cross_entropy(logits_pos, y)
            if self.p_y_given_x_weight:
                loss = loss + self.p_y_given_x_weight * cross_entropy
            stats.update(
                cross_entropy=cross_entropy.detach(),
                accuracy=(logits_pos.detach().argmax(1) == y).float().mean(),
            )
        if self.p_x_y_weight:
            if logits_pos.shape[1] != self.buffer.n_classes:
                raise ValueError(
                    f"classifier(x) returns {logits_pos.shape[1]} logits but the "
                    f"buffer has n_classes={self.buffer.n_classes}"
                )
            e_pos_y = logits_energy(logits_pos, y)
            e_neg_y = logits_energy(self.logits(stats["conditional_negatives"]), y)
            loss = loss + self.p_x_y_weight * (e_pos_y.mean() - e_neg_y.mean())
            stats.update(
                conditional_energy_pos=e_pos_y.detach().mean(),
                conditional_energy_neg=e_neg_y.detach().mean(),
            )
            if not self.p_x_weight:  # the statistics a Trainer logs: the sampled term's
                stats.update(
                    negatives=stats["conditional_negatives"],
                    energy_pos=stats["conditional_energy_pos"],
                    energy_neg=stats["conditional_energy_neg"],
                )
        self.last = JEMStats(sampler_seconds=sampler_seconds, **stats)
        assert isinstance(loss, torch.Tensor)  # a sampled term is on (checked in __init__)
        return loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """classifier(x) under the sampler's autocast, in x's compute dtype (see autocast_pass):
        the loss's energies and cross-entropy are computed from float32 logits."""
        return autocast_pass(self.classifier, x, self.sampler.precision(x).autocast_dtype)


def expected_calibration_error(
    logits: torch.Tensor, y: torch.Tensor, n_bins: int = 15
) -> torch.Tensor:
    """ECE (Guo et al. 2017): the confidence max_k softmax(logits)[k] of each sample binned
    into n_bins equal-width bins of (0, 1]; the sum over bins of (bin size / n) * |accuracy of
    the bin - mean confidence of the bin|. A 0-dim float tensor on logits' device."""
    _check_logits(logits, name="logits")
    _check_labels(y, logits.shape[0], logits.device)
    n_bins = validation.integer(n_bins, "n_bins", low=1)
    confidence, predicted = logits.detach().float().softmax(1).max(1)
    correct = (predicted == y).float()
    # Bin b holds confidences in (b / n_bins, (b + 1) / n_bins].
    bins = (confidence * n_bins).ceil().long().clamp(1, n_bins) - 1
    # (size / n) * |accuracy - mean confidence| of a bin is |sum over it of (correct - conf)| / n.
    excess = torch.zeros(n_bins, device=logits.device).index_add_(0, bins, correct - confidence)
    return excess.abs().sum() / logits.shape[0]


@torch.no_grad()
def classifier_metrics(
    classifier: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_bins: int = 15,
    batch_size: int = 1000,
) -> dict[str, float]:
    """{"accuracy", "ece"} of the classifier on (x, y) as floats, evaluated in eval mode (its
    mode restored afterwards) in batches of batch_size."""
    if not isinstance(classifier, torch.nn.Module):
        raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
    _check_batch(x, "x")
    batch_size = validation.integer(batch_size, "batch_size", low=1)
    training = classifier.training
    classifier.eval()
    try:
        logits = torch.cat([classifier(chunk) for chunk in x.split(batch_size)])
    finally:
        classifier.train(training)
    _check_labels(y, x.shape[0], logits.device)
    return {
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "ece": float(expected_calibration_error(logits, y, n_bins)),
    }
