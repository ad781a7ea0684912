"""benchmarks/bench_training.py runs with short settings and its ratios match its times."""

import json
import runpy
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_training.py"


def test_bench_training_quick_run(tmp_path, monkeypatch):
    bench = runpy.run_path(str(SCRIPT))
    monkeypatch.setitem(bench["CASES"]["ring"], "steps", 2)
    out = tmp_path / "training.json"
    assert bench["main"](["--cases", "ring", "--iterations", "3", "--out", str(out)]) == 0
    (case,) = json.loads(out.read_text())["cases"]
    for clock in ("wall", "cpu"):
        row = case[clock]
        median = row["median_s"]
        assert row["speedup"] == pytest.approx(median["plain"] / median["ebm_fast"])
        # The ring's energy is an MLP: ebm_fast's passes are the direct route's.
        assert row["overhead_us"] == pytest.approx(
            1e6 * (median["ebm_fast"] - median["direct_passes"] - median["optimizer"])
        )
        assert row["direct_route_speedup"] == pytest.approx(
            median["passes"] / median["direct_passes"]
        )
        assert row["floor_us"] == pytest.approx(1e6 * median["kernels"])
        for peer, ratio in row["speedup_vs_peers"].items():  # those installed (none in CI)
            assert ratio == pytest.approx(median[peer] / median["ebm_fast"])
        assert row["ceiling"] == pytest.approx(
            median["plain"] / (median["passes"] + median["optimizer"])
        )
    with pytest.raises(SystemExit):
        bench["main"](["--cases", "nope"])
