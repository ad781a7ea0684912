"""The machinery both samplers share: their common options, the step counter and its state,
input checks, chunking, CUDA-graph dispatch and the non-finite report. A sampler subclass
defines only its per-step tables and its chain loop."""

from __future__ import annotations

import abc
import contextlib
import functools
import time
import warnings

import torch

from ebm_fast.backends import use_backend
from ebm_fast.ops._dispatch import as_int64_scalar
from ebm_fast.ops.langevin_update import SUPPORTED_DTYPES
from ebm_fast.samplers.cuda_graph import CudaGraphChain, graph_key
from ebm_fast.samplers.energy import EnergyFunction, frozen_parameters, parameters_of
from ebm_fast.samplers.results import NonFiniteChainError, SampleInfo
from ebm_fast.samplers.schedules import chunk_rows

CUDA_GRAPH_MODES = ("auto", True, False)
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


class Sampler(abc.ABC):
    """Options every sampler takes (keyword-only, after its own):

    n_steps: steps per sample() call (overridable per call).
    seed: 64-bit noise seed. chain_offset: index of the first chain in a larger batch.
    backend: "auto", "reference", "cpu" or "triton" (forces the update kernel's backend).
    compile: torch.compile the energy (forward and backward); falls back to eager with one
        warning if compilation fails.
    cuda_graph: "auto" captures the K-step chain as a CUDA graph on CUDA tensors, True requires
        it, False never uses it. A failed capture falls back to eager with one warning.
    check_finite: raise NonFiniteChainError when chains reach non-finite energies or states.
    chunk_size: run at most this many chains at a time (same results as unchunked).
    autocast: None, torch.bfloat16 or torch.float16: the energy runs under torch.autocast; the
        chain state and the update stay in x0's dtype.
    """

    def __init__(self, energy, *, n_steps: int = 60, seed: int = 0, chain_offset: int = 0,
                 backend: str = "auto", compile: bool = False, cuda_graph="auto",
                 check_finite: bool = True, chunk_size: int | None = None, autocast=None):
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
        self._energy = EnergyFunction(energy, compile=compile, autocast=autocast,
                                      owner=type(self).__name__)
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

    def _run_chunk(self, x, counter, seed, tables, n_steps: int, chain_offset: int,
                   track: bool) -> dict:
        run_chain = functools.partial(self._chain, n_steps=n_steps, chain_offset=chain_offset,
                                      track=track)
        if self._use_cuda_graph(x):
            try:
                key = graph_key(self.energy, x, tables, n_steps, chain_offset, track)
                if key not in self._graphs:
                    if self._graph_pool is None:
                        self._graph_pool = torch.cuda.graph_pool_handle()
                    self._graphs[key] = CudaGraphChain(run_chain, x, counter, seed, tables,
                                                       self._graph_pool)
                return self._graphs[key].replay(x, counter, seed, tables)
            except Exception as exc:  # e.g. the energy synchronises with the host
                self._graph_failed = True
                warnings.warn(f"{type(self).__name__}: CUDA graph capture failed "
                              f"({type(exc).__name__}: {exc}); running eagerly from now on.",
                              RuntimeWarning, stacklevel=4)
        return run_chain(x, counter, seed, tables)

    def _sample(self, x0, n_steps, step_size, return_info):
        params = parameters_of(self.energy)  # walking a module's tree costs tens of us: once
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
        with backend, frozen_parameters(params):
            for lo in range(0, chains, chunk):
                hi = min(chains, lo + chunk)
                # x[lo:hi] of a contiguous tensor is a contiguous view: updated in place.
                results.append(self._run_chunk(
                    x[lo:hi], self._step, self._seed,
                    tuple(chunk_rows(t, lo, hi) for t in tables),
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
