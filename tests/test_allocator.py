"""retain_freed_cpu_memory: freed activation-sized blocks are reused without page faults."""

import subprocess
import sys
import textwrap

import pytest

from ebm_fast.allocator import retain_freed_cpu_memory

CHURN = textwrap.dedent("""
    import resource, sys, torch
    from ebm_fast.allocator import retain_freed_cpu_memory

    def faults_of_churn():  # a step's worth of activations: allocated, written, freed
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(20):
            a = torch.empty(4 << 20, dtype=torch.uint8).fill_(1)
            b = torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
            del a, b
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    default = faults_of_churn()
    applied = retain_freed_cpu_memory()
    faults_of_churn()  # the first round maps the memory that is kept from then on
    print(default, applied, faults_of_churn())
""")


def test_freed_blocks_are_reused_without_page_faults():
    done = subprocess.run(
        [sys.executable, "-c", CHURN], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    default, applied, retained = done.stdout.split()
    if applied != "True":
        pytest.skip("not glibc: the allocator setting does not apply")
    # 20 rounds of 12 MiB are ~60,000 pages: glibc's defaults fault most of them back in.
    assert int(default) > 1000
    assert int(retained) < 100


@pytest.mark.parametrize(
    "kwargs,error",
    [
        (dict(mmap_threshold=0), ValueError),
        (dict(trim_threshold=2**31), ValueError),
        (dict(mmap_threshold=True), TypeError),
        (dict(trim_threshold=1.5), TypeError),
    ],
)
def test_bad_thresholds_are_refused(kwargs, error):
    with pytest.raises(error, match="threshold"):
        retain_freed_cpu_memory(**kwargs)
