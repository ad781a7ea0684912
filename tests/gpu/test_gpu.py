"""What only a GPU can check (issue 10; run by scripts/gpu_check.sh, docs/gpu-check.md):

* kernels (``test_kernel_*``): the Triton kernels against the reference at realistic sizes of
  thousands of programs: the update on ~2**24 float32 and bfloat16 elements with per-chain
  parameters, value and norm clipping, chains straddling program edges and a nonzero
  chain_offset; Philox bits and uniforms bit-exact; replay-buffer sample and push of
  (256, 3, 32, 32) chains from 10k and 100k slots, every storage and policy; mala_accept on
  4096 chains x 3072 elements. Without CUDA they run under the Triton interpreter at small sizes
  that still span several programs, so the GPU check cannot rot between GPU slots.
* CUDA graphs and host synchronisation (``test_graph_*``, ``test_sync_*``, CUDA only): replay
  equals eager, a second call with a new x0 replays the captured graph, and a training iteration
  (buffer draw, sampler, write-back, optimiser step) runs under
  ``torch.cuda.set_sync_debug_mode("error")`` with the value checks off.
"""

import contextlib

import pytest
import torch

from ebm_fast.backends import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton") is not None,
    reason=f"triton backend unavailable: {unavailable_reason('triton')}",
)

import ebm_fast  # noqa: E402
from ebm_fast.ops._dispatch import kernels  # noqa: E402
from ebm_fast.reference.philox import philox_bits_ref, philox_uniform_ref  # noqa: E402
from tests.helpers import counter, kernel_device  # noqa: E402
from tests.kernels.triton.test_langevin_update import (  # noqa: E402
    _assert_update_close,
    _run_update,
    _update_inputs,
)
from tests.ops.test_mala_accept import _check_backend_against_reference  # noqa: E402

DEVICE = kernel_device("triton")
ON_GPU = DEVICE.type == "cuda"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Realistic sizes on a GPU; under the interpreter, sizes that still span several programs (an
# update program covers 2048 elements, a buffer program 4 chains x 1024 features).
# 4097 x 4095 = 2**24 - 1 elements: odd chains, so chain edges fall inside programs.
UPDATE_SHAPE = (4097, 4095) if ON_GPU else (5, 1001)
BUFFER_BATCH, BUFFER_SHAPE = (256, (3, 32, 32)) if ON_GPU else (6, (3, 20, 20))
BUFFER_CAPACITIES = (10_000, 100_000) if ON_GPU else (40,)
N_CLASSES = 10
MALA_CHAINS, MALA_SHAPE = (4096, (3, 32, 32)) if ON_GPU else (6, (3, 20, 25))
SEED, STEP, CHAIN_OFFSET = 2**63 + 12345, 2**31 + 7, 3


# ------------------------------------------------------------------------------------ kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize(
    "grad_clip,grad_clip_mode", [(1.0, "norm"), (0.5, "value")], ids=["norm_clip", "value_clip"]
)
def test_kernel_update_at_scale_matches_reference(dtype, grad_clip, grad_clip_mode):
    """In place, per-chain step sizes and noise scales on the device, clamp on both sides;
    norm clipping is active on every chain (gradient norms ~ 3 sqrt(4095))."""
    x, grad, step_size, noise_scale = _update_inputs(UPDATE_SHAPE, dtype, True, 7)
    options = (0, CHAIN_OFFSET, grad_clip, grad_clip_mode, -2.0, 2.0)
    out = _run_update(x, grad, step_size, noise_scale, SEED, STEP, options, in_place=True)
    # The float32 check (against the float64 reference) runs the reference on the kernel's
    # device: on a CPU it takes seconds per million elements. The bfloat16 check compares on the
    # CPU, so its (single, float32) reference runs there.
    reference_device = DEVICE if dtype == torch.float32 else torch.device("cpu")
    _assert_update_close(
        out,
        *(t.to(reference_device) for t in (x, grad, step_size, noise_scale)),
        SEED,
        STEP,
        options,
    )


@pytest.mark.parametrize("distribution", ["bits", "uniform"])
def test_kernel_philox_at_scale_is_bit_exact(distribution):
    dtype = torch.int32 if distribution == "bits" else torch.float32
    out = torch.empty(UPDATE_SHAPE, dtype=dtype, device=DEVICE)
    kernels("triton")["philox"](
        out=out,
        seed=counter(SEED, DEVICE),
        step=counter(STEP, DEVICE),
        stream=5,
        chain_offset=CHAIN_OFFSET,
        distribution=distribution,
    )
    draw = philox_bits_ref if distribution == "bits" else philox_uniform_ref
    want = draw(
        UPDATE_SHAPE, seed=SEED, step=STEP, stream=5, chain_offset=CHAIN_OFFSET, device=DEVICE
    )
    assert torch.equal(out, want.to(dtype) if distribution == "bits" else want)


