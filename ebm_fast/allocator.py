"""Keep freed CPU memory in the process instead of returning it to the OS (glibc malloc).

A sampling loop allocates and frees the same activation-sized blocks at every step. With glibc's
default settings, freed blocks above the mmap threshold (128 KiB, raised adaptively up to
32 MiB) are unmapped, and a free top of the heap above the trim threshold is returned to the OS;
the next step then page-faults the memory back in, zero-filled. Measured on the 2-core Xeon VM
(torch 2.13 CPU, one thread): a 50-step chain of a 2-128-128-1 MLP at 8192 chains took 11,000 to
30,000 minor page faults per call, whichever loop ran it (plain, ebm_fast or bare gradients), and
none after :func:`retain_freed_cpu_memory`. Which loop pays depends on the heap's history, so
without it timings of identical work move by 10-30% between runs.

This changes the whole process's allocator and cannot be undone; it holds on to up to
``trim_threshold`` bytes of freed memory. ``ebm-fast demo`` and ``benchmarks/bench_sampler.py``
call it (for every loop they time alike) unless given ``--default-malloc``. Setting the
environment variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` before Python
starts, or running with jemalloc / tcmalloc, has the same effect.
"""

from __future__ import annotations

import ctypes
import ctypes.util

from ebm_fast import validation

__all__ = ["retain_freed_cpu_memory"]

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def retain_freed_cpu_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30) -> bool:
    """Serve blocks below ``mmap_threshold`` bytes from the heap and keep up to
    ``trim_threshold`` bytes of freed heap; returns whether glibc accepted both settings (False
    on other C libraries, where nothing is changed)."""
    mmap_threshold = validation.integer(mmap_threshold, "mmap_threshold", low=1, high=2**31)
    trim_threshold = validation.integer(trim_threshold, "trim_threshold", low=1, high=2**31)
    path = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(path)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):  # not glibc (or no C library found)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # The trim threshold first: it alone stops returning the heap top, whatever mmap accepts.
    trimmed = mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    return trimmed and mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
