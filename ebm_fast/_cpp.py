"""Build (once, cached) and load the C++ CPU kernels in ebm_fast/csrc.

Every ``*.cpp`` file in csrc is compiled into one extension that registers its ops under the
``ebm_fast_cpu`` namespace (``torch.ops.ebm_fast_cpu.<op>``). torch's JIT builder caches the
result under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and rebuilds only when a source
or a flag changes. ``ebm-fast build`` runs the build ahead of time; otherwise the first op that
needs it builds it. Set EBM_FAST_DISABLE_CPP=1 to pretend the extension is missing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Callable

CSRC = Path(__file__).resolve().parent / "csrc"
EXTENSION_NAME = "ebm_fast_cpu"
# -march=native: the build uses every instruction set the building CPU has, so the cached build
# is keyed by the CPU's features (extension_name()).
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-DEBM_FAST_BUILD"]
LD_FLAGS = ["-fopenmp"]


def sources() -> list[str]:
    return sorted(str(p) for p in CSRC.glob("*.cpp"))


def _cpu_features() -> str:
    """The host CPU's feature flags as the OS reports them (Linux), else its machine type."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return " ".join(sorted(value.split()))
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def extension_name() -> str:
    """The extension's build name, tagged with the host CPU's features and the source folder.
    torch's cache is keyed by name, sources and flags only: a cache shared between machines (an
    NFS home, a container image, a CI cache) would otherwise hand a -march=native build to a CPU
    that lacks its instructions, and the process would die of SIGILL instead of falling back;
    and two checkouts (source paths differ) would rebuild over each other's build on every
    switch."""
    digest = hashlib.sha256(f"{_cpu_features()}\n{CSRC}".encode()).hexdigest()[:12]
    return f"{EXTENSION_NAME}_{digest}"


def _cached_build_is_current() -> bool:
    """Whether torch's extension cache holds a build newer than every source here, so that loading
    compiles nothing. (A change of CXX_FLAGS alone also rebuilds, unannounced.)"""
    from torch.utils import cpp_extension

    name = extension_name()
    # torch's own cache folder for the name (honours $TORCH_EXTENSIONS_DIR); private but stable.
    library = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    try:
        built = library.stat().st_mtime
    except OSError:
        return False
    return all(path.stat().st_mtime <= built for path in CSRC.iterdir()
               if path.suffix in (".cpp", ".h"))


@functools.lru_cache(maxsize=None)
def _load() -> tuple[bool, str | None]:
    if os.environ.get("EBM_FAST_DISABLE_CPP") == "1":
        return False, "disabled by EBM_FAST_DISABLE_CPP=1"
    if not sources():
        return False, f"no C++ sources found in {CSRC}"
    try:
        from torch.utils import cpp_extension

        if not _cached_build_is_current():  # announce a build, not the load of a cached one
            print("ebm_fast: building the C++ CPU kernels (the first build takes about a "
                  "minute)...", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=extension_name(),
            sources=sources(),
            extra_cflags=CXX_FLAGS,
            extra_ldflags=LD_FLAGS,
            extra_include_paths=[str(CSRC)],
            is_python_module=False,
            verbose=os.environ.get("EBM_FAST_VERBOSE_BUILD") == "1",
        )
    except Exception as exc:  # compiler missing, ninja missing, build error
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return False, (
            f"the C++ extension failed to build ({first_line}); it needs g++ and ninja "
            "(`pip install ninja`); run `ebm-fast build` to see the full log"
        )
    return True, None


def load_error() -> str | None:
    """None when the C++ kernels are loaded, else why not."""
    return _load()[1]


def ops():
    """The ``torch.ops.ebm_fast_cpu`` namespace; raises if the extension is unavailable."""
    ok, reason = _load()
    if not ok:
        raise RuntimeError(f"ebm_fast C++ backend unavailable: {reason}")
    import torch

    return torch.ops.ebm_fast_cpu


@functools.lru_cache(maxsize=None)
def kernels() -> dict[str, Callable]:
    """Each op's C++ entry point (ebm_fast/csrc/<op>.cpp), the overload itself: calling it skips
    the packet's overload resolution (5 us per call instead of 8 on this CPU, for every update of
    a sampler). Raises if the extension is unavailable."""
    namespace = ops()
    return {
        "buffer_push": namespace.buffer_push_out.default,
        "buffer_sample": namespace.buffer_sample_out.default,
        "langevin_update": namespace.langevin_update_out.default,
        "mala_accept": namespace.mala_accept_out.default,
        "philox": namespace.philox_out.default,
    }
