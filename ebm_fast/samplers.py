"""Drop-in samplers: ``LangevinSampler`` (unadjusted, IGEBM/JEM convention) and ``MALASampler``.

Both take any energy callable x -> (B,) or (B, 1) (a plain nn.Module works) and share one
machinery, written once here:

* energy + gradient evaluation that leaves the energy's parameters as they were (requires_grad
  switched off for the call and restored, also on error; train/eval mode untouched), optionally
  under torch.compile (falls back to eager with one warning) and torch.autocast;
* a step counter kept as a 0-dim int64 tensor on the chains' device, advanced on the device (no
  host sync, CUDA-graph safe): a fresh sampler with seed s draws its updates' noise at steps
  0, 1, 2, ... across sample() calls, and ``state_dict()`` holds it, so a resumed sampler
  continues the same trajectories;
* per-step tables for step sizes, noise scales and temperatures (constants, per-chain tensors or
  schedules), built once per call so the loop never asks the host for a value;
* chunking over chains with the noise spec's chain_offset, so chunked results equal the
  unchunked run;
* per-chain diagnostics and non-finite detection accumulated on the device and read once at the end;
* on CUDA, the whole K-step chain captured once per (shape, dtype, K, chunk) as a CUDA graph and
  replayed.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import math
import time
import warnings
from typing import Callable

import torch

from ebm_fast.backends import forced_backend, use_backend
from ebm_fast.noise import STREAM_MALA_ACCEPT, STREAM_PROPOSAL
from ebm_fast.ops._dispatch import as_int64_scalar, float_kernel_for
from ebm_fast.ops.langevin_update import GRAD_CLIP_MODES, SUPPORTED_DTYPES
from ebm_fast.reference.langevin_update import compute_dtype

__all__ = ["LangevinSampler", "MALASampler", "SampleInfo", "NonFiniteChainError",
           "linear_schedule", "geometric_schedule"]

CUDA_GRAPH_MODES = ("auto", True, False)
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class NonFiniteChainError(FloatingPointError):
    """Chains reached a non-finite energy or state (raised when check_finite is on)."""


@dataclasses.dataclass
class SampleInfo:
    """Per-chain diagnostics of one sample() call; tensors have shape (chains,).

    initial_energy / final_energy: energy at x0 and at the returned samples. mean_grad_norm: the
    energy gradient's Euclidean norm, averaged over the states the chain stood at (Langevin: the
    K states it stepped from; MALA: x0 and the state after each step, proposals not included).
    displacement: |x_K - x0|.
    time_s: wall-clock seconds of the call (the device is synchronised to measure it).
    MALA only: accept_rate (fraction of accepted proposals) and step_size (per chain, after any
    adaptation; pass it back as ``sample(..., step_size=info.step_size)`` to keep it).
    """

    initial_energy: torch.Tensor
    final_energy: torch.Tensor
    mean_grad_norm: torch.Tensor
    displacement: torch.Tensor
    time_s: float
    accept_rate: torch.Tensor | None = None
    step_size: torch.Tensor | None = None


def linear_schedule(start: float, end: float) -> Callable[[int, int], float]:
    """A schedule for step_size / noise_scale / temperature: start at step 0, end at the last."""
    def schedule(k: int, n_steps: int) -> float:
        return start + (end - start) * (k / max(n_steps - 1, 1))
    return schedule


def geometric_schedule(start: float, end: float) -> Callable[[int, int], float]:
    """Like :func:`linear_schedule` but interpolating log-linearly (start and end > 0)."""
    if not (start > 0 and end > 0):
        raise ValueError(f"geometric_schedule needs start > 0 and end > 0, got {start}, {end}")
    def schedule(k: int, n_steps: int) -> float:
        return start * (end / start) ** (k / max(n_steps - 1, 1))
    return schedule


# ----------------------------------------------------------------------------- shared helpers


def _parameters_of(energy) -> list[torch.Tensor]:
    """The parameters an energy owns: a Module's, or those of the Module owning a bound method."""
    owner = energy if isinstance(energy, torch.nn.Module) else getattr(energy, "__self__", None)
    return list(owner.parameters()) if isinstance(owner, torch.nn.Module) else []


