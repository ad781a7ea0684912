"""Replay-buffer cycle benchmark: one sample(256) + push of (3, 32, 32) chains.

Compares, in one run and as ratios to the data-movement floor (``torch.index_select`` of the
drawn slots into a preallocated batch plus ``index_copy_`` back, no randomness):

* ebm_fast ReplayBuffer, float32 and uint8 storage (write-back push; with and without the
  non-finite check, which costs one host read per push),
* eager torch indexing with torch.rand-based reinit (as JEM writes it),
* a list-of-tensors buffer (as IGEBM writes it).

Usage: python benchmarks/bench_buffer.py [--quick] [--capacities N ...] [--device cpu|cuda]
[--threads N] [--json PATH] (or ``ebm-fast bench buffer ...``). Results:
benchmarks/results/buffer.json, rewritten after each capacity (a run cut short keeps the
finished ones).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from pathlib import Path

import torch

from ebm_fast import ReplayBuffer
from ebm_fast.backends import backend_for

SAMPLE_SHAPE = (3, 32, 32)
BATCH = 256
REINIT_PROB = 0.05
RESULTS = Path(__file__).resolve().parent / "results" / "buffer.json"


class ListBuffer:
    """IGEBM-style buffer: a Python list of per-sample tensors, reinit from torch.rand."""

    def __init__(self, capacity, device):
        self.storage = list((torch.rand(capacity, *SAMPLE_SHAPE, device=device) * 2 - 1).unbind(0))

    def sample(self, batch):
        idx = [random.randrange(len(self.storage)) for _ in range(batch)]
        x = torch.stack([self.storage[i] for i in idx])
        reinit = torch.rand(batch, device=x.device) < REINIT_PROB
        noise = torch.rand_like(x) * 2 - 1
        return torch.where(reinit[:, None, None, None], noise, x), idx

    def push(self, x, idx):
        for row, i in zip(x.unbind(0), idx):
            self.storage[i] = row


class EagerBuffer:
    """JEM-style buffer: one tensor, fancy indexing, torch.rand-based reinit."""

    def __init__(self, capacity, device):
        self.storage = torch.rand(capacity, *SAMPLE_SHAPE, device=device) * 2 - 1

    def sample(self, batch):
        idx = torch.randint(0, self.storage.shape[0], (batch,), device=self.storage.device)
        stored = self.storage[idx]
        noise = torch.rand_like(stored) * 2 - 1
        choose = (torch.rand(batch, device=stored.device) < REINIT_PROB).float()
        choose = choose[:, None, None, None]
        return choose * noise + (1 - choose) * stored, idx

    def push(self, x, idx):
        self.storage[idx] = x


def make_cycles(capacity, device):
    """name -> zero-argument callable running one sample + push cycle."""
    flat = torch.rand(capacity, *SAMPLE_SHAPE, device=device) * 2 - 1
    floor_idx = torch.randint(0, capacity, (BATCH,), device=device)
    floor_out = torch.empty(BATCH, *SAMPLE_SHAPE, device=device)

    def floor():
        torch.index_select(flat, 0, floor_idx, out=floor_out)
        flat.index_copy_(0, floor_idx, floor_out)

    cycles = {"floor (index_select + index_copy_)": floor}
    for storage in ("float32", "uint8"):
        for check in (False, True):
            buffer = ReplayBuffer(
                capacity,
                SAMPLE_SHAPE,
                device=device,
                storage=storage,
                reinit_prob=REINIT_PROB,
                check_values=check,
            )
            buffer.push(torch.rand(capacity, *SAMPLE_SHAPE, device=device) * 2 - 1)  # filled

            def cycle(buffer=buffer):
                x, idx = buffer.sample(BATCH)
                buffer.push(x, idx=idx)

            name = f"ebm_fast {storage}" + (" + non-finite check" if check else "")
            cycles[name] = cycle
    for name, cls in (
        ("eager torch indexing + torch.rand reinit", EagerBuffer),
        ("list-of-tensors buffer (IGEBM)", ListBuffer),
    ):
        buffer = cls(capacity, device)

        def cycle(buffer=buffer):
            x, idx = buffer.sample(BATCH)
            buffer.push(x, idx)

        cycles[name] = cycle
    return cycles


def time_cycles(cycles, device, rounds, reps):
    """Median seconds per cycle of each callable; rounds interleave the variants so load
    changes on the machine hit them all alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in cycles.values():  # warm-up (kernel compilation, allocator)
        for _ in range(3):
            fn()
    sync()
    samples = {name: [] for name in cycles}
    for _ in range(rounds):
        for name, fn in cycles.items():
            sync()
            start = time.perf_counter()
            for _ in range(reps):
                fn()
            sync()
            samples[name].append((time.perf_counter() - start) / reps)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10k slots only, few repetitions")
    parser.add_argument(
        "--capacities",
        type=int,
        nargs="+",
        default=None,
        help="buffer slots to time (default 10000 50000; quick 10000)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    capacities = args.capacities or ((10_000,) if args.quick else (10_000, 50_000))
    if min(capacities) < BATCH:
        parser.error(f"--capacities must be at least the batch, {BATCH}")
    rounds, reps = (5, 5) if args.quick else (15, 10)
    report = {
        "device": str(device),
        "backend": backend_for(device),
        "batch": BATCH,
        "sample_shape": list(SAMPLE_SHAPE),
        "reinit_prob": REINIT_PROB,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "load_average": list(os.getloadavg()),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "results": [],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for capacity in capacities:
        times = time_cycles(make_cycles(capacity, device), device, rounds, reps)
        floor = times["floor (index_select + index_copy_)"]
        print(
            f"\n{capacity} slots, batch {BATCH} of {SAMPLE_SHAPE}, {device} "
            f"({report['backend']} backend)"
        )
        for name, seconds in times.items():
            print(f"  {name:42s} {seconds * 1e3:8.3f} ms   {seconds / floor:6.2f}x floor")
            report["results"].append(
                {
                    "capacity": capacity,
                    "variant": name,
                    "ms_per_cycle": seconds * 1e3,
                    "ratio_to_floor": seconds / floor,
                }
            )
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
