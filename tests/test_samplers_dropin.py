"""docs/drop-in.md is executable: each "before" loop and its one-call "after" replacement run on the
same energy and start points, and their samples' per-dimension means and variances agree within
the sampling error (the noise differs: torch.randn there, the noise spec here). A deliberately
wrong replacement (twice the step size) must disagree, so the comparison has power."""

import math
import re
from pathlib import Path

import pytest
import torch

import ebm_fast

DOC = Path(__file__).resolve().parent.parent / "docs" / "drop-in.md"
SIGMAS_OF_TOLERANCE = 5.0
CHAINS, DIM = 2000, 6


def doc_blocks() -> dict:
    """The python blocks of the doc, keyed by their first-line marker ("igebm: before", ...)."""
    blocks = {}
    for body in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        first, _, _ = body.partition("\n")
        match = re.fullmatch(r"# (\w+: (?:before|after))", first.strip())
        if match:
            blocks[match.group(1)] = body
    return blocks


def run_block(code: str, **names) -> torch.Tensor:
    namespace = {"torch": torch, "ebm_fast": ebm_fast, **names}
    exec(compile(code, str(DOC), "exec"), namespace)
    return namespace["x"]


def statistics_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Per-dimension means and variances equal within SIGMAS_OF_TOLERANCE standard errors."""
    a, b = a.double(), b.double()
    n = a.shape[0]
    mean_se = torch.sqrt((a.var(0) + b.var(0)) / n)
    dev_a, dev_b = (a - a.mean(0)) ** 2, (b - b.mean(0)) ** 2
    var_se = torch.sqrt((dev_a.var(0) + dev_b.var(0)) / n)
    return bool(((a.mean(0) - b.mean(0)).abs() <= SIGMAS_OF_TOLERANCE * mean_se).all()
                and ((a.var(0) - b.var(0)).abs() <= SIGMAS_OF_TOLERANCE * var_se).all())


def network(out_features: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.SiLU(),
                               torch.nn.Linear(32, out_features))


def test_the_doc_has_both_loops_before_and_after():
    assert set(doc_blocks()) == {"igebm: before", "igebm: after", "jem: before", "jem: after"}


@pytest.mark.parametrize("style", ["igebm", "jem"])
def test_the_sampler_call_reproduces_the_loop_statistics(style):
    blocks = doc_blocks()
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(CHAINS, DIM, generator=gen)
    if style == "igebm":
        names = {"model": network(1), "x0": x0, "step_lr": 2.0, "noise_std": 0.05,
                 "num_steps": 20}
        wrong = dict(names, step_lr=4.0)
    else:
        names = {"classifier": network(4), "x0": x0, "step_size": 0.5, "sigma": 0.1,
                 "n_steps": 20}
        wrong = dict(names, step_size=1.0)
    torch.manual_seed(2)
    before = run_block(blocks[f"{style}: before"], **names)
    after = run_block(blocks[f"{style}: after"], **names)
    assert after.shape == before.shape and after.dtype == before.dtype
    assert statistics_agree(before, after)
    assert not statistics_agree(before, run_block(blocks[f"{style}: after"], **wrong))
    moved = (after - x0).norm(dim=1).mean().item()
    assert moved > 5 * math.sqrt(DIM) * 0.01  # the chains went somewhere: this compares work
