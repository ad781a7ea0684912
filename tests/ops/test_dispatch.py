"""ebm_fast/ops/_dispatch.py: the three backends are laid out alike (one file per op of OPS) and
their ``<op>_out`` entry points take the same parameters, so callers can pass them by keyword."""

import inspect
from pathlib import Path

import pytest

import ebm_fast
from ebm_fast import _cpp
from ebm_fast.backends import _triton_import_error
from ebm_fast.ops._dispatch import OPS, kernels

PACKAGE = Path(ebm_fast.__file__).parent
BACKEND_FOLDERS = {
    "reference": (PACKAGE / "reference", ".py"),
    "triton": (PACKAGE / "kernels" / "triton", ".py"),
    "cpu": (PACKAGE / "csrc", ".cpp"),
}


def _parameters(entry) -> list[str]:
    return list(inspect.signature(entry).parameters)


@pytest.mark.parametrize("backend", BACKEND_FOLDERS)
def test_each_backend_has_one_file_per_op_and_only_helpers_beside_them(backend):
    folder, suffix = BACKEND_FOLDERS[backend]
    names = {path.stem for path in folder.glob(f"*{suffix}") if not path.stem.startswith("_")}
    assert names == set(OPS)


@pytest.mark.parametrize("op", OPS)
def test_every_backend_entry_takes_the_references_parameters(op):
    expected = _parameters(kernels("reference")[op])
    if _triton_import_error() is None:
        assert _parameters(kernels("triton")[op]) == expected
    if _cpp.load_error() is None:
        schema = getattr(_cpp.ops(), f"{op}_out").default._schema
        assert [argument.name for argument in schema.arguments] == expected
        assert _parameters(kernels("cpu")[op]) == expected


@pytest.mark.skipif(_cpp.load_error() is not None, reason="C++ backend unavailable")
def test_the_cpp_entry_passes_keywords_to_the_kernel_in_order():
    import torch

    x = torch.randn(3, 4)
    counters = dict(seed=torch.tensor(5), step=torch.tensor(2), stream=0, chain_offset=0)
    by_keyword, by_position = torch.empty_like(x), torch.empty_like(x)
    kernels("cpu")["langevin_update"](
        grad=-x,
        x=x,
        out=by_keyword,
        step_size=torch.tensor(0.1),
        noise_scale=torch.tensor(0.2),
        grad_clip=None,
        grad_clip_mode="value",
        clamp_lo=-1.0,
        clamp_hi=1.0,
        **counters,
    )
    _cpp.ops().langevin_update_out(
        by_position,
        x,
        -x,
        torch.tensor(0.1),
        torch.tensor(0.2),
        *counters.values(),
        None,
        "value",
        -1.0,
        1.0,
    )
    assert torch.equal(by_keyword, by_position)
