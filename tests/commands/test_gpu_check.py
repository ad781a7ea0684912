"""The GPU check (ebm_fast/commands/gpu_check.py, scripts/gpu_check.sh): its dry run walks every
step on the CPU and leaves the files, table and JSON fields a GPU run leaves; a hung step is
killed and the steps after it still run; the targets are judged from the benchmarks' own
figures."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ebm_fast.commands import gpu_check

REPO = Path(__file__).resolve().parents[2]
STEPS = [
    "info",
    "kernels",
    "suite",
    "graphs_syncs",
    "bench_update",
    "bench_buffer",
    "bench_sampler",
    "demo",
]
OUT_FILES = {
    "steps.log",
    "summary.json",
    "update.json",
    "buffer.json",
    "sampler.json",
    "demo.json",
    "demo.png",
}


def test_dry_run_walks_every_step_and_reports(tmp_path):
    out = tmp_path / "out"
    # About a minute on an idle 2-core machine; the budget that bounds a GPU slot is raised so
    # that a loaded machine (or a C++ kernel build in the first step) does not time steps out.
    # OUT_DIR is given relative to the caller's directory, not the checkout.
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "out", "--dry-run", "--budget", "1500"],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=tmp_path,
    )
    summary = json.loads((out / "summary.json").read_text())
    failed = {r["step"]: r.get("log_tail") for r in summary["steps"] if r["result"] != "pass"}
    assert done.returncode == 0 and not failed, (done.stdout[-3000:], failed)
    # Few files, none nested: the device tool brings back at most 8, 2 folders down.
    assert {p.name for p in out.iterdir()} == OUT_FILES
    assert summary["finished"] and summary["passed"] and summary["dry_run"]
    assert [r["step"] for r in summary["steps"]] == STEPS
    for row in summary["steps"]:
        assert row["figure"] and row["seconds"] >= 0 and row["commands"]
    by_step = {r["step"]: r for r in summary["steps"]}
    assert "14 passed" in by_step["kernels"]["figure"]  # the kernels ran, interpreted
    assert "6 skipped" in by_step["graphs_syncs"]["figure"]  # CUDA only
    statuses = {t["target"]: t["status"] for t in summary["targets"]}
    assert len(statuses) == 8 and set(statuses.values()) <= {"met", "not met", "not measured"}
    assert statuses["update at 2^26 fp32: >= 85% of copy bandwidth"] == "not measured"
    assert all(status == "not measured" for name, status in statuses.items() if "graph" in name)
    # The closing table: one row per step, in stdout and at the end of steps.log.
    table = summary["table"].splitlines()
    assert [line.split()[:2] for line in table[2:]] == [[step, "pass"] for step in STEPS]
    assert summary["table"] in done.stdout
    assert (out / "steps.log").read_text().rstrip().endswith(table[-1])
    for name in ("update", "buffer", "sampler", "demo"):
        json.loads((out / f"{name}.json").read_text())


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_hung_step_is_killed_and_the_next_steps_run(tmp_path, monkeypatch, capsys):
    """Budget 60 s over shares 1 : 1 : 58 : 0.1: the first step hangs and is killed after its
    1 s; a failing command ends its step; a step must write its outputs; every step runs."""

    def plan(out_dir, dry_run):
        def figure(log, out):
            return log.split("$", 1)[1].splitlines()[1], []

        return [
            gpu_check.Step(
                "hangs",
                [_python("print('started', flush=True); import time; time.sleep(600)")],
                1,
                figure,
            ),
            gpu_check.Step(
                "fails",
                [_python("print('bad'); raise SystemExit(3)"), _python("print('never run')")],
                1,
                figure,
            ),
            gpu_check.Step(
                "writes",
                [_python(f"open({str(out_dir / 'x.json')!r}, 'w'); print('wrote')")],
                58,
                figure,
                outputs=("x.json",),
            ),
            gpu_check.Step(
                "misses", [_python("print('no file')")], 0.1, figure, outputs=("y.json",)
            ),
        ]

    monkeypatch.setattr(gpu_check, "plan", plan)
    summary = gpu_check.check(tmp_path, dry_run=True, budget_s=60)
    results = {r["step"]: (r["result"], r["figure"]) for r in summary["steps"]}
    assert results == {
        "hangs": ("timeout", "started"),
        "fails": ("fail (exit 3)", "bad"),
        "writes": ("pass", "wrote"),
        "misses": ("fail (no y.json)", "no file"),
    }
    assert summary["steps"][0]["seconds"] < 10 and not summary["passed"]
    assert "never run" not in (tmp_path / "steps.log").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["finished"]


def _write(path: Path, report: dict) -> None:
    path.write_text(json.dumps(report))


def test_update_target_is_the_op_bandwidth_over_the_copy_bandwidth_at_2_to_the_26(tmp_path):
    # 12 bytes per element in 1.0 ms against the faster copy's 8 bytes in 0.6 ms: 90%.
    rows = [
        {"numel": 1 << 20, "median_ms": {"op": 1.0, "clone": 0.1, "copy": 0.1}},
        {"numel": 1 << 26, "median_ms": {"op": 1.0, "clone": 0.7, "copy": 0.6}},
    ]
    _write(tmp_path / "update.json", {"results": rows})
    figure, (row,) = gpu_check.evaluate_update("", tmp_path)
    assert row["value"] == pytest.approx(0.9) and row["status"] == "met"
    assert row["margin"] == pytest.approx(0.9 / 0.85 - 1)
    assert "90% of copy bandwidth at 67,108,864" in figure
    _write(tmp_path / "update.json", {"results": rows[:1]})
    assert gpu_check.evaluate_update("", tmp_path)[1][0]["status"] == "not measured"


def test_buffer_target_takes_the_worst_capacity(tmp_path):
    rows = [
        {"capacity": c, "variant": v, "ratio_to_floor": r}
        for c, v, r in [
            (10_000, "ebm_fast float32", 1.2),
            (10_000, "ebm_fast uint8", 1.0),
            (100_000, "ebm_fast float32", 1.56),
            (100_000, "ebm_fast uint8", 1.1),
        ]
    ]
    _write(tmp_path / "buffer.json", {"results": rows})
    _, (row,) = gpu_check.evaluate_buffer("", tmp_path)
    assert (row["value"], row["status"]) == (1.56, "not met")
    assert row["margin"] == pytest.approx(1.3 / 1.56 - 1)  # 17% over the allowed time


def test_sampler_targets_per_case(tmp_path):
    def case(name, eager, graphed, sampler):
        return {
            "case": name,
            "methods": {
                "eager_loop": {"seconds": eager},
                "graphed_loop": {"seconds": graphed},
                "sampler": {"seconds": sampler},
            },
        }

    _write(
        tmp_path / "sampler.json",
        {
            "cases": [
                case("mlp2", 6.0, 1.2, 1.0),
                case("mlp784", 4.0, 1.5, 1.0),
                case("conv", 1.0, 0.9, 1.0),
            ]
        },
    )
    figure, targets = gpu_check.evaluate_sampler("", tmp_path)
    status = [(t["target"].split(":")[0], t["value"], t["status"]) for t in targets]
    assert status == [
        ("sampler mlp2", 6.0, "met"),
        ("sampler mlp2", 1.2, "not met"),
        ("sampler mlp784", 4.0, "not met"),
        ("sampler mlp784", 1.5, "met"),
        ("sampler conv", 1.0, "met"),
        ("sampler conv", 0.9, "not met"),
    ]
    assert figure.endswith("targets met 3/6 measured of 6")


def test_pytest_figure_counts_and_names_failures():
    log = (
        "$ python -m pytest -v\ntests/test_x.py::test_a FAILED [ 20%]\n"
        "tests/test_x.py::test_b[1-2] PASSED [ 40%]\n"
        "[gw1] [ 60%] ERROR tests/test_y.py::test_c\n"
        "FAILED tests/test_x.py::test_a - AssertionError: 1 == 2\n"
        "==== 1 failed, 3 passed, 1 skipped, 2 deselected, 1 error in 4.20s ====\n"
        "===== suite: fail =====\n"
    )
    figure, _ = gpu_check.evaluate_pytest(log, Path("."))
    assert figure == (
        "1 failed, 3 passed, 1 skipped, 2 deselected, 1 error; first failures: "
        "tests/test_x.py::test_a, tests/test_y.py::test_c"
    )
    killed = "tests/test_x.py::test_a PASSED [ 1%]\ntests/test_x.py::test_b FAILED [ 2%]\n"
    assert gpu_check.evaluate_pytest(killed, Path("."))[0] == (
        "no pytest summary; first failures: tests/test_x.py::test_b"
    )
