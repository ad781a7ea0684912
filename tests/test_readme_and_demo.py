"""The README's example runs as written, and the demo trains and reports (a short run)."""

import json
import re
from pathlib import Path

import pytest
import torch

from ebm_fast import cli
from ebm_fast.exact2d import BOX

ROOT = Path(__file__).resolve().parent.parent


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


def test_demo_trains_and_reports(tmp_path, capsys):
    out = tmp_path / "demo.json"
    assert cli.main(["demo", "--iterations", "30", "--batch", "64", "--steps", "5",
                     "--log-every", "10", "--buffer-size", "500", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "iteration   30/30" in printed and "ebm_fast vs the plain loop" in printed
    runs = {run["kind"]: run for run in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"plain", "ebm_fast"}
    uniform_nll = 2 * torch.log(torch.tensor(2 * BOX)).item()
    for run in runs.values():
        assert run["sampling_seconds"] > 0 and run["chain_steps_per_second"] > 0
        # 30 iterations already pull the density toward the ring: better than uniform on the box.
        assert run["held_out_nll"] < uniform_nll


@pytest.mark.parametrize("option", ["--iterations", "--batch", "--steps", "--buffer-size",
                                    "--log-every"])
def test_demo_rejects_a_count_below_one_naming_the_option(option, capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", option, "0"])
    assert f"argument {option}: value must be >= 1, got 0" in capsys.readouterr().err