@contextlib.contextmanager
def _frozen_parameters(params: list[torch.Tensor]):
    """requires_grad off for the block (no parameter graph is built), restored even on error."""
    trainable = [p for p in params if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _check_energy_output(value, chains: int) -> None:
    """A clear error naming what is wrong unless value is one energy per chain."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"energy(x) must return a tensor, got {type(value).__name__}")
    if tuple(value.shape) not in ((chains,), (chains, 1)):
        raise ValueError(f"energy(x) must return shape ({chains},) or ({chains}, 1), one energy "
                         f"per chain, got {tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"energy(x) must return a floating tensor, got {value.dtype}")


def _contiguous(t: torch.Tensor) -> torch.Tensor:
    # is_contiguous() is a cheap attribute read; .contiguous() a dispatched op call.
    return t if t.is_contiguous() else t.contiguous()


def _chain_energies(value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A checked energy output (B,) or (B, 1), detached, as a contiguous (B,) tensor of dtype.
    Conversions that would be no-ops are skipped: this runs every step, and on a CPU each op
    call costs microseconds even when it does nothing."""
    energy = value.detach()
    if energy.dim() == 2:
        energy = energy.view(energy.shape[0]) if energy.is_contiguous() else energy[:, 0]
    if energy.dtype != dtype:
        energy = energy.to(dtype)
    return _contiguous(energy)


def _check_step_value(value, name: str, *, allow_zero: bool) -> None:
    """Type-check a step-size / noise / temperature argument; numbers must be finite and > 0
    (>= 0 with allow_zero). Tensor values are not read (that would synchronise with the device)."""
    if isinstance(value, torch.Tensor) or (callable(value) and not isinstance(value, bool)):
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, a tensor or a schedule f(k, n_steps), got "
                        f"{type(value).__name__}")
    if not (math.isfinite(value) and (value > 0 or (allow_zero and value == 0))):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be finite and {bound}, got {value}")


