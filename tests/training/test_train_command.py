"""ebm-fast train: outputs, resume, defaults that follow the data, and usage errors before any
work that change nothing on disk."""

import json
import shutil

import pytest
import torch

from ebm_fast import cli
from ebm_fast.training import checkpoints

TINY = [
    "--iterations",
    "4",
    "--log-every",
    "2",
    "--plot-every",
    "4",
    "--checkpoint-every",
    "2",
    "--steps",
    "2",
    "--batch",
    "16",
    "--n-data",
    "200",
    "--hidden",
    "8",
    "--buffer-size",
    "64",
]


def test_train_writes_checkpoint_metrics_and_png_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--data", "ring", "--loss", "kl", "--out", str(out), *TINY]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    assert records[-1]["exact_kl"] > 0 and records[-1]["heldout_nll"] > 0
    assert (out / records[-1]["png"]).stat().st_size > 0
    assert (out / "checkpoint.pt").is_file() and "exact KL" in capsys.readouterr().out
    assert cli.main(["train", "--resume", str(out), "--iterations", "6"]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4, 6]


def test_train_on_images_writes_a_sample_grid(tmp_path):
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    assert (
        cli.main(
            [
                "train",
                "--data",
                "digits",
                "--energy",
                "conv",
                "--loss",
                "short_run",
                "--out",
                str(out),
                *TINY,
            ]
        )
        == 0
    )
    assert any(out.glob("iteration_*.png"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--data", "ring", "--energy", "conv"], "needs an image data set"),
        ([], "--out DIR is required"),
        (["--lr", "nan"], "--lr"),
        (["--steps", "0"], "--steps"),
    ],
)
def test_usage_errors_name_the_option(tmp_path, capsys, argv, message):
    if "--out" not in argv and message != "--out DIR is required":
        argv = [*argv, "--out", str(tmp_path / "x")]
    try:
        status = cli.main(["train", *argv])
    except SystemExit as exit:  # argparse's own usage errors
        status = exit.code
    assert status == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    assert cli.main(["train", "--out", str(out), *TINY]) == 2
    assert "--resume" in capsys.readouterr().err and (out / "config.json").read_text() == "{}"


def files(folder):
    """Every file under folder and its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def usage_error(argv, capsys) -> str:
    """Run `ebm-fast train argv`, expect a usage error (exit 2, no traceback); its message."""
    try:
        status = cli.main(["train", *argv])
    except SystemExit as exit:  # argparse's own usage errors
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 4-iteration KL run (its files are copied, never changed)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", "--data", "ring", "--loss", "kl", "--out", str(out), *TINY]) == 0
    return out


def test_resume_refuses_options_that_differ_from_the_saved_run(finished_run, tmp_path, capsys):
    out = shutil.copytree(finished_run, tmp_path / "run")
    before = files(out)
    err = usage_error(
        ["--resume", str(out), "--loss", "cd", "--lr", "5", "--iterations", "6"], capsys
    )
    assert "--loss cd" in err and "--lr 5" in err and "config.json" in err
    assert "--iterations" not in err.split("differ")[0] and files(out) == before
    # The same values as saved are no change; --iterations is the new total, recorded.
    assert cli.main(["train", "--resume", str(out), "--loss", "kl", "--iterations", "6"]) == 0
    assert json.loads((out / "config.json").read_text())["iterations"] == 6
    assert checkpoints.load(out / "checkpoint.pt")["iteration"] == 6
    # A plain --resume now aims at 6 too: nothing left to train.
    assert cli.main(["train", "--resume", str(out)]) == 0
    assert checkpoints.load(out / "checkpoint.pt")["iteration"] == 6
    before = files(out)
    err = usage_error(["--resume", str(out), "--iterations", "2"], capsys)
    assert "--iterations 2" in err and "iteration 6" in err and files(out) == before


def test_a_run_stopped_before_its_first_checkpoint_restarts_on_resume(
    finished_run, tmp_path, capsys
):
    out = shutil.copytree(finished_run, tmp_path / "run")
    (out / "checkpoint.pt").unlink()  # as if killed after its first log, before any checkpoint
    (out / "metrics.jsonl").write_text((out / "metrics.jsonl").read_text().splitlines()[0])
    assert "--resume" in usage_error(["--out", str(out), *TINY], capsys)
    assert cli.main(["train", "--resume", str(out)]) == 0
    assert "from iteration 0" in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [2, 4]
    restarted, uninterrupted = (
        checkpoints.load(run / "checkpoint.pt")["model"] for run in (out, finished_run)
    )
    for name, tensor in uninterrupted.items():
        assert torch.equal(restarted[name], tensor), name


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _other_model(out):
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "hidden": 9}))


def _missing_shard(out):
    """The checkpoint of a 2-process run whose loss shards are gone."""
    state = checkpoints.load(out / "checkpoint.pt")
    del state["loss"]
    checkpoints.atomic_save({**state, "loss_shards": 2}, out / "checkpoint.pt")


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda out: _truncate(out / "config.json"), "config.json"),
        (lambda out: _truncate(out / "checkpoint.pt"), "checkpoint.pt"),
        (_other_model, "checkpoint.pt"),
        (_missing_shard, "iteration-4-rank-0-of-2.pt"),
    ],
)
def test_resume_from_damaged_or_mismatched_files_is_a_usage_error(
    finished_run, tmp_path, capsys, damage, named
):
    out = shutil.copytree(finished_run, tmp_path / "run")
    damage(out)
    before = files(out)
    assert named in usage_error(["--resume", str(out), "--iterations", "6"], capsys)
    assert files(out) == before


def test_defaults_follow_the_data_and_are_stated_in_the_help(tmp_path, capsys):
    pytest.importorskip("sklearn")
    out = tmp_path / "jem"
    assert (
        cli.main(
            [
                "train",
                "--data",
                "digits",
                "--loss",
                "jem",
                "--out",
                str(out),
                "--iterations",
                "1",
                "--steps",
                "1",
                "--log-every",
                "1",
            ]
        )
        == 0
    )
    config = json.loads((out / "config.json").read_text())
    # Images: the conv energy and JEM's SGLD (step 1, noise 0.01); JEM: Adam with momentum.
    assert (config["energy"], config["step_size"], config["noise_scale"]) == ("conv", 1, 0.01)
    assert (config["batch"], config["lr"], config["beta1"]) == (64, 3e-3, 0.9)
    assert config["iterations"] == 1 and config["steps"] == 1
    with pytest.raises(SystemExit):
        cli.main(["train", "-h"])
    printed = " ".join(capsys.readouterr().out.split())
    assert "0.01 on 2-D data, 1 on images" in printed  # --step-size
    assert "mlp on 2-D data, conv on images" in printed  # --energy
    assert "default 0.001, 0.003 for --loss jem" in printed  # --lr
