"""C++ paths that the other tests do not reach: the threaded splits of at::parallel_for (sizes
above every OpenMP grain, two threads) for buffer_sample, buffer_push and mala_accept against the
reference; and every instruction-set path of csrc/philox.h (AVX-512, AVX2, portable) against the
noise spec. The extension itself is built with -march=native, so it runs only the widest path the
building CPU has; here each path is compiled into a tiny plain shared library (no torch headers:
about a second per build) and called through ctypes."""

import ctypes
import functools
import platform
import subprocess

import pytest
import torch

from ebm_fast import use_backend
from ebm_fast._cpp import CSRC
from ebm_fast.backends import unavailable_reason
from ebm_fast.ops.buffer_push import buffer_push
from ebm_fast.ops.buffer_sample import buffer_sample
from ebm_fast.ops.mala_accept import mala_accept
from ebm_fast.reference import philox as ref
from tests.helpers import assert_within_eager_error, counter

# The grains in csrc: buffer kernels split the batch into runs of at least 16384 / features
# rows, mala_accept the chains into runs of at least 32768 / elements per chain.
FEATURES, BATCH = 40, 1500  # grain 409 rows: 2 threads split the batch
MALA_PER_CHAIN, MALA_CHAINS = 40, 2000  # grain 819 chains


@pytest.fixture
def two_threads():
    """The cpu backend, on two threads. (Checked here, not at import: the philox.h tests below
    need no extension, so a mutated header need not rebuild it for them.)"""
    reason = unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(f"cpu backend unavailable: {reason}")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _on_both(call):
    """call() under the reference and the cpu backend."""
    results = {}
    for backend in ("reference", "cpu"):
        with use_backend(backend):
            results[backend] = call()
    return results["reference"], results["cpu"]


