"""The PNG panels: the image mosaic keeps its tiles apart."""

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ebm_fast.training import plots  # noqa: E402


def test_image_mosaic_pads_between_tiles_like_make_grid():
    images = torch.arange(3.0).reshape(3, 1, 1, 1).expand(3, 1, 2, 2)  # tiles of 0, 1 and 2
    figure, ax = plt.subplots()
    plots.image_mosaic(ax, images, (0.0, 2.0), side=2, padding=1)
    shown = torch.as_tensor(ax.get_images()[0].get_array())
    plt.close(figure)
    # side * (2 + padding) + padding pixels a side: a gap around and between the tiles.
    assert shown.shape == (7, 7)
    gap = plots.MOSAIC_GAP
    assert (shown[0] == gap).all() and (shown[:, 3] == gap).all() and (shown[3] == gap).all()
    tiles = [shown[1:3, 1:3], shown[1:3, 4:6], shown[4:6, 1:3], shown[4:6, 4:6]]
    # Values map lo..hi to black..white; the fourth tile is empty (black).
    assert [tile.unique().tolist() for tile in tiles] == [[0.0], [0.5], [1.0], [0.0]]
