"""Long chains: the extra memory of a call does not grow with n_steps (tables, counters and
diagnostics are made a block of steps at a time), and the 32-bit step counter is never run past
its last step (issue 12, items 2 and 5)."""

import tracemalloc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ebm_fast import LangevinSampler, MALASampler, linear_schedule

SAMPLERS = [pytest.param(LangevinSampler, id="langevin"), pytest.param(MALASampler, id="mala")]
LONG = 10**6


class _Stop(Exception):
    pass


def energy_stopping_after(evaluations: int):
    """E = |x|^2 / 2 that raises _Stop at its evaluations-th call: a long chain's first steps."""
    calls = []

    def energy(x):
        calls.append(None)
        if len(calls) == evaluations:
            raise _Stop
        return 0.5 * (x * x).sum(1)

    return energy


class LargestNewStorage(TorchDispatchMode):
    """The largest storage (bytes) any tensor op produced while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize(
    "step_size", [0.01, linear_schedule(0.02, 0.01)], ids=["number", "schedule"]
)
@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_a_million_step_chain_costs_no_memory_per_step_before_its_first_updates(
    sampler_cls, step_size
):
    # 4 chains of 2 elements: 32 bytes of state. A per-step table of a million steps would hold
    # 4-8 MB of tensor storage and a million Python tensor objects (tens of MB traced).
    sampler = sampler_cls(energy_stopping_after(4), step_size=step_size, n_steps=LONG, seed=0)
    with LargestNewStorage():  # kernels loaded and modules imported first: not the call's memory
        sampler_cls(lambda x: (x * x).sum(1), step_size=step_size, n_steps=2).sample(
            torch.ones(4, 2)
        )
    tracemalloc.start()
    try:
        with LargestNewStorage() as storage, pytest.raises(_Stop):
            sampler.sample(torch.randn(4, 2))
        _, python_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert storage.largest <= 4096, storage.largest
    assert python_peak < 2 * 2**20, python_peak
    assert sampler.step == 0  # the call failed: no noise steps were used up


def test_load_state_dict_takes_counters_by_the_noise_spec_rule():
    sampler = LangevinSampler(lambda x: (x * x).sum(1), step_size=0.1, seed=0)
    for step, error in (
        (2**32, ValueError),
        (-1, ValueError),
        (torch.tensor(2**32), ValueError),
        (torch.tensor(-3), ValueError),
        (1.5, TypeError),
        (torch.tensor(2.0), TypeError),
    ):
        with pytest.raises(error, match=r"state_dict\['step'\]"):
            sampler.load_state_dict({"step": step, "seed": 1})
    with pytest.raises(ValueError, match=r"state_dict\['seed'\]"):
        sampler.load_state_dict({"step": 0, "seed": 2**64})
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        sampler.load_state_dict([1, 2])
    with pytest.raises(ValueError, match=r"state_dict is missing 'seed'"):
        sampler.load_state_dict({"step": 0})
    sampler.load_state_dict({"step": 7, "seed": 2**64 - 1})  # ints as the rule allows
    assert sampler.step == 7
    assert sampler.state_dict()["seed"].item() == -1  # the 64 bits, as two's complement


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_the_sampler_refuses_to_run_past_its_last_32_bit_step(sampler_cls):
    sampler = sampler_cls(lambda x: (x * x).sum(1), step_size=0.1, n_steps=2, seed=0)
    sampler.load_state_dict({"step": torch.tensor(2**32 - 2), "seed": torch.tensor(5)})
    x = sampler.sample(torch.zeros(3, 2))  # steps 2**32 - 2 and 2**32 - 1: the last two
    assert sampler.step == 2**32
    with pytest.raises(ValueError, match=r"2\*\*32.*seed"):
        sampler.sample(x, 1)  # step 2**32 would reuse step 0's noise
    assert sampler.step == 2**32
