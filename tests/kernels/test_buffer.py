"""buffer_sample / buffer_push kernels (cpu, triton) against the reference: same slots, same
reinit decisions, same values, same stored bytes; and opcheck of both ops on every backend."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ebm_fast import use_backend
from ebm_fast.backends import unavailable_reason
from ebm_fast.ops._dispatch import kernel_for
from ebm_fast.ops.buffer_push import _buffer_push_op
from ebm_fast.ops.buffer_sample import _buffer_sample_op
from ebm_fast.reference.buffer_push import buffer_push_out as push_ref
from ebm_fast.reference.buffer_sample import buffer_sample_out as sample_ref
from tests.helpers import kernel_backends, kernel_device

STORAGE_DTYPES = [torch.float32, torch.bfloat16, torch.uint8]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# The interpreter runs Triton kernels slowly: fewer examples there.
EXAMPLES = {"cpu": 40, "triton": 12}


def _backend_kernel(op, backend, device):
    """The entry point the resolver picks for ``op`` with ``backend`` forced."""
    with use_backend(backend):
        return kernel_for(op, torch.empty(0, device=device))


def _backend_examples(backend):
    return settings(max_examples=EXAMPLES[backend])


@st.composite
def buffer_layouts(draw):
    n_classes = draw(st.integers(1, 3))
    slots_per_class = draw(st.integers(1, 6))
    features = draw(st.sampled_from([1, 3, 7, 16, 33]))
    return n_classes, slots_per_class, features


def _random_storage(gen, capacity, features, dtype, device):
    if dtype == torch.uint8:
        codes = torch.randint(0, 256, (capacity, features), generator=gen, dtype=torch.uint8)
        return codes.to(device)
    return (torch.randn(capacity, features, generator=gen) * 2).to(dtype).to(device)


@st.composite
def sample_cases(draw):
    n_classes, slots_per_class, features = draw(buffer_layouts())
    return dict(
        n_classes=n_classes,
        slots_per_class=slots_per_class,
        features=features,
        batch=draw(st.integers(1, 9)),
        storage_dtype=draw(st.sampled_from(STORAGE_DTYPES)),
        out_dtype=draw(st.sampled_from(OUT_DTYPES)),
        init_kind=draw(st.sampled_from(["uniform", "gaussian", "values"])),
        reinit_prob=draw(st.sampled_from([0.0, 0.3, 1.0]) | st.floats(0.0, 1.0)),
        lo=draw(st.sampled_from([-1.0, 0.0, -3.5])),
        width=draw(st.sampled_from([1.0, 2.0, 7.25])),
        seed=draw(st.integers(0, 2**64 - 1)),
        step=draw(st.integers(0, 2**32 - 1)),
        chain_offset=draw(st.sampled_from([0, 5, 2**32 + 3])),
        data_seed=draw(st.integers(0, 99)),
    )


def _run_sample(kernel, case, device):
    gen = torch.Generator().manual_seed(case["data_seed"])
    capacity = case["n_classes"] * case["slots_per_class"]
    batch, features = case["batch"], case["features"]
    storage = _random_storage(gen, capacity, features, case["storage_dtype"], device)
    written = (torch.rand(capacity, generator=gen) < 0.7).to(torch.uint8).to(device)
    y = (
        torch.randint(0, case["n_classes"], (batch,), generator=gen).to(device)
        if case["n_classes"] > 1
        else None
    )
    values = (
        torch.randn(batch, features, generator=gen).to(case["out_dtype"]).to(device)
        if case["init_kind"] == "values"
        else None
    )
    out = torch.empty(batch, features, dtype=case["out_dtype"], device=device)
    slots = torch.empty(batch, dtype=torch.int64, device=device)
    seed = torch.tensor(case["seed"] - (1 << 64) if case["seed"] >= 1 << 63 else case["seed"])
    kernel(
        out,
        slots,
        storage,
        written,
        y,
        values,
        seed.to(device),
        torch.tensor(case["step"], device=device),
        case["chain_offset"],
        case["slots_per_class"],
        case["reinit_prob"],
        case["init_kind"],
        case["lo"],
        case["lo"] + case["width"],
    )
    return out.cpu(), slots.cpu()


@pytest.mark.parametrize("backend", kernel_backends())
def test_sample_matches_reference(backend):
    device = kernel_device(backend)

    @_backend_examples(backend)
    @given(case=sample_cases())
    def check(case):
        out, slots = _run_sample(_backend_kernel("buffer_sample", backend, device), case, device)
        expected_out, expected_slots = _run_sample(sample_ref, case, torch.device("cpu"))
        assert torch.equal(slots, expected_slots)
        if case["init_kind"] == "gaussian":  # log/sin/cos may differ in the last bit
            torch.testing.assert_close(out, expected_out)
        else:
            assert torch.equal(out, expected_out), (out - expected_out).abs().max()

    check()


@st.composite
def push_cases(draw):
    n_classes, slots_per_class, features = draw(buffer_layouts())
    pushes = draw(st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=1, max_size=3))
    return dict(
        n_classes=n_classes,
        slots_per_class=slots_per_class,
        features=features,
        pushes=pushes,
        storage_dtype=draw(st.sampled_from(STORAGE_DTYPES[::-1])),  # uint8 (the rounding) first
        x_dtype=draw(st.sampled_from(OUT_DTYPES)),
        policy=draw(st.sampled_from(["fifo", "reservoir"])),
        stochastic=draw(st.booleans()),
        # Past 2**31 and 2**32 items per class the reservoir's (r * (t + 1)) >> 32 leaves 64 bits.
        initial_count=draw(st.integers(0, 20) | st.sampled_from([2**31 - 3, 2**32 + 5, 2**45])),
        lo=draw(st.sampled_from([-1.0, 0.0])),
        width=draw(st.sampled_from([0.99609375, 3.984375, 2.0])),
        seed=draw(st.integers(0, 2**63 - 1)),
        chain_offset=draw(st.sampled_from([0, 7, 2**32])),
        data_seed=draw(st.integers(0, 99)),
    )


def _run_pushes(kernel, case, device):
    """A sequence of appends and write-backs; returns storage, written and count after it."""
    gen = torch.Generator().manual_seed(case["data_seed"])
    capacity = case["n_classes"] * case["slots_per_class"]
    features = case["features"]
    storage = _random_storage(gen, capacity, features, case["storage_dtype"], device)
    written = torch.zeros(capacity, dtype=torch.uint8, device=device)
    count = torch.full(
        (case["n_classes"],), case["initial_count"], dtype=torch.int64, device=device
    )
    for step, (batch, write_back) in enumerate(case["pushes"]):
        # Spread over and beyond [lo, hi] so clamping and both rounding directions occur.
        x = case["lo"] - 0.5 + (case["width"] + 1) * torch.rand(batch, features, generator=gen)
        # Some values halfway between two uint8 codes (exactly, for the power-of-two steps
        # 0.99609375 / 255 and 3.984375 / 255): the rounding rule decides them.
        halfway = case["lo"] + (torch.randint(0, 255, x.shape, generator=gen) + 0.5) * (
            case["width"] / 255
        )
        x = torch.where(torch.rand(x.shape, generator=gen) < 0.3, halfway, x)
        x = x.to(case["x_dtype"]).to(device)
        idx = torch.randint(0, capacity, (batch,), generator=gen).to(device) if write_back else None
        y = (
            torch.randint(0, case["n_classes"], (batch,), generator=gen).to(device)
            if case["n_classes"] > 1 and not write_back
            else None
        )
        kernel(
            storage,
            written,
            count,
            x,
            idx,
            y,
            torch.tensor(case["seed"], device=device),
            torch.tensor(step, device=device),
            case["chain_offset"],
            case["slots_per_class"],
            case["policy"],
            case["lo"],
            case["lo"] + case["width"],
            case["stochastic"],
        )
    return storage.cpu(), written.cpu(), count.cpu()


@pytest.mark.parametrize("backend", kernel_backends())
def test_push_matches_reference(backend):
    device = kernel_device(backend)

    @_backend_examples(backend)
    @given(case=push_cases())
    def check(case):
        got = _run_pushes(_backend_kernel("buffer_push", backend, device), case, device)
        expected = _run_pushes(push_ref, case, torch.device("cpu"))
        for name, a, b in zip(("storage", "written", "count"), got, expected):
            assert torch.equal(a, b), name

    check()


def _opcheck_sample_args(storage_dtype, init_kind):
    gen = torch.Generator().manual_seed(0)
    storage = _random_storage(gen, 6, 5, storage_dtype, "cpu")
    written = torch.tensor([1, 0, 1, 1, 0, 1], dtype=torch.uint8)
    values = torch.randn(4, 5) if init_kind == "values" else None
    return (
        storage,
        written,
        torch.tensor([0, 2, 1, 2]),
        values,
        4,
        torch.float32,
        torch.tensor(11),
        torch.tensor(3),
        0,
        2,
        0.4,
        init_kind,
        -1.0,
        1.0,
    )


def _opcheck_push_args(storage_dtype, write_back):
    gen = torch.Generator().manual_seed(1)
    storage = _random_storage(gen, 6, 5, storage_dtype, "cpu")
    idx = torch.tensor([5, 0, 5]) if write_back else None
    y = None if write_back else torch.tensor([2, 0, 2])
    return (
        storage,
        torch.zeros(6, dtype=torch.uint8),
        torch.tensor([0, 4, 1]),
        torch.randn(3, 5),
        idx,
        y,
        torch.tensor(11),
        torch.tensor(3),
        0,
        2,
        "reservoir",
        -1.0,
        1.0,
        True,
    )


@pytest.mark.parametrize("backend", [pytest.param("reference", id="reference"), *kernel_backends()])
@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.uint8])
def test_opcheck(backend, storage_dtype):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("opcheck here runs CPU tensors")
    with use_backend(backend):
        for init_kind in ("uniform", "values"):
            torch.library.opcheck(_buffer_sample_op, _opcheck_sample_args(storage_dtype, init_kind))
        for write_back in (False, True):
            torch.library.opcheck(_buffer_push_op, _opcheck_push_args(storage_dtype, write_back))


def test_kernels_refuse_labels_outside_the_buffer():
    if unavailable_reason("cpu"):
        pytest.skip("cpu backend unavailable")
    args = list(_opcheck_sample_args(torch.float32, "uniform"))
    args[2] = torch.tensor([0, 3, 1, 2])  # 3 classes of 2 slots: class 3 does not exist
    with use_backend("cpu"), pytest.raises(RuntimeError, match=r"y\[1\] = 3"):
        _buffer_sample_op(*args)
    args = list(_opcheck_push_args(torch.float32, True))
    args[4] = torch.tensor([5, 6, 0])
    with use_backend("cpu"), pytest.raises(RuntimeError, match=r"idx\[1\] = 6"):
        _buffer_push_op(*args)
    args = list(_opcheck_push_args(torch.float32, False))
    args[5] = torch.tensor([2, 0, 3])  # chains 0 and 1 are valid, chain 2 is not
    count_before = args[2].clone()
    with use_backend("cpu"), pytest.raises(RuntimeError, match=r"y\[2\] = 3"):
        _buffer_push_op(*args)
    assert torch.equal(args[2], count_before) and not args[1].any()  # nothing half-pushed


# Lowers the Triton kernels to PTX for an H100 (sm_90) without a GPU: the interpreter runs only
# the Python semantics; this catches types, casts and constexpr branches that do not compile.
# A subprocess, because the interpreter must be off.
_COMPILE_FOR_SM90 = r"""
import json, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from ebm_fast.kernels.triton import buffer_sample as bs, buffer_push as bp

