"""Trainer: exact resume (same process and across processes), EMA, the non-finite policy,
metrics, divergence warnings, data kinds, and clear errors that lose nothing already written."""

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ebm_fast import LangevinSampler, ReplayBuffer
from ebm_fast.training import (
    ContrastiveDivergence,
    DivergenceMonitor,
    PersistentML,
    Trainer,
    TrainingWarning,
    checkpoints,
)

REPO = Path(__file__).resolve().parents[2]


def make_run(out_dir=None, *, ema=0.9, n_classes=None, schedule=None, **trainer_kw):
    """A small persistent-ML run: fast, and every piece of state a resume must restore.
    schedule: None or optimizer -> an lr scheduler for it."""
    torch.manual_seed(0)
    energy = nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Dropout(0.1), nn.Linear(16, 1))
    sampler = LangevinSampler(
        energy, step_size=0.01, noise_scale=0.1, n_steps=3, clamp=(-3, 3), seed=1
    )
    buffer = ReplayBuffer(64, (2,), init_range=(-3, 3), seed=2, n_classes=n_classes)
    optimizer = torch.optim.Adam(energy.parameters(), lr=1e-2, betas=(0.0, 0.999))
    trainer = Trainer(
        energy,
        PersistentML(sampler, buffer, alpha=0.1),
        optimizer,
        ema=ema,
        grad_clip=5.0,
        out_dir=out_dir,
        progress=False,
        data_seed=3,
        scheduler=None if schedule is None else schedule(optimizer),
        **{"log_every": 25, **trainer_kw},
    )
    return trainer


def data(n=100):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(4))


def weights(trainer):
    state = dict(trainer.energy.state_dict())
    state.update({f"ema.{k}": v for k, v in trainer.ema_model.state_dict().items()})
    return state


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_is_bit_identical(tmp_path):
    whole = make_run().fit(data(), 200, batch_size=16)
    first = make_run(tmp_path / "run", checkpoint_every=50).fit(data(), 100, batch_size=16)
    resumed = make_run(tmp_path / "run", checkpoint_every=50)
    resumed.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert resumed.iteration == 100
    resumed.fit(data(), 200, batch_size=16)
    assert_same(weights(whole), weights(resumed))
    assert first.iteration == 100
    lines = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["iteration"] for r in lines] == [25, 50, 75, 100, 125, 150, 175, 200]
    assert [r["loss"] for r in lines] == [r["loss"] for r in whole.history]


def test_resume_drops_metrics_logged_after_the_checkpoint(tmp_path):
    run = make_run(tmp_path, checkpoint_every=50)
    run.fit(data(), 50, batch_size=16)
    run.checkpoint_every = 1000
    run.fit(data(), 75, batch_size=16)  # logs 75; its checkpoint at 75 is the end-of-fit one
    resumed = make_run(tmp_path)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    resumed.iteration = 50  # as if the process died after logging 75 with the checkpoint at 50
    resumed._resumed_from = (tmp_path / "checkpoint.pt").resolve()
    resumed._claim_out_dir()
    kept = [
        json.loads(line)["iteration"]
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
    ]
    assert kept == [25, 50]


def test_resume_across_processes(tmp_path):
    """One process trains 60 iterations into a/ and 30 into b/; a second resumes b/ to 60 (the
    200 = 100 + 100 case runs in-process above; here the process boundary is what is tested)."""
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        from tests.training.test_trainer import make_run, data
        root = sys.argv[1]
        if sys.argv[2] == "fresh":
            make_run(root + "/a").fit(data(), 60, batch_size=16)
            make_run(root + "/b").fit(data(), 30, batch_size=16)
        else:
            run = make_run(root + "/b")
            run.load_checkpoint(root + "/b/checkpoint.pt")
            run.fit(data(), 60, batch_size=16)
    """)
    for mode in ("fresh", "resume"):
        subprocess.run(
            [sys.executable, "-c", script, str(tmp_path), mode],
            check=True,
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    loaded = [torch.load(tmp_path / d / "checkpoint.pt", weights_only=True) for d in "ab"]
    assert_same(loaded[0]["model"], loaded[1]["model"])
    assert_same(loaded[0]["ema"], loaded[1]["ema"])
    assert loaded[1]["iteration"] == 60


@pytest.mark.parametrize("kind", ["dataset", "loader"])
def test_resume_with_dataset_and_loader(tmp_path, kind):
    x, y = data(64), torch.arange(64) % 4

    def source():
        dataset = TensorDataset(x, y)
        if kind == "dataset":
            return dataset, 8
        return DataLoader(
            dataset,
            batch_size=8,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(5),
        ), None

    loader, batch_size = source()
    whole = make_run(n_classes=4).fit(loader, 30, batch_size)
    loader, batch_size = source()
    make_run(tmp_path, n_classes=4).fit(loader, 13, batch_size)  # stops inside epoch 2
    resumed = make_run(tmp_path, n_classes=4)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    loader, batch_size = source()
    resumed.fit(loader, 30, batch_size)
    assert_same(weights(whole), weights(resumed))


def test_ema_follows_the_weights():
    run = make_run(ema=0.5)
    run.fit(data(), 1, batch_size=16)
    # First update copies the weights; the second averages with decay 0.5.
    before = [p.detach().clone() for p in run.energy.parameters()]
    run.fit(data(), 2, batch_size=16)
    for ema, old, new in zip(run.ema_model.module.parameters(), before, run.energy.parameters()):
        torch.testing.assert_close(ema, 0.5 * old + 0.5 * new.detach())


class Poisoned(nn.Module):
    """A linear energy that returns NaN while ``poison`` is set."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.poison = False

    def forward(self, x):
        out = self.layer(x)
        return out * float("nan") if self.poison else out


