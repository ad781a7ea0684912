"""Held-out data held to its definition: no held-out point is a training point.

* The 2-D generators draw from the generator they are given and advance it, so a training set
  and a held-out set drawn one after the other from one generator are independent draws of a
  continuous density: they share no point (and no draw repeats the one before).
* The study's context and ``ebm-fast train`` draw their held-out 2-D points that way; the train
  command's JEM test set is a fifth of the labelled images, and the training set is the rest:
  together they are the data set, each image once.
"""

import dataclasses

import pytest
import torch

from ebm_fast.datasets import TOY_2D
from ebm_fast.experiments.study import common
from ebm_fast.experiments.study.config import FULL


def shared_rows(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many rows of a occur (exactly) in b."""
    return int((a[:, None, :] == b[None, :, :]).all(-1).any(1).sum())


@pytest.mark.parametrize("name", sorted(TOY_2D))
def test_successive_draws_from_one_generator_share_no_point(name):
    generator = torch.Generator().manual_seed(3)
    train = TOY_2D[name].sample(800, generator)
    held_out = TOY_2D[name].sample(800, generator)
    assert shared_rows(held_out, train) == 0
    assert shared_rows(train, train) == len(train)  # (the check sees a row in its own set)


def test_the_study_draws_its_held_out_points_apart_from_its_training_points():
    config = dataclasses.replace(FULL, train_size=300, heldout_size=300)
    ctx = common.Context(config, seed=0)
    assert len(ctx.heldout) == len(ctx.train) == 300
    assert shared_rows(ctx.heldout, ctx.train) == 0
