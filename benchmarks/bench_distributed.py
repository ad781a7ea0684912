"""Data-parallel training: 1 process x T threads against T processes x 1 thread (torch.distributed,
gloo on the CPU), or 1 GPU against N GPUs (NCCL) with --device cuda.

Each layout trains the same global batch with Trainer + PersistentML (sharded replay buffer,
energy in DDP) and reports the median seconds per iteration (wall and the process's CPU time),
iterations/s, chain-steps/s (global batch x K sampler steps per second) and the fraction of an
iteration spent in communication: the median time of an all-reduce of the gradient (all the
parameters, as DDP sends them) over the median iteration time. Cases: an MLP 2-128-128-1 on
2-D points (B=256, K=20, the ring target's size) and an MLP 784-256-256-1 on 784-dim points
(B=128, K=20, MNIST-sized; random data: speed does not depend on it). Writes
benchmarks/results/distributed.json. Usage:
    python benchmarks/bench_distributed.py [--iterations N] [--processes T] [--cases ring,mlp784]
                                           [--device cpu|cuda] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ebm_fast import LangevinSampler
from ebm_fast.training import PersistentML, Trainer, distributed

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"
CASES = {
    "ring": dict(dim=2, hidden=128, batch=256, steps=20),
    "mlp784": dict(dim=784, hidden=256, batch=128, steps=20),
}
WARMUP = 3


def _mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, 1),
    )


def _time_case(case: dict, iterations: int, device: torch.device) -> dict:
    """Median wall and CPU seconds of one training iteration, and of one gradient all-reduce,
    on this rank (the group's, when one runs)."""
    torch.manual_seed(0)
    energy = distributed.wrap(_mlp(case["dim"], case["hidden"]).to(device))
    sampler = LangevinSampler(
        energy, step_size=0.01, noise_scale=0.1, n_steps=case["steps"], seed=1, check_finite=False
    )
    buffer = distributed.shard_buffer(
        10240, (case["dim"],), device=device, seed=2, check_values=False
    )
    trainer = Trainer(
        energy,
        PersistentML(sampler, buffer, alpha=0.01),
        torch.optim.Adam(energy.parameters(), lr=1e-3),
        progress=False,
        data_seed=3,
        log_every=10**9,
    )
    rank, world_size = distributed.world()
    x = torch.randn(case["batch"], case["dim"], device=device)
    x_local, _ = distributed.local_batch(x, None, rank, world_size)
    wall, cpu = [], []
    for i in range(WARMUP + iterations):
        distributed.barrier()
        start, start_cpu = time.perf_counter(), time.process_time()
        trainer.step(x_local)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= WARMUP:
            wall.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    gradient = torch.zeros(sum(p.numel() for p in trainer.parameters), device=device)
    reduce = []
    for _ in range(WARMUP + iterations if world_size > 1 else 0):
        start = time.perf_counter()
        dist.all_reduce(gradient)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reduce.append(time.perf_counter() - start)
    return {
        "wall": statistics.median(wall),
        "cpu": statistics.median(cpu),
        "all_reduce": statistics.median(reduce[WARMUP:]) if reduce else 0.0,
        "gradient_bytes": gradient.numel() * gradient.element_size(),
    }


def _rank_main(rank: int, world_size: int, port: int, args, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1 if args.device == "cpu" else torch.get_num_threads())
    me = distributed.init("gloo" if args.device == "cpu" else "nccl")
    timings = {name: _time_case(CASES[name], args.iterations, me.device) for name in args.cases}
    if rank == 0:
        torch.save(timings, out)
    dist.destroy_process_group()


def _processes(world_size: int, args) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/timings.pt"
        mp.start_processes(
            _rank_main, args=(world_size, port, args, out), nprocs=world_size, start_method="spawn"
        )
        return torch.load(out)


def _single(args) -> dict:
    torch.set_num_threads(args.processes if args.device == "cpu" else torch.get_num_threads())
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    return {name: _time_case(CASES[name], args.iterations, device) for name in args.cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument(
        "--processes",
        type=int,
        default=None,
        help="processes (CPU: against 1 process with this many threads; "
        "default 2) or GPUs (default: all)",
    )
    parser.add_argument(
        "--cases",
        default=",".join(CASES),
        type=lambda text: (
            [c for c in text.split(",") if c in CASES]
            or parser.error(f"--cases: choose among {', '.join(CASES)}")
        ),
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.processes is None:
        args.processes = torch.cuda.device_count() if args.device == "cuda" else 2
    layouts = {
        f"1 process x {args.processes if args.device == 'cpu' else 1} "
        f"{'threads' if args.device == 'cpu' else 'GPU'}": _single(args),
        f"{args.processes} processes x 1 {'thread' if args.device == 'cpu' else 'GPU'}": _processes(
            args.processes, args
        ),
    }
    report = {
        "machine": platform.processor() or platform.machine(),
        "device": args.device,
        "torch": torch.__version__,
        "iterations": args.iterations,
        "cases": {},
    }
    for name in args.cases:
        case = CASES[name]
        rows = {}
        for layout, timings in layouts.items():
            t = timings[name]
            rows[layout] = {
                "seconds_per_iteration": t["wall"],
                "cpu_seconds": t["cpu"],
                "iterations_per_s": 1 / t["wall"],
                "chain_steps_per_s": case["batch"] * case["steps"] / t["wall"],
                "all_reduce_seconds": t["all_reduce"],
                "communication_fraction": t["all_reduce"] / t["wall"],
                "gradient_bytes": t["gradient_bytes"],
            }
            print(
                f"{name:7s} {layout:24s} {1 / t['wall']:7.2f} it/s "
                f"{rows[layout]['chain_steps_per_s']:10.0f} chain-steps/s  "
                f"all-reduce {t['all_reduce'] * 1e3:6.2f} ms "
                f"({100 * rows[layout]['communication_fraction']:.1f}% of an iteration)"
            )
        report["cases"][name] = {**case, "layouts": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
