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
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import torch
from torch.types import Device

from ebm_fast import validation
from ebm_fast.noise import STREAM_BUFFER_QUANTIZE, STREAM_BUFFER_REINIT_DECISION
from ebm_fast.ops.buffer_push import buffer_push
from ebm_fast.ops.buffer_sample import OUTPUT_DTYPES, buffer_sample
from ebm_fast.ops.philox import philox_uniform
from ebm_fast.reference.buffer_push import POLICIES
from ebm_fast.reference.buffer_sample import reinit_mask

STORAGES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "uint8": torch.uint8}
INITS = ("uniform", "gaussian")
FLAGS = (False, True)  # options that are a bool, nothing else
# Each rank's chains take indices [rank * 2**32, rank * 2**32 + batch) in the noise counters, so
# shards of one job never share a draw.
RANK_CHAIN_STRIDE = 1 << 32
# The noise spec's step is 32 bits: the draw counter wraps (and repeats noise) at 2**32 calls.
DRAW_LIMIT = 1 << 32
# The reservoir's slot arithmetic is exact while a class has seen fewer than 2**46 items
# (ebm_fast/reference/buffer_push.py).
RESERVOIR_COUNT_LIMIT = 1 << 46
STATE_VERSION = 2
# (message with a {} for the count, mask of the bad entries): one host read checks them all.
ValueChecks = list[tuple[str, torch.Tensor]]

__all__ = ["ReplayBuffer", "STREAM_BUFFER_QUANTIZE"]


