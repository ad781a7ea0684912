"""ebm_fast.training.JEM and LogitsEnergy against hand computations on a linear classifier
f(x) = W x + b, whose energies, cross-entropy and parameter gradients have closed forms:
E(x) = -logsumexp(f(x)), E(x, y) = -f(x)[y]; d/dW of -logsumexp f(x) = -softmax(f(x)) x^T,
of -f(x)[y] = -e_y x^T, of the cross-entropy logsumexp f(x) - f(x)[y] = (softmax - e_y) x^T."""

import json

import pytest
import torch

import ebm_fast
from ebm_fast import cli
from ebm_fast.training import JEM, JEMStats, LogitsEnergy, Trainer, expected_calibration_error

N_CLASSES, DIM, BATCH = 3, 4, 12


def linear_classifier() -> torch.nn.Linear:
    classifier = torch.nn.Linear(DIM, N_CLASSES)
    with torch.no_grad():
        classifier.weight.copy_(
            torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.0, 2.0, 0.0, -0.5], [-1.0, 0.0, 0.0, 1.0]])
        )
        classifier.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    return classifier


def batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(BATCH, DIM, generator=gen) * 2 - 1, torch.arange(BATCH) % N_CLASSES


def make_jem(classifier, buffer=None, *, step_size=0.1, noise_scale=0.01, n_steps=3, **weights):
    sampler = ebm_fast.LangevinSampler(
        LogitsEnergy(classifier),
        step_size=step_size,
        noise_scale=noise_scale,
        n_steps=n_steps,
        seed=0,
    )
    if buffer is None:
        buffer = ebm_fast.ReplayBuffer(6 * N_CLASSES, (DIM,), n_classes=N_CLASSES, seed=1)
    return JEM(classifier, sampler, buffer, **weights)


def hand_logits(x):
    """f(x) = W x + b written out with the classifier's numbers, in float64."""
    weight = torch.tensor(
        [[1.0, 0.0, 0.5, 0.0], [0.0, 2.0, 0.0, -0.5], [-1.0, 0.0, 0.0, 1.0]], dtype=torch.float64
    )
    return x.double() @ weight.T + torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)


def log_sum_exp(logits):
    return logits.exp().sum(1).log()


# -- the energy ------------------------------------------------------------------------------


