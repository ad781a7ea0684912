"""Build (once, cached) and load the C++ CPU kernels in ebm_fast/csrc.

Every ``*.cpp`` file in csrc is compiled into one extension that registers its ops under the
``ebm_fast_cpu`` namespace (``torch.ops.ebm_fast_cpu.<op>``). torch's JIT builder caches the
result under ~/.cache/torch_extensions (or $TORCH_EXTENSIONS_DIR) and rebuilds only when a source
or a flag changes. ``ebm-fast build`` runs the build ahead of time; otherwise the first op that
needs it builds it. Set EBM_FAST_DISABLE_CPP=1 to pretend the extension is missing.

A build never hangs its neighbours: torch guards a build with a lock file that a builder killed
mid-build leaves behind, after which torch waits on it forever. Every build here also holds an
OS lock (flock) on a file beside it, which dies with its holder; see _build_lock.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import socket
import sys
import time
from pathlib import Path

if sys.platform != "win32":  # Windows has no flock: torch's own lock file alone guards a build
    import fcntl

CSRC = Path(__file__).resolve().parent / "csrc"
EXTENSION_NAME = "ebm_fast_cpu"
# -march=native: the build uses every instruction set the building CPU has, so the cached build
# is keyed by the CPU's features (extension_name()).
CXX_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-DEBM_FAST_BUILD"]
LD_FLAGS = ["-fopenmp"]
# How long a process waits for another process's build before it runs the reference kernels
# instead (the first build takes about a minute; longer on a loaded machine).
BUILD_WAIT_S = 600.0
QUIET_WAIT_S = 2.0  # a wait this short goes unannounced


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


def build_directory() -> Path:
    """torch's cache folder for this build (honours $TORCH_EXTENSIONS_DIR; created if missing)."""
    from torch.utils import cpp_extension

    # Private but stable across torch 2.x.
    return Path(cpp_extension._get_build_directory(extension_name(), verbose=False))


def _cached_build_is_current() -> bool:
    """Whether torch's extension cache holds a build newer than every source here, so that loading
    compiles nothing. (A change of CXX_FLAGS alone also rebuilds, unannounced.)"""
    library = build_directory() / f"{extension_name()}.so"
    try:
        built = library.stat().st_mtime
    except OSError:
        return False
    return all(
        path.stat().st_mtime <= built for path in CSRC.iterdir() if path.suffix in (".cpp", ".h")
    )


class BuildWaitTimeout(RuntimeError):
    """Another live process held the build for longer than BUILD_WAIT_S."""


@contextlib.contextmanager
def _build_lock(directory: Path):
    """Hold the build's flock (``ebm_fast.lock``, naming its holder) while torch builds or loads.

    The OS drops a flock when its holder dies, and every ebm_fast build runs under it: so a
    process that holds it and finds torch's lock file (``lock``) knows that file's owner is gone,
    and removes it instead of waiting on it forever. Waiting for a live builder is announced and
    ends after BUILD_WAIT_S with BuildWaitTimeout."""
    if sys.platform == "win32":
        yield
        return
    path = directory / "ebm_fast.lock"
    with open(path, "a+") as handle:  # "a+": the holder's name stays readable while we wait
        if not _try_flock(handle):
            _wait_for_holder(handle, path)
        handle.truncate(0)
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        stale = directory / "lock"
        if stale.exists():
            stale.unlink()
            print(
                f"ebm_fast: removed {stale}, left by an interrupted build",
                file=sys.stderr,
                flush=True,
            )
        yield  # closing the file releases the flock


def _wait_for_holder(handle, path: Path) -> None:
    """Take the flock on ``handle`` once its holder lets go: quietly for QUIET_WAIT_S (the
    holder may be loading a cached build), then announced; BuildWaitTimeout after
    BUILD_WAIT_S."""
    handle.seek(0)
    holder = handle.read().strip() or "another process"
    start, announced = time.monotonic(), False
    while not _try_flock(handle):
        waited = time.monotonic() - start
        if waited > BUILD_WAIT_S:
            raise BuildWaitTimeout(
                f"waited {BUILD_WAIT_S:.0f} s for the C++ build by {holder} (lock {path}); "
                "when it ends, or once you stop it, the next process loads the kernels "
                "(`ebm-fast build` builds them and shows the log)"
            )
        if waited > QUIET_WAIT_S and not announced:
            print(
                f"ebm_fast: waiting for the C++ kernels' build by {holder} (up to "
                f"{BUILD_WAIT_S:.0f} s)...",
                file=sys.stderr,
                flush=True,
            )
            announced = True
        time.sleep(0.1)


def _try_flock(handle) -> bool:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@functools.cache
def _load() -> tuple[bool, str | None]:
    if os.environ.get("EBM_FAST_DISABLE_CPP") == "1":
        return False, "disabled by EBM_FAST_DISABLE_CPP=1"
    if not sources():
        return False, f"no C++ sources found in {CSRC}"
    try:
        from torch.utils import cpp_extension

        with _build_lock(build_directory()):
            if not _cached_build_is_current():  # announce a build, not the load of a cached one
                print(
                    "ebm_fast: building the C++ CPU kernels (the first build takes about a "
                    "minute)...",
                    file=sys.stderr,
                    flush=True,
                )
            cpp_extension.load(
                name=extension_name(),
                sources=sources(),
                extra_cflags=CXX_FLAGS,
                extra_ldflags=LD_FLAGS,
                extra_include_paths=[str(CSRC)],
                is_python_module=False,
                verbose=os.environ.get("EBM_FAST_VERBOSE_BUILD") == "1",
            )
    except BuildWaitTimeout as exc:
        return False, str(exc)
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
