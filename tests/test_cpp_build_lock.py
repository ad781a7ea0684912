"""The C++ build never hangs a process: a lock left by a killed build is cleared, and waiting on a
live build ends in the reference kernels with one warning (issue 23, item 8)."""

import fcntl
import os
import shutil
import subprocess
import sys

import pytest

import ebm_fast
from ebm_fast import _cpp


def run_python(code: str, extensions_dir, timeout: float) -> subprocess.CompletedProcess:
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(extensions_dir))
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def cached_build(tmp_path):
    """A copy of this machine's current build in a fresh extensions folder, so that loading it
    compiles nothing (ninja finds every output up to date)."""
    if "cpu" not in ebm_fast.available_backends():  # builds it here if needed
        pytest.skip("cpu backend unavailable")
    copy = tmp_path / _cpp.extension_name()
    shutil.copytree(_cpp.build_directory(), copy, ignore=shutil.ignore_patterns("*lock"))
    return copy


def test_a_lock_left_by_a_killed_build_is_removed_and_the_kernels_load(cached_build):
    """torch's own lock file, as a build killed mid-way leaves it: torch alone would wait on it
    forever (the timeout fails the test on such code, in seconds instead of hanging)."""
    (cached_build / "lock").touch()
    result = run_python(
        "from ebm_fast import _cpp\nprint(_cpp.load_error())\n", cached_build.parent, timeout=60
    )
    assert result.stdout.strip() == "None", result.stderr
    assert "interrupted build" in result.stderr
    assert not (cached_build / "lock").exists()


def test_waiting_on_a_live_build_ends_in_the_reference_kernels_with_one_warning(cached_build):
    """A live process holds the build (here: this test holds its flock) for longer than the
    wait: the kernels run on the reference backend, and one warning names the holder and the
    way out."""
    with open(cached_build / "ebm_fast.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("pid 12345 on buildhost\n")
        held.flush()
        code = (
            "import warnings, torch\n"
            "from ebm_fast import _cpp, backends\n"
            "_cpp.BUILD_WAIT_S, _cpp.QUIET_WAIT_S = 1.0, 0.2\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    for _ in range(3):\n"
            "        print(backends.backend_for(torch.device('cpu')))\n"
            "print(len(caught)); print(caught[0].message)\n"
        )
        result = run_python(code, cached_build.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    *backend, count, message = result.stdout.strip().splitlines()
    assert backend == ["reference"] * 3 and count == "1"
    assert "pid 12345 on buildhost" in message and "ebm-fast build" in message
    assert "waiting for the C++ kernels' build by pid 12345 on buildhost" in result.stderr