@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.bfloat16, torch.uint8], ids=str)
@pytest.mark.parametrize("init_kind", ["uniform", "gaussian"])
def test_buffer_sample_split_over_threads(two_threads, storage_dtype, init_kind):
    assert BATCH > 2 * (16384 // FEATURES)
    gen = torch.Generator().manual_seed(1)
    n_classes, slots_per_class = 4, 300
    capacity = n_classes * slots_per_class
    if storage_dtype == torch.uint8:
        storage = torch.randint(0, 256, (capacity, FEATURES), generator=gen, dtype=torch.uint8)
    else:
        storage = torch.randn(capacity, FEATURES, generator=gen).to(storage_dtype)
    written = (torch.rand(capacity, generator=gen) < 0.9).to(torch.uint8)
    y = torch.randint(0, n_classes, (BATCH,), generator=gen)
    want, got = _on_both(
        lambda: buffer_sample(
            storage,
            written,
            BATCH,
            dtype=torch.float32,
            seed=counter(5),
            step=counter(2),
            chain_offset=7,
            slots_per_class=slots_per_class,
            reinit_prob=0.1,
            init_kind=init_kind,
            lo=-1.0,
            hi=1.0,
            y=y,
        )
    )
    assert torch.equal(got[1], want[1])
    if init_kind == "gaussian":  # log/sin/cos may differ in the last bit
        torch.testing.assert_close(got[0], want[0])
    else:
        assert torch.equal(got[0], want[0])


@pytest.mark.parametrize("storage_dtype", [torch.float32, torch.uint8], ids=str)
@pytest.mark.parametrize("policy", ["fifo", "reservoir", "write_back"])
def test_buffer_push_split_over_threads(two_threads, storage_dtype, policy):
    gen = torch.Generator().manual_seed(2)
    n_classes, slots_per_class = 2, 1000
    capacity = n_classes * slots_per_class
    x = torch.rand(BATCH, FEATURES, generator=gen) * 2.4 - 1.2
    labels = (
        dict(idx=torch.randint(0, capacity, (BATCH,), generator=gen))
        if policy == "write_back"
        else dict(y=torch.randint(0, n_classes, (BATCH,), generator=gen))
    )

    def push():
        storage = torch.zeros(capacity, FEATURES, dtype=storage_dtype)
        written = torch.zeros(capacity, dtype=torch.uint8)
        count = torch.tensor([300, 5000])  # one class filling up, one full (reservoir drops)
        buffer_push(
            storage,
            written,
            count,
            x,
            seed=counter(9),
            step=counter(1),
            chain_offset=3,
            slots_per_class=slots_per_class,
            policy="fifo" if policy == "write_back" else policy,
            lo=-1.0,
            hi=1.0,
            stochastic=storage_dtype == torch.uint8,
            **labels,
        )
        return storage, written, count

    want, got = _on_both(push)
    for name, a, b in zip(("storage", "written", "count"), got, want):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_mala_accept_split_over_threads(two_threads, dtype):
    assert MALA_CHAINS > 2 * (32768 // MALA_PER_CHAIN)
    gen = torch.Generator().manual_seed(3)
    eps = 2.5 / MALA_PER_CHAIN**0.5
    x = torch.randn(MALA_CHAINS, MALA_PER_CHAIN, generator=gen, dtype=dtype)
    y = x - eps * x + (2 * eps) ** 0.5 * torch.randn(x.shape, generator=gen, dtype=dtype)

    def energy(v):
        return 0.5 * v.pow(2).sum(1)

    temperature = 0.5 + torch.rand(MALA_CHAINS, generator=gen, dtype=dtype)

    def accept():
        state = [x.clone(), x.clone(), energy(x)]
        decided = mala_accept(
            state[0],
            y,
            state[1],
            y,
            state[2],
            energy(y),
            eps,
            temperature,
            seed=11,
            step=4,
            chain_offset=2**33,
        )
        return (*decided, *state)

    want, got = _on_both(accept)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-5)
    assert 0.2 < want[1].mean() < 0.9
    u = ref.philox_uniform_ref((MALA_CHAINS,), seed=11, step=4, stream=1, chain_offset=2**33).to(
        dtype
    )
    decidable = (u - want[1]).abs() > 1e-4
    assert torch.equal(got[0][decidable], want[0][decidable])
    take = got[0]
    assert torch.equal(got[2], torch.where(take[:, None], y, x))
    assert torch.equal(got[3], torch.where(take[:, None], y, x))
    assert torch.equal(got[4], torch.where(take, energy(y), energy(x)))


# ---------------------------------------------------------------------------------------------
# philox.h, one build per instruction-set path.

_PHILOX_WRAPPER = r"""
#include "philox.h"

extern "C" int vector_path() {
#if defined(__AVX512F__)
  return 512;
#elif defined(__AVX2__)
  return 256;
#else
  return 0;
#endif
}

extern "C" void fill(int kind, long long seed, unsigned step, unsigned stream,
                     unsigned long long n0, long long count, void* out) {
  const ebm_fast::PhiloxStream s(ebm_fast::PhiloxKey(seed), step, stream);
  if (kind == 0) ebm_fast::philox_bits_bulk(n0, count, s, static_cast<uint32_t*>(out));
  if (kind == 1) ebm_fast::philox_uniform_bulk(n0, count, s, static_cast<float*>(out));
  if (kind == 2) ebm_fast::philox_normal_bulk(n0, count, s, static_cast<float*>(out));
}
"""

# path: (flags that select it, CPU feature it needs, the wrapper's vector_path()). The csrc
# build's -ffp-contract=off keeps the scalar float expressions unfused as there.
_PATHS = {
    "avx512": (["-mavx512f", "-mavx2", "-mfma"], "avx512f", 512),
    "avx2": (["-mno-avx512f", "-mavx2", "-mfma"], "avx2", 256),
    "portable": (["-mno-avx512f", "-mno-avx2", "-mno-fma"], None, 0),
}


def _cpu_flags() -> set:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


@pytest.fixture(scope="module")
def philox_library(tmp_path_factory):
    """path -> the wrapper built for that path (once per test session)."""
    from torch.utils.cpp_extension import get_cxx_compiler

    directory = tmp_path_factory.mktemp("philox_paths")
    (directory / "wrapper.cpp").write_text(_PHILOX_WRAPPER)

    @functools.cache
    def build(path: str):
        library = directory / f"philox_{path}.so"
        done = subprocess.run(
            [
                get_cxx_compiler(),
                "-O3",
                "-std=c++17",
                "-shared",
                "-fPIC",
                "-ffp-contract=off",
                *_PATHS[path][0],
                f"-I{CSRC}",
                str(directory / "wrapper.cpp"),
                "-o",
                str(library),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return ctypes.CDLL(str(library))

    return build


@pytest.mark.parametrize("path", sorted(_PATHS))
@pytest.mark.parametrize("chain_offset", [2**32 // 7 + 1, 2**33 + 1, 2**34 // 7 - 57])
def test_each_philox_path_matches_the_spec(philox_library, path, chain_offset):
    """Chains of 7 elements: the run starts 3 elements into a block (and past 2**32 blocks, the
    counter's high word, for the second offset; across block 2**32, 101 blocks in, inside a
    group of 8 of the AVX2 path, for the third), spans single and paired tiles and ends inside
    one. Words and uniforms bit-exact, normals within the float32 reference's own error."""
    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the vector paths are x86-64 ones")
    feature = _PATHS[path][1]
    if feature is not None and feature not in _cpu_flags():
        pytest.skip(f"this CPU lacks {feature}")
    library = philox_library(path)
    assert library.vector_path() == _PATHS[path][2]
    shape, seed, step, stream = (101, 7), 2**63 + 99, 12, 3
    n0 = chain_offset * shape[1]
    assert n0 % 4 == 3
    counters = dict(seed=seed, step=step, stream=stream, chain_offset=chain_offset)
    for kind, (dtype, reference) in enumerate(
        [
            (torch.int32, ref.philox_bits_ref),
            (torch.float32, ref.philox_uniform_ref),
            (torch.float32, ref.philox_normal_ref),
        ]
    ):
        out = torch.empty(shape, dtype=dtype)
        library.fill(
            kind,
            ctypes.c_longlong(counter(seed).item()),
            ctypes.c_uint(step),
            ctypes.c_uint(stream),
            ctypes.c_ulonglong(n0),
            ctypes.c_longlong(out.numel()),
            ctypes.c_void_p(out.data_ptr()),
        )
        want = reference(shape, **counters)
        if kind < 2:
            assert torch.equal(out, want), (path, kind)
        else:
            exact = ref.philox_normal_ref(shape, dtype=torch.float64, **counters)
            assert_within_eager_error(out, want, exact, atol=1e-6)
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
