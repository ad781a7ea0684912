"""ReplayBuffer: a device-resident replay buffer for persistent EBM chains (IGEBM, JEM).

One fused kernel draws a batch (slot choice, dequantisation, Bernoulli re-initialisation from
noise) and one stores it back (write-back to the drawn slots, FIFO ring or reservoir). Storage,
written flags, per-class counts and the draw counter all live on the buffer's device, so
``sample`` and ``push`` never read the device from the host (with ``check_values=False``) and can
be captured in a CUDA graph. All randomness follows the noise spec (ebm_fast/noise.py): the
draw counter is the spec's ``step`` and is advanced by every ``sample`` and ``push``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ebm_fast.ops._dispatch import as_int64_scalar
from ebm_fast.ops.buffer_push import buffer_push
from ebm_fast.ops.buffer_sample import OUTPUT_DTYPES, buffer_sample
from ebm_fast.noise import STREAM_BUFFER_QUANTIZE
from ebm_fast.reference.buffer_push import POLICIES

STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
INITS = ("uniform", "gaussian")
# Each rank's chains take indices [rank * 2**32, rank * 2**32 + batch) in the noise counters, so
# shards of one job never share a draw.
RANK_CHAIN_STRIDE = 1 << 32
ELEMENT_INDEX_LIMIT = 1 << 62
STATE_VERSION = 1

__all__ = ["ReplayBuffer", "STREAM_BUFFER_QUANTIZE"]


class ReplayBuffer:
    """A buffer of ``capacity`` samples of shape ``sample_shape`` kept on ``device``.

    Args:
        capacity: number of slots (with ``n_classes``: in total, ``capacity // n_classes`` per
            class; capacity must be a multiple of n_classes).
        sample_shape: shape of one sample, e.g. (3, 32, 32).
        device: where storage and counters live (default: CPU).
        dtype: dtype of the batches ``sample`` returns (float32, float64, bfloat16, float16).
        storage: "float32", "bfloat16" (half the memory) or "uint8" (a quarter; values are
            quantised over ``init_range``: error at most half a step of (hi - lo) / 255 inside
            the range, values outside are clamped to it).
        init: "uniform" over ``init_range``, "gaussian" (standard normal), or a callable
            ``init(shape, device=..., dtype=...)`` returning a tensor of that shape (called once
            per ``sample`` for the whole batch; its randomness is the caller's).
        reinit_prob: probability that a drawn chain is replaced by fresh init noise.
        n_classes: per-class storage (JEM): ``sample`` and appending ``push`` take class labels y.
        policy: "fifo" (ring per class) or "reservoir" (Vitter's algorithm R per class).
        seed: 64-bit noise seed.
        rank: shard index for multi-process training; rank r draws noise for chain indices
            starting at r * 2**32, so shards never share a draw.
        stochastic_rounding: uint8 storage rounds stochastically (unbiased, noise-spec stream
            ``STREAM_BUFFER_QUANTIZE``) instead of to nearest.
        check_values: refuse non-finite pushes and out-of-range labels / slots with a clear
            error. Costs one host-device synchronisation per call on a GPU; set False for
            CUDA-graph capture or the last few percent of speed.

    Slots never written hold init noise: drawing one always returns fresh init values.
    """

    def __init__(self, capacity: int, sample_shape, *, device=None, dtype=torch.float32,
                 storage: str = "float32", init: str | Callable = "uniform",
                 init_range=(-1.0, 1.0), reinit_prob: float = 0.05, n_classes: int | None = None,
                 policy: str = "fifo", seed: int = 0, rank: int = 0,
                 stochastic_rounding: bool = False, check_values: bool = True):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        if isinstance(sample_shape, int):
            sample_shape = (sample_shape,)
        sample_shape = tuple(sample_shape)
        if not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sample_shape):
            raise ValueError(f"sample_shape must be a tuple of positive ints, got {sample_shape!r}")
        if dtype not in OUTPUT_DTYPES:
            raise TypeError(f"dtype must be one of {OUTPUT_DTYPES}, got {dtype}")
        if storage not in STORAGES:
            raise ValueError(f"storage must be one of {tuple(STORAGES)}, got {storage!r}")
        if not (callable(init) or init in INITS):
            raise ValueError(f"init must be one of {INITS} or a callable, got {init!r}")
        if not isinstance(init_range, (tuple, list)) or len(init_range) != 2:
            raise ValueError(f"init_range must be a (lo, hi) pair, got {init_range!r}")
        lo, hi = (float(v) for v in init_range)
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"init_range must be finite with lo < hi, got {init_range!r}")
        if not 0.0 <= float(reinit_prob) <= 1.0:
            raise ValueError(f"reinit_prob must be in [0, 1], got {reinit_prob}")
        if n_classes is not None:
            if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes <= 0:
                raise ValueError(f"n_classes must be None or a positive int, got {n_classes!r}")
            if capacity % n_classes:
                raise ValueError(f"capacity ({capacity}) must be a multiple of n_classes "
                                 f"({n_classes}): each class owns capacity // n_classes slots")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
            raise ValueError(f"rank must be a non-negative int, got {rank!r}")
        device = torch.device(device) if device is not None else torch.device("cpu")
        self.capacity = capacity
        self.sample_shape = sample_shape
        self.dtype = dtype
        self.storage = storage
        self.init = init
        self.init_range = (lo, hi)
        self.reinit_prob = float(reinit_prob)
        self.n_classes = n_classes
        self.policy = policy
        self.rank = rank
        self.stochastic_rounding = bool(stochastic_rounding)
        self.check_values = bool(check_values)
        self._features = math.prod(sample_shape)
        self._slots_per_class = capacity // (n_classes or 1)
        self._chain_offset = rank * RANK_CHAIN_STRIDE
        self._seed = as_int64_scalar(seed, "seed", 64).to(device)
        self._storage = torch.zeros((capacity, self._features), dtype=STORAGES[storage],
                                    device=device)
        self._written = torch.zeros((capacity,), dtype=torch.uint8, device=device)
        self._count = torch.zeros((n_classes or 1,), dtype=torch.int64, device=device)
        self._draws = torch.zeros((), dtype=torch.int64, device=device)

    # -- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._storage.device

    @property
    def seed(self) -> int:
        return int(self._seed)

    def __len__(self) -> int:
        """Number of slots holding a pushed sample (reads the device)."""
        return int(self._written.sum())

    def extra_repr(self) -> str:
        init = self.init if isinstance(self.init, str) else getattr(self.init, "__name__",
                                                                    "callable")
        classes = "" if self.n_classes is None else f", n_classes={self.n_classes}"
        rank = "" if self.rank == 0 else f", rank={self.rank}"
        return (f"capacity={self.capacity}, sample_shape={self.sample_shape}, "
                f"storage={self.storage}, dtype={str(self.dtype).replace('torch.', '')}, "
                f"policy={self.policy}{classes}, init={init} {list(self.init_range)}, "
                f"reinit_prob={self.reinit_prob}, device={self.device}{rank}")

    def __repr__(self) -> str:
        return f"ReplayBuffer({self.extra_repr()}, filled={len(self)}/{self.capacity})"

    def to(self, device) -> "ReplayBuffer":
        """Move storage and counters to ``device`` (in place; returns self)."""
        device = torch.device(device)
        for name in ("_seed", "_storage", "_written", "_count", "_draws"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- validation -------------------------------------------------------------------------
    def _check_labels(self, y, batch: int, name: str, upper: int):
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(y).__name__}")
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {y.dtype}")
        if y.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(y.shape)}")
        if y.device != self.device:
            raise ValueError(f"{name} is on {y.device} but the buffer is on {self.device}")
        return y.to(torch.int64), (name, y, upper)

    def _class_labels(self, y, batch: int, ranges: list, purpose: str):
        """y as int64 (its range check added to ``ranges``), or None for a buffer without
        classes; a clear error when y is missing or superfluous."""
        if self.n_classes is None:
            if y is not None:
                raise ValueError("y was given but the buffer has no classes (n_classes=None)")
            return None
        if y is None:
            raise ValueError(f"y (the class of each chain) is required {purpose}: the buffer has "
                             f"n_classes={self.n_classes}")
        y, check = self._check_labels(y, batch, "y", self.n_classes)
        ranges.append(check)
        return y

    def _check_values(self, ranges, x=None) -> None:
        """One host read for every value check of a call (skipped when check_values=False).

        Pushed values are checked through their sum, one pass at memory speed: it is finite
        only if every element is (NaN and inf propagate); only a non-finite sum (or an
        overflow of huge finite values) pays for the per-chain count.
        """
        if not self.check_values or (not ranges and x is None):
            return
        stats = [((labels < 0) | (labels >= upper)).sum().to(torch.float64)
                 for _, labels, upper in ranges]
        if x is not None:
            stats.append(x.sum(dtype=torch.float32).to(torch.float64))
        values = torch.stack(stats).tolist()
        for (name, _, upper), bad in zip(ranges, values):
            if bad:
                raise ValueError(f"{int(bad)} entries of {name} are outside [0, {upper})")
        if x is not None and not math.isfinite(values[-1]):
            # Checked as stored: pushes are rounded to float32 first (float64 beyond its range
            # would become inf).
            stored = x.reshape(x.shape[0], -1).to(torch.float32)
            bad = int((~torch.isfinite(stored)).any(1).sum())
            if bad:
                raise ValueError(f"push refused: {bad} of {x.shape[0]} chains hold non-finite "
                                 "values (NaN, inf, or beyond float32's range); fix the sampler "
                                 "or pass check_values=False")

    def _check_batch_indices(self, batch: int) -> None:
        if (self._chain_offset + batch) * self._features >= ELEMENT_INDEX_LIMIT:
            raise ValueError(f"rank {self.rank} with batch {batch} of {self._features} elements "
                             "exceeds the 2**62 noise counter range")

    # -- hot path ---------------------------------------------------------------------------
    def sample(self, batch_size: int, y=None):
        """Draw ``batch_size`` chains: returns (x (batch_size, *sample_shape) in ``dtype``,
        slot indices (batch_size,) int64), both on the buffer's device.

        Slots are drawn uniformly with replacement (within class y[i] when n_classes is set);
        each chain is replaced by fresh init noise with probability reinit_prob, and always when
        its slot was never written.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self._check_batch_indices(batch_size)
        ranges = []
        y = self._class_labels(y, batch_size, ranges, "to sample")
        self._check_values(ranges)
        init_values = None
        if callable(self.init):
            shape = (batch_size, *self.sample_shape)
            init_values = self.init(shape, device=self.device, dtype=self.dtype)
            if not isinstance(init_values, torch.Tensor) or init_values.shape != shape:
                raise ValueError(f"init must return a tensor of shape {shape}, got "
                                 f"{getattr(init_values, 'shape', type(init_values).__name__)}")
            init_values = init_values.reshape(batch_size, self._features)
        x, slots = buffer_sample(
            self._storage, self._written, batch_size, dtype=self.dtype, seed=self._seed,
            step=self._draws, chain_offset=self._chain_offset,
            slots_per_class=self._slots_per_class, reinit_prob=self.reinit_prob,
            init_kind="values" if init_values is not None else self.init,
            lo=self.init_range[0], hi=self.init_range[1], y=y, init_values=init_values)
        self._draws.add_(1)
        return x.reshape(batch_size, *self.sample_shape), slots

    def push(self, x: torch.Tensor, idx=None, y=None) -> None:
        """Store a batch x (batch, *sample_shape).

        With ``idx`` (the slots ``sample`` returned) each chain is written back to its slot;
        otherwise chains are appended by the buffer's policy (into class y[i] when n_classes is
        set). Where two chains of one push land in the same slot, the later one is kept.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        if x.dim() != 1 + len(self.sample_shape) or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"x must have shape (batch, *{self.sample_shape}), got "
                             f"{tuple(x.shape)}")
        if x.device != self.device:
            raise ValueError(f"x is on {x.device} but the buffer is on {self.device}")
        batch = x.shape[0]
        if batch == 0:
            raise ValueError("x holds no chains (batch size 0)")
        self._check_batch_indices(batch)
        ranges = []
        if idx is not None:
            idx, check = self._check_labels(idx, batch, "idx", self.capacity)
            ranges.append(check)
            y = None
        else:
            y = self._class_labels(y, batch, ranges, "to append")
        if x.dtype not in OUTPUT_DTYPES:
            x = x.to(torch.float32)
        self._check_values(ranges, x)
        buffer_push(self._storage, self._written, self._count, x.reshape(batch, self._features),
                    seed=self._seed, step=self._draws, chain_offset=self._chain_offset,
                    slots_per_class=self._slots_per_class, policy=self.policy,
                    lo=self.init_range[0], hi=self.init_range[1],
                    stochastic=self.stochastic_rounding, idx=idx, y=y)
        self._draws.add_(1)

    # -- checkpoints ------------------------------------------------------------------------
    def _config(self) -> dict:
        return {"version": STATE_VERSION, "capacity": self.capacity,
                "sample_shape": list(self.sample_shape), "storage": self.storage,
                "n_classes": self.n_classes, "policy": self.policy,
                "init_range": list(self.init_range), "rank": self.rank}

    def state_dict(self) -> dict:
        """Everything needed to resume draws bit-identically (loadable with weights_only=True)."""
        return {"config": self._config(), "seed": self._seed.detach().clone(),
                "storage": self._storage.detach().clone(),
                "written": self._written.detach().clone(),
                "count": self._count.detach().clone(), "draws": self._draws.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict; refuses (ValueError) one from a differently configured buffer."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"config", "seed", "storage", "written", "count", "draws"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        config, expected = state["config"], self._config()
        if not isinstance(config, dict):
            raise ValueError("state_dict['config'] must be a dict")
        mismatched = [f"{k}: saved {config.get(k)!r}, this buffer {v!r}"
                      for k, v in expected.items() if config.get(k) != v]
        if mismatched:
            raise ValueError("state_dict comes from a differently configured ReplayBuffer: "
                             + "; ".join(mismatched))
        for name, current in (("seed", self._seed), ("storage", self._storage),
                              ("written", self._written), ("count", self._count),
                              ("draws", self._draws)):
            saved = state[name]
            if not isinstance(saved, torch.Tensor):
                raise ValueError(f"state_dict[{name!r}] must be a tensor, got "
                                 f"{type(saved).__name__}")
            if saved.shape != current.shape or saved.dtype != current.dtype:
                raise ValueError(f"state_dict[{name!r}] has {tuple(saved.shape)} {saved.dtype}, "
                                 f"expected {tuple(current.shape)} {current.dtype}")
        for name in ("seed", "storage", "written", "count", "draws"):
            getattr(self, f"_{name}").copy_(state[name])
