"""Trainer: the EBM training loop with EMA, gradient clipping, a learning-rate schedule, a
non-finite policy, progress, JSONL metrics, divergence warnings, callbacks and exact-resume
checkpoints."""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ebm_fast import validation
from ebm_fast.samplers import NonFiniteChainError
from ebm_fast.samplers.energy import trainable_parameters
from ebm_fast.training import checkpoints, distributed
from ebm_fast.training.data import batch_stream
from ebm_fast.training.diagnostics import DivergenceMonitor
from ebm_fast.training.losses import EBMLoss

__all__ = ["Trainer", "CHECKPOINT_NAME", "METRICS_NAME"]

# What fit() trains on: a tensor, an (x, y) pair of tensors, a Dataset or a DataLoader.
TrainingData = torch.Tensor | tuple[torch.Tensor, torch.Tensor] | Dataset | DataLoader

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CHECKPOINT_FORMAT = "ebm_fast.training/1"
NONFINITE_POLICIES = ("skip", "raise")


class Trainer:
    """Train ``energy`` with ``loss`` (an ebm_fast.training loss built on a sampler of this
    energy) and ``optimizer``.

    Args:
        ema: None or a decay in (0, 1): an exponential moving average of the weights is kept in
            ``trainer.ema_model`` (torch.optim.swa_utils.AveragedModel).
        grad_clip: None or a max norm > 0 for the parameter gradients (clip_grad_norm_).
        out_dir: where checkpoint.pt and metrics.jsonl go (None: nothing is written). Checked
            writable at once; ``fit`` refuses a directory that already holds a run
            (FileExistsError) unless this trainer was resumed from its checkpoint or started
            that run itself.
        checkpoint_every: write a checkpoint every this many iterations (and at the end of fit);
            None: only at the end.
        log_every: every this many iterations a metrics record (metrics.jsonl, ``history``) and
            the divergence checks; those iterations also collect the chains' diagnostics. The
            first iteration also reads its mean E+, the monitor's baseline of the energies'
            level.
        progress: a tqdm progress bar (shown only when stderr is a terminal).
        on_nonfinite: "skip" (a non-finite loss, gradient or chain skips the step, counted in
            ``nonfinite_skipped`` and warned about) or "raise" (FloatingPointError /
            NonFiniteChainError).
        data_seed: seed of the data order (None: drawn from torch's global generator).
        monitor: the DivergenceMonitor (default thresholds when None).
        scheduler: None or a torch.optim.lr_scheduler scheduler of ``optimizer``, stepped once
            per iteration (after the optimiser step, also when a non-finite step was skipped:
            the learning rate is a function of the iteration); saved in checkpoints.
        callbacks: callables ``callback(trainer, record)`` run for each metrics record before it
            is written; they may add entries to it (an evaluation, the path of a plot).
        step_callbacks: callables ``callback(trainer)`` run after every iteration (after the
            metrics record of a logged one), with ``trainer.iteration`` already counted.

    Each iteration reads the device once (whether loss and gradient norm are finite), as
    torch.amp.GradScaler does; logged iterations read their statistics once more.

    Under torchrun (ebm_fast.training.distributed: a process group, the energy in DDP, a
    sharded buffer) each rank trains on its slice of every global batch with its chains' global
    indices; metrics are averaged over the ranks (one all-reduce per logged iteration), the
    progress bar and metrics.jsonl are rank 0's, checkpoints are written per rank (loss state)
    and by rank 0 (the rest). Callbacks run on every rank (``trainer.rank`` tells which).
    """

    def __init__(
        self,
        energy: torch.nn.Module,
        loss: EBMLoss,
        optimizer: torch.optim.Optimizer,
        *,
        ema: float | None = None,
        grad_clip: float | None = None,
        out_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        log_every: int = 100,
        progress: bool = True,
        on_nonfinite: str = "skip",
        data_seed: int | None = None,
        monitor: DivergenceMonitor | None = None,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        callbacks: tuple[Callable[[Trainer, dict], None], ...] = (),
        step_callbacks: tuple[Callable[[Trainer], None], ...] = (),
    ) -> None:
        self.parameters = trainable_parameters(energy)
        self.rank, self.world_size = distributed.world()
        if not isinstance(loss, EBMLoss):
            raise TypeError(f"loss must be an ebm_fast.training loss, got {type(loss).__name__}")
        if loss.energy is not energy:
            raise ValueError(
                "loss was built on a sampler of another energy: the sampler must "
                "sample the energy being trained"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        own = {id(p) for p in energy.parameters()}
        if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
            raise ValueError("optimizer holds parameters that are not the energy's")
        self.energy, self.loss, self.optimizer = energy, loss, optimizer
        self.ema_decay = (
            None
            if ema is None
            else validation.real(ema, "ema", low=0.0, high=1.0, low_open=True, high_open=True)
        )
        self.ema_model = (
            None
            if ema is None
            else AveragedModel(
                energy, multi_avg_fn=get_ema_multi_avg_fn(self.ema_decay), use_buffers=True
            )
        )
        self.grad_clip = validation.grad_clip(grad_clip)
        self.checkpoint_every = (
            None
            if checkpoint_every is None
            else validation.integer(checkpoint_every, "checkpoint_every", low=1)
        )
        self.log_every = validation.integer(log_every, "log_every", low=1)
        if not isinstance(progress, bool):
            raise TypeError(f"progress must be a bool, got {type(progress).__name__}")
        self.progress = progress
        self.on_nonfinite = validation.choice(on_nonfinite, "on_nonfinite", NONFINITE_POLICIES)
        self.data_seed = validation.seed_or_default(data_seed, "data_seed")
        self.monitor = DivergenceMonitor() if monitor is None else monitor
        self.scheduler = _check_scheduler(scheduler, optimizer)
        if not all(callable(c) for c in callbacks):
            raise TypeError("callbacks must be callables callback(trainer, record)")
        if not all(callable(c) for c in step_callbacks):
            raise TypeError("step_callbacks must be callables callback(trainer)")
        self.callbacks, self.step_callbacks = tuple(callbacks), tuple(step_callbacks)
        self.out_dir = None if out_dir is None else _writable_dir(out_dir)
        self.iteration = 0
        self.nonfinite_skipped = 0
        self.history: list[dict] = []
        self._resumed_from: Path | None = None
        self._claimed: Path | None = None  # the out_dir whose run is this trainer's
        self._data_state: dict | None = None  # a checkpoint's data order, applied by fit()
        self._batches = None  # fit()'s batch stream
        self._window = {"iterations": 0, "seconds": 0.0, "sampler_seconds": 0.0}

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, data: TrainingData, iterations: int, batch_size: int | None = None) -> Trainer:
        """Train until ``trainer.iteration == iterations`` (a total: a resumed trainer runs the
        rest). data: a tensor, an (x, y) pair of tensors, a Dataset (batches of batch_size in a
        new order each epoch) or a DataLoader (batch_size None). Returns the trainer."""
        iterations = validation.integer(iterations, "iterations", low=0)
        batches = batch_stream(data, batch_size, self.data_seed)
        if self._data_state is not None:
            batches.load_state_dict(self._data_state)
            self._data_state = None
        self._batches = batches
        if self.out_dir is not None:
            self._claim_out_dir()
        device = self.parameters[0].device
        bar = tqdm(
            total=iterations,
            initial=self.iteration,
            unit="it",
            dynamic_ncols=True,
            disable=not (self.progress and self.rank == 0 and sys.stderr.isatty()),
        )
        with bar:
            while self.iteration < iterations:
                x, y = next(batches)
                if self.world_size > 1:
                    x, y = distributed.local_batch(x, y, self.rank, self.world_size)
                self.step(
                    x.to(device, non_blocking=True),
                    None if y is None else y.to(device, non_blocking=True),
                )
                bar.update(1)
                if self.history and self.history[-1]["iteration"] == self.iteration:
                    record = self.history[-1]
                    bar.set_postfix(
                        loss=f"{record['loss']:.3g}",
                        gap=f"{record['energy_gap']:.3g}",
                        refresh=False,
                    )
                if (
                    self.out_dir is not None
                    and self.checkpoint_every
                    and self.iteration % self.checkpoint_every == 0
                ):
                    self.save_checkpoint()
        if self.out_dir is not None:
            self.save_checkpoint()
        return self

    def step(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """One iteration on the positive batch x (labels y for a conditional loss)."""
        start = time.perf_counter()
        log = (self.iteration + 1) % self.log_every == 0
        self.loss.track_chains = log
        if self.world_size > 1:
            distributed.prepare_loss(self.loss, x.shape[0], self.rank, self.world_size)
        self.optimizer.zero_grad(set_to_none=True)
        try:
            loss = self.loss(x, y if self.loss.conditional else None)
        except NonFiniteChainError:
            if self.on_nonfinite == "raise":
                raise
            loss = None
        finite = False
        if loss is not None:
            loss.backward()
            # Without a clip, the norm alone (clip_grad_norm_ with an infinite max would still
            # rescale every gradient by 1: a pass over all of them per iteration).
            if self.grad_clip is None:
                grads = [p.grad for p in self.parameters if p.grad is not None]
                norm = torch.nn.utils.get_total_norm(grads)
            else:
                norm = torch.nn.utils.clip_grad_norm_(self.parameters, self.grad_clip)
            finite = bool(torch.isfinite(loss.detach() + norm))  # the iteration's host read
        if finite:
            self.optimizer.step()
            if self.ema_model is not None:
                self.ema_model.update_parameters(self.energy)
        else:
            if self.on_nonfinite == "raise":
                raise FloatingPointError(
                    f"iteration {self.iteration + 1}: the loss or a parameter gradient is not "
                    "finite; lower the learning rate or the sampler's step_size, raise alpha, or "
                    "clip gradients (Trainer(grad_clip=...)); on_nonfinite='skip' skips such steps"
                )
            self.optimizer.zero_grad(set_to_none=True)
            self.nonfinite_skipped += 1
        if self.scheduler is not None:
            self.scheduler.step()
        self.iteration += 1
        window = self._window
        window["iterations"] += 1
        window["seconds"] += time.perf_counter() - start
        if self.loss.last is not None and loss is not None:
            window["sampler_seconds"] += self.loss.last.sampler_seconds
            if self.iteration == 1:  # the monitor's baseline: the energies' level at the start
                self.monitor.start(
                    distributed.all_reduce_mean(self.loss.last.energy_pos.detach().float()).item()
                )
        if log:
            self._log(loss, norm if loss is not None else None)
        for callback in self.step_callbacks:
            callback(self)

    # -- metrics ----------------------------------------------------------------------------
    def _log(self, loss: torch.Tensor | None, grad_norm: torch.Tensor | None) -> None:
        stats = self.loss.last if loss is not None else None
        values: dict[str, torch.Tensor] = {}
        if stats is not None and loss is not None and grad_norm is not None:  # a step was taken
            values = {
                "loss": loss.detach(),
                "energy_pos": stats.energy_pos,
                "energy_neg": stats.energy_neg,
                "grad_norm": grad_norm.detach(),
            }
            for key in (
                "chain_grad_norm",
                "chain_displacement",
                "reinit_fraction",
                "kl",
                "entropy",
            ):
                if getattr(stats, key) is not None:
                    values[key] = getattr(stats, key)
        numbers = (
            dict(
                zip(
                    values,
                    distributed.all_reduce_mean(
                        torch.stack([v.float().reshape(()) for v in values.values()])
                    ).tolist(),
                )
            )
            if values
            else {}
        )
        window = self._window
        nan = float("nan")
        record: dict[str, Any]
        record = {
            "iteration": self.iteration,
            "loss": numbers.get("loss", nan),
            "energy_pos": numbers.get("energy_pos", nan),
            "energy_neg": numbers.get("energy_neg", nan),
            "energy_gap": numbers.get("energy_pos", nan) - numbers.get("energy_neg", nan),
            "grad_norm": numbers.get("grad_norm", nan),
            **{
                k: numbers[k]
                for k in (
                    "chain_grad_norm",
                    "chain_displacement",
                    "reinit_fraction",
                    "kl",
                    "entropy",
                )
                if k in numbers
            },
            "sampler_seconds": window["sampler_seconds"] / window["iterations"],
            "iteration_seconds": window["seconds"] / window["iterations"],
            "nonfinite_skipped": self.nonfinite_skipped,
        }
        # What the energy's passes ran in, and why (autocast="auto" resolved by the sampler).
        precision = self.loss.sampler.last_precision
        record["precision"] = None if precision is None else precision.to_dict()
        record["warnings"] = self.monitor.update(record)
        self._window = {"iterations": 0, "seconds": 0.0, "sampler_seconds": 0.0}
        for callback in self.callbacks:  # they may add entries (evaluations) to the record
            callback(self, record)
        self.history.append(record)
        if self.out_dir is not None and self.rank == 0:
            with open(self.out_dir / METRICS_NAME, "a") as f:
                f.write(json.dumps(record) + "\n")

    # -- out_dir ----------------------------------------------------------------------------
    def _claim_out_dir(self) -> None:
        """Refuse to overwrite another run (whatever this trainer's iteration: after a load
        from elsewhere or a manual step too); a resumed run drops the metrics it logged after
        its checkpoint (they are logged again)."""
        out_dir = self.out_dir
        if out_dir is None or self._claimed == out_dir:  # nothing to claim, or claimed
            return
        checkpoint, metrics = out_dir / CHECKPOINT_NAME, out_dir / METRICS_NAME
        if self._resumed_from is not None and self._resumed_from == checkpoint.resolve():
            if metrics.exists() and self.rank == 0:
                kept = [
                    line
                    for line in metrics.read_text().splitlines(keepends=True)
                    if line.strip() and json.loads(line)["iteration"] <= self.iteration
                ]
                checkpoints.atomic_write_text("".join(kept), metrics)
        elif checkpoint.exists() or metrics.exists():
            raise FileExistsError(
                f"out_dir {out_dir} already holds a run ({CHECKPOINT_NAME} or "
                f"{METRICS_NAME}); resume it with trainer.load_checkpoint("
                f"'{checkpoint}') or choose another out_dir"
            )
        self._claimed = out_dir

    # -- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this run bit-identically (weights_only loadable)."""
        return {
            "format": CHECKPOINT_FORMAT,
            "iteration": self.iteration,
            "nonfinite_skipped": self.nonfinite_skipped,
            "loss_kind": type(self.loss).__name__,
            "model": distributed.unwrap(self.energy).state_dict(),
            "ema": None if self.ema_model is None else self.ema_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "loss": self.loss.state_dict(),
            "monitor": self.monitor.state_dict(),
            "data": None if self._batches is None else self._batches.state_dict(),
            "rng": {
                "cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            },
        }

    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write the checkpoint atomically (default out_dir/checkpoint.pt); returns its path."""
        if path is None:
            if self.out_dir is None:
                raise ValueError("save_checkpoint() needs a path when the trainer has no out_dir")
            path = self.out_dir / CHECKPOINT_NAME
        path = Path(path)
        state = self.state_dict()
        if self.world_size > 1:
            # Shards first, the main file last: a crash in between leaves the previous main
            # file, whose shards (named by its iteration) are still there.
            shard = distributed.shard_path(path, self.iteration, self.rank, self.world_size)
            shard.parent.mkdir(exist_ok=True)
            checkpoints.atomic_save(state.pop("loss"), shard)
            state["loss_shards"] = self.world_size
            distributed.barrier()
            if self.rank == 0:
                checkpoints.atomic_save(state, path)
            distributed.barrier()
        else:
            shard = None
            checkpoints.atomic_save(state, path)
        distributed.remove_stale_shards(path, self.rank, self.world_size, keep=shard)
        return path

    def _saved_loss_state(self, state: dict, path: Path) -> dict:
        """The loss state for this rank: the single file's, or the shard files' re-sharded
        for this world size (distributed.reshard_loss_state) when it differs."""
        saved_ranks = state.get("loss_shards")
        states = (
            [state["loss"]]
            if saved_ranks is None
            else [
                checkpoints.load(
                    distributed.shard_path(path, state["iteration"], rank, saved_ranks),
                    map_location="cpu",
                )
                for rank in range(saved_ranks)
            ]
        )
        return distributed.reshard_loss_state(states, self.rank, self.world_size)

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Continue the run saved at path. Refuses (ValueError, nothing loaded) a checkpoint of
        another model, loss or configuration."""
        path = Path(path)
        state = checkpoints.load(path, map_location="cpu")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(
                f"{path} is not an ebm_fast training checkpoint (format "
                f"{state.get('format')!r}, expected {CHECKPOINT_FORMAT!r})"
            )
        if state["loss_kind"] != type(self.loss).__name__:
            raise ValueError(
                f"{path} was saved with loss {state['loss_kind']}, this trainer's "
                f"loss is {type(self.loss).__name__}"
            )
        model = distributed.unwrap(self.energy)
        _check_same_model(state["model"], model.state_dict(), path)
        if (state["ema"] is None) != (self.ema_model is None):
            raise ValueError(
                f"{path} was saved {'without' if state['ema'] is None else 'with'} "
                f"an EMA but this trainer has ema={self.ema_decay}"
            )
        if (state.get("scheduler") is None) != (self.scheduler is None):
            scheduler = type(self.scheduler).__name__ if self.scheduler else None
            raise ValueError(
                f"{path} was saved "
                f"{'without' if state.get('scheduler') is None else 'with'} a "
                f"learning-rate scheduler but this trainer has "
                f"scheduler={scheduler}"
            )
        # The loss first: its buffer refuses another configuration before copying anything.
        self.loss.load_state_dict(self._saved_loss_state(state, path))
        model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema_model is not None:
            self.ema_model.load_state_dict(state["ema"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state.get("monitor") is not None:
            self.monitor.load_state_dict(state["monitor"])
        torch.set_rng_state(state["rng"]["cpu"])
        if state["rng"]["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.iteration, self.nonfinite_skipped = state["iteration"], state["nonfinite_skipped"]
        self._data_state = state["data"]
        self._resumed_from = path.resolve()
        self._claimed = None  # another run's state now: out_dir is checked again


def _check_scheduler(scheduler, optimizer):
    """The scheduler, if it is one Trainer can step once per iteration on this optimizer."""
    if scheduler is None:
        return None
    if not isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler):
        raise TypeError(
            f"scheduler must be a torch.optim.lr_scheduler scheduler, got "
            f"{type(scheduler).__name__}"
        )
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "ReduceLROnPlateau steps on a metric, not once per iteration: step it "
            "yourself in a callback (callbacks=...) with the metric it needs"
        )
    if scheduler.optimizer is not optimizer:
        raise ValueError("scheduler was built on another optimizer than the trainer's")
    return scheduler


def _check_same_model(saved: dict, current: dict, path: Path) -> None:
    problems = [f"missing {key}" for key in current if key not in saved]
    problems += [f"unexpected {key}" for key in saved if key not in current]
    problems += [
        f"{key}: saved {tuple(saved[key].shape)}, model {tuple(value.shape)}"
        for key, value in current.items()
        if key in saved and tuple(saved[key].shape) != tuple(value.shape)
    ]
    if problems:
        raise ValueError(
            f"{path} holds another model's weights: "
            + "; ".join(problems[:5])
            + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
        )


def _writable_dir(out_dir) -> Path:
    """out_dir created if needed and checked writable, before any work starts."""
    if not isinstance(out_dir, (str, Path)):
        raise TypeError(
            f"out_dir must be a path (str or pathlib.Path), got {type(out_dir).__name__}"
        )
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise ValueError(f"out_dir {str(out_dir)!r} is not a writable directory: {exc}") from exc
    return path