def test_nonfinite_steps_are_skipped_and_counted_or_raise():
    energy = Poisoned()
    sampler = LangevinSampler(energy, step_size=0.01, seed=0)
    run = Trainer(
        energy,
        ContrastiveDivergence(sampler, k=0),
        torch.optim.SGD(energy.parameters(), lr=0.1),
        progress=False,
        log_every=2,
        data_seed=0,
    )
    energy.poison = True
    before = [p.detach().clone() for p in energy.parameters()]
    with pytest.warns(TrainingWarning, match="non-finite"):
        run.fit(data(), 2, batch_size=8)
    assert run.nonfinite_skipped == 2
    assert all(torch.equal(a, b) for a, b in zip(before, energy.parameters()))
    assert run.history[-1]["nonfinite_skipped"] == 2
    # Chains that go non-finite in the sampler are skipped too.
    run.loss = ContrastiveDivergence(sampler, k=2)
    run.fit(data(), 3, batch_size=8)
    assert run.nonfinite_skipped == 3
    run.on_nonfinite = "raise"
    with pytest.raises(FloatingPointError, match="not finite"):
        run.loss = ContrastiveDivergence(sampler, k=0)
        run.fit(data(), 4, batch_size=8)


def test_metrics_records_hold_the_documented_keys(tmp_path):
    run = make_run(tmp_path, log_every=10)
    run.fit(data(), 10, batch_size=16)
    record = json.loads((tmp_path / "metrics.jsonl").read_text())
    for key in (
        "iteration",
        "loss",
        "energy_pos",
        "energy_neg",
        "energy_gap",
        "grad_norm",
        "chain_grad_norm",
        "chain_displacement",
        "reinit_fraction",
        "sampler_seconds",
        "iteration_seconds",
        "nonfinite_skipped",
        "warnings",
    ):
        assert key in record, key
    assert record["energy_gap"] == pytest.approx(record["energy_pos"] - record["energy_neg"])
    assert 0 < record["sampler_seconds"] < record["iteration_seconds"]


def test_divergence_monitor_warns_with_a_suggestion():
    monitor = DivergenceMonitor(growth=10, margin=1.0, patience=3)
    base = {"iteration": 1, "energy_pos": 0.0, "energy_neg": 0.0, "nonfinite_skipped": 0}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert monitor.update({**base, "energy_gap": -0.5, "chain_grad_norm": 1.0}) == []
    with pytest.warns(TrainingWarning, match="alpha"):
        issued = monitor.update({**base, "energy_gap": -50.0, "chain_grad_norm": 20.0})
    assert len(issued) == 2 and any("step_size" in m for m in issued)
    with warnings.catch_warnings():  # still diverging: not repeated
        warnings.simplefilter("error")
        monitor.update({**base, "energy_gap": -60.0, "chain_grad_norm": 30.0})
    for _ in range(2):
        monitor.update({**base, "energy_gap": 2.0, "energy_pos": 1.0, "energy_neg": -1.0})
    with pytest.warns(TrainingWarning, match="E- has been"):
        monitor.update({**base, "energy_gap": 2.0, "energy_pos": 1.0, "energy_neg": -1.0})


def test_bad_arguments_are_refused_before_anything_is_lost(tmp_path):
    run = make_run(tmp_path / "run")
    run.fit(data(), 10, batch_size=16)
    saved = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a run"):
        make_run(tmp_path / "run").fit(data(), 10, batch_size=16)
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == saved

    other = make_run()
    other.energy = nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 1))
    before = {k: v.clone() for k, v in other.energy.state_dict().items()}
    with pytest.raises(ValueError, match="another model"):
        other.load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert_same(before, other.energy.state_dict())

    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="out_dir"):
        make_run(tmp_path / "file" / "sub")
    with pytest.raises(TypeError, match="out_dir"):
        make_run(3)
    with pytest.raises(ValueError, match="ema"):
        make_run(ema=1.0)
    with pytest.raises(ValueError, match="batch_size"):
        make_run().fit(data(), 10)
    with pytest.raises(ValueError, match="exceeds"):
        make_run().fit(data(8), 10, batch_size=16)
    with pytest.raises(ValueError, match="on_nonfinite"):
        make_run(on_nonfinite="ignore")
    frozen = nn.Linear(2, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, run.loss, run.optimizer)
    with pytest.raises(ValueError, match="another energy"):
        Trainer(nn.Linear(2, 1), run.loss, run.optimizer)


