"""The one place where an energy is evaluated: by the chains (energy and input gradient, no
parameter graph) and by the losses (energies that keep the parameter graph). Both apply the same
output check, negate, autocast and conditioning, so an energy option works in samplers and losses
alike by construction.

For the chains the energy's parameters have requires_grad switched off for a call and restored
(also on error): no parameter graph is built and no .grad is touched. Optionally the energy runs
under torch.compile (eager fallback with one warning) and torch.autocast, is negated (a model
that returns -E, as JEM's f), and is put in eval mode for the call.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable

import torch

from ebm_fast.samplers.inputs import NO_CONDITIONING, Conditioning
from ebm_fast.samplers.kernels import contiguous
from ebm_fast.samplers.mlp_gradient import MLPGradient
from ebm_fast.validation import compute_dtype


def module_of(energy) -> torch.nn.Module | None:
    """The Module an energy is, or the Module owning a bound method, else None."""
    owner = energy if isinstance(energy, torch.nn.Module) else getattr(energy, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def parameters_of(energy) -> list[torch.Tensor]:
    """The parameters an energy owns (those of module_of(energy))."""
    module = module_of(energy)
    return [] if module is None else list(module.parameters())


def trainable_parameters(energy) -> list[torch.Tensor]:
    """The parameters with requires_grad of an energy that is an nn.Module, in the order of
    ``energy.parameters()``: the list every training gradient (and exact2d's exact ones) is taken
    with respect to. TypeError for anything but a Module, ValueError when it has none."""
    if not isinstance(energy, torch.nn.Module):
        raise TypeError(
            f"energy must be a torch.nn.Module (its parameters are trained), got "
            f"{type(energy).__name__}"
        )
    params: list[torch.Tensor] = [p for p in energy.parameters() if p.requires_grad]
    if not params:
        raise ValueError(
            "energy has no trainable parameters (requires_grad=True): nothing to "
            "take a gradient with respect to"
        )
    return params


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """torch.autocast(dtype) for the passes, or a null context for dtype None. No weight-cast
    cache: it lives for one energy call anyway, and CUDA-graph capture requires it off."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype, cache_enabled=False)


def autocast_pass(function: Callable, x: torch.Tensor, dtype: torch.dtype | None):
    """function(x) with its passes (forward, and backward through the returned tensor) under
    autocast(dtype), the result in x's compute dtype: a bfloat16 energy averaged in bfloat16
    would lose the small difference E(x+) - E(x-). For passes that are not an energy (JEM's
    logits); energies go through EnergyFunction.energies."""
    with autocast_context(x.device.type, dtype):
        value = function(x)
    return value if dtype is None else value.to(compute_dtype(x.dtype))


@contextlib.contextmanager
def frozen_parameters(params: list[torch.Tensor]):
    """requires_grad off for the block (no parameter graph is built), restored even on error."""
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module | None):
    """The module and its submodules in eval mode for the block (batch-norm statistics do not
    move while sampling), each restored to its own mode afterwards, even on error."""
    if module is None:
        yield
        return
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _check_energy_output(value, chains: int) -> None:
    """A clear error naming what is wrong unless value is one energy per chain."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"energy(x) must return a tensor, got {type(value).__name__}")
    shapes = ((chains,), (chains, 1), ()) if chains == 1 else ((chains,), (chains, 1))
    if tuple(value.shape) not in shapes:
        raise ValueError(
            f"energy(x) must return shape ({chains},) or ({chains}, 1), one energy "
            f"per chain, got {tuple(value.shape)}"
        )
    if not value.dtype.is_floating_point:
        raise TypeError(f"energy(x) must return a floating tensor, got {value.dtype}")


def _per_chain(energy: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checked energy output (B,), (B, 1) or, for one chain, (), as a contiguous (B,) tensor of
    dtype (differentiable). Conversions that would be no-ops are skipped: this runs every step,
    and on a CPU each op call costs microseconds even when it does nothing."""
    if energy.dim() != 1:
        energy = energy.reshape(energy.shape[0] if energy.dim() else 1)
    if energy.dtype != dtype:
        energy = energy.to(dtype)
    return contiguous(energy)


