"""Backend selection: forcing, fallback with one warning, clear errors."""

import os
import subprocess
import sys

import pytest
import torch

import ebm_fast
from ebm_fast.backends import backend_for


def test_reference_is_always_available():
    assert "reference" in ebm_fast.available_backends()


def test_use_backend_forces_and_restores():
    before = backend_for(torch.device("cpu"))
    with ebm_fast.use_backend("reference"):
        assert backend_for(torch.device("cpu")) == "reference"
        with ebm_fast.use_backend("auto"):
            assert backend_for(torch.device("cpu")) == before
    assert backend_for(torch.device("cpu")) == before


def test_unknown_backend_is_refused():
    listed = r"backend must be one of \('auto', 'reference', 'cpu', 'triton'\), got 'cuda-magic'"
    with pytest.raises(ValueError, match=listed):
        with ebm_fast.use_backend("cuda-magic"):
            pass
    with pytest.raises(TypeError, match="backend must be one of"):
        with ebm_fast.use_backend(None):
            pass


def test_cpu_backend_refuses_cuda_tensors():
    if "cpu" not in ebm_fast.available_backends():
        pytest.skip("cpu backend unavailable")
    with ebm_fast.use_backend("cpu"):
        with pytest.raises(RuntimeError, match="forced"):
            backend_for(torch.device("cuda"))


def test_missing_cpp_backend_falls_back_with_one_warning():
    """Import never fails; the first op on CPU warns once, naming what is missing, then works."""
    code = (
        "import warnings, torch, ebm_fast\n"
        "warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    x = torch.zeros(2, 3)\n"
        "    for step in range(3):\n"
        "        ebm_fast.langevin_update(x, x, 0.1, 0.1, seed=0, step=step, out=x)\n"
        "msgs = [str(w.message) for w in caught if 'backend' in str(w.message)]\n"
        "print(len(msgs)); print(msgs[0])\n"
        "print(ebm_fast.available_backends())\n"
    )
    env = dict(os.environ, EBM_FAST_DISABLE_CPP="1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    count, message, backends = result.stdout.strip().splitlines()
    assert count == "1"
    assert "'cpu'" in message and "EBM_FAST_DISABLE_CPP" in message and "reference" in message
    assert "cpu" not in backends


def test_cached_cpp_build_loads_quietly():
    """The "building ... about a minute" notice is for a build, not for loading a cached one."""
    if "cpu" not in ebm_fast.available_backends():  # builds it here if needed
        pytest.skip("cpu backend unavailable")
    code = "from ebm_fast import _cpp\nprint(_cpp.load_error())\n"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
    )
    assert result.stdout.strip() == "None", result.stderr
    assert "building" not in result.stderr


def test_an_empty_extension_cache_is_announced_as_a_build(monkeypatch, tmp_path):
    from ebm_fast import _cpp

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert not _cpp._cached_build_is_current()


def test_cpp_build_is_keyed_by_the_cpu_features(monkeypatch):
    """-march=native builds are cached per CPU feature set, so a cache shared between machines
    never loads a build whose instructions this CPU lacks."""
    from ebm_fast import _cpp

    monkeypatch.setattr(_cpp, "_cpu_features", lambda: "avx2 fma sse4_2")
    avx2 = _cpp.extension_name()
    assert avx2.startswith(_cpp.EXTENSION_NAME) and avx2.isidentifier()
    assert _cpp.extension_name() == avx2
    monkeypatch.setattr(_cpp, "_cpu_features", lambda: "avx2 avx512f fma sse4_2")
    assert _cpp.extension_name() != avx2


def test_cpp_build_is_keyed_by_the_source_folder(monkeypatch, tmp_path):
    """Two checkouts keep two builds: torch rebuilds a name whose source paths changed, so one
    shared name would make them rebuild over each other on every switch."""
    from ebm_fast import _cpp

    here = _cpp.extension_name()
    monkeypatch.setattr(_cpp, "CSRC", tmp_path / "csrc")
    assert _cpp.extension_name() != here and _cpp.extension_name().isidentifier()
