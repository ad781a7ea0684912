"""The precision and memory layout an energy's passes run in, chosen for the hardware.

The chains keep their own dtype (docs/design.md, Precision); this policy picks only what the
energy's forward and backward passes use:

* **bf16 autocast** where the device computes bf16 natively: a CUDA device of compute
  capability >= 8.0, or a CPU with avx512_bf16 or AMX. Elsewhere bf16 is emulated, 14-20x
  slower than float32 on an AVX2 CPU (benchmarks/RESULTS.md), so ``"auto"`` keeps float32 there.
* **channels-last** for 4-D states with a convolutional energy (without InstanceNorm2d, whose
  outputs are always contiguous): on a CPU, where oneDNN's convolutions run NHWC natively; on
  CUDA only under bf16/fp16 autocast, where cuDNN's tensor-core kernels are NHWC. The model
  must be converted too (``fast_energy``): converting only x gained nothing (0.96-1.01x,
  issue 22).

``resolve_precision`` makes the choice, ``fast_energy`` applies it to a model (and falls back,
with one warning, where the model refuses it), ``capability_line`` says what the machine has.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
import warnings
from typing import Any, cast

import torch

from ebm_fast import validation

POLICIES = ("auto", "fp32", "bf16", "fp16")
LAYOUTS = ("auto", "channels_last", "contiguous")
# A policy given as torch's autocast dtype (the samplers' autocast= before this policy).
_DTYPE_POLICIES = {
    None: "fp32",
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
}
_AUTOCAST_NAMES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# torch's CPU queries, by the names its versions gave them (2.5+ first, then 2.3-2.4), and the
# /proc/cpuinfo flag read where this torch has none of them.
_CPU_QUERIES = {
    "avx512_bf16": (("_is_avx512_bf16_supported",), "avx512_bf16"),
    "AMX": (("_is_amx_tile_supported", "_is_cpu_support_amx_tile"), "amx_bf16"),
}
EMULATED_BF16 = "bf16 would be emulated and 14-20x slower"


@dataclasses.dataclass(frozen=True)
class PrecisionChoice:
    """What the energy's passes run in: ``autocast_dtype`` (None: the state's own dtype) and
    the layout (``channels_last``), with the policy asked for and a human-readable reason."""

    policy: str
    autocast_dtype: torch.dtype | None
    channels_last: bool
    reason: str

    @property
    def memory_format(self) -> torch.memory_format:
        """The layout for the chains' states: ``x.contiguous(memory_format=...)``."""
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def to_dict(self) -> dict:
        """Plain values (JSON, checkpoints); ``from_dict`` reads them back."""
        dtype = self.autocast_dtype
        return {
            "policy": self.policy,
            "autocast": None if dtype is None else _name(dtype),
            "channels_last": self.channels_last,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: dict) -> PrecisionChoice:
        """The choice ``to_dict`` wrote; ValueError naming the field that is not one."""
        if not isinstance(data, dict) or set(data) != {
            "policy",
            "autocast",
            "channels_last",
            "reason",
        }:
            raise ValueError(
                f"not a precision choice (want the keys policy, autocast, "
                f"channels_last, reason): {data!r}"
            )
        autocast = data["autocast"]
        if autocast is not None and autocast not in _AUTOCAST_NAMES:
            raise ValueError(
                f"precision choice: autocast must be one of "
                f"{tuple(_AUTOCAST_NAMES)} or None, got {autocast!r}"
            )
        if type(data["channels_last"]) is not bool or not isinstance(data["reason"], str):
            raise ValueError(
                f"precision choice: channels_last must be a bool and reason a "
                f"string, got {data['channels_last']!r} and {data['reason']!r}"
            )
        if data["policy"] not in POLICIES:
            raise ValueError(
                f"precision choice: policy must be one of {POLICIES}, got {data['policy']!r}"
            )
        return cls(
            data["policy"], _AUTOCAST_NAMES.get(autocast), data["channels_last"], data["reason"]
        )


def _name(dtype: torch.dtype | None) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_has(feature: str) -> bool:
    """Whether this CPU has ``feature`` ("avx512_bf16" or "AMX"), by torch's query."""
    queries, flag = _CPU_QUERIES[feature]
    for name in queries:
        query = getattr(torch.cpu, name, None)
        if query is not None:
            return bool(query())
    from ebm_fast._cpp import _cpu_features  # the OS's flags, for a torch without the query

    return flag in _cpu_features().split()


