"""How an op reaches its kernel: one route for every op, on every backend.

    ops/<op>.py  <op>(...)            the public function: validates and normalises its arguments
    run_op(registered op, impl, ...)  the registered custom op under torch.compile, else impl
    ops/<op>.py  <op>_impl(...)       allocates the outputs, makes the inputs contiguous
    kernel_for(op, tensor)(...)       the backend's ``<op>_out`` serving the tensor

Every backend implements each op of :data:`OPS` as ``<op>_out``, with the same parameters
(names and order): the contiguous tensors it writes first, then the op's normalised inputs
(contiguous tensors, validated parameters). Callers pass them by keyword. Where they are:

* reference: ``ebm_fast/reference/<op>.py`` (pure torch, any device; the spec)
* cpu:       ``ebm_fast/csrc/<op>.cpp``, the C++ op ``torch.ops.ebm_fast_cpu.<op>_out``
* triton:    ``ebm_fast/kernels/triton/<op>.py`` (imported on first use: it imports triton)
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import torch

from ebm_fast import _cpp
from ebm_fast.backends import backend_for, forced_backend

OPS = ("buffer_push", "buffer_sample", "langevin_update", "mala_accept", "philox")
PYTHON_BACKEND_PACKAGES = {"reference": "ebm_fast.reference", "triton": "ebm_fast.kernels.triton"}


def _cpp_entry(op: str) -> Callable:
    """The C++ op ``<op>_out`` as a Python function with its schema's parameters, calling the
    overload positionally. Calling the overload itself skips the packet's overload resolution
    (5 us per call instead of 8 on this CPU); passing it keywords would cost 8 us more (torch
    matches them against the schema), a Python function's keywords cost 0.5 us."""
    overload = getattr(_cpp.ops(), f"{op}_out").default
    parameters = ", ".join(argument.name for argument in overload._schema.arguments)
    namespace = {"overload": overload}
    exec(f"def {op}_out({parameters}):\n    overload({parameters})\n", namespace)
    return namespace[f"{op}_out"]


@functools.cache
def kernels(backend: str) -> dict[str, Callable]:
    """``backend``'s table: each op of :data:`OPS` -> its ``<op>_out``. Raises if the C++
    extension is unavailable (backend "cpu") or triton is not importable ("triton")."""
    if backend == "cpu":
        return {op: _cpp_entry(op) for op in OPS}
    package = PYTHON_BACKEND_PACKAGES[backend]
    return {op: getattr(importlib.import_module(f"{package}.{op}"), f"{op}_out") for op in OPS}


def kernel_for(op: str, tensor: torch.Tensor) -> Callable:
    """The entry point of ``op`` on the backend serving ``tensor`` (the op's main operand: its
    device picks the backend). The Triton kernels compute in float32, so float64 tensors go to
    the reference unless a backend is forced. Callers running many steps on the same tensors
    (the samplers) resolve it once."""
    backend = backend_for(tensor.device)
    if backend == "triton" and tensor.dtype == torch.float64 and forced_backend() is None:
        backend = "reference"
    return kernels(backend)[op]


def run_op(registered_op: Callable, implementation: Callable, **arguments):
    """Run an op on its arguments (by name): torch.compile traces the registered custom op;
    eager calls run the same implementation directly. The custom-op dispatcher costs about 0.1 ms
    of Python per call on a CPU (measured: 100 us against 9 us for a 16-element
    langevin_update), as much as the whole update of a few hundred thousand elements."""
    if torch.compiler.is_compiling():
        return registered_op(**arguments)
    return implementation(**arguments)
