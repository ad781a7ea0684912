"""benchmarks/bench_sampler.py times the precision policy "auto" against the float32 sampler in
the same run, and records the machine's capability line and the choice it timed."""

import json
import runpy
from pathlib import Path

import pytest
import torch

from ebm_fast.precision import PrecisionChoice, capability_line, resolve_precision

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_sampler.py"


def test_auto_is_timed_beside_fp32_and_its_choice_recorded(tmp_path):
    bench = runpy.run_path(str(SCRIPT))
    out = tmp_path / "sampler.json"
    assert (
        bench["main"](
            [
                "--rounds",
                "1",
                "--no-compile",
                "--cases",
                "conv",
                "--chains",
                "2",
                "--steps",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["capability"] == capability_line(torch.device("cpu"))
    (case,) = report["cases"]
    assert PrecisionChoice.from_dict(case["auto"]) == resolve_precision(
        "auto", "cpu", torch.float32, state_dim=4, energy=bench["conv_net"]()
    )
    methods = case["methods"]
    assert methods["sampler_auto"]["speedup_vs_sampler"] == pytest.approx(
        methods["sampler"]["seconds"] / methods["sampler_auto"]["seconds"]
    )
    assert methods["sampler_auto"]["cpu_speedup_vs_sampler"] == pytest.approx(
        methods["sampler"]["cpu_seconds"] / methods["sampler_auto"]["cpu_seconds"]
    )


@pytest.mark.parametrize("case", ["conv", "mlp784"])
def test_auto_runs_the_model_in_the_layout_it_chose(case):
    """The model is converted (the sampler keeps its chains contiguous and takes autocast="auto"
    itself)."""
    bench = runpy.run_path(str(SCRIPT))
    spec = bench["CASES"][case]
    model, x0 = spec["make"](), torch.rand(2, *spec["shape"])
    auto_model, choice = bench["under_auto"](model, x0)
    assert auto_model is not model
    assert choice.channels_last == (x0.dim() == 4)  # this CPU's rule for a conv energy
    assert all(
        p.is_contiguous(memory_format=choice.memory_format)
        for p in auto_model.parameters()
        if p.dim() == 4
    )
    assert all(p.is_contiguous() for p in model.parameters())  # the shared model untouched
