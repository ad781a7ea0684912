"""Exact tools for 2-D energy-based models: partition function, likelihood, ML gradient, samples.

In 2-D the partition function is a sum over a grid: on the box [-b, b]^2 cut into cells x cells
squares, Z = sum_i exp(-E(c_i)) * area (c_i the cell centres: the midpoint rule, exact up to the
quadrature error and the mass outside the box). With it the exact negative log-likelihood and its
exact gradient

    grad NLL = E_data[grad E] - E_p[grad E]        (p = exp(-E) / Z)

are computable, and any sampling-based estimator of that gradient can be measured against it
(``ebm-fast study``, docs/estimators.md).

The energy must be finite at every grid point: a NaN or an infinity there makes Z, the weights
and the draws meaningless, so every tool raises ValueError instead of returning them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ebm_fast import validation
from ebm_fast.ops.philox import philox_uniform
from ebm_fast.samplers.energy import trainable_parameters

__all__ = [
    "BOX",
    "grid",
    "log_partition",
    "exact_expectation",
    "exact_nll",
    "exact_kl",
    "exact_ml_gradient",
    "exact_samples",
]

BOX = 4.0  # default half-width of the box [-BOX, BOX]^2 (the 2-D data sets lie well inside)
# A 2-D energy: (N, 2) points -> (N,) or (N, 1) energies (an nn.Module or any callable).
Energy2D = Callable[[torch.Tensor], torch.Tensor]


def grid(
    box: float = BOX,
    cells: int = 200,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """(cell centres (cells**2, 2), cell area) of the box [-box, box]^2 cut into cells x cells."""
    box = validation.real(box, "box", low=0.0, low_open=True)
    cells = validation.integer(cells, "cells", low=2)
    width = 2 * box / cells
    axis = -box + width * (torch.arange(cells, dtype=dtype, device=device) + 0.5)
    points = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(-1, 2)
    return points, width * width


def _grid_energies(
    energy: Energy2D, box: float, cells: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(grid points, E at each, cell area); the grid takes the energy's parameter dtype/device."""
    param = next(iter(energy.parameters()), None) if isinstance(energy, nn.Module) else None
    points, area = grid(
        box,
        cells,
        dtype=torch.float32 if param is None else param.dtype,
        device=None if param is None else param.device,
    )
    values = energy(points)
    # (N,) or (N, 1) only: flattening anything wider would silently sum the wrong terms into Z.
    if values.shape not in ((points.shape[0],), (points.shape[0], 1)):
        raise ValueError(
            f"energy must return one value per point, shape ({points.shape[0]},) or "
            f"({points.shape[0]}, 1), got {tuple(values.shape)}"
        )
    values = values.reshape(-1)
    finite = torch.isfinite(values.detach())
    if not finite.all():  # one host read per call: these are analysis tools, not a sampler step
        bad = (~finite).nonzero()[:, 0]
        first = points[bad[0]].tolist()
        raise ValueError(
            f"energy must be finite on the grid, got {values[bad[0]].item()} at "
            f"({first[0]:.4g}, {first[1]:.4g}) and non-finite values at "
            f"{bad.numel()} of {values.numel()} points"
        )
    return points, values, area


def log_partition(energy: Energy2D, box: float = BOX, cells: int = 200) -> torch.Tensor:
    """log Z = log sum_cells exp(-E) * area, as a 0-dim tensor (differentiable in the energy's
    parameters: its gradient is -E_p[grad E])."""
    _, values, area = _grid_energies(energy, box, cells)
    return torch.logsumexp(-values, 0) + math.log(area)


@torch.no_grad()
def exact_expectation(
    energy: Energy2D, f: Callable[[torch.Tensor], torch.Tensor], box: float = BOX, cells: int = 200
) -> torch.Tensor:
    """E_p[f(x)] with weights softmax(-E) over the grid cells; f maps (N, 2) points to (N, ...)."""
    points, energies, _ = _grid_energies(energy, box, cells)
    weights = torch.softmax(-energies, 0)
    values = f(points)
    if values.shape[:1] != (points.shape[0],):
        raise ValueError(
            f"f must return one value (or row) per point, shape ({points.shape[0]}, "
            f"...), got {tuple(values.shape)}"
        )
    return torch.tensordot(weights.to(values.dtype), values, dims=1)


