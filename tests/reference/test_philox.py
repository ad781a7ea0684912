"""The noise spec's reference against first principles: known answers, distribution, invariances."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from ebm_fast import use_backend
from ebm_fast.ops.philox import philox_bits, philox_normal, philox_uniform
from ebm_fast.reference import philox as ref
from ebm_fast.reference.philox import philox4x32_10

# Random123's known-answer vectors for Philox4x32-10 (kat_vectors): counter, key -> output.
RANDOM123_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter,key,expected", RANDOM123_KAT)
def test_philox_known_answers(counter, key, expected):
    words = philox4x32_10(*(torch.tensor(c) for c in counter), *(torch.tensor(k) for k in key))
    assert tuple(int(w) for w in words) == expected


def test_counter_layout_follows_the_spec():
    """Element n of chain c takes word n % 4 of block (g lo, g hi, step, stream), g = n // 4."""
    seed, step, stream, offset = 0x1234_5678_9ABC_DEF0, 7, 3, 5
    bits = ref.philox_bits_ref((3, 6), seed=seed, step=step, stream=stream, chain_offset=offset)
    for chain in range(3):
        for j in range(6):
            n = (offset + chain) * 6 + j
            g = n // 4
            block = philox4x32_10(
                torch.tensor(g & 0xFFFFFFFF),
                torch.tensor(g >> 32),
                torch.tensor(step),
                torch.tensor(stream),
                torch.tensor(seed & 0xFFFFFFFF),
                torch.tensor(seed >> 32),
            )
            assert int(bits[chain, j]) & 0xFFFFFFFF == int(block[n % 4])


def test_large_counters_use_the_high_word():
    """Element indices beyond 2**34 reach the counter's second word."""
    chain = (1 << 34) + 3
    got = ref.philox_bits_ref((1, 4), seed=9, step=0, chain_offset=chain)
    g = chain * 4 // 4
    block = philox4x32_10(
        torch.tensor(g & 0xFFFFFFFF),
        torch.tensor(g >> 32),
        torch.tensor(0),
        torch.tensor(0),
        torch.tensor(9),
        torch.tensor(0),
    )
    assert [int(v) & 0xFFFFFFFF for v in got[0]] == [int(w) for w in block]


def test_uniform_map_matches_triton_definition():
    """u = (r as int32, complemented where negative) * 4.6566127342e-10, in [0, 1)."""
    words = torch.tensor([0, 1, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x12345678], dtype=torch.int64)
    u = ref.uniform_from_bits(words)
    expected = [0.0, 1.0, 2147483647.0, 2147483647.0, 0.0, float(0x12345678)]
    want = torch.tensor(expected, dtype=torch.float32) * torch.tensor(4.6566127342e-10)
    assert torch.equal(u, want)
    assert float(u.max()) < 1.0