def _init_name(init) -> str:
    """How a checkpoint names the init: the built-in's name, or a callable's qualified name."""
    if isinstance(init, str):
        return init
    name = getattr(init, "__qualname__", type(init).__qualname__)
    return f"{getattr(init, '__module__', type(init).__module__)}.{name}"


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
        n_classes: per-class storage (JEM): appending ``push`` takes class labels y, and
            ``sample`` draws within class y[i] when given y, uniformly over all slots otherwise.
        policy: "fifo" (ring per class) or "reservoir" (Vitter's algorithm R per class).
        seed: 64-bit noise seed; None (the default) draws one from torch's global generator, so
            ``torch.manual_seed`` makes a run reproducible and two fresh buffers differ.
        rank: shard index for multi-process training; rank r draws noise for chain indices
            starting at r * 2**32, so shards never share a draw.
        stochastic_rounding: uint8 storage rounds stochastically (unbiased, noise-spec stream
            ``STREAM_BUFFER_QUANTIZE``) instead of to nearest.
        check_values: refuse non-finite pushes and out-of-range labels / slots with a clear
            error. Costs one host-device synchronisation per call on a GPU; set False for
            CUDA-graph capture or the last few percent of speed.

    Slots never written hold init noise: drawing one always returns fresh init values.
    ``len(buffer)`` (also ``n_written``) counts written slots, not ``capacity``.
    """

    def __init__(
        self,
        capacity: int,
        sample_shape: int | Sequence[int],
        *,
        device: Device = None,
        dtype: torch.dtype = torch.float32,
        storage: str = "float32",
        init: str | Callable[..., torch.Tensor] = "uniform",
        init_range: tuple[float, float] = (-1.0, 1.0),
        reinit_prob: float = 0.05,
        n_classes: int | None = None,
        policy: str = "fifo",
        seed: int | None = None,
        rank: int = 0,
        stochastic_rounding: bool = False,
        check_values: bool = True,
    ) -> None:
        capacity = validation.integer(capacity, "capacity", low=1)
        if isinstance(sample_shape, (tuple, list, torch.Size)):
            sample_shape = tuple(
                validation.integer(size, f"sample_shape[{i}]", low=1)
                for i, size in enumerate(sample_shape)
            )
        else:
            sample_shape = (validation.integer(sample_shape, "sample_shape", low=1),)
        if not isinstance(init_range, (tuple, list)):
            raise TypeError(f"init_range must be a (lo, hi) pair, got {type(init_range).__name__}")
        if len(init_range) != 2:
            raise ValueError(f"init_range must be a (lo, hi) pair, got {init_range!r}")
        lo = validation.real(init_range[0], "init_range[0]")
        hi = validation.real(init_range[1], "init_range[1]")
        if not lo < hi:
            raise ValueError(f"init_range must have lo < hi, got {init_range!r}")
        if n_classes is not None:
            n_classes = validation.integer(n_classes, "n_classes", low=1)
            if capacity % n_classes:
                raise ValueError(
                    f"capacity ({capacity}) must be a multiple of n_classes "
                    f"({n_classes}): each class owns capacity // n_classes slots"
                )
        self.capacity = capacity
        self.sample_shape = sample_shape
        self.dtype = validation.dtype(dtype, "dtype", OUTPUT_DTYPES)
        self.storage = validation.choice(storage, "storage", tuple(STORAGES))
        self.init = init if callable(init) else validation.choice(init, "init", INITS)
        self.init_range = (lo, hi)
        self.reinit_prob = validation.real(reinit_prob, "reinit_prob", low=0.0, high=1.0)
        # Compared in float32 as the kernels do; a 0-dim CPU tensor works with any device.
        self._reinit_threshold = torch.tensor(self.reinit_prob, dtype=torch.float32)
        self.n_classes = n_classes
        self.policy = validation.choice(policy, "policy", POLICIES)
        self.rank = validation.integer(rank, "rank", low=0)
        self.stochastic_rounding = validation.choice(
            stochastic_rounding, "stochastic_rounding", FLAGS
        )
        self.check_values = validation.choice(check_values, "check_values", FLAGS)
        self.slots_per_class = capacity // (n_classes or 1)
        self._features = math.prod(sample_shape)
        self._chain_offset = self.rank * RANK_CHAIN_STRIDE
        device = torch.device(device) if device is not None else torch.device("cpu")
        self._seed = validation.counter(validation.seed_or_default(seed), "seed", 64).to(device)
        self._storage = torch.zeros(
            (capacity, self._features), dtype=STORAGES[self.storage], device=device
        )
        self._written = torch.zeros((capacity,), dtype=torch.uint8, device=device)
        self._count = torch.zeros((n_classes or 1,), dtype=torch.int64, device=device)
        self._draws = torch.zeros((), dtype=torch.int64, device=device)

    @classmethod
    def from_tensor(
        cls,
        samples: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        capacity: int | None = None,
        n_classes: int | None = None,
        **kwargs: Any,
    ) -> ReplayBuffer:
        """A buffer holding the rows of ``samples`` (n, *sample_shape), e.g. the tensor buffer
        of a JEM or IGEBM checkpoint. The rows are appended in order (one ``push``), so they
        count as written and ``sample`` returns them.

        Args:
            samples: floating tensor (n, *sample_shape); the buffer lives on its device unless
                ``device`` is given.
            y: int tensor (n,) of each row's class (needs ``n_classes``). Without y, a buffer
                with ``n_classes`` takes JEM's layout: class k's rows are the k-th of
                n_classes equal contiguous blocks of ``samples``.
            capacity: slots (default: n). With fewer slots than rows, the policy decides which
                rows stay (FIFO: the last ones).
            n_classes, **kwargs: as for the constructor.
        """
        if not isinstance(samples, torch.Tensor):
            raise TypeError(f"samples must be a tensor, got {type(samples).__name__}")
        if not samples.dtype.is_floating_point:
            raise TypeError(f"samples must be a floating tensor, got {samples.dtype}")
        if samples.dim() < 2 or samples.shape[0] == 0:
            raise ValueError(
                "samples must have shape (n, *sample_shape) with n >= 1, got "
                f"{tuple(samples.shape)}"
            )
        rows = samples.shape[0]
        if y is None and n_classes is not None:
            if rows % n_classes:
                raise ValueError(
                    f"without y, samples holds n_classes ({n_classes}) equal "
                    f"blocks of rows (JEM's layout), but it has {rows} rows"
                )
            y = torch.arange(rows, device=samples.device) // (rows // n_classes)
        elif y is not None and n_classes is None:
            raise ValueError("y was given without n_classes: pass the number of classes")
        kwargs.setdefault("device", samples.device)
        buffer = cls(
            rows if capacity is None else capacity,
            tuple(samples.shape[1:]),
            n_classes=n_classes,
            **kwargs,
        )
        buffer.push(samples, y=y)
        return buffer

    # -- properties -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._storage.device

    @property
    def seed(self) -> int:
        """The 64-bit noise seed (reads the device)."""
        return int(self._seed) % (1 << 64)

    @property
    def n_written(self) -> int:
        """Number of slots holding a pushed sample (reads the device); at most ``capacity``."""
        return int(self._written.sum())

    def __len__(self) -> int:
        """``n_written``: a fresh buffer has length 0 whatever its capacity."""
        return self.n_written

    def classes_of(self, idx: torch.Tensor) -> torch.Tensor:
        """The class owning each slot of ``idx`` (on idx's device, no host read)."""
        if self.n_classes is None:
            raise ValueError("classes_of needs a buffer with classes (n_classes is None)")
        return idx // self.slots_per_class

    def extra_repr(self) -> str:
        init = (
            self.init if isinstance(self.init, str) else getattr(self.init, "__name__", "callable")
        )
        classes = "" if self.n_classes is None else f", n_classes={self.n_classes}"
        rank = "" if self.rank == 0 else f", rank={self.rank}"
        return (
            f"capacity={self.capacity}, sample_shape={self.sample_shape}, "
            f"storage={self.storage}, dtype={str(self.dtype).replace('torch.', '')}, "
            f"policy={self.policy}{classes}, init={init} {list(self.init_range)}, "
            f"reinit_prob={self.reinit_prob}, device={self.device}{rank}"
        )

    def __repr__(self) -> str:
        # A meta-device buffer has no values to count.
        filled = "?" if self.device.type == "meta" else self.n_written
        return f"ReplayBuffer({self.extra_repr()}, filled={filled}/{self.capacity})"

    def to(self, device: torch.device | str | int) -> ReplayBuffer:
        """Move storage and counters to ``device`` (in place; returns self)."""
        device = torch.device(device)
        for name in ("_seed", "_storage", "_written", "_count", "_draws"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    # -- validation -------------------------------------------------------------------------
    def _labels(
        self, labels: object, batch: int, name: str, upper: int, checks: ValueChecks
    ) -> torch.Tensor:
        """labels as int64 (batch,); their range check [0, upper) is added to ``checks``."""
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"{name} must be an integer tensor, got {labels.dtype}")
        if labels.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(labels.shape)}")
        validation.same_device(self.device, "the buffer", **{name: labels})
        if self.check_values:
            checks.append(
                (
                    f"{{}} entries of {name} are outside [0, {upper})",
                    (labels < 0) | (labels >= upper),
                )
            )
        return labels.to(torch.int64)

    def _classes(self, y: object, batch: int, checks: ValueChecks) -> torch.Tensor | None:
        """y as int64 (range-checked), or None; refused on a buffer without classes."""
        if y is None:
            return None
        if self.n_classes is None:
            raise ValueError("y was given but the buffer has no classes (n_classes=None)")
        return self._labels(y, batch, "y", self.n_classes, checks)

    def _check_values(self, checks: ValueChecks, x: torch.Tensor | None = None) -> None:
        """One host read for every value check of a call (skipped when check_values=False).

        ``checks`` holds (message with a {} for the count, mask of bad entries) pairs. Pushed
        values are checked through their sum, one pass at memory speed: it is finite only if
        every element is (NaN and inf propagate); only a non-finite sum (or an overflow of huge
        finite values) pays for the per-chain count.
        """
        if not self.check_values or (not checks and x is None):
            return
        stats = [bad.sum().to(torch.float64) for _, bad in checks]
        if x is not None:
            stats.append(x.sum(dtype=torch.float32).to(torch.float64))
        values = torch.stack(stats).tolist()
        for (message, _), bad in zip(checks, values):
            if bad:
                raise ValueError(message.format(int(bad)))
        if x is not None and not math.isfinite(values[-1]):
            # Checked as stored: pushes are rounded to float32 first (float64 beyond its range
            # would become inf).
            stored = x.reshape(x.shape[0], -1).to(torch.float32)
            bad = int((~torch.isfinite(stored)).any(1).sum())
            if bad:
                raise ValueError(
                    f"push refused: {bad} of {x.shape[0]} chains hold non-finite "
                    "values (NaN, inf, or beyond float32's range); fix the sampler "
                    "or pass check_values=False"
                )

    def _check_batch_indices(self, batch: int) -> None:
        validation.chain_offset(
            self._chain_offset, (batch, self._features), f"rank {self.rank}'s first chain index"
        )

    def _reinit_decisions(self, slots: torch.Tensor) -> torch.Tensor:
        """Which chains of the draw at the current counter got init values: the kernels' rule
        (ebm_fast/reference/buffer_sample.py), its uniforms from the fast Philox op (the
        reference's pure-torch Philox costs milliseconds per batch)."""
        u = philox_uniform(
            slots.shape,
            seed=self._seed,
            step=self._draws,
            stream=STREAM_BUFFER_REINIT_DECISION,
            chain_offset=self._chain_offset,
            device=self.device,
        )
        return reinit_mask(u, self._reinit_threshold, self._written, slots)

    # -- hot path ---------------------------------------------------------------------------
    @overload
    def sample(
        self,
        batch_size: int,
        y: torch.Tensor | None = None,
        *,
        return_reinit: Literal[False] = False,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    @overload
    def sample(
        self, batch_size: int, y: torch.Tensor | None = None, *, return_reinit: Literal[True]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    @overload
    def sample(
        self, batch_size: int, y: torch.Tensor | None = None, *, return_reinit: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def sample(
        self, batch_size: int, y: torch.Tensor | None = None, *, return_reinit: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor] | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw ``batch_size`` chains: returns (x (batch_size, *sample_shape) in ``dtype``,
        slot indices (batch_size,) int64), both on the buffer's device; with
        ``return_reinit=True`` also a bool (batch_size,) mask of the chains replaced by fresh
        init values (computed on the device, no host read).

        Slots are drawn uniformly with replacement: within class y[i] when y is given (buffers
        with n_classes), over all slots otherwise (``classes_of(idx)`` gives their classes).
        Each chain is replaced by fresh init noise with probability reinit_prob, and always
        when its slot was never written.
        """
        batch_size = validation.integer(batch_size, "batch_size", low=1)
        return_reinit = validation.choice(return_reinit, "return_reinit", FLAGS)
        self._check_batch_indices(batch_size)
        checks: ValueChecks = []
        y = self._classes(y, batch_size, checks)
        self._check_values(checks)
        # Without y every slot is one class's: a uniform draw over the whole buffer.
        slots_per_class = self.capacity if y is None else self.slots_per_class
        init_values, init_kind = None, self.init
        if callable(init_kind):
            shape = (batch_size, *self.sample_shape)
            init_values = init_kind(shape, device=self.device, dtype=self.dtype)
            if not isinstance(init_values, torch.Tensor) or init_values.shape != shape:
                raise ValueError(
                    f"init must return a tensor of shape {shape}, got "
                    f"{getattr(init_values, 'shape', type(init_values).__name__)}"
                )
            init_values, init_kind = init_values.reshape(batch_size, self._features), "values"
        x, slots = buffer_sample(
            self._storage,
            self._written,
            batch_size,
            dtype=self.dtype,
            seed=self._seed,
            step=self._draws,
            chain_offset=self._chain_offset,
            slots_per_class=slots_per_class,
            reinit_prob=self.reinit_prob,
            init_kind=init_kind,
            lo=self.init_range[0],
            hi=self.init_range[1],
            y=y,
            init_values=init_values,
        )
        reinit = self._reinit_decisions(slots) if return_reinit else None
        self._draws.add_(1)
        x = x.reshape(batch_size, *self.sample_shape)
        return (x, slots) if reinit is None else (x, slots, reinit)

    def push(
        self, x: torch.Tensor, idx: torch.Tensor | None = None, y: torch.Tensor | None = None
    ) -> None:
        """Store a batch x (batch, *sample_shape).

        With ``idx`` (the slots ``sample`` returned) each chain is written back to its slot (a
        y given too must be each slot's class); otherwise chains are appended by the buffer's
        policy (into class y[i] when n_classes is set). Where two chains of one push land in
        the same slot, the later one is kept.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"x must be a floating tensor, got {x.dtype}")
        if x.dim() != 1 + len(self.sample_shape) or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"x must have shape (batch, *{self.sample_shape}), got {tuple(x.shape)}"
            )
        validation.same_device(self.device, "the buffer", x=x)
        batch = x.shape[0]
        if batch == 0:
            raise ValueError("x holds no chains (batch size 0)")
        self._check_batch_indices(batch)
        checks: ValueChecks = []
        y = self._classes(y, batch, checks)
        if idx is not None:
            idx = self._labels(idx, batch, "idx", self.capacity, checks)
            if y is not None and self.check_values:
                checks.append(
                    (
                        f"{{}} entries of y are not the class of their slot (idx // "
                        f"{self.slots_per_class})",
                        self.classes_of(idx) != y,
                    )
                )
            y = None  # the slots fix the classes
        elif self.n_classes is not None and y is None:
            raise ValueError(
                "y (the class of each chain) is required to append: the buffer "
                f"has n_classes={self.n_classes}"
            )
        if x.dtype not in OUTPUT_DTYPES:
            x = x.to(torch.float32)
        self._check_values(checks, x)
        buffer_push(
            self._storage,
            self._written,
            self._count,
            x.reshape(batch, self._features),
            seed=self._seed,
            step=self._draws,
            chain_offset=self._chain_offset,
            slots_per_class=self.slots_per_class,
            policy=self.policy,
            lo=self.init_range[0],
            hi=self.init_range[1],
            stochastic=self.stochastic_rounding,
            idx=idx,
            y=y,
        )
        self._draws.add_(1)

    # -- checkpoints ------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        """Everything that decides what the buffer draws and stores, besides its tensors."""
        return {
            "version": STATE_VERSION,
            "capacity": self.capacity,
            "sample_shape": list(self.sample_shape),
            "storage": self.storage,
            "dtype": str(self.dtype),
            "init": _init_name(self.init),
            "init_range": list(self.init_range),
            "reinit_prob": self.reinit_prob,
            "n_classes": self.n_classes,
            "policy": self.policy,
            "rank": self.rank,
            "stochastic_rounding": self.stochastic_rounding,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume draws bit-identically (loadable with weights_only=True)."""
        return {
            "config": self._config(),
            "seed": self._seed.detach().clone(),
            "storage": self._storage.detach().clone(),
            "written": self._written.detach().clone(),
            "count": self._count.detach().clone(),
            "draws": self._draws.detach().clone(),
        }

    def _check_state_values(self, state: dict[str, Any]) -> None:
        """Refuse counters no sequence of pushes and draws could have produced."""
        written, count, draws = (state[name].cpu() for name in ("written", "count", "draws"))
        if not ((written == 0) | (written == 1)).all():
            raise ValueError("state_dict['written'] must hold only 0 and 1 flags")
        if not 0 <= int(draws) < DRAW_LIMIT:
            raise ValueError(f"state_dict['draws'] must be in [0, 2**32), got {int(draws)}")
        if (count < 0).any():
            raise ValueError(f"state_dict['count'] must be >= 0, got {count.tolist()}")
        if self.policy == "reservoir" and (count >= RESERVOIR_COUNT_LIMIT).any():
            raise ValueError(
                "state_dict['count'] must be below 2**46 for a reservoir (its slot "
                f"arithmetic is exact only there), got {count.tolist()}"
            )
        # Appends fill each class's first slots in order before anything wraps or is replaced.
        filled = torch.arange(self.slots_per_class)[None, :] < count[:, None]
        if (filled & (written.reshape(-1, self.slots_per_class) == 0)).any():
            raise ValueError(
                "state_dict['written'] leaves slots unwritten that state_dict"
                "['count'] says were appended to"
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a state_dict. Refuses (ValueError, naming each difference) one saved by a
        differently configured buffer, and counters no buffer could have reached."""
        if not isinstance(state, dict):
            raise TypeError(f"state must be a dict, got {type(state).__name__}")
        missing = {"config", "seed", "storage", "written", "count", "draws"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing {sorted(missing)}")
        config, expected = state["config"], self._config()
        if not isinstance(config, dict):
            raise ValueError("state_dict['config'] must be a dict")
        mismatched = [
            f"{k}: saved {config.get(k)!r}, this buffer {v!r}"
            for k, v in expected.items()
            if config.get(k) != v
        ]
        if mismatched:
            raise ValueError(
                "state_dict comes from a differently configured ReplayBuffer: "
                + "; ".join(mismatched)
            )
        for name, current in (
            ("seed", self._seed),
            ("storage", self._storage),
            ("written", self._written),
            ("count", self._count),
            ("draws", self._draws),
        ):
            saved = state[name]
            if not isinstance(saved, torch.Tensor):
                raise ValueError(
                    f"state_dict[{name!r}] must be a tensor, got {type(saved).__name__}"
                )
            if saved.shape != current.shape or saved.dtype != current.dtype:
                raise ValueError(
                    f"state_dict[{name!r}] has {tuple(saved.shape)} {saved.dtype}, "
                    f"expected {tuple(current.shape)} {current.dtype}"
                )
        self._check_state_values(state)
        for name in ("seed", "storage", "written", "count", "draws"):
            getattr(self, f"_{name}").copy_(state[name])