def native_bf16(device: torch.device) -> tuple[bool, str]:
    """(whether ``device`` computes bf16 natively, why) for a CPU or CUDA device."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if (major, minor) >= (8, 0):
            return True, f"cuda capability {major}.{minor} has native bf16"
        return False, f"cuda capability {major}.{minor} < 8.0 lacks native bf16"
    if device.type == "cpu":
        for feature in _CPU_QUERIES:
            if cpu_has(feature):
                return True, f"cpu has {feature}"
        return False, (
            f"cpu lacks native bf16 ({torch.backends.cpu.get_cpu_capability()} "
            f"only): {EMULATED_BF16}"
        )
    return False, f"no bf16 detection for {device.type} devices"


def capability_line(device: torch.device) -> str:
    """One line naming the device and what the policy reads from it (benchmarks print it)."""
    device = torch.device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (
            f"cuda: {torch.cuda.get_device_name(device)}, capability {major}.{minor}, "
            f"torch {torch.__version__}"
        )
    features = ", ".join(
        f"{feature} {'yes' if cpu_has(feature) else 'no'}" for feature in _CPU_QUERIES
    )
    return (
        f"cpu: {_cpu_name()} ({torch.backends.cpu.get_cpu_capability()}; {features}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def resolve_precision(
    policy,
    device,
    state_dtype: torch.dtype,
    *,
    state_dim: int | None = None,
    energy=None,
    layout: str = "auto",
) -> PrecisionChoice:
    """The passes' precision and layout for chains of ``state_dtype`` on ``device``.

    policy: "auto" (bf16 where native, else fp32), "fp32", "bf16", "fp16" (float16 as asked, no
        hardware check), or the samplers' autocast dtype (None: fp32, torch.bfloat16,
        torch.float16).
    state_dim, energy: the states' number of dimensions and the energy, for the layout: "auto"
        picks channels-last for 4-D float32 states and an nn.Module energy with an nn.Conv2d
        (and no InstanceNorm2d), on a CPU, or on CUDA under autocast. "channels_last" (4-D
        states only) and "contiguous" force it.

    Stated behaviours: a float64 (or bf16/fp16) state keeps its dtype in the passes (autocast
    casts only float32); asked explicitly for bf16, it warns once. Explicit "bf16" where bf16 is
    not native is honoured, with one warning naming the reason.
    """
    device = torch.device(device)
    state_dtype = validation.dtype(state_dtype, "state_dtype", validation.SUPPORTED_DTYPES)
    layout = validation.choice(layout, "layout", LAYOUTS)
    policy = _policy_name(policy)
    autocast, reason = _precision(policy, device, state_dtype)
    if layout == "channels_last" and state_dim != 4:
        raise ValueError(f"layout 'channels_last' needs 4-D states, got state_dim={state_dim}")
    if layout == "auto":
        channels_last, why = _channels_last_helps(device, state_dtype, state_dim, energy, autocast)
    else:
        channels_last, why = layout == "channels_last", f"{layout} as asked"
    return PrecisionChoice(policy, autocast, channels_last, f"{reason}; {why}")


def _policy_name(policy) -> str:
    if isinstance(policy, str):
        return validation.choice(policy, "precision", POLICIES)
    if policy is None or isinstance(policy, torch.dtype):
        if policy in _DTYPE_POLICIES:
            return _DTYPE_POLICIES[policy]
    raise TypeError(
        f"precision must be one of {POLICIES} or an autocast dtype (None, "
        f"torch.bfloat16, torch.float16), got {policy!r}"
    )


def _precision(policy: str, device: torch.device, state_dtype: torch.dtype):
    """(autocast dtype or None, why) for the passes."""
    if state_dtype != torch.float32:
        name = _name(state_dtype)
        if policy in ("bf16", "fp16"):
            _warn_once(
                f"precision {policy!r} asked for {name} states: autocast casts only "
                f"float32, so the passes stay {name}"
            )
        return None, f"{name} state: passes stay {name}"
    if policy == "fp32":
        return None, "fp32 as asked"
    if policy == "fp16":
        return torch.float16, "fp16 as asked"
    native, why = native_bf16(device)
    if policy == "bf16":
        if not native:
            _warn_once(
                f"precision 'bf16' on {device.type}: {why}; running bf16 as asked "
                f"(precision 'auto' picks fp32 here)"
            )
        return torch.bfloat16, f"bf16 as asked ({why})"
    return (torch.bfloat16, f"bf16: {why}") if native else (None, f"fp32: {why}")


def _channels_last_helps(device, state_dtype, state_dim, energy, autocast) -> tuple[bool, str]:
    if state_dim != 4:
        return False, "contiguous: states are not 4-D"
    if state_dtype != torch.float32:
        return False, f"contiguous: {_name(state_dtype)} state"
    modules = list(energy.modules()) if isinstance(energy, torch.nn.Module) else []
    if not any(isinstance(m, torch.nn.Conv2d) for m in modules):
        return False, "contiguous: no nn.Conv2d in the energy"
    if any(isinstance(m, torch.nn.InstanceNorm2d) for m in modules):
        # Its kernels return contiguous outputs whatever the input: the layout would flip
        # around every one (ICD's energy measured 0.94-0.96x in channels-last on a CPU).
        return False, "contiguous: the energy's InstanceNorm2d undoes channels-last"
    if device.type == "cpu":
        return True, "channels-last: 4-D states, conv energy, cpu"
    if device.type == "cuda" and autocast is not None:
        return True, "channels-last: 4-D states, conv energy, cuda tensor cores"
    return False, f"contiguous: no channels-last gain known for {device.type} without autocast"


def fast_energy(energy, choice: PrecisionChoice, example: torch.Tensor | None = None):
    """``energy`` converted to ``choice``'s layout (in place, as Module.to does), and the
    choice as it stands: ``(energy, choice)``.

    With ``example`` (a few states), one forward pass under the choice checks that the energy
    runs that way. A model that refuses channels-last (a 5-D weight, a .view of a conv output)
    or the autocast dtype (an op without a bf16 kernel) is put back and that part dropped from
    the choice, with one warning naming the reason. An energy that fails without either is the
    caller's error, raised as it is.
    """
    if not isinstance(choice, PrecisionChoice):
        raise TypeError(
            f"choice must be a PrecisionChoice (resolve_precision), got {type(choice).__name__}"
        )
    if choice.channels_last:
        try:
            _layout(energy, choice)
        except RuntimeError as exc:  # the conversion itself refuses (a 5-D weight)
            choice = _without(choice, energy, exc, layout=True)
    if example is not None and _trial(energy, choice, example) is not None:
        choice = _fall_back(energy, choice, example)
    _layout(energy, choice)
    return energy, choice


def _fall_back(energy, choice: PrecisionChoice, example: torch.Tensor) -> PrecisionChoice:
    """``choice`` less the parts ``energy`` refuses, each part tried alone on ``example``."""
    plain = dataclasses.replace(choice, autocast_dtype=None, channels_last=False)
    error = _trial(energy, plain, example)
    if error is not None:
        raise error  # the energy fails as written: not a precision or layout matter
    if choice.channels_last:
        error = _trial(energy, dataclasses.replace(plain, channels_last=True), example)
        if error is not None:
            choice = _without(choice, energy, error, layout=True)
    if choice.autocast_dtype is not None:
        error = _trial(
            energy, dataclasses.replace(plain, autocast_dtype=choice.autocast_dtype), example
        )
        if error is not None:
            choice = _without(choice, energy, error, autocast=True)
    error = _trial(energy, choice, example)
    if error is not None:  # each part runs alone, but not both together
        choice = _without(choice, energy, error, layout=True, autocast=True)
    return choice


def _layout(energy, choice: PrecisionChoice) -> None:
    """Module.to(memory_format=...): every 4-D and 5-D parameter and buffer in that layout."""
    if isinstance(energy, torch.nn.Module):
        # Any: torch's type stubs leave out the memory_format keyword Module.to takes.
        cast(Any, energy).to(memory_format=choice.memory_format)


def _trial(energy, choice: PrecisionChoice, example: torch.Tensor) -> RuntimeError | None:
    """None when one forward pass of ``energy`` under ``choice`` runs, else its error. In eval
    mode and without a graph, so that the trial changes nothing (batch-norm statistics)."""
    _layout(energy, choice)
    modes = (
        [(m, m.training) for m in energy.modules()] if isinstance(energy, torch.nn.Module) else []
    )
    for module, _ in modes:
        module.training = False
    try:
        with (
            torch.no_grad(),
            torch.autocast(
                example.device.type,
                choice.autocast_dtype,
                enabled=choice.autocast_dtype is not None,
            ),
        ):
            energy(example.contiguous(memory_format=choice.memory_format))
    except RuntimeError as exc:
        return exc
    finally:
        for module, training in modes:
            module.training = training
    return None


def _without(
    choice: PrecisionChoice,
    energy,
    error: RuntimeError,
    *,
    layout: bool = False,
    autocast: bool = False,
) -> PrecisionChoice:
    """``choice`` without channels-last and/or autocast, with one warning naming why."""
    parts = (["channels-last"] if layout else []) + (
        [f"{_name(choice.autocast_dtype)} autocast"] if autocast else []
    )
    why = (
        f"{type(energy).__name__} refuses {' with '.join(parts)} "
        f"({str(error).strip().splitlines()[0]})"
    )
    _warn_once(f"{why}; its passes run without it")
    return dataclasses.replace(
        choice,
        channels_last=choice.channels_last and not layout,
        autocast_dtype=None if autocast else choice.autocast_dtype,
        reason=f"{choice.reason}; {why}",
    )


_warned: set[str] = set()
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _warn_once(message: str) -> None:
    """One warning per message and process, attributed to the first caller outside ebm_fast
    (the user's line, also when a sampler resolved the policy)."""
    if message in _warned:
        return
    _warned.add(message)
    frame, level = sys._getframe(), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"ebm_fast: {message}", RuntimeWarning, stacklevel=level)