def _buffer_state(capacity, features, storage_dtype, gen):
    """Storage with random content, ~70% of slots written, and per-class append counts past the
    slots per class (FIFO heads wrapped, reservoir replacing at random)."""
    if storage_dtype == torch.uint8:
        storage = torch.randint(0, 256, (capacity, features), generator=gen, dtype=torch.uint8)
    else:
        storage = (torch.rand(capacity, features, generator=gen) * 2 - 1).to(storage_dtype)
    written = (torch.rand(capacity, generator=gen) < 0.7).to(torch.uint8)
    slots_per_class = capacity // N_CLASSES
    count = torch.randint(2 * slots_per_class, 3 * slots_per_class, (N_CLASSES,), generator=gen)
    return [t.to(DEVICE) for t in (storage, written, count)]


def _buffer_cycle(sample, push, state, appended, y, policy, stochastic):
    """What a training iteration does to the buffer: append a batch by the policy, draw a batch,
    write it back to its slots (draw counters 0, 1, 2). Returns the drawn batch, its slots and
    the final storage, written flags and counts."""
    storage, written, count = state
    slots_per_class = storage.shape[0] // N_CLASSES
    shared = dict(
        storage=storage,
        written=written,
        seed=counter(SEED, DEVICE),
        chain_offset=CHAIN_OFFSET,
        slots_per_class=slots_per_class,
        lo=-1.0,
        hi=1.0,
    )
    push(
        **shared,
        count=count,
        x=appended,
        idx=None,
        y=y,
        step=counter(0, DEVICE),
        policy=policy,
        stochastic=stochastic,
    )
    out = torch.empty_like(appended)
    slots = torch.empty(appended.shape[0], dtype=torch.int64, device=DEVICE)
    sample(
        **shared,
        out=out,
        slots=slots,
        y=y,
        init_values=None,
        step=counter(1, DEVICE),
        reinit_prob=0.05,
        init_kind="uniform",
    )
    push(
        **shared,
        count=count,
        x=out * 0.9,
        idx=slots,
        y=None,
        step=counter(2, DEVICE),
        policy=policy,
        stochastic=stochastic,
    )
    return out, slots, storage, written, count


