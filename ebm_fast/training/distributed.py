"""Training over several processes and machines with torch.distributed (torchrun, DDP).

Run the same script under ``torchrun --nproc_per_node N`` (``--nnodes M`` across machines):
call :func:`init` first, wrap the energy with :func:`wrap` (DDP; a wrapper of your own is left
alone), build the replay buffer with :func:`shard_buffer`, and the Trainer does the rest:

* every rank draws the same global batch (same ``data_seed``) and keeps its contiguous slice
  (:func:`local_batch`), so the global batch B is split into B / world_size rows per rank;
* the sampler's ``chain_offset`` is set to the rank's first global chain index, so rank r's
  chains draw exactly the noise chains [r * B/R, (r + 1) * B/R) of a single process would:
  no two ranks share a draw, and the union of the ranks' chains is the single-process run's;
* fresh-chain initialisers (ShortRunML's and PersistentCD's ``init``) are called for the global
  batch on every rank (same torch generator state) and sliced (:class:`GlobalInit`);
* the replay buffer of global capacity N is sharded: rank r owns N / R slots and draws its
  noise at chain indices from r * 2**32 (ReplayBuffer's ``rank``); nothing is exchanged per
  iteration besides DDP's gradient all-reduce;
* checkpoints: every rank writes its loss state (buffer shard, persistent chains) to a shard
  file, then rank 0 writes the model, optimiser and counters; :func:`reshard_loss_state`
  reassembles the shards and splits them for another world size.

See docs/distributed.md.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ebm_fast import validation
from ebm_fast.buffer import ReplayBuffer

__all__ = [
    "Rank",
    "init",
    "world",
    "wrap",
    "unwrap",
    "local_batch",
    "GlobalInit",
    "shard_buffer",
    "prepare_loss",
    "all_reduce_mean",
    "barrier",
    "shard_path",
    "remove_stale_shards",
    "reshard_buffer_state",
    "reshard_loss_state",
]

# A shard file, or the temporary file of its write (checkpoints.atomic_save's name for it).
_SHARD_FILE = re.compile(r"\.?iteration-\d+-rank-(\d+)-of-\d+\.pt(\..+\.tmp)?")


@dataclasses.dataclass(frozen=True)
class Rank:
    """This process's place in the job: its rank, the world size and its device."""

    rank: int
    world_size: int
    device: torch.device


