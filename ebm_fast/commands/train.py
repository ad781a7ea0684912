"""Train an EBM on a bundled data set: checkpoints, metrics.jsonl, PNGs, exact KL/NLL in 2-D.

ebm-fast train --data ring --loss persistent --energy mlp --out runs/ring writes into runs/ring:
config.json (the options), checkpoint.pt (every --checkpoint-every iterations and at the end),
metrics.jsonl (every --log-every iterations) and a PNG every --plot-every iterations: for 2-D
data the data, the learned density and the negatives, with the exact KL(data || model) (data
sets with an analytic density) and the exact held-out NLL (partition function summed on a
grid); for images a grid of negatives. --loss jem trains a classifier of the labelled images as
JEM (the energy -logsumexp of its logits) on four fifths of them and reports the test accuracy
and expected calibration error on the rest (test_metrics.json). ebm-fast train --resume
runs/ring continues that run (to --iterations, if given, else to its own). --nproc N trains on N
processes (torchrun, one per GPU with --device cuda; docs/distributed.md): the --batch and
--buffer-size are global, split over the processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from ebm_fast import LangevinSampler, datasets, validation
from ebm_fast.exact2d import BOX, exact_kl, exact_nll
from ebm_fast.experiments.models import build_energy
from ebm_fast.training import checkpoints, distributed, plots
from ebm_fast.training.jem import JEM, LogitsEnergy, classifier_metrics
from ebm_fast.training.losses import (ContrastiveDivergence, KLPersistentML, PersistentCD,
                                      PersistentML, ShortRunML)
from ebm_fast.training.trainer import CHECKPOINT_NAME, Trainer

__all__ = ["add_arguments", "main"]

LOSSES = ("cd", "pcd", "persistent", "short_run", "kl", "jem")
ENERGIES = ("mlp", "conv")
#: --autocast choices -> the samplers' (and losses') autocast dtype
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
CONFIG_NAME = "config.json"
HELD_OUT = 5000
GRID_CELLS = 200

count = validation.argparse_type(validation.integer, low=1)
positive_real = validation.argparse_type(validation.real, low=0.0, low_open=True)
non_negative_real = validation.argparse_type(validation.real, low=0.0)
probability = validation.argparse_type(validation.real, low=0.0, high=1.0)
ema_decay = validation.argparse_type(validation.real, low=0.0, high=1.0, low_open=True,
                                     high_open=True)
seed = validation.argparse_type(validation.integer, low=0, high=2 ** 63)


def add_arguments(parser) -> None:
    parser.add_argument("--data", choices=(*datasets.TOY_2D, *datasets.IMAGES), default="ring")
    parser.add_argument("--loss", choices=LOSSES, default="persistent",
                        help="cd: CD-k from the data (k = --steps); pcd: persistent CD; "
                             "persistent: replay-buffer ML (IGEBM/JEM); short_run: fresh noise "
                             "chains; kl: persistent ML with Du et al. (2021)'s KL and entropy; "
                             "jem: JEM's p(x) + p(y|x) loss on a classifier (labelled images)")
    parser.add_argument("--energy", choices=ENERGIES, default="mlp",
                        help="conv needs an image data set")
    parser.add_argument("--out", type=Path, help="output directory (new, or holding no run)")
    parser.add_argument("--resume", type=Path, help="continue the run in this directory")
    parser.add_argument("--iterations", type=count, help="total iterations (default 3000)")
    parser.add_argument("--batch", type=count, default=256)
    parser.add_argument("--steps", type=count, default=20, help="Langevin steps per iteration")
    parser.add_argument("--step-size", type=positive_real, default=0.01)
    parser.add_argument("--noise-scale", type=non_negative_real, default=0.1414)
    parser.add_argument("--alpha", type=non_negative_real, default=0.01,
                        help="weight of the energy-magnitude regulariser")
    parser.add_argument("--autocast", choices=tuple(AUTOCAST), default="none",
                        help="run the energy's passes (sampler and loss) in this precision; the "
                             "chains, their noise and updates stay float32 (docs/samplers.md: "
                             "bf16 pays off where the hardware has bf16 units)")
    parser.add_argument("--lr", type=positive_real, default=1e-3)
    parser.add_argument("--buffer-size", type=count, default=10000)
    parser.add_argument("--reinit-prob", type=probability, default=0.05)
    parser.add_argument("--hidden", type=count, default=128, help="width of the MLP energy")
    parser.add_argument("--ema", type=ema_decay, help="EMA decay of the weights (off if unset)")
    parser.add_argument("--grad-clip", type=positive_real, help="max parameter-gradient norm")
    parser.add_argument("--n-data", type=count, default=20000, help="2-D training points")
    parser.add_argument("--value-range", choices=("-1,1", "0,1"), default="-1,1",
                        help="pixel range of image data")
    parser.add_argument("--log-every", type=count, default=100)
    parser.add_argument("--checkpoint-every", type=count, default=500)
    parser.add_argument("--plot-every", type=count, default=500,
                        help="PNG every this many iterations (at log iterations)")
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--nproc", type=count, default=1,
                        help="processes to train on (launched with torchrun; gloo on the CPU, "
                             "NCCL and one GPU each with --device cuda)")


def _usage_error(message: str) -> int:
    print(f"ebm-fast train: error: {message}", file=sys.stderr)
    return 2


def _load_data(args):
    """(training data, held-out 2-D data or None, the data set's exact log density or None,
    the chains' box (lo, hi)); for --loss jem the training data is an (images, labels) pair."""
    if args.data in datasets.TOY_2D:
        toy = datasets.TOY_2D[args.data]
        generator = torch.Generator().manual_seed(args.seed)
        return (toy.sample(args.n_data, generator), toy.sample(HELD_OUT, generator),
                toy.log_density, (-BOX, BOX))
    value_range = tuple(float(v) for v in args.value_range.split(","))
    x, y = datasets.IMAGES[args.data](value_range=value_range)
    return ((x, y) if args.loss == "jem" else x), None, None, value_range


def _build_loss(args, energy, sample_shape, box):
    sampler = LangevinSampler(energy, step_size=args.step_size, noise_scale=args.noise_scale,
                              n_steps=args.steps, clamp=box, seed=args.seed + 1,
                              autocast=AUTOCAST[args.autocast])

    def noise(n: int) -> torch.Tensor:  # the global generator: the Trainer saves its state
        return box[0] + (box[1] - box[0]) * torch.rand(n, *sample_shape, device=args.device)

    if args.loss == "cd":
        return ContrastiveDivergence(sampler, k=args.steps, alpha=args.alpha)
    if args.loss == "pcd":
        return PersistentCD(sampler, alpha=args.alpha)
    if args.loss == "short_run":
        return ShortRunML(sampler, noise, alpha=args.alpha)
    buffer = distributed.shard_buffer(args.buffer_size, sample_shape, device=args.device,
                                      init_range=box, reinit_prob=args.reinit_prob,
                                      seed=args.seed + 2)
    if args.loss == "persistent":
        return PersistentML(sampler, buffer, alpha=args.alpha)
    if args.loss == "jem":  # a per-class buffer: one block of slots per logit
        classes = distributed.unwrap(energy).classifier[-1].out_features
        buffer = distributed.shard_buffer(args.buffer_size, sample_shape, device=args.device,
                                          init_range=box, reinit_prob=args.reinit_prob,
                                          n_classes=classes, seed=args.seed + 2)
        return JEM(distributed.unwrap(energy).classifier, sampler, buffer)
    return KLPersistentML(sampler, buffer, alpha=args.alpha)


class Plots:
    """The 2-D evaluation (exact KL and held-out NLL into the record) and the PNGs."""

    def __init__(self, args, out_dir: Path, held_out, log_density, box):
        self.args, self.out_dir = args, out_dir
        self.held_out, self.log_density, self.box = held_out, log_density, box

    def __call__(self, trainer: Trainer, record: dict) -> None:
        if trainer.rank != 0 or (record["iteration"] % self.args.plot_every and
                                 record["iteration"] != self.args.iterations):
            return
        energy = distributed.unwrap(trainer.energy)
        negatives = trainer.loss.last.negatives.detach().cpu()
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        path = self.out_dir / f"iteration_{record['iteration']:07d}.png"
        if self.held_out is None:
            figure, ax = plt.subplots(figsize=(6, 6))
            plots.image_mosaic(ax, negatives, self.box, side=8)
            figure.suptitle(f"negatives at iteration {record['iteration']}")
        else:
            device = next(energy.parameters()).device
            record["heldout_nll"] = exact_nll(energy, self.held_out.to(device), BOX, GRID_CELLS)
            title = f"held-out NLL {record['heldout_nll']:.3f}"
            if self.log_density is not None:
                record["exact_kl"] = exact_kl(self.log_density, energy, BOX, GRID_CELLS)
                title += f", KL(data || model) {record['exact_kl']:.3f} nats"
            figure, axes = plt.subplots(1, 3, figsize=(12, 4.2))
            plots.scatter_panel(axes[0], self.held_out, BOX, "data (held out)")
            plots.density_panel(axes[1], energy, BOX, GRID_CELLS, "model density exp(-E)")
            plots.scatter_panel(axes[2], negatives, BOX, "negatives")
            figure.suptitle(f"iteration {record['iteration']}: {title}")
        figure.savefig(path, dpi=100)
        plt.close(figure)
        record["png"] = path.name


def _resolve_run(args):
    """args completed from --resume's config, or a fresh run's config; usage errors as text."""
    if args.resume is not None:
        if args.out is not None and args.out.resolve() != args.resume.resolve():
            return None, "--resume continues in its own directory: leave out --out"
        config_path = args.resume / CONFIG_NAME
        if not (args.resume / CHECKPOINT_NAME).is_file() or not config_path.is_file():
            return None, f"--resume {args.resume}: no {CHECKPOINT_NAME} and {CONFIG_NAME} there"
        saved = json.loads(config_path.read_text())
        iterations = args.iterations or saved["iterations"]
        # Runs saved before --autocast existed sampled in full precision.
        # The number of processes is this session's (a sharded buffer is re-sharded).
        args = argparse.Namespace(**{"autocast": "none", **saved, "iterations": iterations,
                                     "nproc": args.nproc, "out": args.resume,
                                     "resume": args.resume})
        return args, _split_problem(args)
    if args.out is None:
        return None, "--out DIR is required (or --resume DIR)"
    if args.energy == "conv" and args.data in datasets.TOY_2D:
        return None, f"--energy conv needs an image data set, not {args.data}"
    if args.loss == "jem" and (args.data in datasets.TOY_2D or args.buffer_size % 10):
        return None, "--loss jem needs labelled images and a --buffer-size divisible by 10"
    if args.device == "cuda" and not torch.cuda.is_available():
        return None, "--device cuda, but torch sees no CUDA device here"
    if args.device == "cuda" and args.nproc > torch.cuda.device_count():
        return None, f"--nproc {args.nproc}, but torch sees {torch.cuda.device_count()} GPUs"
    if (args.out / CHECKPOINT_NAME).exists() or (args.out / CONFIG_NAME).exists():
        return None, f"--out {args.out} already holds a run: continue it with --resume {args.out}"
    args.iterations = args.iterations or 3000
    return args, _split_problem(args)


def _split_problem(args) -> str | None:
    """Why the global batch or buffer cannot be split over args.nproc processes, or None."""
    classes = 10 if args.loss == "jem" else 1
    if args.batch % args.nproc or args.buffer_size % (args.nproc * classes):
        return (f"--batch and --buffer-size are global: they must be multiples of --nproc "
                f"{args.nproc}" + (" (the buffer of 10 * --nproc)" if classes > 1 else ""))
    return None


def main(args) -> int:
    args, problem = _resolve_run(args)
    if problem:
        return _usage_error(problem)
    try:
        out_dir = args.out
        out_dir.mkdir(parents=True, exist_ok=True)
        if args.resume is None:
            config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                      if k not in ("out", "resume", "func")}
            checkpoints.atomic_write_text(json.dumps(config, indent=2), out_dir / CONFIG_NAME)
    except OSError as exc:
        return _usage_error(f"--out {args.out} is not writable: {exc}")
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _launch(args)
    return _train(args)


