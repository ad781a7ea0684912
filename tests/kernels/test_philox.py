"""Every kernel backend's noise against the spec's reference (ebm_fast/noise.py): integer words and
uniforms bit-exact, normals within float rounding, chunking invariance, seeds and steps given as
large ints or as tensors."""

import pytest
import torch
from hypothesis import given, strategies as st

from ebm_fast import use_backend
from ebm_fast.backends import unavailable_reason
from ebm_fast.ops.philox import philox_bits, philox_normal, philox_uniform
from ebm_fast.reference import philox as ref
from tests.helpers import assert_within_eager_error, kernel_backends, kernel_device

DRAWS = {
    "bits": (philox_bits, ref.philox_bits_ref),
    "uniform": (philox_uniform, ref.philox_uniform_ref),
    "normal": (philox_normal, ref.philox_normal_ref),
}


def _max_per_chain(backend: str) -> int:
    """Triton runs in the (slow) interpreter on the CPU: keep its tensors small."""
    return 40 if backend == "triton" else 700


def _draw(backend, distribution, shape, **counters):
    with use_backend(backend):
        return DRAWS[distribution][0](shape, device=kernel_device(backend), **counters).cpu()


def assert_matches_spec(got: torch.Tensor, distribution: str, shape, **counters) -> None:
    """bits/uniform: identical to the reference. normal: within 2x the float32 reference's own
    error against the float64 evaluation, and within 1e-5 of the float32 reference."""
    reference = DRAWS[distribution][1](shape, **counters)
    if distribution != "normal":
        assert torch.equal(got, reference)
        return
    exact = ref.philox_normal_ref(shape, dtype=torch.float64, **counters)
    assert_within_eager_error(got, reference, exact, atol=1e-6)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)


counters = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**64 - 1),
        "step": st.integers(0, 2**32 - 1),
        "stream": st.sampled_from([0, 1, 5, 2**32 - 1]),
        "chain_offset": st.one_of(st.integers(0, 50), st.integers(0, 2**40)),
    }
)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distribution", sorted(DRAWS))
@given(data=st.data(), counters=counters)
def test_draws_match_the_spec(backend, distribution, data, counters):
    chains = data.draw(st.integers(1, 5), label="chains")
    trailing = data.draw(st.lists(st.integers(1, 9), min_size=0, max_size=2), label="trailing")
    per_chain = 1
    for size in trailing:
        per_chain *= size
    if per_chain > _max_per_chain(backend):
        trailing = [_max_per_chain(backend)]
    shape = (chains, *trailing)
    got = _draw(backend, distribution, shape, **counters)
    assert got.shape == shape
    assert_matches_spec(got, distribution, shape, **counters)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distribution", sorted(DRAWS))
def test_block_counter_carries_into_the_high_word(backend, distribution):
    """Element indices that cross block 2**32 (n = 2**34) set counter word c1 = g >> 32."""
    shape, first_chain = (9, 14), (2**34 - 40) // 14
    got = _draw(backend, distribution, shape, seed=3, step=1, chain_offset=first_chain)
    assert_matches_spec(got, distribution, shape, seed=3, step=1, chain_offset=first_chain)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distribution", sorted(DRAWS))
def test_chunking_invariance(backend, distribution):
    """Two halves drawn with chain_offset equal the whole batch, bit for bit, also when the
    second half starts inside a Philox block (7 elements per chain)."""
    counters = dict(seed=2**63 + 11, step=4, stream=0)
    whole = _draw(backend, distribution, (9, 7), **counters)
    first = _draw(backend, distribution, (5, 7), **counters)
    second = _draw(backend, distribution, (4, 7), chain_offset=5, **counters)
    assert torch.equal(torch.cat([first, second]), whole)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distribution", sorted(DRAWS))
def test_seed_and_step_as_tensors_equal_ints(backend, distribution):
    seed, step = 2**64 - 3, 2**32 - 1
    device = kernel_device(backend)
    from_ints = _draw(backend, distribution, (3, 10), seed=seed, step=step)
    from_tensors = _draw(
        backend,
        distribution,
        (3, 10),
        seed=torch.tensor(seed - 2**64, dtype=torch.int64, device=device),
        step=torch.tensor(step, dtype=torch.int64, device=device),
    )
    assert torch.equal(from_ints, from_tensors)
    assert_matches_spec(from_ints, distribution, (3, 10), seed=seed, step=step)


@pytest.mark.parametrize("distribution", sorted(DRAWS))
@pytest.mark.parametrize("shape", [(1, 100_003), (3, 33_337), (1001, 97)])
def test_large_draws_on_cpu(distribution, shape):
    """Sizes that split over threads, within and across chains, with ragged ends."""
    if unavailable_reason("cpu"):
        pytest.skip(f"cpu backend unavailable: {unavailable_reason('cpu')}")
    counters = dict(seed=77, step=2, stream=3, chain_offset=1)
    got = _draw("cpu", distribution, shape, **counters)
    assert_matches_spec(got, distribution, shape, **counters)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("distribution", sorted(DRAWS))
def test_opcheck(backend, distribution):
    from ebm_fast.ops.philox import _philox_op

    device = kernel_device(backend)
    args = (
        [3, 5],
        torch.tensor(2**63 + 7 - 2**64, device=device),
        torch.tensor(4, device=device),
        1,
        2,
        distribution,
        device,
    )
    with use_backend(backend):
        torch.library.opcheck(_philox_op, args)