@pytest.mark.parametrize("capacity", BUFFER_CAPACITIES)
@pytest.mark.parametrize("policy", ["fifo", "reservoir"])
@pytest.mark.parametrize(
    "storage_dtype",
    [torch.float32, torch.bfloat16, torch.uint8],
    ids=["float32", "bfloat16", "uint8"],
)
def test_kernel_buffer_cycle_at_scale_matches_reference(storage_dtype, policy, capacity):
    """Same slots, same reinit decisions and values, same stored bytes as the reference run on
    the same device (uint8 with stochastic rounding: its noise must match too)."""
    features = torch.Size(BUFFER_SHAPE).numel()
    gen = torch.Generator().manual_seed(capacity)
    state = _buffer_state(capacity, features, storage_dtype, gen)
    appended = (torch.rand(BUFFER_BATCH, features, generator=gen) * 2.2 - 1.1).to(DEVICE)
    y = torch.randint(0, N_CLASSES, (BUFFER_BATCH,), generator=gen).to(DEVICE)
    stochastic = storage_dtype == torch.uint8
    got = _buffer_cycle(
        kernels("triton")["buffer_sample"],
        kernels("triton")["buffer_push"],
        [t.clone() for t in state],
        appended,
        y,
        policy,
        stochastic,
    )
    want = _buffer_cycle(
        kernels("reference")["buffer_sample"],
        kernels("reference")["buffer_push"],
        state,
        appended,
        y,
        policy,
        stochastic,
    )
    for name, a, b in zip(("batch", "slots", "storage", "written", "count"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_kernel_mala_accept_at_scale_matches_reference(dtype):
    """Every decision the float64 acceptance probability settles equals the reference's and the
    spec's; accepted chains moved, others untouched (test_mala_accept's full check)."""
    case = dict(
        chains=MALA_CHAINS,
        shape=MALA_SHAPE,
        dtype=dtype,
        layout_stride=1,
        eps=0.01,
        temp=1.0,
        curvature=1.0,
        eps_kind="per_chain",
        temp_kind="scalar",
        data_seed=3,
        seed=SEED,
        step=STEP,
        stream=1,
        chain_offset=CHAIN_OFFSET,
        seed_as_tensor=True,
        inject="nan energy_y",
    )
    _check_backend_against_reference("triton", case)


# ------------------------------------------------------------------ CUDA graphs and host syncs


def _mlp(d_in: int, hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(d_in, hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, hidden),
        torch.nn.SiLU(),
        torch.nn.Linear(hidden, 1),
    )


SAMPLERS = {
    "langevin": lambda model, graph: ebm_fast.LangevinSampler(
        model,
        step_size=0.01,
        noise_scale=0.005,
        n_steps=40,
        clamp=(-1.0, 1.0),
        grad_clip=1.0,
        grad_clip_mode="norm",
        cuda_graph=graph,
        check_finite=False,
    ),
    "mala": lambda model, graph: ebm_fast.MALASampler(
        model, step_size=1e-4, n_steps=40, adapt=True, cuda_graph=graph, check_finite=False
    ),
}


@contextlib.contextmanager
def _no_host_sync(what: str):
    """Fail naming ``what`` if it synchronises the host with the device."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    except RuntimeError as exc:
        raise AssertionError(f"{what} synchronised with the host: {exc}") from exc
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
@pytest.mark.parametrize("name", SAMPLERS)
def test_graph_replay_equals_eager_and_a_new_x0_reuses_the_graph(name, monkeypatch):
    """784-256-256-1 MLP, 256 chains, 40 steps: the graphed sampler gives the eager sampler's
    samples on two calls; the second call, from another x0 of the same shape, captures nothing."""
    made = []  # one entry per torch.cuda.CUDAGraph made, i.e. per capture
    real_graph = torch.cuda.CUDAGraph
    monkeypatch.setattr(
        torch.cuda,
        "CUDAGraph",
        lambda *args, **kwargs: made.append(1) or real_graph(*args, **kwargs),
    )
    torch.manual_seed(0)
    model = _mlp(784, 256).cuda()
    graphed, eager = (SAMPLERS[name](model, graph) for graph in (True, False))
    x0, x1 = (torch.rand(256, 784, device="cuda") * 2 - 1 for _ in range(2))
    first = graphed.sample(x0)
    captured = len(made)
    second = graphed.sample(x1)
    assert captured >= 1 and len(made) == captured, "the second call captured again"
    torch.testing.assert_close(first, eager.sample(x0))
    torch.testing.assert_close(second, eager.sample(x1))


@needs_cuda
@pytest.mark.parametrize("storage", ["float32", "uint8"])
@pytest.mark.parametrize("name", SAMPLERS)
def test_sync_free_training_iteration(name, storage):
    """Buffer draw, sampler (CUDA graph and eager), write-back and an optimiser step: no host
    synchronisation once warmed up (kernels compiled, graphs captured, optimiser state made)."""
    torch.manual_seed(0)
    energy = torch.nn.Sequential(torch.nn.Flatten(), _mlp(3 * 16 * 16, 128)).cuda()
    buffer = ebm_fast.ReplayBuffer(
        2000,
        (3, 16, 16),
        device="cuda",
        storage=storage,
        n_classes=10,
        policy="reservoir",
        check_values=False,
    )
    samplers = [SAMPLERS[name](energy, graph) for graph in (True, False)]
    # capturable: Adam's step counters stay on the device
    optimiser = torch.optim.Adam(energy.parameters(), lr=1e-4, capturable=True)
    data = torch.rand(512, 3, 16, 16, device="cuda") * 2 - 1
    y = torch.randint(0, 10, (64,), device="cuda")

    def iteration(sampler, check):
        with check("ReplayBuffer.sample"):
            x0, idx = buffer.sample(64, y=y)
        with check(f"{type(sampler).__name__}.sample"):
            x = sampler.sample(x0)
        with check("ReplayBuffer.push (write-back)"):
            buffer.push(x, idx=idx)
        with check("ReplayBuffer.push (append)"):
            buffer.push(x, y=y)
        with check("the optimiser step"):
            positives = data[torch.randint(0, 512, (64,), device="cuda")]
            loss = energy(positives).mean() - energy(x).mean()
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()

    for sampler in samplers:
        iteration(sampler, lambda what: contextlib.nullcontext())  # warm-up
    for sampler in samplers:
        iteration(sampler, _no_host_sync)
    assert all(torch.isfinite(p).all() for p in energy.parameters())
