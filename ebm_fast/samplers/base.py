"""The machinery both samplers share: their common options, the step counter and its state,
input checks, chunking, CUDA-graph dispatch and the non-finite report. A sampler subclass
defines only its per-step tables and its chain loop."""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import functools
import numbers
import time
import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypedDict, overload

import torch

from ebm_fast import validation
from ebm_fast.backends import BACKENDS, use_backend
from ebm_fast.precision import PrecisionChoice, resolve_precision
from ebm_fast.samplers.cuda_graph import CudaGraphChain, graph_key
from ebm_fast.samplers.energy import (
    EnergyFunction,
    eval_mode,
    frozen_parameters,
    module_of,
    parameters_of,
)
from ebm_fast.samplers.inputs import ChainInputs, Conditioning
from ebm_fast.samplers.results import NonFiniteChainError, SampleInfo
from ebm_fast.samplers.schedules import StepParameter, StepValues

CUDA_GRAPH_MODES = ("auto", True, False)
AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)
AUTOCAST_AUTO = "auto"  # bf16 where the chains' device computes it natively, else none
# The noise spec's step counter has 32 bits: step 2**32 would draw step 0's noise again.
STEP_LIMIT = 1 << 32


class SamplerOptions(TypedDict, total=False):
    """The keyword options every sampler takes (see :class:`Sampler`), for type checkers."""

    n_steps: int
    seed: int | None
    chain_offset: int
    backend: str
    compile: bool
    cuda_graph: bool | str
    check_finite: bool
    chunk_size: int | None
    autocast: torch.dtype | str | None
    negate: bool
    eval_mode: bool
    mlp_gradient: bool