def test_logits_energy_is_minus_logsumexp_and_minus_the_labels_logit():
    x, y = batch()
    energy = LogitsEnergy(linear_classifier())
    logits = hand_logits(x)
    torch.testing.assert_close(energy(x).double(), -log_sum_exp(logits), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(
        energy(x, y).double(), -logits[torch.arange(BATCH), y], rtol=1e-6, atol=1e-6
    )


def test_logits_energy_shows_the_classifiers_parameters_and_the_sampler_freezes_them():
    classifier = linear_classifier()
    energy = LogitsEnergy(classifier)
    assert [id(p) for p in energy.parameters()] == [id(p) for p in classifier.parameters()]
    sampler = ebm_fast.LangevinSampler(energy, step_size=0.1, noise_scale=0.0, n_steps=1, seed=0)
    x, y = batch()
    samples = sampler.sample(x, y=y)
    # One noiseless step on E(x, y) = -f(x)[y] moves x by step_size * W[y].
    torch.testing.assert_close(samples, x + 0.1 * classifier.weight.detach()[y])
    assert all(p.grad is None and p.requires_grad for p in classifier.parameters())


def test_logits_energy_refusals_name_the_argument():
    energy = LogitsEnergy(linear_classifier())
    x, y = batch()
    with pytest.raises(TypeError, match="classifier must be a torch.nn.Module"):
        LogitsEnergy(lambda x: x)
    with pytest.raises(TypeError, match="y must be an int64"):
        energy(x, y.float())
    with pytest.raises(ValueError, match=r"y must have shape \(12,\)"):
        energy(x, y[:3])
    with pytest.raises(ValueError, match=r"classifier\(x\) must have shape \(12, n_classes\)"):
        LogitsEnergy(torch.nn.Flatten(0))(x)


# -- the loss --------------------------------------------------------------------------------

WEIGHTS = {"p_x_weight": 0.7, "p_y_given_x_weight": 1.3, "p_x_y_weight": 0.4}


def hand_loss_and_gradient(x, y, x_neg, x_neg_y):
    """The JEM loss and its (dW, db) for the linear classifier, from the closed forms."""

    def mean_grad(points, coefficients):  # mean over samples of coefficients_i x_i^T, and of c_i
        return coefficients.T @ points.double() / points.shape[0], coefficients.mean(0)

    onehot = torch.nn.functional.one_hot(y, N_CLASSES).double()
    logits, logits_neg, logits_neg_y = hand_logits(x), hand_logits(x_neg), hand_logits(x_neg_y)
    rows = torch.arange(BATCH)
    loss = (
        WEIGHTS["p_x_weight"] * (-log_sum_exp(logits).mean() + log_sum_exp(logits_neg).mean())
        + WEIGHTS["p_y_given_x_weight"] * (log_sum_exp(logits) - logits[rows, y]).mean()
        + WEIGHTS["p_x_y_weight"] * (-logits[rows, y].mean() + logits_neg_y[rows, y].mean())
    )
    terms = [
        (WEIGHTS["p_x_weight"], x, -logits.softmax(1)),
        (-WEIGHTS["p_x_weight"], x_neg, -logits_neg.softmax(1)),
        (WEIGHTS["p_y_given_x_weight"], x, logits.softmax(1) - onehot),
        (WEIGHTS["p_x_y_weight"], x, -onehot),
        (-WEIGHTS["p_x_y_weight"], x_neg_y, -onehot),
    ]
    grad_w = sum(w * mean_grad(points, c)[0] for w, points, c in terms)
    grad_b = sum(w * mean_grad(points, c)[1] for w, points, c in terms)
    return loss, grad_w, grad_b


def test_loss_and_gradients_equal_the_closed_forms_and_sampling_leaves_no_gradients():
    classifier = linear_classifier()
    est = make_jem(classifier, **WEIGHTS)
    x, y = batch()
    loss = est(x, y)
    assert all(p.grad is None and p.requires_grad for p in classifier.parameters())
    stats = est.last
    assert isinstance(stats, JEMStats)
    expected, grad_w, grad_b = hand_loss_and_gradient(
        x, y, stats.negatives, stats.conditional_negatives
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-5)
    loss.backward()
    torch.testing.assert_close(classifier.weight.grad.double(), grad_w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(classifier.bias.grad.double(), grad_b, rtol=1e-5, atol=1e-5)
    logits = hand_logits(x)
    torch.testing.assert_close(
        stats.cross_entropy.double(),
        (log_sum_exp(logits) - logits[torch.arange(BATCH), y]).mean(),
        rtol=1e-5,
        atol=1e-6,
    )
    assert stats.accuracy.item() == pytest.approx((logits.argmax(1) == y).double().mean().item())
    torch.testing.assert_close(
        stats.energy_pos.double(), -log_sum_exp(logits).mean(), rtol=1e-5, atol=1e-6
    )
    torch.testing.assert_close(
        stats.conditional_energy_neg.double(),
        -hand_logits(stats.conditional_negatives)[torch.arange(BATCH), y].mean(),
        rtol=1e-5,
        atol=1e-6,
    )


def constant_class_buffer(centres):
    """A per-class buffer whose class k holds only copies of centres[k] (no reinit)."""
    rows = centres.repeat_interleave(4, dim=0)
    return ebm_fast.ReplayBuffer.from_tensor(rows, n_classes=N_CLASSES, reinit_prob=0.0, seed=2)


CENTRES = torch.tensor([[0.5, 0.0, 0.0, 0.0], [0.0, -0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.5]])


def test_class_conditional_chains_come_from_and_return_to_their_class_and_sample_e_x_y():
    classifier = linear_classifier()
    buffer = constant_class_buffer(CENTRES)
    est = make_jem(
        classifier,
        buffer,
        step_size=0.2,
        noise_scale=0.0,
        n_steps=1,
        p_x_weight=0.0,
        p_x_y_weight=1.0,
    )
    x, _ = batch()
    y = torch.tensor([2, 0, 2, 2, 0, 2, 0, 0, 2, 2, 0, 2])  # class 1 never asked for
    est(x, y)
    # One noiseless step on E(x, y) from class y's slots: centres[y] + 0.2 W[y].
    moved = CENTRES + 0.2 * classifier.weight.detach()
    torch.testing.assert_close(est.last.conditional_negatives, moved[y])
    assert est.last.negatives is est.last.conditional_negatives
    # Written back into the slots of their own class; class 1 is untouched.
    storage = buffer.state_dict()["storage"].reshape(N_CLASSES, 4, DIM)
    for k in range(N_CLASSES):
        is_centre = (storage[k] == CENTRES[k]).all(1)
        is_moved = torch.isclose(storage[k], moved[k]).all(1)
        assert (is_centre | is_moved).all()
        assert is_moved.any() == (k in y.tolist())


def test_p_x_chains_are_drawn_over_all_classes_and_sample_the_marginal_energy():
    classifier = linear_classifier()
    est = make_jem(
        classifier,
        constant_class_buffer(CENTRES),
        step_size=0.2,
        noise_scale=0.0,
        n_steps=1,
        p_x_weight=1.0,
        p_y_given_x_weight=0.0,
    )
    assert not est.conditional
    x, _ = batch()
    est(torch.cat([x, x, x]))
    # From centres[k], one noiseless step on E(x) = -logsumexp f(x): + 0.2 softmax(f) @ W.
    weight = classifier.weight.detach()
    candidates = CENTRES + 0.2 * (classifier(CENTRES).softmax(1) @ weight).detach()
    distance = torch.cdist(est.last.negatives, candidates)
    nearest = distance.argmin(1)
    assert distance.min(1).values.max() < 1e-5
    assert len(set(nearest.tolist())) == N_CLASSES  # 36 draws over all slots hit every class


def test_tracked_iteration_reports_chain_statistics_and_the_reinit_fraction():
    est = make_jem(linear_classifier(), p_x_y_weight=1.0)
    est.track_chains = True
    x, y = batch()
    est(x, y)
    # A fresh buffer re-initialises every draw.
    assert est.last.reinit_fraction.item() == 1.0
    assert est.last.chain_grad_norm.item() > 0 and est.last.chain_displacement.item() > 0


def test_state_dict_resumes_the_same_iteration():
    x, y = batch()
    est = make_jem(linear_classifier(), p_x_y_weight=1.0)
    est(x, y)
    state = est.state_dict()
    expected = est(x, y)
    resumed = make_jem(linear_classifier(), p_x_y_weight=1.0)
    resumed.load_state_dict(state)
    assert resumed(x, y).item() == expected.item()
    assert torch.equal(resumed.last.conditional_negatives, est.last.conditional_negatives)


def test_trainer_trains_a_jem_classifier():
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(
        torch.nn.Linear(DIM, 16), torch.nn.SiLU(), torch.nn.Linear(16, N_CLASSES)
    )
    est = make_jem(classifier, p_x_y_weight=0.5)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=1e-2)
    trainer = Trainer(est.energy, est, optimizer, log_every=5, progress=False, data_seed=0)
    gen = torch.Generator().manual_seed(3)
    y = torch.randint(0, N_CLASSES, (96,), generator=gen)
    x = torch.nn.functional.one_hot(y, N_CLASSES).float() @ torch.eye(
        N_CLASSES, DIM
    ) * 2 + 0.1 * torch.randn(96, DIM, generator=gen)
    trainer.fit((x, y), iterations=30, batch_size=BATCH)
    assert [r["iteration"] for r in trainer.history] == [5, 10, 15, 20, 25, 30]
    assert all("reinit_fraction" in r for r in trainer.history)
    assert trainer.nonfinite_skipped == 0
    accuracy = (classifier(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.9  # separable classes: the cross-entropy term trains the classifier


def test_refusals_name_the_argument():
    classifier = linear_classifier()
    x, y = batch()
    with pytest.raises(ValueError, match="p_x_weight"):
        make_jem(classifier, p_x_weight=-1.0)
    with pytest.raises(TypeError, match="p_x_y_weight"):
        make_jem(classifier, p_x_y_weight=True)
    with pytest.raises(ValueError, match="nothing would be sampled"):
        make_jem(classifier, p_x_weight=0.0)
    with pytest.raises(ValueError, match="buffer needs n_classes"):
        make_jem(classifier, ebm_fast.ReplayBuffer(8, (DIM,), seed=0), p_x_y_weight=1.0)
    with pytest.raises(ValueError, match="sampler must sample the classifier's energy"):
        other = make_jem(linear_classifier())
        JEM(classifier, other.sampler, other.buffer)
    est = make_jem(classifier)
    with pytest.raises(ValueError, match="y .* is required"):
        est(x)
    with pytest.raises(TypeError, match="y must be an int64"):
        est(x, y.int())
    with pytest.raises(ValueError, match="x_pos has samples of shape"):
        est(x[:, :2], y)
    with pytest.raises(ValueError, match="buffer has n_classes=4"):
        make_jem(
            classifier, ebm_fast.ReplayBuffer(8, (DIM,), n_classes=4, seed=0), p_x_y_weight=1.0
        )(x, y)


# -- calibration ----------------------------------------------------------------------------


def two_class_logits(confidence_of_class_0):
    p = torch.tensor(confidence_of_class_0)
    return torch.stack([p.log(), (1 - p).log()], 1)


def test_expected_calibration_error_by_hand():
    # Confidences 0.93 (right), 0.93 (wrong), 0.62 (right), 0.77 (wrong), ten bins:
    # 2/4 |1/2 - 0.93| + 1/4 |1 - 0.62| + 1/4 |0 - 0.77| = 0.215 + 0.095 + 0.1925.
    logits = two_class_logits([0.93, 0.93, 0.62, 0.77])
    y = torch.tensor([0, 1, 0, 1])
    ece = expected_calibration_error(logits, y, n_bins=10)
    assert ece.item() == pytest.approx(0.5025, abs=1e-6)
    # One bin: |accuracy - mean confidence| = |1/2 - 0.8125|.
    assert expected_calibration_error(logits, y, n_bins=1).item() == pytest.approx(0.3125, abs=1e-6)
    # Calibrated: confidence 0.75 and three of four right.
    calibrated = expected_calibration_error(
        two_class_logits([0.75] * 4), torch.tensor([0, 0, 0, 1]), n_bins=10
    )
    assert calibrated.item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(logits, y, n_bins=0)


# -- ebm-fast train --loss jem ---------------------------------------------------------------


def test_train_command_reports_test_accuracy_calibration_and_a_sample_grid(tmp_path, capsys):
    pytest.importorskip("sklearn")  # the bundled digits (GPU machines lack it)
    out = tmp_path / "run"
    status = cli.main(
        [
            "train",
            "--data",
            "digits",
            "--loss",
            "jem",
            "--out",
            str(out),
            "--iterations",
            "40",
            "--batch",
            "64",
            "--steps",
            "2",
            "--log-every",
            "20",
            "--plot-every",
            "40",
            "--buffer-size",
            "200",
            "--hidden",
            "32",
            "--lr",
            "1e-2",
            "--step-size",
            "1",
            "--noise-scale",
            "0.01",
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "expected calibration error" in printed
    metrics = json.loads((out / "test_metrics.json").read_text())
    assert metrics["accuracy"] > 0.4  # chance is 0.1: the p(y|x) term trains the classifier
    assert 0.0 <= metrics["ece"] <= 1.0
    assert (out / "iteration_0000040.png").stat().st_size > 0
    assert cli.main(["train", "--data", "ring", "--loss", "jem", "--out", str(tmp_path / "x")]) == 2
    assert "--loss jem needs labelled images" in capsys.readouterr().err