def compile_ptx(kernel, types, constexprs, options=None):
    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr" if name in constexprs else "i32")
                 for name in names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

def sample(out, storage, has_y, init, compute):
    types = {"out_ptr": "*" + out, "slots_ptr": "*i64", "storage_ptr": "*" + storage,
             "written_ptr": "*u8", "y_ptr": "*i64", "values_ptr": "*" + out, "seed": "*i64",
             "step": "i64", "chain_offset": "i64", "reinit_prob": "fp32", "lo": "fp32",
             "width": "fp32", "uint8_step": "fp32"}
    constexprs = {"SEED_IS_POINTER": True, "STEP_IS_POINTER": False, "HAS_Y": has_y,
                  "INIT": init,
                  "STREAM_DECISION": 2, "STREAM_VALUES": 3, "STREAM_SLOT": 4, "COMPUTE": compute,
                  "CHAINS": bs.CHAINS, "BLOCK": bs.BLOCK}
    # The launcher's options: no fp fusion, so no float32 fma where the reference rounds twice.
    return compile_ptx(bs._buffer_sample_kernel, types, constexprs,
                       {"enable_fp_fusion": bs.FP_FUSION})

def push(storage, x, stochastic):
    types = {"storage_ptr": "*" + storage, "written_ptr": "*u8", "x_ptr": "*" + x,
             "targets_ptr": "*i64", "seed": "*i64", "step": "*i64", "chain_offset": "i64",
             "lo": "fp32", "inv_step": "fp32"}
    constexprs = {"SEED_IS_POINTER": True, "STEP_IS_POINTER": True, "STOCHASTIC": stochastic,
                  "STREAM_QUANTIZE": 6, "CHAINS": bp.CHAINS, "BLOCK": bp.BLOCK}
    return compile_ptx(bp._buffer_push_kernel, types, constexprs)