class Sampler(abc.ABC):
    """The base of both samplers. The options every sampler takes (keyword-only, after its own):

    n_steps: steps per sample() call (overridable per call; 0 returns a copy of x0).
    seed: 64-bit noise seed; None (default) draws one from torch's global generator, so
        torch.manual_seed makes runs reproducible and two samplers draw different noise.
    chain_offset: index of the first chain in a larger batch.
    backend: "auto", "reference", "cpu" or "triton" (forces the update kernel's backend).
    compile: torch.compile the energy (forward and backward); falls back to eager with one
        warning if compilation fails.
    cuda_graph: "auto" captures the K-step chain as a CUDA graph on CUDA tensors, True requires
        it, False never uses it. A failed capture falls back to eager with one warning.
    check_finite: raise NonFiniteChainError when chains reach non-finite energies or states.
    chunk_size: run at most this many chains at a time (same results as unchunked).
    autocast: None, torch.bfloat16, torch.float16 or "auto": the energy's passes run under
        torch.autocast; the chain state and the update stay in x0's dtype. "auto" picks bf16
        where the chains' device computes it natively (CUDA compute capability >= 8.0, a CPU
        with avx512_bf16 or AMX) and none elsewhere (ebm_fast.precision; sample info reports
        the choice). Default None: the passes as the energy is written, on any hardware.
    negate: the callable returns -E (a model's f(x) as in JEM, where E(x) = -f(x)).
    eval_mode: put the energy (an nn.Module, or the Module of a bound method) and its
        submodules in eval mode for each sample() call, each restored to its own mode
        afterwards. The chains' option: a loss's passes (energies()) run in the module's mode.
    mlp_gradient: for an nn.Sequential MLP energy (Linear layers and elementwise activations,
        one output; see ebm_fast.samplers.mlp_gradient), compute each step's input gradient
        with the layers' own forward and backward functions instead of autograd: the same
        bits, without building a graph (1.07-1.29x faster passes measured on a CPU). False:
        always autograd. Energies it does not cover use autograd either way.
    """

    def __init__(
        self,
        energy: Callable[..., torch.Tensor],
        *,
        n_steps: int = 60,
        seed: int | None = None,
        chain_offset: int = 0,
        backend: str = "auto",
        compile: bool = False,
        cuda_graph: bool | str = "auto",
        check_finite: bool = True,
        chunk_size: int | None = None,
        autocast: torch.dtype | str | None = None,
        negate: bool = False,
        eval_mode: bool = False,
        mlp_gradient: bool = True,
    ) -> None:
        if not callable(energy):
            raise TypeError(
                f"energy must be callable (x -> (B,) energies), got {type(energy).__name__}"
            )
        self.energy = energy
        self.n_steps = validation.integer(n_steps, "n_steps", low=0)
        self._seed = validation.counter(validation.seed_or_default(seed), "seed", 64)
        self.backend = validation.choice(backend, "backend", BACKENDS)
        self.cuda_graph = validation.choice(cuda_graph, "cuda_graph", CUDA_GRAPH_MODES)
        self.check_finite = bool(check_finite)
        self.chunk_size = (
            None if chunk_size is None else validation.integer(chunk_size, "chunk_size", low=1)
        )
        self.chain_offset = validation.integer(chain_offset, "chain_offset", low=0)
        self.autocast = (
            autocast
            if autocast is None or autocast == AUTOCAST_AUTO
            else validation.dtype(autocast, "autocast", AUTOCAST_DTYPES)
        )
        # (chains' device, dtype and dims, the PrecisionChoice)
        self._precision: tuple[tuple[torch.device, torch.dtype, int], PrecisionChoice] | None = None
        self._recorded_precision: PrecisionChoice | None = None  # from load_state_dict
        self.eval_mode = bool(eval_mode)
        self._energy = EnergyFunction(
            energy,
            compile=compile,
            autocast=None,
            negate=bool(negate),
            owner=type(self).__name__,
            mlp_gradient=bool(mlp_gradient),
        )
        # The step counter twice: read by the kernels on the chains' device, and kept on the
        # host for the checks (reading the device copy would synchronise).
        self._step = torch.zeros((), dtype=torch.int64)
        self._steps_taken = 0
        self._graphs: dict[tuple, CudaGraphChain] = {}
        self._graph_pool: object = None  # torch.cuda.graph_pool_handle(), made at first capture
        self._graph_failed = False
        self._number_tables: tuple[tuple, tuple[StepValues, ...]] | None = None  # _call_tables

    # -- state ------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """How many updates the sampler has drawn noise for: the next one uses this step."""
        return self._steps_taken

    def state_dict(self) -> dict[str, Any]:
        """The step counter, the seed and, with autocast="auto", the precision it resolved
        (None before any call): loadable with torch.load(weights_only=True)."""
        choice = self.last_precision if self.autocast == AUTOCAST_AUTO else None
        return {
            "step": torch.tensor(self._steps_taken, dtype=torch.int64),
            "seed": self._seed.cpu().clone(),
            "precision": None if choice is None else choice.to_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a state_dict(): the same seed, the next step where that one stopped.
        Counters follow the noise spec's rule (ints or 0-dim integer tensors; a step in
        [0, 2**32), a seed in [0, 2**64))."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(
                f"state_dict must be a dict from state_dict(), got {type(state_dict).__name__}"
            )
        for key in ("step", "seed"):
            if key not in state_dict:
                raise ValueError(f"state_dict is missing {key!r}, got keys {list(state_dict)}")
        step = validation.counter(state_dict["step"], "state_dict['step']", 32)
        # A tensor's value is read here, once: a resumed sampler must not reuse noise either.
        steps_taken = validation.integer(int(step), "state_dict['step']", low=0, high=STEP_LIMIT)
        seed = validation.counter(state_dict["seed"], "state_dict['seed']", 64)
        self._step = torch.tensor(steps_taken, dtype=torch.int64, device=self._step.device)
        self._steps_taken = steps_taken
        self._seed = seed.clone()
        recorded = state_dict.get("precision")
        if recorded is not None and self.autocast == AUTOCAST_AUTO:
            # A resumed run keeps the dtype its run chose, whatever this machine would pick.
            self._recorded_precision = PrecisionChoice.from_dict(dict(recorded))
            self._precision = None

    # -- the energy and the backend, as losses use them -----------------------------------

    def energies(self, x: torch.Tensor, y: object = None, **energy_kwargs: Any) -> torch.Tensor:
        """The (B,) energies E(x) as this sampler sees the energy (output checked, negated,
        under its autocast, in x's compute dtype), differentiable in x and in the energy's
        parameters: the one pass every loss takes. The module runs in its own mode."""
        self._use_precision(x)
        return self._energy.energies(x, Conditioning(y, energy_kwargs))

    def precision(self, x: torch.Tensor) -> PrecisionChoice:
        """What the energy's passes run in for chains like x, and why: the autocast option,
        "auto" resolved for x's device and dtype. Kept while they do not change."""
        key = (x.device, x.dtype, x.dim())
        if self._precision is None or self._precision[0] != key:
            recorded = self._recorded_precision
            policy = self.autocast if recorded is None else recorded.autocast_dtype
            # The layout is the model's (ebm_fast.precision.fast_energy converts it).
            choice = resolve_precision(
                policy, x.device, x.dtype, state_dim=x.dim(), layout="contiguous"
            )
            if recorded is not None:  # resolved above for its warning where it is emulated
                choice = dataclasses.replace(
                    recorded, reason=f"as recorded by the run resumed ({recorded.reason})"
                )
            self._precision = (key, choice)
        return self._precision[1]

    @property
    def last_precision(self) -> PrecisionChoice | None:
        """The precision of the last call (None before any): what Trainer metrics report."""
        return None if self._precision is None else self._precision[1]

    def _use_precision(self, x: torch.Tensor) -> PrecisionChoice:
        choice = self.precision(x)
        self._energy.autocast = choice.autocast_dtype
        return choice

    def backend_context(self):
        """The block in which ops run on this sampler's backend: its forced one, or, for
        "auto", whatever an enclosing ``use_backend`` chose (the ops pick)."""
        return contextlib.nullcontext() if self.backend == "auto" else use_backend(self.backend)

    # -- validation -------------------------------------------------------------------------

    def _check_x0(self, x0, params: list[torch.Tensor]) -> None:
        validation.chain_tensor(x0, "x0")
        if x0.numel() == 0:
            raise ValueError(
                f"x0 must have at least one chain and one element per chain, got "
                f"shape {tuple(x0.shape)}"
            )
        validation.chain_offset(self.chain_offset, x0.shape)
        for p in params:
            if p.device != x0.device:
                raise ValueError(
                    f"x0 is on {x0.device} but the energy's parameters are on {p.device}"
                )
        if self.cuda_graph is True and x0.device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs CUDA tensors, but x0 is on {x0.device}")

    def _check_steps_left(self, n_steps: int) -> None:
        if self._steps_taken + n_steps > STEP_LIMIT:
            raise ValueError(
                f"{type(self).__name__}: {n_steps} more steps would take the step counter (at "
                f"{self._steps_taken}) past 2**32 - 1, the last step the noise spec counts "
                f"(step 2**32 would draw step 0's noise again); continue with another seed "
                f"(load_state_dict({{'step': 0, 'seed': ...}}) or a new sampler)"
            )

    def _check_y(self, y, x0: torch.Tensor) -> None:
        if isinstance(y, torch.Tensor):
            if y.dim() == 0 or y.shape[0] != x0.shape[0]:
                raise ValueError(
                    f"y must have one entry per chain ({x0.shape[0]}), got shape {tuple(y.shape)}"
                )
            validation.same_device(x0.device, "x0", y=y)

    # -- the call ---------------------------------------------------------------------------

    @overload
    def sample(
        self,
        x0: torch.Tensor,
        n_steps: int | None = None,
        *,
        step_size: StepParameter | None = None,
        return_info: Literal[False] = False,
        y: object = None,
        **energy_kwargs: Any,
    ) -> torch.Tensor: ...

    @overload
    def sample(
        self,
        x0: torch.Tensor,
        n_steps: int | None = None,
        *,
        step_size: StepParameter | None = None,
        return_info: Literal[True],
        y: object = None,
        **energy_kwargs: Any,
    ) -> tuple[torch.Tensor, SampleInfo]: ...

    @overload
    def sample(
        self,
        x0: torch.Tensor,
        n_steps: int | None = None,
        *,
        step_size: StepParameter | None = None,
        return_info: bool,
        y: object = None,
        **energy_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, SampleInfo]: ...

    def sample(
        self,
        x0: torch.Tensor,
        n_steps: int | None = None,
        *,
        step_size: StepParameter | None = None,
        return_info: bool = False,
        y: object = None,
        **energy_kwargs: Any,
    ) -> torch.Tensor | tuple[torch.Tensor, SampleInfo]:
        """Run the chains from x0 (not modified) and return the samples, and a SampleInfo with
        return_info=True (Langevin: one extra energy evaluation for the final energies; MALA:
        acceptance rates and adapted step sizes included).

        n_steps, step_size: this call's, instead of the constructor's. y and energy_kwargs: the
        energy is called as energy(x, y, **energy_kwargs) (energy(x, **energy_kwargs) without
        y); a tensor y has one entry per chain and is split with the chains.
        """
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                f"{type(self).__name__}.sample() cannot run under "
                "torch.inference_mode(): the chains follow the energy's input "
                "gradient, which inference mode switches off; use "
                "torch.no_grad() instead (the sampler turns gradients on for its "
                "own passes)"
            )
        params = parameters_of(self.energy)  # walking a module's tree costs tens of us: once
        self._check_x0(x0, params)
        self._check_y(y, x0)
        n_steps = self.n_steps if n_steps is None else validation.integer(n_steps, "n_steps", low=0)
        self._check_steps_left(n_steps)
        conditioning = Conditioning(y, energy_kwargs)
        start = time.perf_counter()
        x = x0.detach().clone(memory_format=torch.contiguous_format)
        # Grad mode on for the chains' input gradients (a caller may sample under no_grad).
        with (
            self.backend_context(),
            frozen_parameters(params),
            torch.enable_grad(),
            eval_mode(module_of(self.energy) if self.eval_mode else None),
        ):
            precision = self._use_precision(x)
            if n_steps == 0:  # nothing to run (JEM's loop does nothing either): x0's copy
                return (
                    (x, self._info_without_steps(x, conditioning, start, precision))
                    if return_info
                    else x
                )
            self._energy.start_call(x, conditioning)
            # The counter and seed live on the chains' device: kernels and CUDA graphs read
            # them there.
            self._step, self._seed = self._step.to(x.device), self._seed.to(x.device)
            inputs = ChainInputs(
                x, self._step, self._seed, self._call_tables(x, n_steps, step_size), conditioning
            )
            chunk = min(self.chunk_size or x.shape[0], x.shape[0])
            results = [
                self._run_chunk(
                    inputs
                    if chunk == x.shape[0]
                    else inputs.for_chains(lo, min(x.shape[0], lo + chunk)),
                    n_steps,
                    self.chain_offset + lo,
                    return_info,
                )
                for lo in range(0, x.shape[0], chunk)
            ]
        self._step += n_steps
        self._steps_taken += n_steps
        merged = (
            results[0]
            if len(results) == 1
            else {key: torch.cat([r[key] for r in results]) for key in results[0]}
        )
        if self.check_finite:
            self._raise_if_non_finite(merged["nonfinite_score"], n_steps)
        if not return_info:
            return x
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
        info = SampleInfo(
            initial_energy=merged["initial_energy"],
            final_energy=merged["final_energy"],
            mean_grad_norm=merged["mean_grad_norm"],
            displacement=torch.linalg.vector_norm(
                (x - x0.detach()).reshape(x.shape[0], -1).float(), dim=1
            ),
            time_s=time.perf_counter() - start,
            accept_rate=merged.get("accept_rate"),
            step_size=merged.get("step_size"),
            precision=precision,
        )
        return x, info

    def _info_without_steps(
        self, x: torch.Tensor, conditioning, start: float, precision: PrecisionChoice
    ) -> SampleInfo:
        """A zero-step call's SampleInfo: x0's energies, no displacement, a NaN mean_grad_norm
        (no gradient was evaluated), no accept_rate or step_size."""
        energy = self._energy.value(x, conditioning)
        return SampleInfo(
            initial_energy=energy,
            final_energy=energy,
            mean_grad_norm=torch.full((x.shape[0],), float("nan"), device=x.device),
            displacement=torch.zeros(x.shape[0], device=x.device),
            time_s=time.perf_counter() - start,
            precision=precision,
        )

    @abc.abstractmethod
    def _tables(self, x: torch.Tensor, n_steps: int, step_size) -> tuple[StepValues, ...]:
        """The call's per-step parameter values (step size, noise, ...)."""

    @abc.abstractmethod
    def _parameter_values(self) -> tuple:
        """The per-step parameters as the sampler holds them (numbers, tensors, schedules or
        None), which _tables reads."""

    def _call_tables(self, x: torch.Tensor, n_steps: int, step_size) -> tuple[StepValues, ...]:
        """_tables, kept while the parameters are the same numbers and the chains' dtype and
        device do not change: checking and filling them cost ~40 us per call on a CPU thread.
        Tables of numbers do not depend on n_steps (every step reads the same 0-dim tensor)."""
        values = self._parameter_values()
        if step_size is not None or not all(
            v is None or isinstance(v, numbers.Real) for v in values
        ):
            return self._tables(x, n_steps, step_size)
        key = (x.dtype, x.device, *values)
        if self._number_tables is None or self._number_tables[0] != key:
            self._number_tables = (key, self._tables(x, n_steps, None))
        return self._number_tables[1]

    @abc.abstractmethod
    def _chain(self, inputs: ChainInputs, *, n_steps: int, chain_offset: int, track: bool) -> dict:
        """Run n_steps on inputs.x in place, drawing noise at (seed, counter, counter + 1, ...),
        with the tables a block of steps at a time; return the chunk's per-chain results
        (tensors only)."""

    def _use_cuda_graph(self, x: torch.Tensor) -> bool:
        return self.cuda_graph is not False and x.device.type == "cuda" and not self._graph_failed

    def _run_chunk(self, inputs: ChainInputs, n_steps: int, chain_offset: int, track: bool) -> dict:
        run_chain = functools.partial(
            self._chain, n_steps=n_steps, chain_offset=chain_offset, track=track
        )
        if self._use_cuda_graph(inputs.x):
            inputs = inputs.tabulated(n_steps)  # a graph's inputs are tensors
            try:
                key = graph_key(self.energy, inputs, n_steps, chain_offset, track)
                if key not in self._graphs:
                    if self._graph_pool is None:
                        self._graph_pool = torch.cuda.graph_pool_handle()
                    self._graphs[key] = CudaGraphChain(run_chain, inputs, self._graph_pool)
                return self._graphs[key].replay(inputs)
            except Exception as exc:  # e.g. the energy synchronises with the host
                self._graph_failed = True
                warnings.warn(
                    f"{type(self).__name__}: CUDA graph capture failed "
                    f"({type(exc).__name__}: {exc}); running eagerly from now on.",
                    RuntimeWarning,
                    stacklevel=4,
                )
        return run_chain(inputs)

    def _raise_if_non_finite(self, score: torch.Tensor, n_steps: int) -> None:
        worst = int(score.max())  # the one host read of the call
        if worst == 0:
            return
        count = int((score > 0).sum())
        first = n_steps + 1 - worst  # the earliest local step at which a chain was non-finite
        where = (
            "at the initial state x0"
            if first == 0
            else f"after update {first} of {n_steps} in this call (sampler step "
            f"{self._steps_taken - n_steps + first - 1})"
        )
        raise NonFiniteChainError(
            f"{type(self).__name__}: {count} of {score.shape[0]} chains have a non-finite "
            f"energy or state; the first appeared {where}. Lower step_size, clip gradients "
            f"(grad_clip), check the energy, or pass check_finite=False to get the samples anyway."
        )