class EnergyFunction:
    """The user's energy as samplers and losses call it, given the call's conditioning.
    negate: the callable returns -E (E = -f(x)). autocast: None or the dtype its passes run in.

    Chains: (energy, gradient), the gradient alone, or the energy alone at x (no parameter
    graph: the sampler freezes the parameters). Losses: :meth:`energies`, which keeps the graph.

    owner: the sampler's name, for the compile-fallback warning. mlp_gradient: take an MLP
    energy's input gradient without autograd where MLPGradient covers it (same bits).
    """

    def __init__(
        self,
        energy: Callable,
        *,
        compile: bool,
        autocast: torch.dtype | None,
        negate: bool,
        owner: str,
        mlp_gradient: bool = True,
    ) -> None:
        self.energy, self.autocast, self.negate, self.owner = energy, autocast, negate, owner
        self._compiled = torch.compile(energy) if compile else None
        # The direct route computes the plain energy's passes (under the sampler's autocast
        # too): not for a compiled or negated one.
        direct = mlp_gradient and not (compile or negate)
        self._mlp = MLPGradient.of(energy) if direct else None
        # This call's route (start_call): the MLP's direct gradient, or None for autograd.
        self._direct: MLPGradient | None = None
        self._checked = False  # this call's output checked (its shape is fixed for the call)
        # d(sum E)/dE for the autograd route, kept while its layout holds.
        self._ones: torch.Tensor | None = None

    def start_call(self, x: torch.Tensor, conditioning: Conditioning) -> None:
        """Choose the route of this sample() call's input gradients: MLPGradient where it
        covers the energy, else autograd. Once per call: the check walks the layers (tens of
        microseconds), and nothing it reads changes while the chains run."""
        mlp = self._mlp
        self._direct = mlp if mlp is not None and mlp.covers(x, conditioning) else None
        self._checked = False

    def _call(self, x: torch.Tensor, conditioning: Conditioning, compiled: bool):
        if compiled and self._compiled is not None:
            try:
                return conditioning.call(self._compiled, x)
            except Exception as exc:  # compilation failed: the eager energy is always correct
                self._compiled = None
                warnings.warn(
                    f"{self.owner}: torch.compile of the energy failed "
                    f"({type(exc).__name__}: {exc}); running it eagerly.",
                    RuntimeWarning,
                    stacklevel=8,
                )  # the user's sample() call
        return conditioning.call(self.energy, x)

    def _forward(
        self,
        x: torch.Tensor,
        conditioning: Conditioning,
        *,
        compiled: bool = False,
        check: bool = True,
    ) -> torch.Tensor:
        """The energy at x as returned, checked, negated when the callable returns -E, its
        passes under the autocast dtype."""
        if self.autocast is None:  # no context at all: microseconds per step on a CPU
            value = self._call(x, conditioning, compiled)
        else:
            with autocast_context(x.device.type, self.autocast):
                value = self._call(x, conditioning, compiled)
        if check:
            _check_energy_output(value, x.shape[0])
        return -value if self.negate else value

    def energies(
        self, x: torch.Tensor, conditioning: Conditioning = NO_CONDITIONING
    ) -> torch.Tensor:
        """The (B,) energies at x in x's compute dtype, differentiable in x and in the
        energy's parameters: the pass a loss takes (positives, negatives, the KL step). The
        module runs in its own mode (eval_mode is the chains' option)."""
        return _per_chain(self._forward(x, conditioning), compute_dtype(x.dtype))

    def _value_and_grad(
        self, x: torch.Tensor, conditioning: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy as the callable returned it, negated when it returns -E; dE/dx) at x; builds
        no graph through parameters. As few op calls as the loop a user writes: the (B, 1) ->
        (B,) reshape happens after the backward pass, not inside the graph. Runs with grad mode
        on: Sampler.sample turns it on once for the call (per step it costs microseconds)."""
        direct = self._direct
        if direct is not None:
            return direct(x, self.autocast)
        x_var = x.detach().requires_grad_(True)
        value = self._forward(x_var, conditioning, compiled=True, check=not self._checked)
        self._checked = True
        # An output that needs no gradient, or one only through other tensors (no path from
        # x: grad is None), has no gradient in x to follow.
        (grad,) = (
            torch.autograd.grad(value, x_var, self._ones_like(value), allow_unused=True)
            if value.requires_grad
            else (None,)
        )
        if grad is None:
            raise ValueError(
                "energy(x) does not depend on x through differentiable "
                "operations: there is no gradient to follow"
            )
        return value, grad

    def _ones_like(self, value: torch.Tensor) -> torch.Tensor:
        """d(sum E)/dE, the gradient autograd gives value.sum()'s backward, made once per
        layout: the sum and the ones are two op calls per step saved."""
        ones = self._ones
        if (
            ones is None
            or ones.shape != value.shape
            or ones.dtype != value.dtype
            or ones.device != value.device
        ):
            self._ones = ones = torch.ones_like(value, memory_format=torch.contiguous_format)
        return ones

    def value_and_grad(
        self, x: torch.Tensor, conditioning: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy (B,) in the compute dtype, detached; dE/dx) at x."""
        value, grad = self._value_and_grad(x, conditioning)
        return _per_chain(value.detach(), compute_dtype(x.dtype)), grad

    def grad(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """dE/dx at x, for chains that need no energies (no check, no statistics): the energies'
        conversion is a few op calls per step saved."""
        return self._value_and_grad(x, conditioning)[1]

    def value(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The energy (B,) in the compute dtype at x, without a gradient."""
        with torch.no_grad():
            return self.energies(x, conditioning)
