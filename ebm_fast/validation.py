"""The argument rulebook: every check of a user-given argument in ebm_fast is one of these rules.

Policy (one for ops, samplers, buffer, training and the CLI):

* A wrong TYPE raises TypeError; the right type with a wrong VALUE raises ValueError. A tensor of
  an unsupported dtype, and an unsupported ``torch.dtype``, count as a wrong type.
* The message names the argument and shows what was given.
* bool is never a number (``True`` is refused where an int or a float is expected).
* numpy integer and float scalars are numbers (``numbers.Integral`` / ``numbers.Real``).
* NaN is always refused; infinity only where a rule says it means "no limit".
* Integer ranges are half-open ``[low, high)``, float ranges closed unless a side is marked open.
* Values inside tensors are not read: that would synchronise with the tensor's device (a
  counter given as a tensor, a per-chain step size) -- the caller keeps those in range.
"""

from __future__ import annotations

import argparse
import math
import numbers
import struct
from collections.abc import Callable

import torch

# dtypes of the chains' states, and the dtype their arithmetic runs in (compute_dtype).
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
GRAD_CLIP_MODES = ("value", "norm")

# The public functions' argument types, as type checkers see them (the rules below check values).
ChainParameter = float | torch.Tensor  # a number, or one value per chain (chains,) (0-dim too)
Counter = int | torch.Tensor  # a seed or a step: an int, or a 0-dim integer tensor
Bounds = tuple[float | None, float | None]  # a clamp's (lo, hi); None or +-inf: unbounded

# Global element indices n of the noise spec (ebm_fast/noise.py) stay below this: int64
# arithmetic in the reference and the kernels never overflows.
MAX_ELEMENT_INDEX = 1 << 62


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in for states of ``dtype``: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shown(value) -> str:
    """How a refused value is shown: its repr, and its type where the repr hides it (a numpy
    scalar or a tensor prints like a plain number)."""
    if type(value) in (int, float, str, type(None)):  # np.float64 subclasses float: exact types
        return repr(value)
    return f"{value!r} ({type(value).__module__}.{type(value).__qualname__})"


