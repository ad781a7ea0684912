"""Axes-level plot panels shared by ``ebm-fast train`` and ``ebm-fast demo``.

Each draws into a matplotlib Axes the caller made, so this module never imports matplotlib
itself (the caller picks the backend)."""

from __future__ import annotations

import math

import torch

from ebm_fast.exact2d import BOX, grid

__all__ = ["density_panel", "scatter_panel", "image_mosaic"]


def _square(ax, box: float) -> None:
    ax.set_xlim(-box, box)
    ax.set_ylim(-box, box)
    ax.set_aspect("equal")


@torch.no_grad()
def density_panel(ax, energy, box: float = BOX, cells: int = 200, title: str = "") -> None:
    """exp(-E) over [-box, box]^2 at the cells x cells grid's centres, scaled to peak 1."""
    param = next(energy.parameters())
    points, _ = grid(box, cells, dtype=param.dtype, device=param.device)
    log_p = -energy(points).reshape(cells, cells).float().cpu()
    # grid's points run x-major (index [i, j] is (x_i, y_j)); imshow wants rows along y.
    ax.imshow((log_p - log_p.max()).exp().T.numpy(), origin="lower", cmap="viridis",
              extent=(-box, box, -box, box))
    _square(ax, box)
    ax.set_title(title)


def scatter_panel(ax, points: torch.Tensor, box: float = BOX, title: str = "",
                  limit: int = 4000) -> None:
    """The first `limit` of (N, 2) points, on the square [-box, box]^2."""
    ax.scatter(*points[:limit].detach().cpu().T.numpy(), s=1, alpha=0.4)
    _square(ax, box)
    ax.set_title(title)


def image_mosaic(ax, images: torch.Tensor, value_range, title: str = "",
                 side: int | None = None) -> None:
    """The first side x side images of (N, C, H, W), C = 1 (grey) or 3 (RGB), as one mosaic;
    values clamped to value_range = (lo, hi), which maps to black..white; side=None: the
    smallest square holding all N. Empty tiles are lo (black)."""
    lo, hi = value_range
    side = math.ceil(math.sqrt(images.shape[0])) if side is None else side
    channels, height, width = images.shape[1:]
    shown = images[:side * side].detach().float().cpu().clamp(lo, hi)
    tiles = torch.full((side * side, channels, height, width), float(lo))
    tiles[:len(shown)] = shown
    mosaic = tiles.reshape(side, side, channels, height, width).permute(0, 3, 1, 4, 2).reshape(
        side * height, side * width, channels)
    ax.imshow(((mosaic - lo) / (hi - lo)).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    # Ticks off rather than the whole axis: a caller's axis label stays visible.
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