def _on_device(table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A table built on the host, on the chains' device. PyTorch synchronises the stream for a
    copy from pageable host memory; a pinned, non-blocking copy is queued like a kernel."""
    if device.type == "cuda" and table.device.type == "cpu":
        return table.pin_memory().to(device, non_blocking=True)
    return table.to(device)


def _step_values(value, name: str, n_steps: int, x: torch.Tensor, *, allow_zero: bool,
                 allow_schedule: bool = True) -> torch.Tensor:
    """A parameter's value at each of the call's steps: (K,) shared, or (K, B) per chain.

    value: a number, a 0-dim or per-chain (B,) tensor, or a schedule ``f(k, n_steps)`` returning
    either, evaluated on the host once per call. Tensor values are not checked (that would
    synchronise with the device); numbers must be finite and > 0 (>= 0 with allow_zero). The
    table reaches the device without waiting for it (no host synchronisation).
    """
    _check_step_value(value, name, allow_zero=allow_zero)
    dtype, chains = compute_dtype(x.dtype), x.shape[0]
    if callable(value) and not isinstance(value, torch.Tensor):
        if not allow_schedule:
            raise TypeError(f"{name} cannot be a schedule here")
        rows = [value(k, n_steps) for k in range(n_steps)]
        if any(isinstance(row, torch.Tensor) or callable(row) for row in rows):
            rows = [_step_values(row, f"{name} (schedule at step {k})", 1, x,
                                 allow_zero=allow_zero, allow_schedule=False)[0]
                    for k, row in enumerate(rows)]
            return torch.stack(torch.broadcast_tensors(*rows))
        for k, row in enumerate(rows):
            _check_step_value(row, f"{name} (schedule at step {k})", allow_zero=allow_zero)
        # Numbers only: one (K,) table built on the host, one copy.
        return _on_device(torch.tensor([float(row) for row in rows], dtype=dtype), x.device)
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a floating tensor, got {value.dtype}")
        if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != chains):
            raise ValueError(f"{name} must be a number, a 0-dim tensor or a per-chain tensor of "
                             f"shape ({chains},), got shape {tuple(value.shape)}")
        if value.dim() == 1 and value.device != x.device:
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
        # Contiguous: the kernels take each step's row as it is.
        value = _contiguous(_on_device(value.detach().to(dtype), x.device))
    else:
        value = torch.full((), float(value), dtype=dtype, device=x.device)
    return value.expand(n_steps, *value.shape)


def _step_counters(counter: torch.Tensor, n_steps: int) -> tuple[torch.Tensor, ...]:
    """The noise step of each of the call's updates, counter + k, as 0-dim device tensors made by
    two ops per call (an in-place increment per step cost ~10-20 us on a CPU thread)."""
    return (counter + torch.arange(n_steps, device=counter.device)).unbind(0)


def _chunk_rows(table: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """A per-step table restricted to chains lo:hi (per-chain tables are (K, B))."""
    return table[:, lo:hi] if table.dim() == 2 else table


class _ChainDiagnostics:
    """Per-chain diagnostics of one chunk, kept on the device and reduced once at the end.

    Non-finite detection never reads the device from the host and costs one small copy per
    step: check() copies the step's energies into a (FOLD_EVERY, chains) block allocated once;
    every FOLD_EVERY steps (and in finish(), with the final state) the block is folded in place
    into a per-chain score: 0 while a chain is finite, else n_steps + 1 - k for the first local
    step k at which it was not (k = 0: the initial state, k = n_steps: the final state), so
    folds combine by a maximum. Memory stays O(FOLD_EVERY x chains) however long the chain.
    """

    # A fold per step was ~8 small ops (70-100 us per step on one CPU thread, 3% of a
    # 784-256-256-1 MLP step); a copy per step and a fold per 32 steps cost a few us per step.
    FOLD_EVERY = 32

    def __init__(self, x: torch.Tensor, n_steps: int, check_finite: bool, track: bool):
        self.check_finite, self.track, self.n_steps = check_finite, track, n_steps
        self.pending = 0  # rows of the block awaiting a fold
        self.folded = 0  # local steps already folded into the score
        self.block = self.weights = self.score = None  # made at the first check
        self.grad_norm_sum = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        self.evaluations = 0
        self.initial_energy: torch.Tensor | None = None

    def check(self, energy: torch.Tensor) -> None:
        """Record the energies of the next local step (0, 1, ...) for the non-finite check."""
        if self.check_finite:
            if self.block is None:
                self._allocate(energy)
            self.block[self.pending].copy_(energy)
            self.pending += 1
            if self.pending == self.block.shape[0]:
                self._fold()

    def _allocate(self, like: torch.Tensor) -> None:
        # Weights are integers up to n_steps + 1: exact in float32 below 2**24, else float64.
        dtype = like.dtype if self.n_steps < 2**24 else torch.float64
        self.block = like.new_empty((min(self.FOLD_EVERY, self.n_steps), like.shape[0]),
                                    dtype=dtype)
        self.weights = torch.arange(self.n_steps + 1, 0, -1, dtype=dtype, device=like.device)
        self.score = like.new_zeros(like.shape[0], dtype=dtype)

    def _fold(self) -> None:
        n = self.pending
        if n == 0:
            return
        # In place (a fresh block-sized temporary per op would page-fault on a CPU): x * 0 is
        # 0 where x is finite and NaN where it is not, so `bad` is 1 there and 0 elsewhere.
        bad = self.block[:n].mul_(0).nan_to_num_(nan=1.0)
        rows = bad.mul_(self.weights[self.folded:self.folded + n, None]).amax(dim=0)
        torch.maximum(self.score, rows, out=self.score)
        self.folded += n
        self.pending = 0

    def measure(self, energy: torch.Tensor, grad: torch.Tensor) -> None:
        """Accumulate the return_info statistics of one energy+gradient evaluation."""
        if self.track:
            if self.initial_energy is None:
                self.initial_energy = energy.clone()
            self.grad_norm_sum += torch.linalg.vector_norm(
                grad.reshape(grad.shape[0], -1).float(), dim=1)
            self.evaluations += 1

    def finish(self, x: torch.Tensor, energy: torch.Tensor | None) -> dict:
        """The chunk's results; with check_finite, "nonfinite_score" (see the class docstring)
        includes the final state x and, when given, its energies."""
        results = {}
        if self.check_finite:
            self._fold()
            # x * 0 sums to 0 exactly when all of a chain's elements are finite (a plain sum
            # could overflow), else NaN; adding the final energies keeps that property.
            final = (x.reshape(x.shape[0], -1) * 0).sum(dim=1)
            if energy is not None:
                final = (final + energy).mul_(0)
            # Weight 1, the lowest: the final state counts only for chains finite until then.
            torch.maximum(self.score, final.nan_to_num_(nan=1.0).to(self.score.dtype),
                          out=self.score)
            results["nonfinite_score"] = self.score
        if self.track:
            results.update(initial_energy=self.initial_energy, final_energy=energy,
                           mean_grad_norm=self.grad_norm_sum / self.evaluations)
        return results


class _CudaGraphChain:
    """One K-step chain captured as a CUDA graph: static inputs in, replay, results out."""

    def __init__(self, run_chain: Callable, x, counter, seed, tables, pool):
        self.x, self.counter, self.seed = x.clone(), counter.clone(), seed.clone()
        self.tables = tuple(t.clone() for t in tables)
        # Warm up on a side stream (lazy initialisation, compilation, allocator) on scratch copies.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run_chain(self.x.clone(), self.counter.clone(), self.seed, self.tables)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.outputs = run_chain(self.x, self.counter, self.seed, self.tables)

    def replay(self, x, counter, seed, tables) -> dict:
        self.x.copy_(x)
        self.counter.copy_(counter)
        self.seed.copy_(seed)
        for static, table in zip(self.tables, tables):
            static.copy_(table)
        self.graph.replay()
        x.copy_(self.x)
        # Graphs of one sampler share a memory pool: copy the outputs out before the next replay.
        return {key: value.clone() for key, value in self.outputs.items()}


# ----------------------------------------------------------------------------- the base sampler


class _Sampler(abc.ABC):
    """Machinery shared by both samplers; subclasses define the tables and the chain loop."""

    def __init__(self, energy, *, n_steps: int, seed: int, backend: str, compile: bool,
                 cuda_graph, check_finite: bool, chunk_size: int | None, chain_offset: int,
                 autocast):
        if not callable(energy):
            raise TypeError(f"energy must be callable (x -> (B,) energies), got "
                            f"{type(energy).__name__}")
        self.energy = energy
        self.n_steps = self._check_n_steps(n_steps)
        self._seed = as_int64_scalar(seed, "seed", 64)
        if backend not in ("auto", "reference", "cpu", "triton"):
            raise ValueError(f"backend must be 'auto', 'reference', 'cpu' or 'triton', got "
                             f"{backend!r}")
        self.backend = backend
        if cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph must be one of {CUDA_GRAPH_MODES}, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self.check_finite = bool(check_finite)
        if chunk_size is not None and (isinstance(chunk_size, bool)
                                       or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")
        self.chunk_size = chunk_size
        if isinstance(chain_offset, bool) or not isinstance(chain_offset, int) or chain_offset < 0:
            raise ValueError(f"chain_offset must be an int >= 0, got {chain_offset!r}")
        self.chain_offset = chain_offset
        if autocast is not None and autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got "
                             f"{autocast!r}")
        self.autocast = autocast
        self._compiled_energy = torch.compile(energy) if compile else None
        self._step = torch.zeros((), dtype=torch.int64)
        self._graphs: dict = {}
        self._graph_pool = None
        self._graph_failed = False

    # -- state ------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """How many updates the sampler has drawn noise for (reads the device counter)."""
        return int(self._step)

    def state_dict(self) -> dict:
        """The step counter and seed (loadable with torch.load(weights_only=True))."""
        return {"step": self._step.detach().cpu().clone(), "seed": self._seed.cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        for key in ("step", "seed"):
            value = state.get(key)
            if not (isinstance(value, torch.Tensor) and value.dim() == 0
                    and value.dtype == torch.int64):
                raise ValueError(f"state_dict[{key!r}] must be a 0-dim int64 tensor, got {value!r}")
        self._step = state["step"].to(self._step.device).clone()
        self._seed = state["seed"].clone()

    # -- validation -------------------------------------------------------------------------

    @staticmethod
    def _check_n_steps(n_steps) -> int:
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
        return n_steps

    def _check_x0(self, x0, params: list[torch.Tensor]) -> None:
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a tensor, got {type(x0).__name__}")
        if x0.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"x0 must have one of the dtypes {SUPPORTED_DTYPES}, got {x0.dtype}")
        if x0.dim() < 1 or x0.numel() == 0:
            raise ValueError(f"x0 must have a leading chain axis with at least one chain (and one "
                             f"element per chain), got shape {tuple(x0.shape)}")
        for p in params:
            if p.device != x0.device:
                raise ValueError(f"x0 is on {x0.device} but the energy's parameters are on "
                                 f"{p.device}")
        if self.cuda_graph is True and x0.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, but x0 is on {x0.device}")

    # -- energy and gradient ----------------------------------------------------------------

    def _autocast(self, x: torch.Tensor):
        if self.autocast is None:
            return contextlib.nullcontext()
        # No weight-cast cache: it lives for one energy call anyway, and CUDA-graph capture
        # requires it off.
        return torch.autocast(device_type=x.device.type, dtype=self.autocast, cache_enabled=False)

    def _call_energy(self, x: torch.Tensor):
        if self._compiled_energy is not None:
            try:
                return self._compiled_energy(x)
            except Exception as exc:  # compilation failed: the eager energy is always correct
                self._compiled_energy = None
                warnings.warn(f"{type(self).__name__}: torch.compile of the energy failed "
                              f"({type(exc).__name__}: {exc}); running it eagerly.",
                              RuntimeWarning, stacklevel=4)
        return self.energy(x)

    def _energy_and_grad(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy (B,) in the compute dtype, dE/dx) at x; builds no graph through parameters.
        As few op calls as the loop a user writes: the (B, 1) -> (B,) reshape happens after the
        backward pass, not inside the graph."""
        with torch.enable_grad():
            x_var = x.detach().requires_grad_(True)
            with self._autocast(x):
                value = self._call_energy(x_var)
            _check_energy_output(value, x.shape[0])
            if not value.requires_grad:
                raise ValueError("energy(x) does not depend on x through differentiable "
                                 "operations: there is no gradient to follow")
            (grad,) = torch.autograd.grad(value.sum(), x_var)
        return _chain_energies(value, compute_dtype(x.dtype)), grad

    def _energy_only(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), self._autocast(x):
            value = self.energy(x)
        _check_energy_output(value, x.shape[0])
        return _chain_energies(value, compute_dtype(x.dtype))

    # -- the call ---------------------------------------------------------------------------

    @abc.abstractmethod
    def _tables(self, x: torch.Tensor, n_steps: int, step_size) -> tuple[torch.Tensor, ...]:
        """The call's per-step parameter tables, (K,) shared or (K, B) per chain."""

    @abc.abstractmethod
    def _chain(self, x, counter, seed, tables, *, n_steps: int, chain_offset: int,
               track: bool) -> dict:
        """Run n_steps on x in place, drawing noise at (seed, counter, counter + 1, ...); return
        the chunk's per-chain results (tensors only)."""

    def _use_cuda_graph(self, x: torch.Tensor) -> bool:
        return self.cuda_graph is not False and x.device.type == "cuda" and not self._graph_failed

    def _graph_key(self, x, tables, n_steps, chain_offset, track) -> tuple:
        # Parameters are read from their memory at replay: a model whose tensors were replaced
        # (not updated in place) or whose mode changed gets a new capture; so does a call under
        # another forced backend (the graph holds the kernels it captured).
        params = tuple(p.data_ptr() for p in _parameters_of(self.energy))
        training = getattr(self.energy, "training", None)
        return (tuple(x.shape), x.dtype, x.device, n_steps, chain_offset, track,
                tuple((tuple(t.shape), t.dtype) for t in tables), params, training,
                forced_backend())

    def _run_chunk(self, x, counter, seed, tables, n_steps: int, chain_offset: int,
                   track: bool) -> dict:
        run_chain = functools.partial(self._chain, n_steps=n_steps, chain_offset=chain_offset,
                                      track=track)
        if self._use_cuda_graph(x):
            try:
                key = self._graph_key(x, tables, n_steps, chain_offset, track)
                if key not in self._graphs:
                    if self._graph_pool is None:
                        self._graph_pool = torch.cuda.graph_pool_handle()
                    self._graphs[key] = _CudaGraphChain(run_chain, x, counter, seed, tables,
                                                        self._graph_pool)
                return self._graphs[key].replay(x, counter, seed, tables)
            except Exception as exc:  # e.g. the energy synchronises with the host
                self._graph_failed = True
                warnings.warn(f"{type(self).__name__}: CUDA graph capture failed "
                              f"({type(exc).__name__}: {exc}); running eagerly from now on.",
                              RuntimeWarning, stacklevel=3)
        return run_chain(x, counter, seed, tables)

    def _sample(self, x0, n_steps, step_size, return_info):
        params = _parameters_of(self.energy)  # walking a module's tree costs tens of us: once
        self._check_x0(x0, params)
        n_steps = self.n_steps if n_steps is None else self._check_n_steps(n_steps)
        chains, device = x0.shape[0], x0.device
        tables = self._tables(x0, n_steps, step_size)
        chunk = self.chunk_size or chains
        # The counter and seed live on the chains' device: kernels and CUDA graphs read them there.
        self._step, self._seed = self._step.to(device), self._seed.to(device)
        start = time.perf_counter()
        x = x0.detach().clone(memory_format=torch.contiguous_format)
        results = []
        # "auto" leaves the choice to the ops, so an enclosing `with use_backend(...)` holds.
        backend = contextlib.nullcontext() if self.backend == "auto" else use_backend(self.backend)
        with backend, _frozen_parameters(params):
            for lo in range(0, chains, chunk):
                hi = min(chains, lo + chunk)
                # x[lo:hi] of a contiguous tensor is a contiguous view: updated in place.
                results.append(self._run_chunk(
                    x[lo:hi], self._step, self._seed,
                    tuple(_chunk_rows(t, lo, hi) for t in tables),
                    n_steps, self.chain_offset + lo, return_info))
        self._step += n_steps
        merged = results[0] if len(results) == 1 else {
            key: torch.cat([r[key] for r in results]) for key in results[0]}
        if self.check_finite:
            self._raise_if_non_finite(merged["nonfinite_score"], n_steps)
        if not return_info:
            return x
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        info = SampleInfo(
            initial_energy=merged["initial_energy"], final_energy=merged["final_energy"],
            mean_grad_norm=merged["mean_grad_norm"],
            displacement=torch.linalg.vector_norm(
                (x - x0.detach()).reshape(chains, -1).float(), dim=1),
            time_s=time.perf_counter() - start,
            accept_rate=merged.get("accept_rate"), step_size=merged.get("step_size"))
        return x, info

    def _raise_if_non_finite(self, score: torch.Tensor, n_steps: int) -> None:
        worst = int(score.max())  # the one host read of the call
        if worst == 0:
            return
        count = int((score > 0).sum())
        first = n_steps + 1 - worst  # the earliest local step at which a chain was non-finite
        where = ("at the initial state x0" if first == 0 else
                 f"after update {first} of {n_steps} in this call (sampler step "
                 f"{int(self._step) - n_steps + first - 1})")
        raise NonFiniteChainError(
            f"{type(self).__name__}: {count} of {score.shape[0]} chains have a non-finite "
            f"energy or state; the first appeared {where}. Lower step_size, clip gradients "
            f"(grad_clip), check the energy, or pass check_finite=False to get the samples anyway.")


# ----------------------------------------------------------------------------- Langevin


class LangevinSampler(_Sampler):
    """Unadjusted Langevin dynamics: x <- clamp(x - eps * clip(grad E(x)) + sigma * xi).

    The IGEBM/JEM convention, with eps (step_size) and sigma (noise_scale) decoupled; give
    temperature T instead of noise_scale for sigma = sqrt(2 eps T), the discretised Langevin
    diffusion targeting exp(-E / T) (with neither, T = 1). step_size, noise_scale and temperature
    each take a number, a per-chain tensor (B,) or a schedule f(k, n_steps) -> value for step
    k of a call (see linear_schedule / geometric_schedule). xi is the noise spec's normal
    (stream 0) at the sampler's step counter.

    Args:
        energy: callable x -> (B,) or (B, 1) energies; a plain nn.Module works.
        n_steps: steps per sample() call (overridable per call).
        grad_clip, grad_clip_mode: None, or c > 0 with "value" (elements into [-c, c]) or
            "norm" (each chain's gradient rescaled to norm <= c).
        clamp: None or (lo, hi) applied to the state after each update.
        seed: 64-bit noise seed. chain_offset: index of the first chain in a larger batch.
        backend: "auto", "reference", "cpu" or "triton" (forces the update kernel's backend).
        compile: torch.compile the energy (forward and backward); falls back to eager with one
            warning if compilation fails.
        cuda_graph: "auto" captures the K-step chain as a CUDA graph on CUDA tensors, True
            requires it, False never uses it. A failed capture falls back to eager with one warning.
        check_finite: raise NonFiniteChainError when chains reach non-finite energies or states.
        chunk_size: run at most this many chains at a time (same results as unchunked).
        autocast: None, torch.bfloat16 or torch.float16: the energy runs under torch.autocast;
            the chain state and the update stay in x0's dtype.
    """

    def __init__(self, energy, *, step_size, noise_scale=None, temperature=None, n_steps=60,
                 grad_clip=None, grad_clip_mode="value", clamp=None, seed=0, chain_offset=0,
                 backend="auto", compile=False, cuda_graph="auto", check_finite=True,
                 chunk_size=None, autocast=None):
        super().__init__(energy, n_steps=n_steps, seed=seed, backend=backend, compile=compile,
                         cuda_graph=cuda_graph, check_finite=check_finite, chunk_size=chunk_size,
                         chain_offset=chain_offset, autocast=autocast)
        if noise_scale is not None and temperature is not None:
            raise ValueError("give noise_scale (decoupled sigma) or temperature "
                             "(sigma = sqrt(2 step_size temperature)), not both")
        if grad_clip_mode not in GRAD_CLIP_MODES:
            raise ValueError(f"grad_clip_mode must be one of {GRAD_CLIP_MODES}, got "
                             f"{grad_clip_mode!r}")
        if grad_clip is not None:
            if isinstance(grad_clip, bool) or not isinstance(grad_clip, (int, float)) or not (
                    0 < grad_clip < math.inf):
                raise ValueError(f"grad_clip must be None or a finite number > 0, got "
                                 f"{grad_clip!r}")
            grad_clip = float(grad_clip)
        if clamp is None:
            clamp = (None, None)
        if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2 and all(
                v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))
                for v in clamp)):
            raise ValueError(f"clamp must be None or a (lo, hi) pair of numbers or None, got "
                             f"{clamp!r}")
        clamp = tuple(None if v is None else float(v) for v in clamp)
        if None not in clamp and clamp[0] > clamp[1]:
            raise ValueError(f"clamp has lo > hi: {clamp!r}")
        self.step_size, self.noise_scale = step_size, noise_scale
        self.temperature = 1.0 if noise_scale is None and temperature is None else temperature
        self.grad_clip, self.grad_clip_mode, self.clamp = grad_clip, grad_clip_mode, clamp
        _check_step_value(step_size, "step_size", allow_zero=False)
        for value, name in ((noise_scale, "noise_scale"), (self.temperature, "temperature")):
            if value is not None:
                _check_step_value(value, name, allow_zero=True)

    def sample(self, x0: torch.Tensor, n_steps: int | None = None, *, step_size=None,
               return_info: bool = False):
        """Run the chains from x0 (not modified) and return the samples, and a SampleInfo with
        return_info=True (which costs one extra energy evaluation for the final energies)."""
        return self._sample(x0, n_steps, step_size, return_info)

    def _tables(self, x, n_steps, step_size):
        eps = _step_values(self.step_size if step_size is None else step_size, "step_size",
                           n_steps, x, allow_zero=False)
        if self.noise_scale is not None:
            sigma = _step_values(self.noise_scale, "noise_scale", n_steps, x, allow_zero=True)
        else:
            temperature = _step_values(self.temperature, "temperature", n_steps, x, allow_zero=True)
            if eps.dim() != temperature.dim():  # one shared (K,), one per-chain (K, B) table
                eps_rows, temperature = (t if t.dim() == 2 else t[:, None]
                                         for t in (eps, temperature))
            else:
                eps_rows = eps
            sigma = (2 * eps_rows * temperature).sqrt()
        return eps, sigma

    def _chain(self, x, counter, seed, tables, *, n_steps, chain_offset, track):
        eps, sigma = (table.unbind(0) for table in tables)
        steps = _step_counters(counter, n_steps)
        diagnostics = _ChainDiagnostics(x, n_steps, self.check_finite, track)
        # The fused kernel resolved once and called without the custom-op layer: its arguments
        # are contiguous and valid by construction, and the Python dispatch of a custom op
        # costs ~0.1 ms per call.
        update = float_kernel_for("langevin_update", x)
        for k in range(n_steps):
            energy, grad = self._energy_and_grad(x)
            diagnostics.check(energy)
            diagnostics.measure(energy, grad)
            update(x, x, _contiguous(grad), eps[k], sigma[k], seed, steps[k], STREAM_PROPOSAL,
                   chain_offset, self.grad_clip, self.grad_clip_mode, *self.clamp)
        return diagnostics.finish(x, self._energy_only(x) if track else None)