def _launch(args) -> int:
    """Run this training on args.nproc processes of this machine with torchrun; each reads
    the run's config.json (written above) through this module's __main__."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", "-m", "ebm_fast.commands.train",
               str(args.out), str(args.iterations)]
    return subprocess.call(command + (["--resume"] if args.resume is not None else []))


def _train(args) -> int:
    me = distributed.init()
    if args.device == "cuda":
        args.device = str(me.device)
    out_dir = args.out
    data, held_out, log_density, box = _load_data(args)
    test = None
    if args.loss == "jem":  # a fixed fifth of the images (by --seed) is the test set
        rows = data[0].shape[0]
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(args.seed))
        test = tuple(t[order[:rows // 5]].to(args.device) for t in data)
        data = tuple(t[order[rows // 5:]] for t in data)
    sample_shape = tuple((data[0] if test else data).shape[1:])
    torch.manual_seed(args.seed)
    energy = build_energy(args.energy, sample_shape, args.hidden,
                          int(data[1].max()) + 1 if test else 1).to(args.device)
    if test:
        energy = LogitsEnergy(energy)
    energy = distributed.wrap(energy)
    loss = _build_loss(args, energy, sample_shape, box)
    optimizer = torch.optim.Adam(energy.parameters(), lr=args.lr, betas=(0.0, 0.999))
    trainer = Trainer(energy, loss, optimizer, ema=args.ema, grad_clip=args.grad_clip,
                      out_dir=out_dir, checkpoint_every=args.checkpoint_every,
                      log_every=args.log_every, data_seed=args.seed,
                      callbacks=(Plots(args, out_dir, held_out, log_density, box),))
    if args.resume is not None:
        trainer.load_checkpoint(args.out / CHECKPOINT_NAME)
        if me.rank == 0:
            print(f"resuming {out_dir} at iteration {trainer.iteration}")
    start = time.perf_counter()
    trainer.fit(data, args.iterations, args.batch)
    seconds = time.perf_counter() - start
    last = trainer.history[-1] if trainer.history else {}
    summary = f"{args.data}, {args.loss} loss, {args.energy} energy: {trainer.iteration} " \
              f"iterations ({seconds:.1f} s this session)"
    if me.rank != 0:
        return 0
    if test:
        metrics = classifier_metrics(distributed.unwrap(energy).classifier, *test)
        checkpoints.atomic_write_text(json.dumps(metrics, indent=2), out_dir / "test_metrics.json")
        last = {**last, "test_accuracy": metrics["accuracy"], "test_ece": metrics["ece"]}
    for key, label in (("exact_kl", "exact KL(data || model)"),
                       ("heldout_nll", "held-out NLL"), ("test_accuracy", "test accuracy"),
                       ("test_ece", "expected calibration error")):
        if key in last:
            summary += f", {label} {last[key]:.3f}"
    print(summary + f"; outputs in {out_dir}")
    return 0


if __name__ == "__main__":  # one rank of `ebm-fast train --nproc N` (see _launch)
    run_dir, total = Path(sys.argv[1]), int(sys.argv[2])
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    resume = run_dir if "--resume" in sys.argv[3:] else None
    sys.exit(_train(argparse.Namespace(**{"autocast": "none", **config, "iterations": total,
                                          "out": run_dir, "resume": resume})))
