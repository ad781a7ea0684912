"""The argument rulebook: TypeError for a wrong type, ValueError for a wrong value, the argument
named; bool never a number; numpy scalars numbers; NaN refused; inf only where it means no limit."""

import argparse
import math

import numpy as np
import pytest
import torch

from ebm_fast import validation as v


def test_integer_accepts_python_and_numpy_ints_in_a_half_open_range():
    assert v.integer(3, "n", low=0, high=4) == 3
    assert type(v.integer(np.int64(3), "n")) is int
    assert v.integer(np.uint8(7), "n", low=7) == 7
    assert v.integer(-(10**30), "n") == -(10**30)
    with pytest.raises(ValueError, match=r"n must be >= 0 and < 4, got 4"):
        v.integer(4, "n", low=0, high=4)
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        v.integer(0, "n", low=1)


@pytest.mark.parametrize(
    "value", [True, np.bool_(True), 1.0, np.float64(2.0), "3", None, torch.tensor(3)]
)
def test_integer_refuses_other_types_naming_them(value):
    with pytest.raises(TypeError, match="count must be an int"):
        v.integer(value, "count")


def test_numpy_and_tensor_values_are_shown_with_their_type():
    with pytest.raises(TypeError, match=r"numpy.*float64"):
        v.integer(np.float64(2.0), "count")


def test_real_policy():
    assert v.real(2, "a") == 2.0 and type(v.real(np.float32(0.5), "a")) is float
    assert v.real(np.int32(3), "a") == 3.0
    assert v.real(math.inf, "a", allow_inf=True) == math.inf
    assert v.real(0.0, "a", low=0.0) == 0.0
    for value, rules, error, pattern in [
        (True, {}, TypeError, "a must be a float"),
        ("1", {}, TypeError, "a must be a float"),
        (None, {}, TypeError, "a must be a float"),
        (math.nan, {"allow_inf": True}, ValueError, "NaN"),
        (np.float32("nan"), {}, ValueError, "NaN"),
        (math.inf, {}, ValueError, "finite"),
        (-math.inf, {}, ValueError, "finite"),
        (10**400, {}, ValueError, "beyond the float range"),
        (0.0, {"low": 0.0, "low_open": True}, ValueError, "a must be > 0.0"),
        (1.0, {"high": 1.0, "high_open": True}, ValueError, "a must be < 1.0"),
        (1.5, {"low": 0.0, "high": 1.0}, ValueError, r"a must be >= 0.0 and <= 1.0, got 1.5"),
    ]:
        with pytest.raises(error, match=pattern):
            v.real(value, "a", **rules)


def test_choice_type_and_value_errors_list_the_choices():
    assert v.choice("norm", "mode", ("value", "norm")) == "norm"
    with pytest.raises(ValueError, match=r"mode must be one of \('value', 'norm'\), got 'max'"):
        v.choice("max", "mode", ("value", "norm"))
    with pytest.raises(TypeError, match="mode must be one of"):
        v.choice(1, "mode", ("value", "norm"))


def test_clamp_bounds():
    assert v.clamp_bounds(None) == (None, None)
    assert v.clamp_bounds((-1, np.float32(2.0))) == (-1.0, 2.0)
    assert v.clamp_bounds([None, math.inf]) == (None, math.inf)
    assert v.clamp_bounds((-math.inf, None)) == (-math.inf, None)
    for clamp, error, pattern in [
        (1.0, TypeError, "clamp must be None or a"),
        ((1.0,), ValueError, "pair"),
        ((math.nan, 1.0), ValueError, r"clamp\[0\] must not be NaN"),
        ((0.0, math.nan), ValueError, r"clamp\[1\] must not be NaN"),
        ((True, 1.0), TypeError, r"clamp\[0\]"),
        ((2.0, 1.0), ValueError, "lo > hi"),
    ]:
        with pytest.raises(error, match=pattern):
            v.clamp_bounds(clamp)


def test_grad_clip():
    assert v.grad_clip(None) is None
    assert v.grad_clip(math.inf) == math.inf
    assert v.grad_clip(np.float64(0.5)) == 0.5
    with pytest.raises(ValueError, match="grad_clip must be > 0"):
        v.grad_clip(0.0)
    with pytest.raises(ValueError, match="NaN"):
        v.grad_clip(math.nan)
    with pytest.raises(TypeError, match="grad_clip"):
        v.grad_clip(True)


def test_update_limits_in_the_compute_dtype():
    # Beyond float32's range: no limit at all (None), as the kernels' rounding to inf makes it.
    assert v.update_limits(1e300, -1e300, 1e300, torch.float32) == (None, None, None)
    assert v.update_limits(1e300, -1e300, 1e300, torch.float64) == (1e300, -1e300, 1e300)
    assert v.update_limits(math.inf, -math.inf, math.inf, torch.float64) == (None, None, None)
    # A bound beyond the range on the inner side clamps everything to +-inf.
    assert v.update_limits(None, 1e300, None, torch.bfloat16) == (None, math.inf, None)
    # Rounded to nearest in float32.
    assert v.update_limits(0.1, None, None, torch.float16)[0] == float(np.float32(0.1))
    with pytest.raises(ValueError, match="smallest normal"):
        v.update_limits(1e-40, None, None, torch.float32)
    assert v.update_limits(1e-40, None, None, torch.float64)[0] == 1e-40


