"""Sampler throughput (chain-steps per second) against the loops users write today, in one run.

Cases (issue 5): MLP 2-128-128-1 (B=8192, K=50), MLP 784-256-256-1 (B=256, K=40), a small conv
net on 3x32x32 (B=32, K=10); small energies where the per-step overhead is what counts (issue
22): a parameter-free quadratic and an MLP 2-64-64-1, each at B=4 and B=256 (K=200). Not run by
default, on 3x32x32: wrn (issue 17), JEM's WRN-10-2
(B=16, K=5); the nets of published EBM code (issue 22, ebm_fast.experiments.nets): igebm,
IGEBM's ResNet-32 (B=8, K=3); jem_wrn, JEM's WRN-16-4 (B=8, K=5); icd, ICD's conv energy (B=8,
K=5). Methods, each a whole K-step chain from the same x0:

  floor            K bare energy forward+backward passes w.r.t. x (parameters frozen), no update
  eager_loop       detach, requires_grad, autograd.grad, x - eps g + sigma randn, clamp
  compiled_loop    the same loop body under torch.compile
  graphed_loop     (CUDA) the whole K-step plain loop captured by hand in one CUDA graph and
                   replayed: the best a user can do without ebm_fast
  sampler          ebm_fast.LangevinSampler (same update, fused kernel; CUDA graph on CUDA)
  sampler_auto     LangevinSampler(autocast="auto") on the model as precision.fast_energy
                   converts it (channels-last where that helps): bf16 passes where the device
                   has native bf16; the choice and its reason are printed with the case
  sampler_compile  ebm_fast.LangevinSampler(compile=True)
  ebmkit, torchebm their Langevin samplers, when installed (benchmark-only; never a dependency)
  sampler_bf16     (--autocast bf16; sampler_fp16 for fp16) the sampler with the energy's passes
                   under torch.autocast, the chains in float32
  *_channels_last  (--channels-last, image cases) the sampler (and its autocast variant) on a
                   channels-last copy of the model and x0

"vs sampler" is the speed-up over the float32 sampler (the gain of auto, autocast,
channels-last). The machine's capability line (what the policy reads) is printed first.

Reports the median seconds of a K-step run (methods interleaved round by round),
chain-steps/s, speed-up over eager_loop and time over floor, and the same two ratios from each
method's fastest round (on a shared VM the median moves with neighbours' load; the minimum is
the least disturbed run), and the speed-up over the sampler in process CPU time (median; the
clock a loaded machine stretches least, for CPU runs with --threads 1).
Writes benchmarks/results/sampler.json, rewritten after each case (a run cut short keeps the
finished cases).  Usage:
    python benchmarks/bench_sampler.py [--quick] [--rounds N] [--cases mlp2,mlp784,conv]
                                       [--chains B] [--steps K] [--device cpu]
                                       [--no-compile] [--threads N]
                                       [--default-malloc] [--out PATH]
                                       [--autocast bf16|fp16] [--channels-last]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import ebm_fast
from ebm_fast.allocator import retain_freed_cpu_memory
from ebm_fast.backends import backend_for
from ebm_fast.experiments.nets import NETS, JEMWideResNet
from ebm_fast.precision import capability_line, fast_energy, resolve_precision

STEP_SIZE, NOISE_SCALE, CLAMP = 0.01, 0.005, (-1.0, 1.0)
RESULTS = Path(__file__).resolve().parent / "results" / "sampler.json"


def conv_net() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(32, 64, 4, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv2d(64, 64, 4, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(64 * 8 * 8, 1),
    )


class Quadratic(torch.nn.Module):
    """E(x) = |x|^2 / 2, no parameters: the tiny energy where the per-step overhead is all
    there is (issue 22: the sampler must not be slower than the plain loop here either)."""

    def forward(self, x):
        return 0.5 * (x * x).sum(1)


def mlp_64() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(2, 64),
        torch.nn.SiLU(),
        torch.nn.Linear(64, 64),
        torch.nn.SiLU(),
        torch.nn.Linear(64, 1),
    )


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}

CASES = {
    "mlp2": dict(make=NETS["mlp2"][0], shape=(2,), chains=8192, steps=50),
    "mlp784": dict(make=NETS["mlp784"][0], shape=(784,), chains=256, steps=40),
    "conv": dict(make=conv_net, shape=(3, 32, 32), chains=32, steps=10),
    "wrn": dict(
        make=lambda: JEMWideResNet(depth=10, widen=2), shape=(3, 32, 32), chains=16, steps=5
    ),
    "igebm": dict(make=NETS["igebm"][0], shape=NETS["igebm"][1], chains=8, steps=3),
    "jem_wrn": dict(make=NETS["jem_wrn"][0], shape=NETS["jem_wrn"][1], chains=8, steps=5),
    "icd": dict(make=NETS["icd"][0], shape=NETS["icd"][1], chains=8, steps=5),
    # Small energies and batches: the per-step overhead against the plain loop's.
    "quad_b4": dict(make=Quadratic, shape=(2,), chains=4, steps=200),
    "quad_b256": dict(make=Quadratic, shape=(2,), chains=256, steps=200),
    "mlp64_b4": dict(make=mlp_64, shape=(2,), chains=4, steps=200),
    "mlp64_b256": dict(make=mlp_64, shape=(2,), chains=256, steps=200),
}
DEFAULT_CASES = ("mlp2", "mlp784", "conv", "quad_b4", "quad_b256", "mlp64_b4", "mlp64_b256")


def floor_fn(model, x0, steps):
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        for p in params:
            p.requires_grad_(False)
        try:
            for _ in range(steps):
                x = x0.detach().requires_grad_(True)
                torch.autograd.grad(model(x).sum(), x)
        finally:
            for p in params:
                p.requires_grad_(True)
        return x0

    return run


def loop_step(model):
    def step(x):
        x = x.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(x).sum(), x)
        return (x - STEP_SIZE * grad + NOISE_SCALE * torch.randn_like(x)).clamp(*CLAMP).detach()

    return step


def loop_fn(step, x0, steps):
    def run():
        x = x0.clone()
        for _ in range(steps):
            x = step(x)
        return x

    return run


def graphed_loop_fn(step, x0, steps):
    """The plain loop captured in one CUDA graph, as torch's CUDA-graph recipe has a user do it:
    warm-up on a side stream, capture from a static input, copy each x0 in and replay."""
    static_x = x0.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy initialisation (cuBLAS, autograd) outside the capture
        loop_fn(step, static_x, steps)()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = loop_fn(step, static_x, steps)()

    def run():
        static_x.copy_(x0)
        graph.replay()
        return static_out

    return run


def ebmkit_fn(model, x0, steps):
    from ebm.samplers.langevin import LangevinDynamics

    sampler = LangevinDynamics(
        step_size=STEP_SIZE, steps=steps, noise_scale=NOISE_SCALE, clamp=CLAMP
    )
    return lambda: sampler.sample(lambda x: model(x).reshape(-1), x0)


def torchebm_fn(model, x0, steps):
    from torchebm.core import BaseModel
    from torchebm.samplers import LangevinDynamics

    class Energy(BaseModel):  # torchebm samples BaseModel subclasses
        def __init__(self, net):
            super().__init__(device=x0.device)
            self.net = net

        def forward(self, x):
            return self.net(x).reshape(-1)

    sampler = LangevinDynamics(
        model=Energy(model),
        step_size=STEP_SIZE,
        noise_scale=NOISE_SCALE,
        clamp=CLAMP,
        device=x0.device,
    )
    return lambda: sampler.sample(x=x0, n_steps=steps)


def sampler_fn(model, x0, steps, **options):
    sampler = ebm_fast.LangevinSampler(
        model, step_size=STEP_SIZE, noise_scale=NOISE_SCALE, clamp=CLAMP, n_steps=steps, **options
    )
    return lambda: sampler.sample(x0)


def channels_last_fn(model, x0, steps, **options):
    """The sampler on a channels-last copy of the model and x0 (the shared model keeps its
    layout for the other methods)."""
    return sampler_fn(
        copy.deepcopy(model).to(memory_format=torch.channels_last),
        x0.contiguous(memory_format=torch.channels_last),
        steps,
        **options,
    )


def under_auto(model, x0):
    """(a copy of the model in the layout precision "auto" picks, the choice): the sampler
    then runs with autocast="auto", which resolves the same dtype itself."""
    choice = resolve_precision("auto", x0.device, x0.dtype, state_dim=x0.dim(), energy=model)
    model, choice = fast_energy(copy.deepcopy(model), choice, x0[:2])
    return model, choice


def methods(
    model,
    x0,
    steps,
    compile_too: bool,
    auto,
    autocast: str | None = None,
    channels_last: bool = False,
) -> dict:
    auto_model, _ = auto
    found = {
        "floor": lambda: floor_fn(model, x0, steps),
        "eager_loop": lambda: loop_fn(loop_step(model), x0, steps),
        "sampler": lambda: sampler_fn(model, x0, steps),
        "sampler_auto": lambda: sampler_fn(auto_model, x0, steps, autocast="auto"),
    }
    if autocast is not None:
        found[f"sampler_{autocast}"] = lambda: sampler_fn(
            model, x0, steps, autocast=AUTOCAST[autocast]
        )
    if channels_last and x0.dim() == 4:
        found["sampler_channels_last"] = lambda: channels_last_fn(model, x0, steps)
        if autocast is not None:
            found[f"sampler_{autocast}_channels_last"] = lambda: channels_last_fn(
                model, x0, steps, autocast=AUTOCAST[autocast]
            )
    if x0.device.type == "cuda":
        found["graphed_loop"] = lambda: graphed_loop_fn(loop_step(model), x0, steps)
    if compile_too:
        found["compiled_loop"] = lambda: loop_fn(torch.compile(loop_step(model)), x0, steps)
        found["sampler_compile"] = lambda: sampler_fn(model, x0, steps, compile=True)
    found["ebmkit"] = lambda: ebmkit_fn(model, x0, steps)
    found["torchebm"] = lambda: torchebm_fn(model, x0, steps)
    return found


def bench_case(
    name: str,
    case: dict,
    device,
    reps: int,
    compile_too: bool,
    autocast: str | None = None,
    channels_last: bool = False,
) -> dict:
    """Every method once for warm-up (compilation, capture, caches), then `reps` rounds in which
    every method runs once in turn, so load changes on a shared machine hit all methods alike."""
    torch.manual_seed(0)
    model = case["make"]().to(device)
    x0 = torch.rand(case["chains"], *case["shape"], device=device) * 2 - 1
    steps = case["steps"]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    auto = under_auto(model, x0)
    runners, skipped = {}, {}
    for method, make in methods(
        model, x0, steps, compile_too, auto, autocast, channels_last
    ).items():
        try:
            run = make()
            run()
            sync()
        except ImportError as exc:
            skipped[method] = f"not installed ({exc})"
            continue
        except Exception as exc:  # a peer whose API does not fit: report, do not fail the run
            skipped[method] = f"{type(exc).__name__}: {exc}"
            continue
        runners[method] = run
    times = {method: [] for method in runners}
    cpu_times = {method: [] for method in runners}
    for _ in range(reps):
        for method, run in runners.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            sync()
            times[method].append(time.perf_counter() - start)
            cpu_times[method].append(time.process_time() - cpu_start)
    rows = {}
    for method, samples in times.items():
        seconds = statistics.median(samples)
        rows[method] = {
            "seconds": seconds,
            "min_seconds": min(samples),
            "chain_steps_per_s": case["chains"] * steps / seconds,
            "cpu_seconds": statistics.median(cpu_times[method]),
        }
    for row in rows.values():
        row["speedup_vs_eager_loop"] = rows["eager_loop"]["seconds"] / row["seconds"]
        row["time_over_floor"] = row["seconds"] / rows["floor"]["seconds"]
        row["min_speedup_vs_eager_loop"] = rows["eager_loop"]["min_seconds"] / row["min_seconds"]
        row["min_time_over_floor"] = row["min_seconds"] / rows["floor"]["min_seconds"]
        row["speedup_vs_sampler"] = rows["sampler"]["seconds"] / row["seconds"]
        row["min_speedup_vs_sampler"] = rows["sampler"]["min_seconds"] / row["min_seconds"]
        row["cpu_speedup_vs_sampler"] = rows["sampler"]["cpu_seconds"] / row["cpu_seconds"]
    return {
        "case": name,
        "chains": case["chains"],
        "steps": steps,
        "shape": list(case["shape"]),
        "auto": auto[1].to_dict(),
        "methods": rows,
        "skipped": skipped,
    }


def print_case(case: dict) -> None:
    print(f"\n{case['case']}: B={case['chains']} K={case['steps']} shape={case['shape']}")
    print(f"  auto: {case['auto']['reason']}")
    print(
        f"  {'method':27s} {'ms/run':>10s} {'chain-steps/s':>14s} {'vs eager':>9s} "
        f"{'/ floor':>8s} {'vs sampler':>11s} | fastest rounds: {'ms':>8s} {'vs eager':>9s} "
        f"{'/ floor':>8s} {'vs sampler':>11s} | CPU time: vs sampler"
    )
    for method, row in case["methods"].items():
        print(
            f"  {method:27s} {row['seconds'] * 1e3:10.2f} {row['chain_steps_per_s']:14.0f} "
            f"{row['speedup_vs_eager_loop']:8.2f}x {row['time_over_floor']:7.2f}x "
            f"{row['speedup_vs_sampler']:10.2f}x | {'':16s}{row['min_seconds'] * 1e3:8.2f} "
            f"{row['min_speedup_vs_eager_loop']:8.2f}x {row['min_time_over_floor']:7.2f}x "
            f"{row['min_speedup_vs_sampler']:10.2f}x | {row['cpu_speedup_vs_sampler']:9.2f}x"
        )
    for method, reason in case["skipped"].items():
        print(f"  {method:27s} skipped: {reason}")
    sys.stdout.flush()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 timed rounds")
    parser.add_argument(
        "--rounds",
        type=int,
        default=11,
        help="timed rounds, every method once per round (default 11)",
    )
    parser.add_argument(
        "--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated, of {','.join(CASES)}"
    )
    parser.add_argument(
        "--autocast",
        choices=tuple(AUTOCAST),
        help="also time the sampler with the energy's passes in this precision",
    )
    parser.add_argument(
        "--channels-last",
        action="store_true",
        help="also time the sampler on channels-last copies (image cases)",
    )
    parser.add_argument(
        "--chains",
        type=int,
        default=None,
        help="chains B for every case instead of the case's own (smoke runs)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="steps K for every case instead of the case's own (smoke runs)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (1 avoids OpenMP spin-waits on a loaded machine)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's allocator as it is (by default freed memory is kept "
        "for reuse, for every method alike: see ebm_fast.allocator)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    malloc = "default" if args.default_malloc or not retain_freed_cpu_memory() else "retain"
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    for option in ("rounds", "chains", "steps"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            parser.error(f"--{option} must be >= 1")
    reps = 2 if args.quick else args.rounds
    names = [n for n in args.cases.split(",") if n]
    unknown = set(names) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {sorted(CASES)}")
    load_before = os.getloadavg()
    results = []
    report = {
        "benchmark": "sampler",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "update_backend": backend_for(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "reps": reps,
        "malloc": malloc,
        "autocast": args.autocast,
        "channels_last": args.channels_last,
        "capability": capability_line(device),
        "load_average_before": load_before,
        "cases": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(report["capability"])
    for name in names:
        case = dict(CASES[name])
        case.update(
            {
                key: getattr(args, key)
                for key in ("chains", "steps")
                if getattr(args, key) is not None
            }
        )
        results.append(
            bench_case(
                name, case, device, reps, not args.no_compile, args.autocast, args.channels_last
            )
        )
        report["load_average_after"] = os.getloadavg()
        args.out.write_text(json.dumps(report, indent=2))
        print_case(results[-1])
    print(
        f"\nmalloc: {malloc}; load average before/after: {load_before} / "
        f"{report['load_average_after']}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
