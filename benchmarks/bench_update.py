"""Langevin update benchmark: x <- clamp(x - eps * grad + sigma * xi, -1, 1), float32.

Per size, in one run with interleaved repeats (median of the repeats):

* ``op``: ebm_fast.langevin_update in place (out=x), auto backend,
* ``eager``: the plain torch expression ``(x - eps*g + sigma*torch.randn_like(x)).clamp(-1, 1)``,
* ``compiled``: the same expression under torch.compile,
* ``clone``: ``x.clone()``, the memory-bandwidth yardstick (8 bytes per element moved; the
  update moves 12: read x and grad, write x),
* ``copy``: ``y.copy_(x)`` into a preallocated tensor: the same traffic without the allocation
  (clone pays page faults on a fresh buffer at large sizes; the in-place op never does).

Ratios: op/clone and op/copy (the floor is 1.5 for a memory-bound update), eager/op and
compiled/op (speed-up of the op). On CUDA also the op's GB/s at 12 bytes per element and its
fraction of the copy's.

Usage: python benchmarks/bench_update.py [--quick] [--sizes 64K 1M ...] [--repeats N]
[--device cpu|cuda] [--threads N] [--no-compile] [--json PATH] (or ``ebm-fast bench update ...``).
Results: benchmarks/results/update.json, rewritten after each size (a run cut short keeps the
finished sizes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import ebm_fast
from ebm_fast.backends import backend_for

RESULTS = Path(__file__).resolve().parent / "results" / "update.json"
DEFAULT_SIZES = ["64K", "1M", "4M", "20M"]
QUICK_SIZES = ["64K", "1M"]
STEP_SIZE, NOISE_SCALE, CLAMP = 0.01, 0.005, (-1.0, 1.0)
BYTES_PER_ELEMENT = {"op": 12, "clone": 8, "copy": 8}
MIN_SAMPLE_SECONDS = 2e-3  # calls per timed sample: enough to dwarf the timer's resolution


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def eager_update(x, g):
    return (x - STEP_SIZE * g + NOISE_SCALE * torch.randn_like(x)).clamp(*CLAMP)


def make_cases(numel: int, chains: int, device: torch.device, compiled_update):
    per_chain = max(1, numel // chains)
    x = torch.rand(chains, per_chain, device=device) * 2 - 1
    g = torch.randn_like(x)
    counter = {"step": 0}

    def op():
        counter["step"] += 1
        ebm_fast.langevin_update(
            x, g, STEP_SIZE, NOISE_SCALE, seed=1234, step=counter["step"], clamp=CLAMP, out=x
        )

    copy_target = torch.empty_like(x)
    cases = {
        "op": op,
        "eager": lambda: eager_update(x, g),
        "clone": lambda: x.clone(),
        "copy": lambda: copy_target.copy_(x),
    }
    if compiled_update is not None:
        cases["compiled"] = lambda: compiled_update(x, g)
    return x.numel(), cases


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, calls: int, device: torch.device) -> float:
    """Seconds per call, over `calls` back-to-back calls."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def bench_size(numel, chains, device, repeats, compiled_update) -> dict:
    numel, cases = make_cases(numel, chains, device, compiled_update)
    calls = {}
    for name, fn in cases.items():  # warm-up (compiles), then calibrate calls per sample
        fn()
        calls[name] = max(1, int(MIN_SAMPLE_SECONDS / max(time_calls(fn, 1, device), 1e-9)))
    samples = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved: load changes hit every variant alike
        for name, fn in cases.items():
            samples[name].append(time_calls(fn, calls[name], device))
    median = {name: statistics.median(values) for name, values in samples.items()}
    result = {
        "numel": numel,
        "chains": chains,
        "median_ms": {name: 1e3 * t for name, t in median.items()},
        "min_ms": {name: 1e3 * min(values) for name, values in samples.items()},
        "ratios": {
            "op/clone": median["op"] / median["clone"],
            "op/copy": median["op"] / median["copy"],
            "eager/op": median["eager"] / median["op"],
        },
    }
    if "compiled" in median:
        result["ratios"]["compiled/op"] = median["compiled"] / median["op"]
    # The same ratios from each variant's fastest sample: less sensitive to other processes.
    fastest = {name: min(values) for name, values in samples.items()}
    result["ratios_of_min"] = {
        key: fastest[a] / fastest[b]
        for key, (a, b) in {
            "op/clone": ("op", "clone"),
            "op/copy": ("op", "copy"),
            "eager/op": ("eager", "op"),
            "compiled/op": ("compiled", "op"),
        }.items()
        if a in fastest
    }
    if device.type == "cuda":
        gbps = {
            name: BYTES_PER_ELEMENT[name] * numel / median[name] / 1e9 for name in BYTES_PER_ELEMENT
        }
        result["gb_per_s"] = gbps
        copy_bandwidth = max(gbps["clone"], gbps["copy"])  # the better of the two yardsticks
        result["ratios"]["op bandwidth/copy bandwidth"] = gbps["op"] / copy_bandwidth
    return result


def format_table(results: list[dict], device: torch.device) -> str:
    names = ["op", "eager", "compiled", "clone", "copy"]
    ratio_keys = ["op/clone", "op/copy", "eager/op", "compiled/op"]
    header = ["elements"] + [f"{n} ms" for n in names] + ratio_keys
    if device.type == "cuda":
        header += ["op GB/s", "op/copy BW"]
    rows = [header]
    for r in results:
        ms, ratios = r["median_ms"], r["ratios"]
        row = [f"{r['numel']:,}"] + [f"{ms[n]:.3f}" if n in ms else "-" for n in names]
        row += [f"{ratios[k]:.2f}" if k in ratios else "-" for k in ratio_keys]
        if device.type == "cuda":
            row += [f"{r['gb_per_s']['op']:.0f}", f"{ratios['op bandwidth/copy bandwidth']:.0%}"]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "| " + " | ".join(cell.rjust(w) for cell, w in zip(row, widths)) + " |" for row in rows
    ]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "backend": backend_for(device),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        help=f"element counts, e.g. 64K 1M (default: {' '.join(DEFAULT_SIZES)})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="interleaved timed samples per variant (default 11, quick 5)",
    )
    parser.add_argument("--chains", type=int, default=128, help="leading chain axis (default 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    parser.add_argument(
        "--quick", action="store_true", help=f"short run: sizes {' '.join(QUICK_SIZES)}, 5 repeats"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"output (default {RESULTS})")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [parse_size(s) for s in (args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))]
    repeats = args.repeats or (5 if args.quick else 11)
    compiled_update = None if args.no_compile else torch.compile(eager_update, dynamic=False)

    info = machine_info(device)
    print(
        f"langevin_update benchmark on {info['processor']} ({device}, backend "
        f"{info['backend']}, {info['torch_threads']} threads), {repeats} interleaved repeats",
        flush=True,
    )
    results = []
    report = {
        "benchmark": "update",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": info,
        "settings": {
            "dtype": "float32",
            "step_size": STEP_SIZE,
            "noise_scale": NOISE_SCALE,
            "clamp": CLAMP,
            "repeats": repeats,
            "chains": args.chains,
        },
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    for numel in sizes:
        results.append(bench_size(numel, args.chains, device, repeats, compiled_update))
        r = results[-1]
        print(
            f"  {r['numel']:>11,} elements: "
            + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()),
            flush=True,
        )
        info["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(format_table(results, device))
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