# ----------------------------------------------------------------------------- MALA


class MALASampler(_Sampler):
    """Metropolis-adjusted Langevin: exact for exp(-E / T) at any step size.

    Proposal y = x - eps grad E(x) + sqrt(2 eps T) xi (noise stream 0), accepted with the
    Metropolis-Hastings probability by the fused mala_accept kernel (uniform from stream 1), both
    at the sampler's step counter. One energy+gradient evaluation per step: the current state's
    energy and gradient are cached. No clamp and no gradient clipping: either would change the
    proposal density the acceptance ratio assumes and break detailed balance.

    adapt=True tunes each chain's step size toward target_accept during the first adapt_steps
    steps of every call (default: half of them), log eps += adapt_rate * (accept_prob - target).
    While it adapts, the chain is not exactly reversible (the kernel changes with the chain's
    history); the steps after the adaptation phase are exact MALA steps again.

    step_size and temperature take a number, a per-chain tensor (B,) or a schedule f(k, n_steps).
    Other arguments as LangevinSampler.
    """

    def __init__(self, energy, *, step_size, temperature=1.0, n_steps=60, seed=0,
                 chain_offset=0, adapt=False, target_accept=0.574, adapt_steps=None,
                 adapt_rate=0.05, backend="auto", compile=False, cuda_graph="auto",
                 check_finite=True, chunk_size=None, autocast=None, clamp=None, grad_clip=None):
        super().__init__(energy, n_steps=n_steps, seed=seed, backend=backend, compile=compile,
                         cuda_graph=cuda_graph, check_finite=check_finite, chunk_size=chunk_size,
                         chain_offset=chain_offset, autocast=autocast)
        if clamp is not None or grad_clip is not None:
            raise ValueError("MALASampler takes no clamp or grad_clip: they change the proposal "
                             "density and break detailed balance (use LangevinSampler for them)")
        if not 0 < target_accept < 1:
            raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
        if not adapt_rate > 0:
            raise ValueError(f"adapt_rate must be > 0, got {adapt_rate!r}")
        if adapt_steps is not None and (isinstance(adapt_steps, bool) or
                                        not isinstance(adapt_steps, int) or adapt_steps < 0):
            raise ValueError(f"adapt_steps must be None or an int >= 0, got {adapt_steps!r}")
        self.step_size, self.temperature = step_size, temperature
        self.adapt, self.target_accept = bool(adapt), float(target_accept)
        self.adapt_steps, self.adapt_rate = adapt_steps, float(adapt_rate)
        _check_step_value(step_size, "step_size", allow_zero=False)
        _check_step_value(temperature, "temperature", allow_zero=False)

    def sample(self, x0: torch.Tensor, n_steps: int | None = None, *, step_size=None,
               return_info: bool = False):
        """Run the chains from x0 (not modified) and return the samples, and a SampleInfo with
        return_info=True (acceptance rates and adapted step sizes included)."""
        return self._sample(x0, n_steps, step_size, return_info)

    def _tables(self, x, n_steps, step_size):
        return (_step_values(self.step_size if step_size is None else step_size, "step_size",
                             n_steps, x, allow_zero=False),
                _step_values(self.temperature, "temperature", n_steps, x, allow_zero=False))

    def _chain(self, x, counter, seed, tables, *, n_steps, chain_offset, track):
        eps_table, temperature = tables
        eps_rows, temperatures = eps_table.unbind(0), temperature.unbind(0)
        steps = _step_counters(counter, n_steps)
        chains = x.shape[0]
        n_adapt = 0 if not self.adapt else (
            n_steps // 2 if self.adapt_steps is None else min(self.adapt_steps, n_steps))
        # Per-chain multiplier of the step-size table, tuned during the adaptation phase.
        scale = torch.ones(chains, dtype=compute_dtype(x.dtype), device=x.device)
        accepted_count = torch.zeros(chains, dtype=torch.float32, device=x.device)
        accepted = torch.empty(chains, dtype=torch.bool, device=x.device)
        accept_prob = torch.empty(chains, dtype=compute_dtype(x.dtype), device=x.device)
        diagnostics = _ChainDiagnostics(x, n_steps, self.check_finite, track)
        energy_x, grad_x = self._energy_and_grad(x)
        grad_x = _contiguous(grad_x)
        # Only the initial state goes through check(): accepted states have finite energies
        # (mala_accept rejects non-finite proposals); finish() checks the final state.
        diagnostics.check(energy_x)
        diagnostics.measure(energy_x, grad_x)
        proposal = torch.empty_like(x)
        # The fused kernels resolved once and called without the custom-op layer (arguments
        # contiguous and valid by construction; x, grad_x, energy_x are updated in place).
        propose = float_kernel_for("langevin_update", x)
        accept = float_kernel_for("mala_accept", x)
        for k in range(n_steps):
            eps = eps_rows[k] * scale
            propose(proposal, x, grad_x, eps, (2 * eps * temperatures[k]).sqrt(), seed, steps[k],
                    STREAM_PROPOSAL, chain_offset, None, "value", None, None)
            energy_y, grad_y = self._energy_and_grad(proposal)
            accept(accepted, accept_prob, x, proposal, grad_x, _contiguous(grad_y), energy_x,
                   energy_y, eps, temperatures[k], seed, steps[k], STREAM_MALA_ACCEPT,
                   chain_offset)
            accepted_count += accepted
            if k < n_adapt:
                scale.mul_(torch.exp(self.adapt_rate * (accept_prob - self.target_accept)))
            diagnostics.measure(energy_x, grad_x)
        results = diagnostics.finish(x, energy_x)
        if track:
            results.update(accept_rate=accepted_count / n_steps,
                           step_size=eps_table[n_steps - 1] * scale)
        return results
