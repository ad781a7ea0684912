"""CPU proxies for the GPU's no-synchronisation promises: while a sampler's sample(), the replay
buffer's sample/push (check_values=False) and the langevin_update op run, no Python-level host
read of a tensor happens (item, bool, int/float/index conversion, tolist, numpy, cpu, nonzero and
other data-dependent shapes, boolean-mask indexing). On a GPU each would wait for the device; here
a TorchFunctionMode records them, so a sync sneaking into a hot path fails on a CPU runner.
The kernels are the C++ ones (opaque to the mode: their reads are of CPU tensors by contract);
what is checked is every line of Python between the public call and the kernels."""

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ebm_fast
from ebm_fast import LangevinSampler, MALASampler, ReplayBuffer, linear_schedule
from ebm_fast.backends import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason("cpu") is not None,
    reason=f"cpu backend unavailable: {unavailable_reason('cpu')}",
)

HOST_READS = {
    torch.Tensor.item,
    torch.Tensor.tolist,
    torch.Tensor.numpy,
    torch.Tensor.cpu,
    torch.Tensor.__bool__,
    torch.Tensor.__int__,
    torch.Tensor.__float__,
    torch.Tensor.__index__,
    torch.Tensor.nonzero,
    torch.nonzero,
    torch.Tensor.argwhere,
    torch.argwhere,
    torch.Tensor.masked_select,
    torch.masked_select,
    torch.Tensor.unique,
    torch.unique,
    torch.Tensor.any,
    torch.any,
    torch.Tensor.all,
    torch.all,
}
INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__}


def _caller() -> str:
    """file:line of the innermost frame in ebm_fast (else the innermost outside torch)."""
    frames = traceback.extract_stack()[:-3]
    inside = [f for f in frames if "/ebm_fast/" in f.filename] or frames
    return f"{inside[-1].filename}:{inside[-1].lineno}"


class HostReads(TorchFunctionMode):
    """Records every host read of a tensor as 'name at file:line'."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS or (func in INDEXING and _has_bool_mask(args[1])):
            self.reads.append(f"{getattr(func, '__name__', func)} at {_caller()}")
        return func(*args, **kwargs)


def _has_bool_mask(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 0 for i in items)


def test_the_proxy_sees_each_kind_of_host_read():
    t = torch.arange(4.0)
    with HostReads() as mode:
        t.sum().item(), bool(t[0] > 0), int(t[1]), t.tolist(), t.nonzero(), t[t > 1]
    kinds = [read.split()[0] for read in mode.reads]
    assert kinds == ["item", "__bool__", "__int__", "tolist", "nonzero", "__getitem__"], kinds


def double_well(x):
    return ((x * x - 1.0) ** 2).reshape(x.shape[0], -1).sum(1)


SAMPLER_CASES = {
    "langevin_per_chain_norm_clip": lambda: LangevinSampler(
        double_well,
        step_size=torch.linspace(0.01, 0.05, 6),
        noise_scale=0.1,
        n_steps=40,
        grad_clip=1.0,
        grad_clip_mode="norm",
        clamp=(-3.0, 3.0),
        seed=1,
        chunk_size=4,
        check_finite=False,
    ),
    "langevin_schedule": lambda: LangevinSampler(
        double_well,
        step_size=linear_schedule(0.05, 0.01),
        temperature=0.5,
        n_steps=40,
        seed=2,
        check_finite=False,
    ),
    "mala_adaptive_per_chain_temperature": lambda: MALASampler(
        double_well,
        step_size=0.05,
        temperature=torch.linspace(0.5, 2.0, 6),
        n_steps=40,
        adapt=True,
        seed=3,
        check_finite=False,
    ),
}


@pytest.mark.parametrize("make", SAMPLER_CASES.values(), ids=SAMPLER_CASES.keys())
@pytest.mark.parametrize("return_info", [False, True])
def test_sampling_reads_nothing_on_the_host(make, return_info):
    """40 steps (more than one non-finite fold of 32), chunks, per-chain tables and schedules."""
    sampler = make()
    x0 = torch.randn(6, 2, 3, generator=torch.Generator().manual_seed(0))
    sampler.sample(x0, n_steps=2)  # first-call work (kernel resolution, allocation) done
    with HostReads() as mode:
        sampler.sample(x0, return_info=return_info)
    assert mode.reads == []


@pytest.mark.parametrize("sampler_cls", [LangevinSampler, MALASampler])
def test_the_non_finite_check_reads_the_host_once_per_call(sampler_cls):
    sampler = sampler_cls(double_well, step_size=0.05, n_steps=70, seed=4)
    x0 = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    with HostReads() as mode:
        sampler.sample(x0)
    assert len(mode.reads) == 1, mode.reads


@pytest.mark.parametrize("storage", ["float32", "uint8"])
@pytest.mark.parametrize("n_classes, policy", [(None, "fifo"), (3, "reservoir")])
def test_buffer_sample_and_push_read_nothing_on_the_host(storage, n_classes, policy):
    buffer = ReplayBuffer(
        30,
        (2, 3),
        storage=storage,
        n_classes=n_classes,
        policy=policy,
        seed=5,
        stochastic_rounding=storage == "uint8",
        check_values=False,
    )
    y = torch.tensor([0, 2, 1, 2, 0]) if n_classes else None
    with HostReads() as mode:
        x, slots = buffer.sample(5, y=y)
        buffer.push(x + 0.1, y=y)
        x, slots, reinit = buffer.sample(5, y=y, return_reinit=True)
        buffer.push(x, idx=slots)
    assert mode.reads == []


@pytest.mark.parametrize("grad_clip_mode", ["value", "norm"])
def test_the_update_op_reads_nothing_on_the_host(grad_clip_mode):
    x = torch.randn(5, 7)
    grad = torch.randn(5, 7).t().contiguous().t()  # a non-contiguous input takes a copy
    with HostReads() as mode:
        ebm_fast.langevin_update(
            x,
            grad,
            torch.linspace(0.1, 0.5, 5),
            0.3,
            seed=torch.tensor(3),
            step=torch.tensor(9),
            chain_offset=2,
            grad_clip=1.0,
            grad_clip_mode=grad_clip_mode,
            clamp=(-1, 1),
            out=x,
        )
        ebm_fast.langevin_update(x, grad, 0.2, 0.3, seed=7, step=1)
    assert mode.reads == []
