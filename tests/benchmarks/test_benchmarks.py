"""The benchmark scripts run as a user runs them (short settings) and report what they claim:
every method timed, ratios consistent with the times. Figures themselves are not asserted
(they depend on the machine); benchmarks/RESULTS.md holds the measured ones."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def _run(script: str, *args: str) -> None:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the scripts time the C++ backend on CPU tensors
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _positive(value) -> bool:
    return isinstance(value, float) and math.isfinite(value) and value > 0


def test_bench_update_times_the_op_against_eager_and_copies(tmp_path):
    out = tmp_path / "update.json"
    _run(
        "bench_update.py",
        "--quick",
        "--no-compile",
        "--sizes",
        "64K",
        "--repeats",
        "2",
        "--json",
        str(out),
    )
    (row,) = json.loads(out.read_text())["results"]
    assert row["numel"] == 65536
    times = row["median_ms"]
    assert {"op", "eager", "clone", "copy"} <= times.keys()
    assert all(_positive(t) for t in times.values())
    assert row["ratios"]["eager/op"] == pytest.approx(times["eager"] / times["op"])


def test_bench_buffer_reports_each_variant_over_the_floor(tmp_path):
    out = tmp_path / "buffer.json"
    _run("bench_buffer.py", "--quick", "--capacities", "300", "1000", "--json", str(out))
    rows = json.loads(out.read_text())["results"]
    assert sorted({r["capacity"] for r in rows}) == [300, 1000]
    for capacity in (300, 1000):
        at = [r for r in rows if r["capacity"] == capacity]
        floor = [r for r in at if r["variant"].startswith("floor")]
        assert len(floor) == 1 and floor[0]["ratio_to_floor"] == 1.0
        assert len(at) >= 5 and all(_positive(r["ms_per_cycle"]) for r in at)
        for row in at:
            assert row["ratio_to_floor"] == pytest.approx(
                row["ms_per_cycle"] / floor[0]["ms_per_cycle"]
            )


def test_bench_sampler_times_the_sampler_against_the_loop_and_the_floor(tmp_path):
    out = tmp_path / "sampler.json"
    _run(
        "bench_sampler.py",
        "--quick",
        "--no-compile",
        "--cases",
        "conv",
        "--chains",
        "4",
        "--steps",
        "3",
        "--out",
        str(out),
    )
    (case,) = json.loads(out.read_text())["cases"]
    assert (case["chains"], case["steps"]) == (4, 3)
    methods = case["methods"]
    assert {"floor", "eager_loop", "sampler"} <= methods.keys()
    # Peers are timed when installed, else reported as skipped; never silently missing.
    assert {"ebmkit", "torchebm"} <= methods.keys() | case["skipped"].keys()
    for row in methods.values():
        assert _positive(row["seconds"]) and row["min_seconds"] <= row["seconds"]
        assert row["speedup_vs_eager_loop"] == pytest.approx(
            methods["eager_loop"]["seconds"] / row["seconds"]
        )
        assert row["time_over_floor"] == pytest.approx(row["seconds"] / methods["floor"]["seconds"])
