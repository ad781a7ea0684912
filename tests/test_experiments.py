"""The experiments layer: its models, and the estimator study (``ebm-fast study``)."""

import json
import math

import pytest
import torch

from ebm_fast import cli
from ebm_fast.datasets import ring_of_gaussians
from ebm_fast.exact2d import exact_nll
from ebm_fast.experiments import study
from ebm_fast.experiments.models import make_energy, train_exact_ml


def test_make_energy_is_seeded_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = make_energy(4, hidden=8), make_energy(4, hidden=8)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, make_energy(5, hidden=8)[0].weight)


def test_similarity_flattens_every_parameter_in_order():
    """g = (1, 2 | 2), g* = (1, 2 | 0): cosine 5 / (3 sqrt 5), relative error 2 / sqrt 5."""
    estimate = [torch.tensor([1.0, 2.0]), torch.tensor([[2.0]])]
    exact = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    cos, rel = study._similarity(estimate, exact)
    assert cos == pytest.approx(5 / (3 * math.sqrt(5)), rel=1e-12)
    assert rel == pytest.approx(2 / math.sqrt(5), rel=1e-12)
    assert study._similarity(exact, exact) == pytest.approx((1.0, 0.0))
    assert study._similarity(estimate[::-1], exact)[0] != pytest.approx(cos)


def test_exact_ml_training_lowers_the_exact_nll():
    data = ring_of_gaussians(500, torch.Generator().manual_seed(0))
    energy = make_energy(1, hidden=8)
    before = exact_nll(energy, data, cells=40)
    train_exact_ml(energy, data, 20, lr=1e-2, cells=20)
    assert exact_nll(energy, data, cells=40) < before - 0.1


TINY = dict(steps=(2,), repetitions=2, batch=64, train_iterations=5, hidden=8,
            warmup_iterations=2, buffer_size=128, cells=40, train_cells=20)


def test_study_reports_finite_numbers_and_is_deterministic():
    result = study.estimator_study(**TINY)
    again = study.estimator_study(**TINY)

    def numbers(res):
        return [{k: v for k, v in row.items() if k != "seconds"} for row in res["rows"]]

    assert numbers(again) == numbers(result)  # docs/estimators.md's table is reproducible
    names = [(row["estimator"], row["steps"]) for row in result["rows"]]
    assert names == [("exact samples", "-"), ("CD", 2), ("short-run ML", 2), ("persistent ML", 2)]
    for row in result["rows"]:
        cos, rel = row["cosine"], row["rel_error"]
        assert -1 - 1e-9 <= cos["mean"] <= 1 + 1e-9 and cos["std"] >= 0
        assert math.isfinite(rel["mean"]) and rel["mean"] >= 0 and math.isfinite(rel["std"])
    assert math.isfinite(result["model"]["train_nll"])


def test_study_rejects_bad_settings():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        study.estimator_study(**{**TINY, "steps": (0,)})
    with pytest.raises(ValueError, match="steps must name at least one"):
        study.estimator_study(**{**TINY, "steps": ()})
    with pytest.raises(TypeError, match="hidden must be an int"):
        study.estimator_study(**{**TINY, "hidden": 8.0})
    with pytest.raises(ValueError, match="repetitions must be"):
        study.estimator_study(**{**TINY, "repetitions": 0})
    with pytest.raises(ValueError, match="batch must be"):
        study.estimator_study(**{**TINY, "batch": 0})
    with pytest.raises(ValueError, match="train_cells must be"):
        study.estimator_study(**{**TINY, "train_cells": 1})


def test_study_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "study.json"
    assert cli.main(["study", "--steps", "1", "--repetitions", "2", "--batch", "32",
                     "--train-iterations", "3", "--hidden", "8", "--warmup-iterations", "1",
                     "--buffer-size", "64", "--cells", "30", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "training: 3 Adam steps" in printed and "persistent ML" in printed
    assert "cosine (mean ± std)" in printed
    assert len(json.loads(out.read_text())["rows"]) == 4
