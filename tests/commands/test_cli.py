"""``ebm-fast``: one parser with a subcommand per module; bad options are usage errors (exit 2)
naming the option, raised while parsing, before any work starts."""

import importlib
import re
import subprocess
import sys

import pytest
import torch

from ebm_fast import cli
from ebm_fast.commands.bench import BENCHMARKS


def usage_error(argv, capsys) -> str:
    """Run ``ebm-fast argv``, expect argparse's usage error, return stderr. Nothing may have been
    printed to stdout: the command never started."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--step-size", "-1"], "argument --step-size: value must be > 0.0, got -1.0"),
        (["demo", "--noise-scale", "nan"], "argument --noise-scale: value must not be NaN"),
        (["demo", "--reinit-prob", "2"], "argument --reinit-prob: value must be >= 0.0 and <= 1.0"),
        (["demo", "--lr", "nan"], "argument --lr: value must not be NaN"),
        (["demo", "--alpha", "inf"], "argument --alpha: value must be finite"),
        (["demo", "--seed", "-1"], "argument --seed: value must be >= 0"),
        (["demo", "--seed", "12345678901234567890"], "argument --seed: value must be >= 0 and <"),
        (["demo", "--seed", "1.5"], "argument --seed: value must be an int, got 1.5"),
        (["demo", "--iterations", "0"], "argument --iterations: value must be >= 1, got 0"),
        (["demo", "--device", "gpu"], "argument --device: invalid choice: 'gpu'"),
    ],
)
def test_bad_numbers_are_usage_errors_naming_the_option(argv, message, capsys):
    assert message in usage_error(argv, capsys)


@pytest.mark.parametrize("command", ["demo"])  # study: tests/experiments/test_study.py
def test_output_paths_are_checked_before_the_work(command, tmp_path, capsys):
    err = usage_error([command, "--json", "/nonexistent/x.json"], capsys)
    assert "argument --json: directory /nonexistent does not exist" in err
    err = usage_error([command, "--json", str(tmp_path)], capsys)
    assert f"argument --json: {tmp_path} is a directory" in err


def test_cuda_without_a_gpu_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "argument --device: cuda requested, but torch sees no CUDA device" in usage_error(
        ["demo", "--device", "cuda"], capsys
    )


def test_bench_names_what_is_missing_and_what_is_known(capsys):
    err = usage_error(["bench"], capsys)
    assert "the following arguments are required: NAME\n" in err  # not "NAME, ARGS"
    err = usage_error(["bench", "nope"], capsys)
    known = sorted(p.stem[len("bench_") :] for p in BENCHMARKS.glob("bench_*.py"))
    assert {"buffer", "sampler", "update"} <= set(known)
    assert f"argument NAME: no benchmark 'nope'; known: {', '.join(known)}\n" in err


def test_bench_passes_the_rest_to_the_benchmark(capsys):
    with pytest.raises(SystemExit) as exit_info:  # the benchmark's own -h
        cli.main(["bench", "update", "-h"])
    assert exit_info.value.code == 0
    assert "bench_update.py" in capsys.readouterr().out


def test_every_command_is_one_module_and_listed_in_the_help(capsys):
    for name, module_name in cli.COMMANDS.items():
        module = importlib.import_module(module_name)
        assert callable(module.add_arguments) and callable(module.main), name
    with pytest.raises(SystemExit):
        cli.main(["-h"])
    printed = capsys.readouterr().out
    for name in cli.COMMANDS:
        # argparse puts a long name's help on the next line
        assert re.search(rf"^    {re.escape(name)}\s", printed, re.MULTILINE), name


def test_info_lists_the_backends(capsys):
    assert cli.main(["info"]) == 0
    printed = capsys.readouterr().out
    assert "reference" in printed and "CUDA available" in printed


def test_the_console_entry_exits_2_on_a_usage_error():
    result = subprocess.run(
        [sys.executable, "-m", "ebm_fast.cli", "demo", "--lr", "nan"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and "argument --lr: value must not be NaN" in result.stderr
    assert "Traceback" not in result.stderr
