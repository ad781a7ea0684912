"""ebm_fast/kernels/triton/buffer_sample.py and buffer_push.py against the reference at sizes that
span several programs in both tiled dimensions: features wider than one column block and batches
over several row blocks, for every storage dtype, init kind and push policy, with classes and a
nonzero chain_offset. Runs under TRITON_INTERPRET=1 on the CPU or on a GPU. Small random cases on
every backend and the PTX check live in tests/kernels/test_buffer.py."""

import pytest
import torch

from ebm_fast.backends import unavailable_reason

pytestmark = pytest.mark.skipif(
    unavailable_reason("triton") is not None,
    reason=f"triton backend unavailable: {unavailable_reason('triton')}",
)

from ebm_fast.kernels.triton import (  # noqa: E402
    buffer_push as triton_push,
    buffer_sample as triton_sample,
)
from ebm_fast.reference.buffer_push import buffer_push_out as push_ref  # noqa: E402
from ebm_fast.reference.buffer_sample import buffer_sample_out as sample_ref  # noqa: E402
from tests.helpers import counter, kernel_device  # noqa: E402

DEVICE = kernel_device("triton")
CPU = torch.device("cpu")
STORAGE_DTYPES = [torch.float32, torch.bfloat16, torch.uint8]
LO, HI = -1.0, 1.5
N_CLASSES, SLOTS_PER_CLASS = 3, 5

# The real tiles (CHAINS = 4 chains x BLOCK = 1024 features): 3 x 2 programs, the last ones of
# each dimension ragged. (Smaller patched tiles would not be cheaper: the interpreter's cost is
# per program, about 0.1 s each here.)
BATCH, FEATURES = 10, 1100


def test_the_shapes_span_several_programs_in_both_dimensions():
    assert BATCH > 2 * triton_sample.CHAINS and BATCH > 2 * triton_push.CHAINS
    assert triton_sample.BLOCK < FEATURES and triton_push.BLOCK < FEATURES


def _storage(gen, features, dtype):
    capacity = N_CLASSES * SLOTS_PER_CLASS
    if dtype == torch.uint8:
        return torch.randint(0, 256, (capacity, features), generator=gen, dtype=torch.uint8)
    return (torch.randn(capacity, features, generator=gen) * 2).to(dtype)


def _sample(kernel, device, storage, written, y, values, out_dtype, batch, init_kind):
    out = torch.empty(batch, storage.shape[1], dtype=out_dtype, device=device)
    slots = torch.empty(batch, dtype=torch.int64, device=device)
    kernel(
        out,
        slots,
        storage.to(device),
        written.to(device),
        y.to(device),
        None if values is None else values.to(device),
        counter(2**63 + 9, device),
        counter(6, device),
        2**32 + 3,
        SLOTS_PER_CLASS,
        0.3,
        init_kind,
        LO,
        HI,
    )
    return out.cpu(), slots.cpu()


@pytest.mark.parametrize("storage_dtype", STORAGE_DTYPES, ids=str)
@pytest.mark.parametrize(
    "init_kind, out_dtype",
    [("uniform", torch.float32), ("gaussian", torch.bfloat16), ("values", torch.float64)],
    ids=str,
)
def test_sample_across_several_programs(storage_dtype, init_kind, out_dtype):
    """Slots, reinit decisions (30% and unwritten slots), gathered rows in every column block
    and per-element init noise equal the reference."""
    batch, features = BATCH, FEATURES
    gen = torch.Generator().manual_seed(features)
    storage = _storage(gen, features, storage_dtype)
    written = (torch.rand(storage.shape[0], generator=gen) < 0.8).to(torch.uint8)
    y = torch.randint(0, N_CLASSES, (batch,), generator=gen)
    values = (
        torch.randn(batch, features, generator=gen).to(out_dtype) if init_kind == "values" else None
    )
    args = (storage, written, y, values, out_dtype, batch, init_kind)
    out, slots = _sample(triton_sample.buffer_sample_out, DEVICE, *args)
    want, want_slots = _sample(sample_ref, CPU, *args)
    assert torch.equal(slots, want_slots)
    if init_kind == "gaussian":  # log/sin/cos may differ in the last bit
        torch.testing.assert_close(out, want)
    else:
        assert torch.equal(out, want), (out.double() - want.double()).abs().max()


def _push_sequence(kernel, device, storage_dtype, policy, batch, features):
    """Three pushes of one policy ("write_back": given slots, one of them twice) into a
    partly filled buffer; returns storage, written and count after them."""
    gen = torch.Generator().manual_seed(features + 1)
    storage = _storage(gen, features, storage_dtype).to(device)
    written = torch.zeros(storage.shape[0], dtype=torch.uint8, device=device)
    count = torch.tensor([0, 4, 11], dtype=torch.int64, device=device)
    for step in range(3):
        x = (LO - 0.3 + (HI - LO + 0.6) * torch.rand(batch, features, generator=gen)).to(device)
        if policy == "write_back":
            idx = torch.randint(0, storage.shape[0], (batch,), generator=gen)
            idx[-1] = idx[0]  # the later chain wins
            idx, y, push_policy = idx.to(device), None, "fifo"
        else:
            idx, push_policy = None, policy
            y = torch.randint(0, N_CLASSES, (batch,), generator=gen).to(device)
        kernel(
            storage,
            written,
            count,
            x,
            idx,
            y,
            counter(77, device),
            counter(step, device),
            5 + batch * step,
            SLOTS_PER_CLASS,
            push_policy,
            LO,
            HI,
            step != 1,
        )
    return storage.cpu(), written.cpu(), count.cpu()


@pytest.mark.parametrize("storage_dtype", STORAGE_DTYPES, ids=str)
@pytest.mark.parametrize("policy", ["fifo", "reservoir", "write_back"])
def test_push_across_several_programs(storage_dtype, policy):
    """Rows quantised (uint8: stochastic and nearest rounding) and scattered to their slots in
    every column block, written flags set, counts advanced, as the reference does."""
    batch, features = BATCH, FEATURES
    got = _push_sequence(
        triton_push.buffer_push_out, DEVICE, storage_dtype, policy, batch, features
    )
    want = _push_sequence(push_ref, CPU, storage_dtype, policy, batch, features)
    for name, a, b in zip(("storage", "written", "count"), got, want):
        assert torch.equal(a, b), name
