"""Axes-level plot panels shared by ``ebm-fast train`` and ``ebm-fast demo``.

Each draws into a matplotlib Axes the caller made, so this module never imports matplotlib
itself (the caller picks the backend)."""

from __future__ import annotations

import math

import torch

from ebm_fast.exact2d import BOX, grid

__all__ = ["density_panel", "scatter_panel", "image_mosaic", "MOSAIC_GAP"]

#: the grey (0 black .. 1 white) between the tiles of an image mosaic
MOSAIC_GAP = 0.5


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
    ax.imshow(
        (log_p - log_p.max()).exp().T.numpy(),
        origin="lower",
        cmap="viridis",
        extent=(-box, box, -box, box),
    )
    _square(ax, box)
    ax.set_title(title)


def scatter_panel(
    ax, points: torch.Tensor, box: float = BOX, title: str = "", limit: int = 4000
) -> None:
    """The first `limit` of (N, 2) points, on the square [-box, box]^2."""
    ax.scatter(*points[:limit].detach().cpu().T.numpy(), s=1, alpha=0.4)
    _square(ax, box)
    ax.set_title(title)


def image_mosaic(
    ax,
    images: torch.Tensor,
    value_range,
    title: str = "",
    side: int | None = None,
    padding: int = 1,
) -> None:
    """The first side x side images of (N, C, H, W), C = 1 (grey) or 3 (RGB), as one mosaic;
    values clamped to value_range = (lo, hi), which maps to black..white; side=None: the
    smallest square holding all N. Empty tiles are lo (black). The tiles are framed by
    ``padding`` pixels of MOSAIC_GAP grey, around and between them as torchvision's make_grid
    does: without a gap, rows of small digits run together into stripes."""
    lo, hi = value_range
    side = math.ceil(math.sqrt(images.shape[0])) if side is None else side
    channels, height, width = images.shape[1:]
    shown = images[: side * side].detach().float().cpu().clamp(lo, hi)
    tiles = torch.zeros(side * side, channels, height, width)
    tiles[: len(shown)] = (shown - lo) / (hi - lo)
    mosaic = torch.full(
        (side * (height + padding) + padding, side * (width + padding) + padding, channels),
        MOSAIC_GAP,
    )
    for index, tile in enumerate(tiles):
        top, left = (
            padding + k * (size + padding) for k, size in zip(divmod(index, side), (height, width))
        )
        mosaic[top : top + height, left : left + width] = tile.permute(1, 2, 0)
    ax.imshow(mosaic.squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    # Ticks off rather than the whole axis: a caller's axis label stays visible.
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