def test_dtype():
    assert v.dtype(torch.float32, "dtype", (torch.float32,)) is torch.float32
    with pytest.raises(TypeError, match=r"dtype must be one of \(torch.float32,\)"):
        v.dtype(torch.int8, "dtype", (torch.float32,))
    with pytest.raises(TypeError, match="dtype"):
        v.dtype("float32", "dtype", (torch.float32,))


def test_same_device():
    v.same_device(torch.device("cpu"), "x", a=torch.ones(1), b=None)
    with pytest.raises(ValueError, match="a is on meta but x is on cpu"):
        v.same_device(torch.device("cpu"), "x", a=torch.ones(1, device="meta"))


def test_counter_one_rule_for_ints_numpy_ints_and_tensors():
    assert v.counter(5, "step", 32).item() == 5
    assert v.counter(np.uint32(2**32 - 1), "step", 32).item() == 2**32 - 1
    assert v.counter(2**64 - 1, "seed", 64).item() == -1  # the bits, two's complement
    assert v.counter(torch.tensor(3, dtype=torch.int32), "step", 32).dtype == torch.int64
    for value, bits, error in [
        (2**32, 32, ValueError),
        (-1, 32, ValueError),
        (2**64, 64, ValueError),
        (True, 32, TypeError),
        (1.0, 32, TypeError),
        (torch.tensor([1]), 32, TypeError),
        (torch.tensor(1.0), 32, TypeError),
    ]:
        with pytest.raises(error, match="step|seed"):
            v.counter(value, "step" if bits == 32 else "seed", bits)


def test_seed_or_default_draws_from_torch_global_generator():
    torch.manual_seed(3)
    first = v.seed_or_default(None)
    torch.manual_seed(3)
    assert v.seed_or_default(None) == first and 0 <= first < 2**64
    assert v.seed_or_default(np.uint64(2**64 - 1)) == 2**64 - 1
    with pytest.raises(ValueError, match="seed"):
        v.seed_or_default(-1)


def test_chain_offset_keeps_element_indices_below_2_62():
    assert v.chain_offset(np.int64(4), (2, 3)) == 4
    with pytest.raises(ValueError, match="2\\*\\*62"):
        v.chain_offset(2**61, (1, 4))


def test_chain_param_rounds_to_the_compute_dtype():
    x = torch.zeros(2, 3)
    assert v.chain_param(np.float32(0.5), "step_size", x, allow_zero=False).dtype == torch.float32
    assert v.chain_param(0, "noise_scale", x, allow_zero=True).item() == 0.0
    for value in (1e300, 1e-50, 0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="step_size"):
            v.chain_param(value, "step_size", x, allow_zero=False)
    assert v.chain_param(1e300, "step_size", x.double(), allow_zero=False).item() == 1e300
    with pytest.raises(TypeError, match="step_size"):
        v.chain_param(True, "step_size", x, allow_zero=False)


def test_no_partial_overlap():
    buf = torch.zeros(9, 4)
    v.no_partial_overlap(buf[:8], "out", x=buf[:8], grad=torch.zeros(8, 4), y=None)
    v.no_partial_overlap(buf[:4], "out", x=buf[4:8])  # adjacent, disjoint
    v.no_partial_overlap(buf[:0], "out", x=buf)
    with pytest.raises(ValueError, match="out partially overlaps x"):
        v.no_partial_overlap(buf[1:], "out", x=buf[:8])
    with pytest.raises(ValueError, match="out partially overlaps grad"):
        v.no_partial_overlap(buf[:8], "out", x=buf[:8], grad=buf[1:])
    with pytest.raises(ValueError, match="partially overlaps"):  # same start, other strides
        v.no_partial_overlap(buf[:4], "out", x=buf[:8:2])


def test_argparse_type_turns_refusals_into_usage_errors():
    step_size = v.argparse_type(v.real, low=0.0, low_open=True)
    assert step_size("0.5") == 0.5 and step_size("2") == 2.0
    seed = v.argparse_type(v.integer, name="--seed", low=0, high=2**64)
    assert seed("18446744073709551615") == 2**64 - 1
    for parse, text in [
        (step_size, "-1"),
        (step_size, "nan"),
        (step_size, "abc"),
        (seed, "-1"),
        (seed, "1.5"),
        (seed, "99999999999999999999"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
    parser = argparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--seed", type=seed)
    with pytest.raises(argparse.ArgumentError, match="--seed must be >= 0"):
        parser.parse_args(["--seed", "-1"])
