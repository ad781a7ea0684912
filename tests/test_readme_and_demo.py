"""The README's example runs as written, and the demo trains and reports (a short run)."""

import json
import re
from pathlib import Path

import torch

from ebm_fast import demo

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
    assert demo.main(["--iterations", "30", "--batch", "64", "--steps", "5", "--log-every", "10",
                      "--buffer-size", "500", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "iteration   30/30" in printed and "ebm_fast vs the plain loop" in printed
    runs = {run["kind"]: run for run in json.loads(out.read_text())["runs"]}
    assert set(runs) == {"plain", "ebm_fast"}
    uniform_nll = 2 * torch.log(torch.tensor(2 * demo.BOX)).item()
    for run in runs.values():
        assert run["sampling_seconds"] > 0 and run["chain_steps_per_second"] > 0
        # 30 iterations already pull the density toward the ring: better than uniform on the box.
        assert run["held_out_nll"] < uniform_nll


def test_exact_nll_of_a_known_density():
    """E(x) = |x|^2 / 2 is a standard normal (mass outside the box negligible): NLL closed form."""
    class Quadratic(torch.nn.Module):
        def forward(self, x):
            return 0.5 * (x ** 2).sum(1)

    data = torch.randn(4000, 2, generator=torch.Generator().manual_seed(0))
    expected = (0.5 * (data ** 2).sum(1)).mean().item() + torch.log(torch.tensor(2 * torch.pi)).item()
    assert abs(demo.exact_nll(Quadratic(), data) - expected) < 1e-3