def init(backend: str | None = None) -> Rank:
    """Join the torchrun job (init_process_group from torchrun's environment variables); a
    single process run without torchrun gets Rank(0, 1, ...) and no process group.

    backend: None picks NCCL when CUDA is available (device cuda:LOCAL_RANK), gloo otherwise.
    """
    cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    backend = validation.choice(backend, "backend", ("nccl", "gloo"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    rank, world_size = world()
    return Rank(rank, world_size, device)


def world() -> tuple[int, int]:
    """(rank, world_size): (0, 1) without an initialised process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap(energy: torch.nn.Module, **ddp_options) -> torch.nn.Module:
    """The energy in DistributedDataParallel when a process group runs; already wrapped
    modules (DDP, FSDP or any wrapper of yours) and single-process runs are returned as they
    are. forward_sync_buffers defaults to False: the sampler calls the energy every step, and
    DDP would broadcast the module's buffers on each of those calls (buffers are still synced
    once, at wrapping)."""
    if not isinstance(energy, torch.nn.Module):
        raise TypeError(f"energy must be a torch.nn.Module, got {type(energy).__name__}")
    if world()[1] == 1 or energy is not unwrap(energy) or _is_user_wrapper(energy):
        return energy
    ddp_options.setdefault("forward_sync_buffers", False)
    return DistributedDataParallel(energy, **ddp_options)


def _is_user_wrapper(energy: torch.nn.Module) -> bool:
    """FSDP-style wrappers (fully_shard replaces the module's class) manage their own gradient
    synchronisation."""
    return type(energy).__name__.startswith("FSDP")


def unwrap(energy: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (its state_dict has no 'module.' prefix)."""
    return energy.module if isinstance(energy, DistributedDataParallel) else energy


def _local_rows(batch: int, rank: int, world_size: int) -> slice:
    if batch % world_size:
        raise ValueError(
            f"the global batch ({batch} samples) must be a multiple of the world "
            f"size ({world_size}): each rank takes an equal share"
        )
    share = batch // world_size
    return slice(rank * share, (rank + 1) * share)


def local_batch(x: torch.Tensor, y: torch.Tensor | None, rank: int, world_size: int):
    """This rank's contiguous share of the global batch (x, y)."""
    rows = _local_rows(x.shape[0], rank, world_size)
    return x[rows], None if y is None else y[rows]


class GlobalInit:
    """init(batch) -> this rank's rows of init(batch * world_size): every rank draws the whole
    global batch from the same generator state (the same numbers a single process draws) and
    keeps its slice, so the generators stay in step across ranks."""

    def __init__(self, init: Callable[[int], torch.Tensor], rank: int, world_size: int):
        self.init, self.rank, self.world_size = init, rank, world_size

    def __call__(self, batch: int) -> torch.Tensor:
        return self.init(batch * self.world_size)[
            _local_rows(batch * self.world_size, self.rank, self.world_size)
        ]


def shard_buffer(
    capacity: int, sample_shape, *, seed: int | None = None, **options
) -> ReplayBuffer:
    """This rank's shard of a replay buffer of global ``capacity`` slots: capacity /
    world_size slots (a multiple of n_classes), the same seed on every rank (None draws it from
    torch's global generator, in step on ranks seeded alike) and rank r's noise at chain
    indices from r * 2**32. Other options as for ReplayBuffer."""
    rank, world_size = world()
    capacity = validation.integer(capacity, "capacity", low=1)
    per_rank = world_size * (options.get("n_classes") or 1)
    if capacity % per_rank:
        raise ValueError(
            f"capacity ({capacity}) must be a multiple of world_size * n_classes "
            f"({per_rank}): each rank owns an equal share of every class"
        )
    return ReplayBuffer(
        capacity // world_size,
        sample_shape,
        seed=validation.seed_or_default(seed),
        rank=rank,
        **options,
    )


def prepare_loss(loss, local_size: int, rank: int, world_size: int) -> None:
    """Give the loss's chains their global indices for a local batch of local_size (the
    sampler's chain_offset), make its init draw the global batch (GlobalInit), and check that
    its buffer is this rank's shard. Cheap: called every iteration by the Trainer."""
    loss.sampler.chain_offset = rank * local_size
    init = getattr(loss, "init", None)
    if init is not None and not isinstance(init, GlobalInit):
        loss.init = GlobalInit(init, rank, world_size)
    buffer = getattr(loss, "buffer", None)
    if buffer is not None and buffer.rank != rank:
        raise ValueError(
            f"the loss's replay buffer has rank={buffer.rank} on rank {rank}: build "
            "it with ebm_fast.training.distributed.shard_buffer so each rank owns "
            "its shard and its own noise"
        )


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` over the ranks (one all-reduce; the tensor itself in one
    process)."""
    world_size = world()[1]
    if world_size == 1:
        return values
    reduced = values.clone()
    dist.all_reduce(reduced)
    return reduced / world_size


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


# -- checkpoints -----------------------------------------------------------------------------
def shard_path(checkpoint: Path, iteration: int, rank: int, world_size: int) -> Path:
    """Where rank's loss state of the checkpoint at iteration goes: a file per iteration, so
    the shards of the last complete checkpoint survive a crash while the next one is written."""
    return (
        Path(checkpoint).parent
        / f"{Path(checkpoint).stem}.shards"
        / f"iteration-{iteration}-rank-{rank}-of-{world_size}.pt"
    )


def remove_stale_shards(
    checkpoint: Path, rank: int, world_size: int, keep: Path | None = None
) -> None:
    """Remove the shard files of ``checkpoint`` that its newest version does not use: this
    rank's other ones (older checkpoints, temporary files of writes a crash cut short, which
    atomic_save cannot remove when the process is killed), and on rank 0 those of ranks this
    world no longer has (a run resumed on fewer processes; all of them in one process, whose
    checkpoint holds the loss state itself, and then the emptied folder). Every file has one
    remover, so the ranks never race."""
    folder = shard_path(checkpoint, 0, 0, 1).parent
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        match = _SHARD_FILE.fullmatch(path.name)
        owner = None if match is None else int(match[1])
        if (
            path != keep
            and owner is not None
            and (owner == rank or (rank == 0 and owner >= world_size))
        ):
            path.unlink(missing_ok=True)
    if world_size == 1 and not any(folder.iterdir()):
        folder.rmdir()


def _class_blocks(tensor: torch.Tensor, n_ranks: int, n_classes: int) -> torch.Tensor:
    """Shard tensors (n_ranks, capacity / n_ranks, ...) -> (n_classes, global slots per
    class, ...): each shard stores its classes one after another."""
    per_class = tensor.shape[1] // n_classes
    blocks = tensor.reshape(n_ranks, n_classes, per_class, *tensor.shape[2:])
    return blocks.transpose(0, 1).reshape(n_classes, n_ranks * per_class, *tensor.shape[2:])


def reshard_buffer_state(states: list[dict], rank: int, world_size: int) -> dict:
    """Rank's ReplayBuffer state_dict for world_size shards, from the state_dicts of all the
    saved shards (in rank order; one state for a single-process buffer).

    The slots keep their contents and written flags; class c's global slots are split into
    world_size contiguous runs. The seed and draw counter carry over. What cannot carry over:
    which slot a draw picks and the buffer's noise (each rank draws within its own shard, at
    its own chain indices), and the append position (FIFO) or items-seen count (reservoir),
    which restart after each class's leading written slots.
    """
    if len(states) == world_size:
        return states[rank]
    config = dict(states[0]["config"])
    n_classes = config["n_classes"] or 1
    capacity = config["capacity"] * len(states)
    if capacity % (world_size * n_classes):
        raise ValueError(
            f"the buffer's global capacity {capacity} does not split into "
            f"{world_size} shards of equal per-class size ({n_classes} classes)"
        )
    storage, written = (
        _class_blocks(torch.stack([s[name] for s in states]), len(states), n_classes)
        for name in ("storage", "written")
    )
    share = storage.shape[1] // world_size
    mine = slice(rank * share, (rank + 1) * share)
    written = written[:, mine]
    config.update(capacity=capacity // world_size, rank=rank)
    return {
        "config": config,
        "seed": states[0]["seed"].clone(),
        "storage": storage[:, mine].reshape(-1, storage.shape[-1]).clone(),
        "written": written.reshape(-1).clone(),
        "count": written.to(torch.int64).cumprod(1).sum(1),
        "draws": torch.stack([s["draws"] for s in states]).max(),
    }


def reshard_loss_state(states: list[dict], rank: int, world_size: int) -> dict:
    """Rank's loss state_dict for world_size ranks from the saved ranks' states (rank order):
    the buffer re-sharded (reshard_buffer_state), persistent chains concatenated and split; the
    sampler's counters (equal on every rank) from rank 0."""
    if len(states) == world_size:
        return states[rank]
    state = dict(states[0])
    if state.get("buffer") is not None:
        state["buffer"] = reshard_buffer_state([s["buffer"] for s in states], rank, world_size)
    if state.get("chains") is not None:
        chains = torch.cat([s["chains"] for s in states])
        state["chains"] = chains[_local_rows(chains.shape[0], rank, world_size)].clone()
    return state
