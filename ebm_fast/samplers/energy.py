"""Energy and gradient evaluation for the chains, leaving the user's model as it was.

The energy's parameters have requires_grad switched off for a call and restored (also on error):
no parameter graph is built and no .grad is touched. Optionally the energy runs under
torch.compile (eager fallback with one warning) and torch.autocast, is negated (a model that
returns -E, as JEM's f), and is put in eval mode for the call.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

from ebm_fast.samplers.inputs import Conditioning
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
        raise ValueError(f"energy(x) must return shape ({chains},) or ({chains}, 1), one energy "
                         f"per chain, got {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"energy(x) must return a floating tensor, got {value.dtype}")


def _chain_energies(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checked energy output (B,), (B, 1) or, for one chain, (), detached, as a contiguous (B,)
    tensor of dtype. Conversions that would be no-ops are skipped: this runs every step, and on
    a CPU each op call costs microseconds even when it does nothing."""
    energy = value.detach()
    if energy.dim() != 1:
        energy = energy.reshape(energy.shape[0] if energy.dim() else 1)
    if energy.dtype != dtype:
        energy = energy.to(dtype)
    return contiguous(energy)


class EnergyFunction:
    """The user's energy as the chains call it: (energy, gradient) or energy alone at x, given
    the call's conditioning. negate: the callable returns -E (E = -f(x)).

    owner: the sampler's name, for the compile-fallback warning. mlp_gradient: take an MLP
    energy's input gradient without autograd where MLPGradient covers it (same bits).
    """

    def __init__(self, energy, *, compile: bool, autocast, negate: bool, owner: str,
                 mlp_gradient: bool = True):
        self.energy, self.autocast, self.negate, self.owner = energy, autocast, negate, owner
        self._compiled = torch.compile(energy) if compile else None
        # The direct route computes the plain energy's passes: not for a compiled, autocast or
        # negated one.
        direct = mlp_gradient and not (compile or autocast is not None or negate)
        self._mlp = MLPGradient.of(energy) if direct else None
        self._direct = False  # this call's route (start_call)

    def start_call(self, x: torch.Tensor, conditioning: Conditioning) -> None:
        """Choose the route of this sample() call's input gradients: MLPGradient where it
        covers the energy, else autograd. Once per call: the check walks the layers (tens of
        microseconds), and nothing it reads changes while the chains run."""
        self._direct = self._mlp is not None and self._mlp.covers(x, conditioning)

    def _autocast(self, x: torch.Tensor):
        if self.autocast is None:
            return contextlib.nullcontext()
        # No weight-cast cache: it lives for one energy call anyway, and CUDA-graph capture
        # requires it off.
        return torch.autocast(device_type=x.device.type, dtype=self.autocast, cache_enabled=False)

    def _call(self, x: torch.Tensor, conditioning: Conditioning):
        if self._compiled is not None:
            try:
                return conditioning.call(self._compiled, x)
            except Exception as exc:  # compilation failed: the eager energy is always correct
                self._compiled = None
                warnings.warn(f"{self.owner}: torch.compile of the energy failed "
                              f"({type(exc).__name__}: {exc}); running it eagerly.",
                              RuntimeWarning, stacklevel=7)  # the user's sample() call
        return conditioning.call(self.energy, x)

    def _value_and_grad(self, x: torch.Tensor,
                        conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy as the callable returned it, negated when it returns -E; dE/dx) at x; builds
        no graph through parameters. As few op calls as the loop a user writes: the (B, 1) ->
        (B,) reshape happens after the backward pass, not inside the graph. Runs with grad mode
        on: Sampler.sample turns it on once for the call (per step it costs microseconds)."""
        if self._direct:
            return self._mlp(x)
        x_var = x.detach().requires_grad_(True)
        with self._autocast(x):
            value = self._call(x_var, conditioning)
        _check_energy_output(value, x.shape[0])
        if self.negate:
            value = -value
        # An output that needs no gradient, or one only through other tensors (no path from
        # x: grad is None), has no gradient in x to follow.
        (grad,) = torch.autograd.grad(value.sum(), x_var, allow_unused=True) \
            if value.requires_grad else (None,)
        if grad is None:
            raise ValueError("energy(x) does not depend on x through differentiable "
                             "operations: there is no gradient to follow")
        return value, grad

    def value_and_grad(self, x: torch.Tensor,
                       conditioning: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy (B,) in the compute dtype, dE/dx) at x."""
        value, grad = self._value_and_grad(x, conditioning)
        return _chain_energies(value, compute_dtype(x.dtype)), grad

    def grad(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """dE/dx at x, for chains that need no energies (no check, no statistics): the energies'
        conversion is a few op calls per step saved."""
        return self._value_and_grad(x, conditioning)[1]

    def value(self, x: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        """The energy (B,) in the compute dtype at x, without a gradient."""
        with torch.no_grad(), self._autocast(x):
            value = conditioning.call(self.energy, x)
        _check_energy_output(value, x.shape[0])
        return _chain_energies(-value if self.negate else value, compute_dtype(x.dtype))
