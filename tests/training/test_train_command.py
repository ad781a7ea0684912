"""ebm-fast train: outputs, resume, and usage errors before any work."""

import json

import pytest

from ebm_fast import cli

TINY = ["--iterations", "4", "--log-every", "2", "--plot-every", "4", "--checkpoint-every", "2",
        "--steps", "2", "--batch", "16", "--n-data", "200", "--hidden", "8",
        "--buffer-size", "64"]


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
    assert cli.main(["train", "--data", "digits", "--energy", "conv", "--loss", "short_run",
                     "--out", str(out), *TINY]) == 0
    assert any(out.glob("iteration_*.png"))


@pytest.mark.parametrize("argv, message", [
    (["--data", "ring", "--energy", "conv"], "needs an image data set"),
    ([], "--out DIR is required"),
    (["--lr", "nan"], "--lr"),
    (["--steps", "0"], "--steps"),
])
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