def test_box_muller_pairs():
    """Even elements take rho*cos, odd ones rho*sin of the same pair: z0^2 + z1^2 = rho^2."""
    z = ref.philox_normal_ref((1, 4096), seed=1, step=2, dtype=torch.float64).reshape(-1, 2)
    words = ref.philox_bits_ref((1, 4096), seed=1, step=2).reshape(-1, 2).to(torch.int64)
    u_a = ref.uniform_from_bits(words[:, 0] & 0xFFFFFFFF).double().clamp(min=1e-7)
    torch.testing.assert_close((z**2).sum(1), -2 * torch.log(u_a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("distribution", ["normal", "uniform", "bits"])
def test_chunking_invariance(distribution):
    """Two halves drawn with chain_offset equal the whole batch, for odd chain sizes too."""
    with use_backend("reference"):
        draw = {"normal": philox_normal, "uniform": philox_uniform, "bits": philox_bits}[
            distribution
        ]
        whole = draw((7, 3, 5), seed=11, step=4)
        first = draw((3, 3, 5), seed=11, step=4)
        second = draw((4, 3, 5), seed=11, step=4, chain_offset=3)
    assert torch.equal(torch.cat([first, second]), whole)


def test_seed_and_step_as_tensors_equal_ints():
    with use_backend("reference"):
        a = philox_normal((4, 9), seed=2**63 + 5, step=2**32 - 1)
        seed_t = torch.tensor(2**63 + 5 - 2**64, dtype=torch.int64)
        b = philox_normal((4, 9), seed=seed_t, step=torch.tensor(2**32 - 1))
    assert torch.equal(a, b)


def test_normal_distribution_moments_and_ks():
    z = ref.philox_normal_ref((1000, 1000), seed=123, step=0).double().flatten()
    n = z.numel()
    assert abs(z.mean().item()) < 5 / math.sqrt(n)
    assert abs(z.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs(stats.skew(z.numpy())) < 5 * math.sqrt(6 / n)
    assert abs(stats.kurtosis(z.numpy())) < 5 * math.sqrt(24 / n)
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-4


def test_uniform_distribution_ks():
    u = ref.philox_uniform_ref((1000, 1000), seed=321, step=0).double().flatten().numpy()
    assert u.min() >= 0 and u.max() < 1
    assert stats.kstest(u, "uniform").pvalue > 1e-4


@pytest.mark.parametrize("change", ["seed", "step", "stream", "chain_offset"])
def test_different_counters_are_decorrelated(change):
    base = dict(seed=5, step=3, stream=0, chain_offset=0)
    other = dict(base, **{change: base[change] + 1 if change != "chain_offset" else 1000})
    a = ref.philox_normal_ref((200, 500), **base).flatten().double()
    b = ref.philox_normal_ref((200, 500), **other).flatten().double()
    corr = np.corrcoef(a.numpy(), b.numpy())[0, 1]
    assert abs(corr) < 5 / math.sqrt(a.numel())
    assert not torch.equal(a, b)


def test_neighbouring_elements_are_decorrelated():
    """Elements sharing a Philox block (and the two members of a Box-Muller pair) are
    independent."""
    z = ref.philox_normal_ref((1, 400_000), seed=8, step=0).double().reshape(-1, 4).numpy()
    corr = np.corrcoef(z.T)
    off_diagonal = corr[~np.eye(4, dtype=bool)]
    assert np.abs(off_diagonal).max() < 5 / math.sqrt(z.shape[0])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="step"):
        philox_normal((2, 2), seed=0, step=2**32)
    with pytest.raises(ValueError, match="seed"):
        philox_normal((2, 2), seed=-1, step=0)
    with pytest.raises(TypeError, match="seed"):
        philox_normal((2, 2), seed=torch.tensor(1.0), step=0)
    with pytest.raises(ValueError, match="stream"):
        philox_normal((2, 2), seed=0, step=0, stream=-1)
    with pytest.raises(ValueError, match="chain_offset"):
        philox_normal((2, 2), seed=0, step=0, chain_offset=-3)
    with pytest.raises(ValueError, match="chain_offset"):  # element indices beyond 2**62
        philox_normal((2, 2), seed=0, step=0, chain_offset=2**61)
    with pytest.raises(TypeError, match="stream"):
        philox_normal((2, 2), seed=0, step=0, stream=1.5)
    with pytest.raises(ValueError, match="distribution"):
        from ebm_fast.ops.philox import philox

        philox((2, 2), seed=0, step=0, distribution="cauchy")
    with pytest.raises(ValueError, match="step must be >= 0"):
        philox_normal((2, 2), seed=0, step=-1)
    with pytest.raises(TypeError, match=r"shape\[0\] must be an int, got 2.5"):  # not truncated
        philox_normal((2.5,), seed=0, step=0)
    with pytest.raises(TypeError, match=r"shape\[1\]"):
        philox_normal((2, True), seed=0, step=0)
    with pytest.raises(ValueError, match=r"shape\[1\] must be >= 0"):
        philox_normal((2, -1), seed=0, step=0)


def test_numpy_integers_are_ints():
    want = philox_bits((3, 4), seed=2**64 - 1, step=7, stream=2, chain_offset=5)
    got = philox_bits(
        (np.int64(3), np.uint8(4)),
        seed=np.uint64(2**64 - 1),
        step=np.int32(7),
        stream=np.int16(2),
        chain_offset=np.int64(5),
    )
    assert torch.equal(got, want)


def test_philox_op_passes_opcheck():
    from ebm_fast.ops.philox import _philox_op

    for distribution in ("normal", "uniform", "bits"):
        args = ([3, 5], torch.tensor(7), torch.tensor(2), 0, 1, distribution, torch.device("cpu"))
        torch.library.opcheck(_philox_op, args)
