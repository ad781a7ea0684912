"""Shared test utilities: which kernel backends to hold to the reference, and the tolerance rule."""

from __future__ import annotations

import pytest
import torch

from ebm_fast.backends import unavailable_reason


def kernel_device(backend: str) -> torch.device:
    """Where a backend's kernels run in this test session (Triton: CUDA, or CPU interpreted)."""
    if backend == "triton" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def kernel_backends() -> list:
    """pytest params for every non-reference backend, skipped with the reason when missing."""
    params = []
    for name in ("cpu", "triton"):
        reason = unavailable_reason(name)
        marks = [pytest.mark.skip(reason=f"{name} backend unavailable: {reason}")] if reason else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def assert_within_eager_error(
    actual: torch.Tensor,
    eager: torch.Tensor,
    exact: torch.Tensor,
    *,
    factor: float = 2.0,
    atol: float = 0.0,
) -> None:
    """flash-attention's rule: max |kernel - exact| <= factor * max |eager - exact| + atol.

    ``exact`` is the reference evaluated in float64, ``eager`` the same expression evaluated the
    plain way in the kernel's precision. atol covers the case where eager happens to be exact.
    """
    exact = exact.double().cpu()
    kernel_error = (actual.double().cpu() - exact).abs().max().item()
    eager_error = (eager.double().cpu() - exact).abs().max().item()
    assert kernel_error <= factor * eager_error + atol, (
        f"kernel error {kernel_error:.3e} > {factor} x eager error {eager_error:.3e} + {atol:.1e}"
    )


def counter(value: int, device=None) -> torch.Tensor:
    """A seed (< 2**64) or step as the ops pass it to kernels: a 0-dim int64 tensor holding its
    bits (seeds >= 2**63 as two's complement)."""
    return torch.tensor(
        value - (1 << 64) if value >= 1 << 63 else value, dtype=torch.int64, device=device
    )


# Lowers Triton kernels to PTX for an H100 (sm_90) without a GPU: the interpreter runs only the
# Python semantics; compiling catches types, casts and constexpr branches that do not lower.
# The script runs in a subprocess (the interpreter must be off there) with this prelude.
_SM90_PRELUDE = r"""
import json, re, triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_ptx(kernel, types, constexprs, aligned=(), options=None):
    '''PTX of kernel: types maps pointer/float argument names to Triton types (other runtime
    arguments are i32), constexprs the constexpr values, aligned the 16-byte aligned ones.'''
    names = kernel.arg_names
    signature = {name: types.get(name, "constexpr" if name in constexprs else "i32")
                 for name in names}
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in aligned}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]

def vector_counts(text):
    return {"v4_loads": len(re.findall(r"ld\.global(\.[a-z]+)*\.v4", text)),
            "v4_stores": len(re.findall(r"st\.global(\.[a-z]+)*\.v4", text))}
"""


def compile_for_sm90(script: str):
    """Run ``script`` (which may call compile_ptx / vector_counts and must print one JSON line
    last) with Triton compiling for sm_90; returns the parsed JSON. Skips where it cannot run."""
    import json
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("the GPU runs the kernels themselves")
    reason = unavailable_reason("triton")
    if reason is not None:
        pytest.skip(f"triton backend unavailable: {reason}")
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("triton ships no ptxas here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # Triton's default; silences 3.9's warning about it
    done = subprocess.run(
        [sys.executable, "-c", _SM90_PRELUDE + script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def examples(n: int):
    """@settings for a property that runs n examples under the dev profile, scaled with the
    loaded profile (ci: 4n, thorough: 40n; see conftest.py)."""
    from hypothesis import settings

    scale = settings.default.max_examples / settings.get_profile("dev").max_examples
    return settings(max_examples=max(1, round(n * scale)))
