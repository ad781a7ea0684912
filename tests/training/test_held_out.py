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
    rows_of_b = set(map(tuple, b.flatten(1).tolist()))
    return sum(row in rows_of_b for row in map(tuple, a.flatten(1).tolist()))


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


def train_command(monkeypatch, tmp_path, argv):
    """``ebm-fast train argv`` with Trainer.fit recording what it is given instead of training:
    (the training data, the trainer's callbacks, JEM's test set or None)."""
    from ebm_fast import cli
    from ebm_fast.commands import train
    from ebm_fast.training import Trainer

    seen = {"test": None}

    def fit(self, data, iterations, batch_size=None):
        seen["data"], seen["callbacks"] = data, self.callbacks
        return self

    def classifier_metrics(classifier, x, y):
        seen["test"] = (x, y)
        return {"accuracy": 0.0, "ece": 0.0}

    monkeypatch.setattr(Trainer, "fit", fit)
    monkeypatch.setattr(train, "classifier_metrics", classifier_metrics)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--iterations", "1", *argv]) == 0
    return seen


def test_the_train_commands_held_out_points_are_not_training_points(monkeypatch, tmp_path):
    # As many training points as held-out ones (5000): a restarted stream would repeat them all.
    seen = train_command(monkeypatch, tmp_path, ["--data", "ring", "--n-data", "5000"])
    held_out = next(c.held_out for c in seen["callbacks"] if hasattr(c, "held_out"))
    assert len(seen["data"]) == len(held_out) == 5000
    assert shared_rows(held_out, seen["data"]) == 0


def test_the_train_commands_jem_test_set_and_training_set_partition_the_images(
    monkeypatch, tmp_path
):
    pytest.importorskip("sklearn")
    from ebm_fast.datasets import digits

    seen = train_command(monkeypatch, tmp_path, ["--data", "digits", "--loss", "jem"])
    (x_train, y_train), (x_test, y_test) = seen["data"], seen["test"]
    x_all, y_all = digits()
    assert len(x_test) == len(x_all) // 5 and len(x_train) + len(x_test) == len(x_all)

    def rows(x, y):  # the multiset of (label, image) rows, in a canonical order
        flat = torch.cat([y[:, None].double(), x.flatten(1).double()], 1).cpu()
        return sorted(map(tuple, flat.tolist()))

    # Together the two sets are the data set, each image once: no test image is trained on.
    assert sorted(rows(x_train, y_train) + rows(x_test, y_test)) == rows(x_all, y_all)