@torch.no_grad()
def exact_nll(energy: Energy2D, data: torch.Tensor, box: float = BOX, cells: int = 300) -> float:
    """Mean -log p(data) with p = exp(-E) / Z, Z summed on the grid."""
    return float(energy(data).mean() + log_partition(energy, box, cells))


@torch.no_grad()
def exact_kl(
    log_density: Callable[[torch.Tensor], torch.Tensor],
    energy: Energy2D,
    box: float = BOX,
    cells: int = 200,
    *,
    temperature: float = 1.0,
) -> float:
    """KL(p_data || p_model) on the grid, p_model proportional to exp(-E / temperature).

    Both are normalised over the same grid cells (each cell weighs its centre's density), so
    the quadrature error and the mass outside the box fall on both alike instead of biasing the
    KL. log_density maps (N, 2) float64 points to (N,) log densities, unnormalised allowed;
    cells where it is -inf (outside the data's support) have p_data = 0 and contribute 0."""
    temperature = validation.real(temperature, "temperature", low=0.0, low_open=True)
    _, energies, _ = _grid_energies(energy, box, cells)
    log_model = torch.log_softmax(-energies.double() / temperature, 0)
    points, _ = grid(box, cells, dtype=torch.float64, device=log_model.device)
    log_data = log_density(points)
    if log_data.shape not in ((points.shape[0],), (points.shape[0], 1)):
        raise ValueError(
            f"log_density must return one value per point, shape "
            f"({points.shape[0]},) or ({points.shape[0]}, 1), got "
            f"{tuple(log_data.shape)}"
        )
    log_data = log_data.reshape(-1).double()
    # -inf is a zero density; NaN or +inf is no density at all.
    if torch.isnan(log_data).any() or (log_data == math.inf).any():
        raise ValueError("log_density must be finite or -inf on the grid, got NaN or +inf")
    inside = torch.isfinite(log_data)
    if not inside.any():
        raise ValueError(
            "log_density is -inf on every grid cell: the data has no mass in "
            f"the box [-{box}, {box}]^2"
        )
    log_data = torch.log_softmax(log_data, 0)[inside]
    return float((log_data.exp() * (log_data - log_model[inside])).sum())


def exact_ml_gradient(
    energy: nn.Module, data: torch.Tensor, box: float = BOX, cells: int = 200
) -> list[torch.Tensor]:
    """Gradients of the exact NLL, mean E(data) + log Z, w.r.t. ``trainable_parameters(energy)``:
    E_data[grad E] - E_p[grad E] with the model expectation summed exactly on the grid."""
    with torch.enable_grad():
        nll = energy(data).mean() + log_partition(energy, box, cells)
        return list(torch.autograd.grad(nll, trainable_parameters(energy)))


@torch.no_grad()
def exact_samples(
    energy: Energy2D, n: int, *, seed: int, step: int, box: float = BOX, cells: int = 200
) -> torch.Tensor:
    """n independent draws of grid cell centres with probabilities softmax(-E) (inverse CDF of
    noise-spec uniforms at (seed, step)): the negatives an ideal sampler would give."""
    n = validation.integer(n, "n", low=1)
    points, energies, _ = _grid_energies(energy, box, cells)
    cdf = torch.softmax(-energies.double(), 0).cumsum(0)
    u = philox_uniform((n,), seed=seed, step=step, device=points.device).double() * cdf[-1]
    # u in [0, total): cell i is drawn for cdf[i-1] <= u < cdf[i] (right=True), so a cell of
    # probability 0 is never drawn; the clamp only absorbs rounding at the top end.
    return points[torch.searchsorted(cdf, u, right=True).clamp_(max=points.shape[0] - 1)]
