"""Train an EBM on a bundled data set: checkpoints, metrics.jsonl, PNGs, exact KL/NLL in 2-D.

ebm-fast train --data ring --loss persistent --out runs/ring writes into runs/ring: config.json
(the options), checkpoint.pt (every --checkpoint-every iterations and at the end), metrics.jsonl
(every --log-every iterations) and a PNG every --plot-every iterations: for 2-D data the data,
the learned density and the negatives, with the exact KL(data || model) (data sets with an
analytic density) and the exact held-out NLL (partition function summed on a grid); for images
a grid of negatives. --loss jem trains a classifier of the labelled images as JEM (the energy
-logsumexp of its logits) on four fifths of them and reports the test accuracy and expected
calibration error on the rest (test_metrics.json).

The defaults follow the data and the loss: on 2-D data the ring target's settings (an MLP
energy, Langevin at temperature 1); on images JEM's (Grathwohl et al. 2020: the conv energy, SGLD
with step 1 and noise 0.01, 20 steps, batch 64, a 10k buffer re-initialised at 5%), for --loss
jem with Adam's momentum 0.9 and lr 3e-3. ebm-fast train --data digits --loss jem reaches a test
accuracy of 0.986 and an ECE of 0.049 with them in its 500 iterations (200: 0.967 and 0.100;
docs/training.md).

ebm-fast train --resume runs/ring continues that run with its config.json: --iterations (the
total, recorded for later resumes) and --nproc may change, no other option. A run stopped before
its first checkpoint restarts from iteration 0. --nproc N trains on N processes (torchrun, one
per GPU with --device cuda; docs/distributed.md): --batch and --buffer-size are global, split over
the processes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ebm_fast import LangevinSampler, datasets, validation
from ebm_fast.exact2d import BOX, exact_kl, exact_nll
from ebm_fast.experiments import options
from ebm_fast.experiments.models import build_energy
from ebm_fast.training import checkpoints, distributed, plots
from ebm_fast.training.jem import JEM, LogitsEnergy, classifier_metrics
from ebm_fast.training.losses import (
    ContrastiveDivergence,
    KLPersistentML,
    PersistentCD,
    PersistentML,
    ShortRunML,
)
from ebm_fast.training.trainer import CHECKPOINT_NAME, METRICS_NAME, Trainer

__all__ = ["add_arguments", "main"]

LOSSES = ("cd", "pcd", "persistent", "short_run", "kl", "jem")
ENERGIES = ("mlp", "conv")
CONFIG_NAME = "config.json"
HELD_OUT = 5000
GRID_CELLS = 200

#: The defaults that do not depend on the data.
DEFAULTS = {
    "data": "ring",
    "loss": "persistent",
    "hidden": 128,
    "ema": None,
    "grad_clip": None,
    "n_data": 20000,
    "value_range": "-1,1",
    "precision": "auto",
    "log_every": 100,
    "checkpoint_every": 500,
    "plot_every": 500,
    "seed": 0,
    "device": "cpu",
    "beta1": 0.0,
}
#: The defaults that follow the data. 2-D data: the ring target's settings (issue 13: exact KL
#: 0.277 nats at 3000 iterations). Images: JEM's SGLD, batch and buffer (Grathwohl et al. 2020)
#: on the conv energy; the MLP with the 2-D settings ends at 0.3 accuracy with the energies
#: drifting to -347 and noise for negatives (issue 23).
DATA_DEFAULTS = {
    "2-D data": {
        "energy": "mlp",
        "iterations": 3000,
        "batch": 256,
        "steps": 20,
        "step_size": 0.01,
        "noise_scale": 0.1414,
        "alpha": 0.01,
        "lr": 1e-3,
        "buffer_size": 10000,
        "reinit_prob": 0.05,
    },
    "images": {
        "energy": "conv",
        "iterations": 500,
        "batch": 64,
        "steps": 20,
        "step_size": 1.0,
        "noise_scale": 0.01,
        "alpha": 0.01,
        "lr": 1e-3,
        "buffer_size": 10000,
        "reinit_prob": 0.05,
    },
}
#: The defaults that follow the loss. JEM: Adam with JEM's momentum (the others keep IGEBM's
#: none) and the learning rate that reaches a calibrated classifier of the digits in the 500
#: iterations (measured, docs/training.md; JEM's 1e-4 is for a WRN trained 150 epochs, and left
#: the digits' classifier at 0.84 accuracy after 200 iterations).
LOSS_DEFAULTS = {"jem": {"beta1": 0.9, "lr": 3e-3}}
#: What config.json holds: every option but --out, --resume and --nproc (this session's).
CONFIG_KEYS = (*DEFAULTS, *DATA_DEFAULTS["2-D data"])
#: Options added since the first runs were saved, with what those runs used.
ADDED_SINCE = {"precision": "fp32", "beta1": 0.0}
#: --autocast, which --precision replaced: a saved value -> the --precision it means.
SAVED_AUTOCAST = {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}

beta = validation.argparse_type(validation.real, low=0.0, high=1.0, high_open=True)
ema_decay = validation.argparse_type(
    validation.real, low=0.0, high=1.0, low_open=True, high_open=True
)


def _data_kind(data: str) -> str:
    return "2-D data" if data in datasets.TOY_2D else "images"


def _default(key: str) -> str:
    """An option's default as --help states it: by data kind where they differ, and where a
    loss has its own."""
    values = {kind: table[key] for kind, table in DATA_DEFAULTS.items() if key in table}
    if len(set(values.values())) > 1:
        text = ", ".join(
            f"{value:g} on {kind}" if isinstance(value, float) else f"{value} on {kind}"
            for kind, value in values.items()
        )
    else:
        value = DEFAULTS[key] if key in DEFAULTS else values["images"]
        text = f"{value:g}" if isinstance(value, float) else str(value)
    for loss, table in LOSS_DEFAULTS.items():
        if key in table:
            text += f", {table[key]:g} for --loss {loss}"
    return f"default {text}"


def add_arguments(parser) -> None:
    # Options left out stay None: the defaults are filled in after parsing (they follow the
    # data), and a --resume can tell an option given from one left out.
    parser.add_argument(
        "--data", choices=(*datasets.TOY_2D, *datasets.IMAGES), help=f"default {DEFAULTS['data']}"
    )
    parser.add_argument(
        "--loss",
        choices=LOSSES,
        help="cd: CD-k from the data (k = --steps); pcd: persistent CD; "
        "persistent: replay-buffer ML (IGEBM/JEM); short_run: fresh noise "
        "chains; kl: persistent ML with Du et al. (2021)'s KL and entropy; "
        "jem: JEM's p(x) + p(y|x) loss on a classifier (labelled images); "
        f"default {DEFAULTS['loss']}",
    )
    parser.add_argument(
        "--energy", choices=ENERGIES, help=f"conv needs an image data set ({_default('energy')})"
    )
    parser.add_argument("--out", type=Path, help="output directory (new, or holding no run)")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR with its config.json: only --iterations "
        "and --nproc may change, other options must match it; a run "
        "stopped before its first checkpoint restarts from iteration 0",
    )
    parser.add_argument(
        "--iterations",
        type=options.count,
        help="the total number of iterations, also with --resume (where it is "
        f"recorded for later resumes); {_default('iterations')}",
    )
    parser.add_argument("--batch", type=options.count, help=_default("batch"))
    parser.add_argument(
        "--steps", type=options.count, help=f"Langevin steps per iteration ({_default('steps')})"
    )
    parser.add_argument("--step-size", type=options.positive_real, help=_default("step_size"))
    parser.add_argument(
        "--noise-scale", type=options.non_negative_real, help=_default("noise_scale")
    )
    parser.add_argument(
        "--alpha",
        type=options.non_negative_real,
        help=f"weight of the energy-magnitude regulariser (not used by jem; {_default('alpha')})",
    )
    parser.add_argument(
        "--precision",
        choices=tuple(options.PRECISIONS),
        help="the energy's passes (sampler and loss): auto picks bf16 where the device "
        "computes it natively (CUDA >= 8.0, a CPU with avx512_bf16 or AMX), else fp32, and "
        "a resumed run keeps the choice its checkpoint recorded; the chains, their noise and "
        "updates stay float32 (docs/samplers.md); default auto",
    )
    parser.add_argument(
        "--lr", type=options.positive_real, help=f"Adam's learning rate ({_default('lr')})"
    )
    parser.add_argument(
        "--beta1",
        type=beta,
        help="Adam's first beta, its momentum (the second is 0.999): IGEBM's "
        f"0 and JEM's 0.9 ({_default('beta1')})",
    )
    parser.add_argument("--buffer-size", type=options.count, help=_default("buffer_size"))
    parser.add_argument("--reinit-prob", type=options.probability, help=_default("reinit_prob"))
    parser.add_argument(
        "--hidden",
        type=options.count,
        help=f"width of the MLP energy (default {DEFAULTS['hidden']})",
    )
    parser.add_argument(
        "--ema", type=ema_decay, help="EMA decay of the weights, in (0, 1) (off if unset)"
    )
    parser.add_argument(
        "--grad-clip", type=options.positive_real, help="max parameter-gradient norm (off if unset)"
    )
    parser.add_argument(
        "--n-data", type=options.count, help=f"2-D training points (default {DEFAULTS['n_data']})"
    )
    parser.add_argument(
        "--value-range",
        choices=("-1,1", "0,1"),
        help=f"pixel range of image data (default {DEFAULTS['value_range']})",
    )
    parser.add_argument("--log-every", type=options.count, help=f"default {DEFAULTS['log_every']}")
    parser.add_argument(
        "--checkpoint-every", type=options.count, help=f"default {DEFAULTS['checkpoint_every']}"
    )
    parser.add_argument(
        "--plot-every",
        type=options.count,
        help="PNG every this many iterations (at log iterations; default "
        f"{DEFAULTS['plot_every']})",
    )
    parser.add_argument("--seed", type=options.seed, help=f"default {DEFAULTS['seed']}")
    parser.add_argument("--device", choices=("cpu", "cuda"), help=f"default {DEFAULTS['device']}")
    parser.add_argument(
        "--nproc",
        type=options.count,
        default=1,
        help="processes to train on (launched with torchrun; gloo on the CPU, "
        "NCCL and one GPU each with --device cuda; default 1)",
    )


def _usage_error(message: str) -> int:
    print(f"ebm-fast train: error: {message}", file=sys.stderr)
    return 2


def _load_data(args):
    """(training data, held-out 2-D data or None, the data set's exact log density or None,
    the chains' box (lo, hi)); for --loss jem the training data is an (images, labels) pair."""
    if args.data in datasets.TOY_2D:
        toy = datasets.TOY_2D[args.data]
        generator = torch.Generator().manual_seed(args.seed)
        return (
            toy.sample(args.n_data, generator),
            toy.sample(HELD_OUT, generator),
            toy.log_density,
            (-BOX, BOX),
        )
    value_range = tuple(float(v) for v in args.value_range.split(","))
    x, y = datasets.IMAGES[args.data](value_range=value_range)
    return ((x, y) if args.loss == "jem" else x), None, None, value_range


def _build_loss(args, energy, sample_shape, box):
    sampler = LangevinSampler(
        energy,
        step_size=args.step_size,
        noise_scale=args.noise_scale,
        n_steps=args.steps,
        clamp=box,
        seed=args.seed + 1,
        autocast=options.PRECISIONS[args.precision],
    )

    def noise(n: int) -> torch.Tensor:  # the global generator: the Trainer saves its state
        return box[0] + (box[1] - box[0]) * torch.rand(n, *sample_shape, device=args.device)

    if args.loss == "cd":
        return ContrastiveDivergence(sampler, k=args.steps, alpha=args.alpha)
    if args.loss == "pcd":
        return PersistentCD(sampler, alpha=args.alpha)
    if args.loss == "short_run":
        return ShortRunML(sampler, noise, alpha=args.alpha)
    buffer = distributed.shard_buffer(
        args.buffer_size,
        sample_shape,
        device=args.device,
        init_range=box,
        reinit_prob=args.reinit_prob,
        seed=args.seed + 2,
    )
    if args.loss == "persistent":
        return PersistentML(sampler, buffer, alpha=args.alpha)
    if args.loss == "jem":  # a per-class buffer: one block of slots per logit
        classes = distributed.unwrap(energy).classifier[-1].out_features
        buffer = distributed.shard_buffer(
            args.buffer_size,
            sample_shape,
            device=args.device,
            init_range=box,
            reinit_prob=args.reinit_prob,
            n_classes=classes,
            seed=args.seed + 2,
        )
        return JEM(distributed.unwrap(energy).classifier, sampler, buffer)
    return KLPersistentML(sampler, buffer, alpha=args.alpha)


class Plots:
    """The 2-D evaluation (exact KL and held-out NLL into the record) and the PNGs."""

    def __init__(self, args, out_dir: Path, held_out, log_density, box):
        self.args, self.out_dir = args, out_dir
        self.held_out, self.log_density, self.box = held_out, log_density, box

    def __call__(self, trainer: Trainer, record: dict) -> None:
        last = trainer.loss.last  # None while every step so far was skipped (non-finite)
        if (
            trainer.rank != 0
            or last is None
            or (
                record["iteration"] % self.args.plot_every
                and record["iteration"] != self.args.iterations
            )
        ):
            return
        energy = distributed.unwrap(trainer.energy)
        negatives = last.negatives.detach().cpu()
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
    """(the run's settings, None) for a fresh run or a --resume, or (None, a usage error)."""
    given = {
        key: value for key, value in vars(args).items() if key in CONFIG_KEYS and value is not None
    }
    if args.resume is not None:
        return _resolve_resume(args, given)
    if args.out is None:
        return None, "--out DIR is required (or --resume DIR)"
    data, loss = (given.get(key, DEFAULTS[key]) for key in ("data", "loss"))
    settings = argparse.Namespace(
        **{**DEFAULTS, **DATA_DEFAULTS[_data_kind(data)], **LOSS_DEFAULTS.get(loss, {}), **given},
        out=args.out,
        resume=None,
        nproc=args.nproc,
    )
    if settings.energy == "conv" and settings.data in datasets.TOY_2D:
        return None, f"--energy conv needs an image data set, not {settings.data}"
    if settings.loss == "jem" and (settings.data in datasets.TOY_2D or settings.buffer_size % 10):
        return None, "--loss jem needs labelled images and a --buffer-size divisible by 10"
    if settings.device == "cuda" and not torch.cuda.is_available():
        return None, "--device cuda, but torch sees no CUDA device here"
    if settings.device == "cuda" and settings.nproc > torch.cuda.device_count():
        return None, (f"--nproc {settings.nproc}, but torch sees {torch.cuda.device_count()} GPUs")
    if (settings.out / CHECKPOINT_NAME).exists() or (settings.out / CONFIG_NAME).exists():
        return None, (
            f"--out {settings.out} already holds a run: continue it with --resume {settings.out}"
        )
    return settings, _split_problem(settings)


def _resolve_resume(args, given: dict):
    """The saved run's settings with this session's --iterations and --nproc; any other option
    given must match config.json (a silent change would train another run than it says)."""
    if args.out is not None and args.out.resolve() != args.resume.resolve():
        return None, "--resume continues in its own directory: leave out --out"
    config_path = args.resume / CONFIG_NAME
    if not config_path.is_file():
        return None, f"--resume {args.resume}: no {CONFIG_NAME} there (not an ebm-fast train run)"
    try:
        saved = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"--resume: {config_path} is not readable (truncated or damaged?): {exc}"
    if not isinstance(saved, dict):
        return None, f"--resume: {config_path} does not hold a run's options"
    if "autocast" in saved:  # saved before --precision replaced --autocast
        saved["precision"] = SAVED_AUTOCAST.get(saved.pop("autocast"), "fp32")
    saved = {**ADDED_SINCE, **saved}
    missing = [key for key in CONFIG_KEYS if key not in saved]
    if missing:
        return None, f"--resume: {config_path} lacks {', '.join(missing)}"
    changed = [
        f"--{key.replace('_', '-')} {value} (saved: {saved[key]})"
        for key, value in given.items()
        if key != "iterations" and value != saved[key]
    ]
    if changed:
        return None, (
            f"--resume continues the run {config_path} describes, but "
            f"{', '.join(changed)} differ from it: leave them out, or start a new run "
            f"with --out"
        )
    settings = argparse.Namespace(
        **{key: saved[key] for key in CONFIG_KEYS},
        out=args.resume,
        resume=args.resume,
        nproc=args.nproc,
    )
    settings.iterations = given.get("iterations", settings.iterations)
    return settings, _split_problem(settings)


def _split_problem(args) -> str | None:
    """Why the global batch or buffer cannot be split over args.nproc processes, or None."""
    classes = 10 if args.loss == "jem" else 1
    if args.batch % args.nproc or args.buffer_size % (args.nproc * classes):
        return (
            f"--batch and --buffer-size are global: they must be multiples of --nproc "
            f"{args.nproc}" + (" (the buffer of 10 * --nproc)" if classes > 1 else "")
        )
    return None


def main(args) -> int:
    settings, problem = _resolve_run(args)
    if problem:
        return _usage_error(problem)
    restart = settings.resume is not None and not (settings.out / CHECKPOINT_NAME).exists()
    if restart:
        settings.resume = None  # nothing to load: the run starts again from its config
    run = None
    if settings.resume is not None:
        # Checked in this process before anything is written: the checkpoint, its shards and
        # their match with config.json (the ranks of --nproc N load them again).
        try:
            run = _build(settings)
        except (ValueError, OSError) as exc:
            return _usage_error(f"--resume {settings.resume}: {exc}")
        if settings.iterations < run.trainer.iteration:
            return _usage_error(
                f"--iterations {settings.iterations} is the total, but the run "
                f"is at iteration {run.trainer.iteration} already"
            )
    try:
        settings.out.mkdir(parents=True, exist_ok=True)
        config = {key: getattr(settings, key) for key in CONFIG_KEYS}
        checkpoints.atomic_write_text(json.dumps(config, indent=2), settings.out / CONFIG_NAME)
    except OSError as exc:
        return _usage_error(f"--out {settings.out} is not writable: {exc}")
    if restart:
        _clear_outputs(settings.out)
        print(f"{settings.out} has no {CHECKPOINT_NAME} yet: the run starts again from iteration 0")
    if settings.nproc > 1:
        return _launch(settings)
    return _train(settings, run or _build(settings))


def _clear_outputs(out_dir: Path) -> None:
    """What a run stopped before its first checkpoint wrote (written again as it restarts)."""
    for path in (
        out_dir / METRICS_NAME,
        out_dir / "test_metrics.json",
        *out_dir.glob("iteration_*.png"),
    ):
        path.unlink(missing_ok=True)
    shutil.rmtree(out_dir / f"{Path(CHECKPOINT_NAME).stem}.shards", ignore_errors=True)


def _launch(args) -> int:
    """Run this training on args.nproc processes of this machine with torchrun; each reads
    the run's config.json (written above) through this module's __main__."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "ebm_fast.commands.train",
        str(args.out),
    ]
    return subprocess.call(command + (["--resume"] if args.resume is not None else []))


@dataclasses.dataclass
class Run:
    """A run built from its settings: the trainer, what it fits, and for JEM the classifier
    and its test set."""

    trainer: Trainer
    data: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    classifier: torch.nn.Module | None = None
    test: tuple[torch.Tensor, torch.Tensor] | None = None


def _build(args) -> Run:
    """The run args describe, its checkpoint loaded on --resume (damaged or mismatched files
    raise ValueError or OSError naming them, before anything is changed)."""
    me = distributed.init()
    if args.device == "cuda":
        args.device = str(me.device)
    data, held_out, log_density, box = _load_data(args)
    test = None
    if args.loss == "jem":  # a fixed fifth of the images (by --seed) is the test set
        rows = data[0].shape[0]
        order = torch.randperm(rows, generator=torch.Generator().manual_seed(args.seed))
        test = tuple(t[order[: rows // 5]].to(args.device) for t in data)
        data = tuple(t[order[rows // 5 :]] for t in data)
    sample_shape = tuple((data[0] if test else data).shape[1:])
    torch.manual_seed(args.seed)
    net = build_energy(
        args.energy, sample_shape, args.hidden, int(data[1].max()) + 1 if test else 1
    ).to(args.device)
    energy = distributed.wrap(LogitsEnergy(net) if test else net)
    loss = _build_loss(args, energy, sample_shape, box)
    optimizer = torch.optim.Adam(energy.parameters(), lr=args.lr, betas=(args.beta1, 0.999))
    trainer = Trainer(
        energy,
        loss,
        optimizer,
        ema=args.ema,
        grad_clip=args.grad_clip,
        out_dir=args.out,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        data_seed=args.seed,
        callbacks=(Plots(args, args.out, held_out, log_density, box),),
    )
    if args.resume is not None:
        trainer.load_checkpoint(args.out / CHECKPOINT_NAME)
    return Run(trainer, data, net if test else None, test)


def _train(args, run: Run) -> int:
    out_dir, trainer = args.out, run.trainer
    if args.resume is not None and trainer.rank == 0:
        print(f"resuming {out_dir} at iteration {trainer.iteration}")
    start = time.perf_counter()
    trainer.fit(run.data, args.iterations, args.batch)
    seconds = time.perf_counter() - start
    last = trainer.history[-1] if trainer.history else {}
    summary = (
        f"{args.data}, {args.loss} loss, {args.energy} energy: {trainer.iteration} "
        f"iterations ({seconds:.1f} s this session)"
    )
    if trainer.rank != 0:
        return 0
    if run.classifier is not None and run.test is not None:
        metrics = classifier_metrics(run.classifier, *run.test)
        checkpoints.atomic_write_text(json.dumps(metrics, indent=2), out_dir / "test_metrics.json")
        last = {**last, "test_accuracy": metrics["accuracy"], "test_ece": metrics["ece"]}
    for key, label in (
        ("exact_kl", "exact KL(data || model)"),
        ("heldout_nll", "held-out NLL"),
        ("test_accuracy", "test accuracy"),
        ("test_ece", "expected calibration error"),
    ):
        if key in last:
            summary += f", {label} {last[key]:.3f}"
    print(summary + f"; outputs in {out_dir}")
    return 0


if __name__ == "__main__":  # one rank of `ebm-fast train --nproc N` (see _launch)
    run_dir = Path(sys.argv[1])
    config = json.loads((run_dir / CONFIG_NAME).read_text())
    rank_settings = argparse.Namespace(
        **config,
        out=run_dir,
        nproc=int(os.environ["WORLD_SIZE"]),
        resume=run_dir if "--resume" in sys.argv[2:] else None,
    )
    sys.exit(_train(rank_settings, _build(rank_settings)))