def _range_text(low, high, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def integer(value, name: str, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high) (None: unbounded). Python and numpy integers."""
    if type(value) is not int:  # plain ints skip the (slow) abstract-class checks
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {_shown(value)}")
        value = int(value)
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name} must be {_range_text(low, high, False, True)}, got {value}")
    return value


def real(
    value,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """``value`` as a float in [low, high] (a side open when ``*_open``; None: unbounded).

    Python and numpy ints and floats. NaN is refused; +-inf unless ``allow_inf``.
    """
    if type(value) is float:  # plain floats skip the (slow) abstract-class checks
        converted = value
    elif isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {_shown(value)}")
    else:
        try:
            converted = float(value)
        except OverflowError:  # an int beyond the float range
            raise ValueError(f"{name} is beyond the float range, got {value}") from None
    if math.isnan(converted):
        raise ValueError(f"{name} must not be NaN")
    if math.isinf(converted) and not allow_inf:
        raise ValueError(f"{name} must be finite, got {converted}")
    too_low = low is not None and (converted <= low if low_open else converted < low)
    too_high = high is not None and (converted >= high if high_open else converted > high)
    if too_low or too_high:
        raise ValueError(
            f"{name} must be {_range_text(low, high, low_open, high_open)}, got {converted}"
        )
    return converted


def choice(value, name: str, choices):
    """``value``, one of ``choices`` (equal and of the same type). A value of none of the
    choices' types (an int where the choices are strings) is a TypeError; a value of a right type
    not among them a ValueError; both list the choices."""
    for option in choices:
        if type(option) is type(value) and option == value:
            return value
    if not isinstance(value, tuple({type(option) for option in choices})):
        raise TypeError(f"{name} must be one of {tuple(choices)}, got {_shown(value)}")
    raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def clamp_bounds(clamp, name: str = "clamp") -> tuple[float | None, float | None]:
    """None, or a (lo, hi) pair with lo <= hi, either side None; +-inf allowed, NaN refused.
    Returns (lo, hi), (None, None) for no clamp."""
    if clamp is None:
        return None, None
    if not isinstance(clamp, (tuple, list)):
        raise TypeError(f"{name} must be None or a (lo, hi) pair, got {_shown(clamp)}")
    if len(clamp) != 2:
        raise ValueError(f"{name} must be a (lo, hi) pair, got {len(clamp)} entries: {clamp!r}")
    lo, hi = (
        None if bound is None else real(bound, f"{name}[{i}]", allow_inf=True)
        for i, bound in enumerate(clamp)
    )
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"{name} has lo > hi: {clamp!r}")
    return lo, hi


def grad_clip(value, name: str = "grad_clip") -> float | None:
    """None (no clipping) or a float > 0; inf means no clipping too."""
    if value is None:
        return None
    return real(value, name, low=0.0, low_open=True, allow_inf=True)


_SMALLEST_NORMAL = {dtype_: torch.finfo(dtype_).tiny for dtype_ in (torch.float32, torch.float64)}


def _rounded_to(value: float, dtype: torch.dtype) -> float:
    """``value`` rounded to nearest in ``dtype`` (float32 or float64): beyond the dtype's range it
    becomes +-inf, as the kernels' conversion makes it."""
    if dtype == torch.float64:
        return value
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # rounds beyond float32's largest finite value
        return math.copysign(math.inf, value)


def update_limits(
    grad_clip_value: float | None,
    clamp_lo: float | None,
    clamp_hi: float | None,
    dtype: torch.dtype,
) -> tuple[float | None, float | None, float | None]:
    """The already-validated grad_clip and clamp bounds as the kernels apply them to states of
    ``dtype``: each rounded to the compute dtype, and a limit that no longer limits (a grad_clip
    or a bound beyond the dtype's range, rounded to +-inf) turned into None, so that every backend
    skips it alike (a finite 1e300 would overflow or give NaN in float32 arithmetic).

    A grad_clip below the compute dtype's smallest normal number is refused (ValueError): the
    backends would flush it to zero or not, and clip alike to nothing useful either way.
    """
    compute = compute_dtype(dtype)
    if grad_clip_value is not None:
        if grad_clip_value < _SMALLEST_NORMAL[compute]:
            raise ValueError(
                f"grad_clip must be at least {_SMALLEST_NORMAL[compute]} (the "
                f"smallest normal {compute}), got {grad_clip_value}"
            )
        grad_clip_value = _rounded_to(grad_clip_value, compute)
        if math.isinf(grad_clip_value):
            grad_clip_value = None
    if clamp_lo is not None:
        clamp_lo = _rounded_to(clamp_lo, compute)
        if clamp_lo == -math.inf:
            clamp_lo = None
    if clamp_hi is not None:
        clamp_hi = _rounded_to(clamp_hi, compute)
        if clamp_hi == math.inf:
            clamp_hi = None
    return grad_clip_value, clamp_lo, clamp_hi


def dtype(value, name: str, allowed) -> torch.dtype:
    """``value``, a torch.dtype among ``allowed`` (else TypeError listing them)."""
    if not isinstance(value, torch.dtype) or value not in allowed:
        raise TypeError(f"{name} must be one of {tuple(allowed)}, got {_shown(value)}")
    return value


def same_device(device: torch.device, owner: str, **tensors) -> None:
    """Each given tensor (None skipped) must be on ``device``, the device of ``owner``: the
    kernels read raw pointers, so a tensor elsewhere would be read from the wrong memory."""
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != device:
            raise ValueError(f"{name} is on {tensor.device} but {owner} is on {device}")


def counter(value, name: str, bits: int) -> torch.Tensor:
    """A seed (bits=64) or step counter (bits=32) as a 0-dim int64 tensor.

    An int (Python or numpy) must lie in [0, 2**bits); a 64-bit seed keeps its bits as two's
    complement. A 0-dim integer tensor keeps its device, so that a counter captured in a CUDA
    graph is read by the kernel and never by the host; its value is NOT checked (reading it
    would synchronise with the device): the kernels use its low ``bits`` bits.
    """
    if isinstance(value, torch.Tensor):
        if (
            value.dim() != 0
            or value.dtype.is_floating_point
            or value.dtype.is_complex
            or value.dtype == torch.bool
        ):
            raise TypeError(
                f"{name} must be an int or a 0-dim integer tensor, got a tensor of "
                f"shape {tuple(value.shape)} and dtype {value.dtype}"
            )
        return value if value.dtype == torch.int64 else value.to(torch.int64)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int or a 0-dim integer tensor, got {_shown(value)}")
    value = integer(value, name, low=0, high=1 << bits)
    if value >= 1 << 63:  # a 64-bit seed: keep its bits as two's complement
        value -= 1 << 64
    return torch.tensor(value, dtype=torch.int64)


def seed_or_default(seed, name: str = "seed") -> int:
    """A 64-bit seed: ``seed`` checked as an int in [0, 2**64), or for None one drawn from torch's
    global generator (so ``torch.manual_seed`` makes it reproducible)."""
    if seed is None:
        high, low = torch.randint(0, 1 << 32, (2,), dtype=torch.int64).tolist()
        return (high << 32) | low
    return integer(seed, name, low=0, high=1 << 64)


def chain_offset(value, shape, name: str = "chain_offset") -> int:
    """The index of the first chain of a (chains, ...) tensor of draws: an int >= 0 that keeps
    every global element index (chain_offset + chain) * elements_per_chain + j below 2**62."""
    value = integer(value, name, low=0, high=MAX_ELEMENT_INDEX)
    if (value + shape[0]) * math.prod(shape[1:]) > MAX_ELEMENT_INDEX:
        raise ValueError(
            f"{name} {value} with shape {tuple(shape)} gives global element indices beyond 2**62"
        )
    return value


def chain_tensor(x, name: str = "x") -> None:
    """``x`` must be a (chains, ...) tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {_shown(x)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be one of {SUPPORTED_DTYPES}, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a leading chain axis (at least 1 dimension)")


def same_layout(x: torch.Tensor, other, name: str) -> None:
    """``other`` must be a tensor of x's shape, device and dtype."""
    if not isinstance(other, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {_shown(other)}")
    if other.shape != x.shape:
        raise ValueError(f"{name} has shape {tuple(other.shape)} but x has {tuple(x.shape)}")
    if other.device != x.device:
        raise ValueError(f"{name} is on {other.device} but x is on {x.device}")
    if other.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {other.dtype} but x has {x.dtype}")


def _byte_extent(t: torch.Tensor) -> int:
    """Bytes from a non-empty tensor's first element to the end of its last."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return (last + 1) * t.element_size()


def no_partial_overlap(written: torch.Tensor, written_name: str, **read) -> None:
    """``written`` (an output) and each tensor it is computed from (None skipped; all on one
    device) are either the very same elements (same start, shape and strides: an in-place
    update) or disjoint in memory. A partial overlap would let the kernel read an input it
    already overwrote. Two interleaved views whose memory spans cross are refused too (a cheap,
    conservative check). Skipped while torch.compile traces: traced tensors have no addresses."""
    if torch.compiler.is_compiling() or not written.numel():
        return
    start, end = written.data_ptr(), None
    for name, tensor in read.items():
        if tensor is None or tensor is written or not tensor.numel():
            continue
        other = tensor.data_ptr()
        if other == start and tensor.shape == written.shape and tensor.stride() == written.stride():
            continue
        end = start + _byte_extent(written) if end is None else end
        if other < end and start < other + _byte_extent(tensor):
            raise ValueError(
                f"{written_name} partially overlaps {name} in memory: give a "
                f"separate tensor, or {name} itself to update in place"
            )


def chain_param(value, name: str, x: torch.Tensor, *, allow_zero: bool) -> torch.Tensor:
    """A float or per-chain parameter of the chains ``x``, as a tensor of x's compute dtype.

    A number must be finite and > 0 (>= 0 with ``allow_zero``) once rounded to the compute dtype
    (1e300 is inf in float32, 1e-50 is 0). A tensor is floating, 0-dim or (chains,), on x's
    device (a 0-dim CPU tensor is read on the host by every backend); its values are not checked
    (that would synchronise with the device).
    """
    dtype_ = compute_dtype(x.dtype)
    if isinstance(value, torch.Tensor):
        if not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be a float or a floating tensor, got {value.dtype}")
        if value.dim() == 1 and value.shape[0] != x.shape[0]:
            raise ValueError(f"{name} has {value.shape[0]} entries but x has {x.shape[0]} chains")
        if value.dim() > 1:
            raise ValueError(
                f"{name} must be a float, a 0-dim tensor or a per-chain tensor of "
                f"shape ({x.shape[0]},), got shape {tuple(value.shape)}"
            )
        if value.device != x.device and (value.dim() == 1 or value.device.type != "cpu"):
            raise ValueError(f"{name} is on {value.device} but x is on {x.device}")
        return value.to(dtype_)
    number = _rounded_to(real(value, name, low=0.0, low_open=not allow_zero), dtype_)
    if math.isinf(number) or not (number > 0 or (allow_zero and number == 0)):
        raise ValueError(
            f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite in {dtype_}, got {value}"
        )
    return torch.tensor(number, dtype=dtype_)


def argparse_type(check: Callable, name: str = "value", **rules) -> Callable[[str], object]:
    """An argparse ``type=`` applying a rule of this module to a command-line string: the string
    is read as an int, else a float, else kept as it is, then ``check(parsed, name, **rules)``;
    a refusal becomes argparse.ArgumentTypeError (a usage error, not a traceback).

    Example: ``parser.add_argument("--step-size", type=argparse_type(real, low=0, low_open=True))``.
    """

    def parse(text: str):
        parsed: int | float | str
        for read in (int, float):
            try:
                parsed = read(text)
                break
            except ValueError:
                continue
        else:
            parsed = text
        try:
            return check(parsed, name, **rules)
        except (TypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = check.__name__
    return parse
