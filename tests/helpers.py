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


def assert_within_eager_error(actual: torch.Tensor, eager: torch.Tensor, exact: torch.Tensor,
                              *, factor: float = 2.0, atol: float = 0.0) -> None:
    """flash-attention's rule: max |kernel - exact| <= factor * max |eager - exact| + atol.

    ``exact`` is the reference evaluated in float64, ``eager`` the same expression evaluated the
    plain way in the kernel's precision. atol covers the case where eager happens to be exact.
    """
    exact = exact.double().cpu()
    kernel_error = (actual.double().cpu() - exact).abs().max().item()
    eager_error = (eager.double().cpu() - exact).abs().max().item()
    assert kernel_error <= factor * eager_error + atol, (
        f"kernel error {kernel_error:.3e} > {factor} x eager error {eager_error:.3e} + {atol:.1e}")