ptx = {
    "sample_fp32_u8_uniform": sample("fp32", "u8", False, 0, tl.float32),
    "sample_bf16_bf16_gaussian_y": sample("bf16", "bf16", True, 1, tl.float32),
    "sample_fp64_fp32_values": sample("fp64", "fp32", True, 2, tl.float64),
    "push_u8_fp32_stochastic": push("u8", "fp32", True),
    "push_u8_bf16_nearest": push("u8", "bf16", False),
    "push_bf16_fp32": push("bf16", "fp32", False),
    "push_fp32_fp64": push("fp32", "fp64", False),
}
print(json.dumps({name: text.count("fma.rn.f32") for name, text in ptx.items()}))
"""


def test_triton_kernels_compile_for_sm90():
    import json
    import os
    import subprocess
    import sys

    if unavailable_reason("triton") is not None:
        pytest.skip("triton unavailable")
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton ships no ptxas here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_FOR_SM90],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fma_counts = json.loads(done.stdout.strip().splitlines()[-1])
    # Dequantisation and uniform init (lo + q * step, lo + width * u) round like the reference.
    assert fma_counts["sample_fp32_u8_uniform"] == 0, fma_counts


@pytest.mark.parametrize("backend", kernel_backends())
def test_sample_reads_strided_labels(backend):
    """Labels given as a strided view (every other entry of a longer tensor) pick the same
    classes on every backend as on the reference."""
    from ebm_fast.ops.buffer_sample import buffer_sample

    device = kernel_device(backend)
    storage = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # 3 classes of 2 slots
    written = torch.ones(6, dtype=torch.uint8)
    y = torch.tensor([2, 0, 0, 0, 1, 0, 2, 0])[::2]  # classes 2, 0, 1, 2
    kwargs = dict(
        dtype=torch.float32,
        seed=torch.tensor(11),
        step=torch.tensor(3),
        slots_per_class=2,
        reinit_prob=0.0,
        init_kind="uniform",
        lo=-1.0,
        hi=1.0,
    )
    with use_backend("reference"):
        want, want_slots = buffer_sample(storage, written, 4, y=y, **kwargs)
    assert torch.equal(want_slots // 2, y)
    with use_backend(backend):
        got, slots = buffer_sample(
            storage.to(device), written.to(device), 4, y=y.to(device), **kwargs
        )
    assert torch.equal(slots.cpu(), want_slots) and torch.equal(got.cpu(), want)


def test_tensors_on_another_device_are_named():
    """The kernels read raw pointers: a label or row tensor elsewhere is refused, named."""
    from ebm_fast.ops.buffer_push import buffer_push
    from ebm_fast.ops.buffer_sample import buffer_sample

    storage, written = torch.zeros(6, 2), torch.ones(6, dtype=torch.uint8)
    counters = dict(seed=torch.tensor(1), step=torch.tensor(0), slots_per_class=2, lo=-1.0, hi=1.0)
    with pytest.raises(ValueError, match="y is on meta"):
        buffer_sample(
            storage,
            written,
            2,
            y=torch.zeros(2, dtype=torch.int64, device="meta"),
            dtype=torch.float32,
            reinit_prob=0.0,
            init_kind="uniform",
            **counters,
        )
    with pytest.raises(ValueError, match="x is on meta"):
        buffer_push(
            storage,
            written,
            torch.zeros(3, dtype=torch.int64),
            torch.zeros(2, 2, device="meta"),
            y=torch.zeros(2, dtype=torch.int64),
            policy="fifo",
            **counters,
        )