def test_fit_refuses_a_directory_holding_another_run_after_a_load_or_a_step(tmp_path):
    make_run(tmp_path / "b", log_every=5).fit(data(), 10, batch_size=16)
    make_run(tmp_path / "c", log_every=5).fit(data(), 10, batch_size=16)
    c = {name: (tmp_path / "c" / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    loaded = make_run(tmp_path / "c")
    loaded.load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    stepped = make_run(tmp_path / "c")
    stepped.step(data(16))
    for run in (loaded, stepped):
        with pytest.raises(FileExistsError, match="already holds a run"):
            run.fit(data(), 20, batch_size=16)
    assert c == {name: (tmp_path / "c" / name).read_bytes() for name in c}
    # Its own directory, again and again: the run it started there.
    own = make_run(tmp_path / "d")
    own.step(data(16))
    own.fit(data(), 5, batch_size=16).fit(data(), 10, batch_size=16)
    assert checkpoints.load(tmp_path / "d" / "checkpoint.pt")["iteration"] == 10


def decay(optimizer):
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.99)


def test_scheduler_steps_every_iteration_and_resumes_bit_identically(tmp_path):
    whole = make_run(schedule=decay).fit(data(), 60, batch_size=16)
    assert whole.scheduler.last_epoch == 60
    assert whole.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.99**60)
    make_run(tmp_path, schedule=decay, checkpoint_every=30).fit(data(), 30, batch_size=16)
    resumed = make_run(tmp_path, schedule=decay)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.scheduler.last_epoch == 30
    resumed.fit(data(), 60, batch_size=16)
    assert_same(weights(whole), weights(resumed))
    assert resumed.scheduler.state_dict() == whole.scheduler.state_dict()
    # A checkpoint with a scheduler and a trainer without one (or the other way) do not mix.
    with pytest.raises(ValueError, match="scheduler"):
        make_run().load_checkpoint(tmp_path / "checkpoint.pt")


def test_scheduler_must_drive_the_trainers_optimizer():
    run = make_run()
    other = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        Trainer(run.energy, run.loss, run.optimizer, scheduler=decay(other))
    with pytest.raises(TypeError, match="scheduler"):
        Trainer(run.energy, run.loss, run.optimizer, scheduler=0.99)
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        Trainer(
            run.energy,
            run.loss,
            run.optimizer,
            scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau(run.optimizer),
        )


def test_step_callbacks_run_every_iteration_and_log_callbacks_on_log_iterations():
    seen, logged = [], []
    run = make_run(
        log_every=4,
        step_callbacks=(lambda t: seen.append(t.iteration),),
        callbacks=(lambda t, record: logged.append(record["iteration"]),),
    )
    run.fit(data(), 10, batch_size=16)
    assert seen == list(range(1, 11)) and logged == [4, 8]
    with pytest.raises(TypeError, match="step_callbacks"):
        make_run(step_callbacks=(3,))


def test_monitor_warns_when_the_energies_drift_from_their_level_at_the_start():
    """issue 23's JEM run on the MLP: E+ -2.9 at the start, -270 and -346 at the two logs
    (log_every 100), gap and chain gradients growing little between the logs."""
    monitor = DivergenceMonitor()
    monitor.start(-2.9)
    record = {
        "iteration": 100,
        "energy_pos": -270.0,
        "energy_neg": -245.0,
        "energy_gap": -25.0,
        "chain_grad_norm": 40.0,
        "nonfinite_skipped": 0,
    }
    with pytest.warns(TrainingWarning, match="level"):
        issued = monitor.update(record)
    assert len(issued) == 1 and "-2.9" in issued[0]
    # Healthy runs stay within 10x of their start (the conv JEM: -3.5 -> -5.1; the ring ~0).
    monitor = DivergenceMonitor()
    monitor.start(-0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        monitor.update({**record, "energy_pos": -5.1, "energy_neg": -5.4, "energy_gap": 0.3})


def test_trainer_starts_the_monitor_at_its_first_iteration_and_resumes_it(tmp_path):
    run = make_run(tmp_path, log_every=100)
    run.fit(data(), 3, batch_size=16)
    start = run.monitor.start_level
    assert start is not None and start == run.monitor.state_dict()["start_level"]
    resumed = make_run(tmp_path, log_every=100)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.monitor.state_dict() == run.monitor.state_dict()
