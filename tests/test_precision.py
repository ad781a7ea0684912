"""The precision and layout policy: detection (torch's queries mocked), the choice's rules, its
record, and each bad input's stated behaviour (issue 22)."""

import json
import warnings

import pytest
import torch
from torch import nn

from ebm_fast import precision
from ebm_fast.precision import PrecisionChoice, fast_energy, resolve_precision

EMULATED = "cpu lacks native bf16 (AVX2 only): bf16 would be emulated and 14-20x slower"


@pytest.fixture(autouse=True)
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(precision, "_warned", set())


def mock_cpu(monkeypatch, *, avx512_bf16=False, amx=False, isa="AVX2"):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: isa)


def conv_energy():
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 1)
    )


class ViewEnergy(nn.Module):
    """Flattens a conv output with .view, which a channels-last tensor refuses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.linear = nn.Linear(4 * 8 * 8, 1)

    def forward(self, x):
        h = self.conv(x)
        return self.linear(h.view(h.shape[0], -1))


class NoBF16Energy(nn.Module):
    """An op with no bf16 kernel after a linear layer (autocast makes its input bf16)."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x):
        h = self.linear(x)
        if h.dtype == torch.bfloat16:
            raise RuntimeError("\"my_op\" not implemented for 'BFloat16'")
        return h


def caught(call):
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        result = call()
    return result, [str(w.message) for w in found]


# Detection.


@pytest.mark.parametrize(
    "avx512_bf16, amx, expected",
    [
        (True, False, "cpu has avx512_bf16"),
        (False, True, "cpu has AMX"),
        (True, True, "cpu has avx512_bf16"),
    ],
)
def test_a_cpu_with_bf16_units_gets_bf16_passes(monkeypatch, avx512_bf16, amx, expected):
    mock_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, isa="AVX512")
    choice = resolve_precision("auto", "cpu", torch.float32)
    assert choice.autocast_dtype == torch.bfloat16
    assert choice.reason.startswith(f"bf16: {expected}")


def test_a_cpu_without_bf16_units_stays_fp32_and_says_why(monkeypatch):
    mock_cpu(monkeypatch)
    choice, messages = caught(lambda: resolve_precision("auto", "cpu", torch.float32))
    assert choice.autocast_dtype is None and messages == []
    assert choice.reason.startswith(f"fp32: {EMULATED}")


def test_a_torch_without_the_queries_reads_the_cpu_flags(monkeypatch):
    from ebm_fast import _cpp

    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_cpu_support_amx_tile"):
        monkeypatch.delattr(torch.cpu, name, raising=False)
    monkeypatch.setattr(_cpp, "_cpu_features", lambda: "avx2 avx512f fma")
    assert precision.native_bf16(torch.device("cpu"))[0] is False
    monkeypatch.setattr(_cpp, "_cpu_features", lambda: "amx_bf16 amx_tile avx2 avx512f")
    assert precision.native_bf16(torch.device("cpu")) == (True, "cpu has AMX")


def test_the_older_amx_query_name_is_read(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_cpu_support_amx_tile", lambda: True, raising=False)
    assert precision.cpu_has("AMX")


@pytest.mark.parametrize(
    "capability, autocast", [((8, 0), torch.bfloat16), ((9, 0), torch.bfloat16), ((7, 5), None)]
)
def test_cuda_gets_bf16_from_compute_capability_8_0(monkeypatch, capability, autocast):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    choice = resolve_precision("auto", "cuda", torch.float32)
    assert choice.autocast_dtype == autocast
    assert f"cuda capability {capability[0]}.{capability[1]}" in choice.reason


def test_the_capability_line_names_what_the_policy_reads(monkeypatch):
    mock_cpu(monkeypatch, amx=True, isa="AVX512")
    line = precision.capability_line("cpu")
    assert line.startswith("cpu: ") and "AVX512" in line
    assert "avx512_bf16 no" in line and "AMX yes" in line and "threads" in line


# The choice's rules.


def test_explicit_policies_and_the_samplers_autocast_dtypes(monkeypatch):
    mock_cpu(monkeypatch, avx512_bf16=True)
    for policy, name, autocast in [
        ("fp32", "fp32", None),
        (None, "fp32", None),
        (torch.float32, "fp32", None),
        ("bf16", "bf16", torch.bfloat16),
        (torch.bfloat16, "bf16", torch.bfloat16),
        ("fp16", "fp16", torch.float16),
        (torch.float16, "fp16", torch.float16),
    ]:
        choice = resolve_precision(policy, "cpu", torch.float32)
        assert (choice.policy, choice.autocast_dtype) == (name, autocast), policy


def test_a_bad_policy_or_layout_is_refused_by_name():
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision("bf32", "cpu", torch.float32)
    with pytest.raises(TypeError, match="precision must be one of"):
        resolve_precision(16, "cpu", torch.float32)
    with pytest.raises(TypeError, match="precision must be one of"):
        resolve_precision(torch.int8, "cpu", torch.float32)
    with pytest.raises(ValueError, match="layout must be one of"):
        resolve_precision("auto", "cpu", torch.float32, layout="nhwc")
    with pytest.raises(ValueError, match="needs 4-D states"):
        resolve_precision("auto", "cpu", torch.float32, state_dim=2, layout="channels_last")
    with pytest.raises(TypeError, match="state_dtype"):
        resolve_precision("auto", "cpu", torch.int64)


def test_channels_last_for_4d_states_with_a_conv_energy_on_a_cpu(monkeypatch):
    mock_cpu(monkeypatch)
    conv, mlp = conv_energy(), nn.Sequential(nn.Flatten(), nn.Linear(192, 1))

    def layout(**options):
        options = {
            "state_dim": 4,
            "energy": conv,
            "device": "cpu",
            "state_dtype": torch.float32,
        } | options
        return resolve_precision("auto", **options).channels_last

    assert layout()
    assert not layout(state_dim=2)
    assert not layout(energy=mlp) and not layout(energy=lambda x: x.sum((1, 2, 3)))
    assert not layout(state_dtype=torch.float64)
    assert not layout(energy=nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4)))
    assert resolve_precision("fp32", "cpu", torch.float32, state_dim=4, energy=conv).channels_last
    assert not resolve_precision(
        "auto", "cpu", torch.float32, state_dim=4, energy=conv, layout="contiguous"
    ).channels_last
    assert resolve_precision(
        "auto", "cpu", torch.float32, state_dim=4, energy=mlp, layout="channels_last"
    ).channels_last


def test_channels_last_on_cuda_only_under_autocast(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_precision(
        "auto", "cuda", torch.float32, state_dim=4, energy=conv_energy()
    ).channels_last
    assert not resolve_precision(
        "fp32", "cuda", torch.float32, state_dim=4, energy=conv_energy()
    ).channels_last


def test_the_choice_is_recorded_and_read_back_exactly(monkeypatch):
    mock_cpu(monkeypatch, avx512_bf16=True)
    for policy in ("auto", "fp32", "fp16"):
        choice = resolve_precision(policy, "cpu", torch.float32, state_dim=4, energy=conv_energy())
        record = json.loads(json.dumps(choice.to_dict()))
        assert PrecisionChoice.from_dict(record) == choice


@pytest.mark.parametrize(
    "change, message",
    [
        ({"autocast": "int8"}, "autocast must be one of"),
        ({"policy": "fast"}, "policy must be one of"),
        ({"channels_last": "yes"}, "channels_last must be a bool"),
        ({"extra": 1}, "not a precision choice"),
    ],
)
def test_a_damaged_record_is_refused_naming_the_field(change, message):
    record = resolve_precision("fp32", "cpu", torch.float32).to_dict() | change
    with pytest.raises(ValueError, match=message):
        PrecisionChoice.from_dict(record)


# Bad input: each with its stated behaviour.


def test_the_warning_names_the_users_line_also_through_a_sampler(monkeypatch):
    from ebm_fast import LangevinSampler

    mock_cpu(monkeypatch)
    sampler = LangevinSampler(
        lambda x: x.square().sum(1), autocast=torch.bfloat16, step_size=0.1, n_steps=1
    )
    with warnings.catch_warnings(record=True) as found:
        warnings.simplefilter("always")
        sampler.sample(torch.zeros(2, 2))
    (warning,) = [w for w in found if "precision 'bf16'" in str(w.message)]
    assert warning.filename == __file__


def test_a_float64_state_keeps_float64_passes(monkeypatch):
    mock_cpu(monkeypatch, avx512_bf16=True)
    choice, messages = caught(lambda: resolve_precision("auto", "cpu", torch.float64))
    assert choice.autocast_dtype is None and messages == []
    assert "float64 state: passes stay float64" in choice.reason
    # Asked explicitly for bf16: the same choice, and one warning (autocast would not cast).
    for _ in range(2):
        choice, messages = caught(lambda: resolve_precision("bf16", "cpu", torch.float64))
        assert choice.autocast_dtype is None
    assert precision._warned == {
        "precision 'bf16' asked for float64 states: autocast casts only float32, so the "
        "passes stay float64"
    }


def test_explicit_bf16_on_an_emulating_cpu_runs_bf16_with_one_warning(monkeypatch):
    mock_cpu(monkeypatch)
    choice, first = caught(lambda: resolve_precision("bf16", "cpu", torch.float32))
    _, second = caught(lambda: resolve_precision("bf16", "cpu", torch.float32))
    assert choice.autocast_dtype == torch.bfloat16
    assert len(first) == 1 and EMULATED in first[0] and "'auto' picks fp32" in first[0]
    assert second == []


def test_fast_energy_converts_the_model_and_keeps_its_energies(monkeypatch):
    mock_cpu(monkeypatch)
    torch.manual_seed(0)
    energy, x = conv_energy(), torch.randn(5, 3, 8, 8)
    expected = energy(x)
    choice = resolve_precision("auto", "cpu", torch.float32, state_dim=4, energy=energy)
    (converted, kept), messages = caught(lambda: fast_energy(energy, choice, x[:2]))
    assert converted is energy and kept == choice and messages == []
    assert energy[0].weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(energy(x.contiguous(memory_format=kept.memory_format)), expected)


def test_the_trial_pass_changes_no_batch_norm_statistics(monkeypatch):
    mock_cpu(monkeypatch)
    energy = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(1))
    energy(torch.randn(4, 3, 8, 8))  # materialises the lazy layer, moves the statistics once
    before = energy[1].running_mean.clone()
    choice = resolve_precision("auto", "cpu", torch.float32, state_dim=4, energy=energy)
    fast_energy(energy, choice, torch.randn(2, 3, 8, 8) + 5)
    assert torch.equal(energy[1].running_mean, before) and energy.training


@pytest.mark.parametrize(
    "model",
    [ViewEnergy, lambda: nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv3d(1, 1, 1))],
    ids=["view of a conv output", "a 5-D weight"],
)
def test_a_model_that_refuses_channels_last_keeps_its_layout_with_one_warning(monkeypatch, model):
    mock_cpu(monkeypatch)
    energy = model()
    choice = resolve_precision("auto", "cpu", torch.float32, state_dim=4, energy=energy)
    assert choice.channels_last
    example = torch.randn(2, 3, 8, 8) if isinstance(energy, ViewEnergy) else None
    (_, kept), messages = caught(lambda: fast_energy(energy, choice, example))
    assert not kept.channels_last and kept.memory_format == torch.contiguous_format
    assert len(messages) == 1 and f"{type(energy).__name__} refuses channels-last" in messages[0]
    assert "refuses channels-last" in kept.reason
    assert all(p.is_contiguous() for p in energy.parameters())
    _, again = caught(lambda: fast_energy(energy, choice, example))
    assert again == []


def test_an_energy_with_an_op_without_bf16_runs_in_fp32_with_one_warning(monkeypatch):
    mock_cpu(monkeypatch, avx512_bf16=True)
    energy = NoBF16Energy()
    choice = resolve_precision("auto", "cpu", torch.float32, state_dim=2, energy=energy)
    assert choice.autocast_dtype == torch.bfloat16
    (_, kept), messages = caught(lambda: fast_energy(energy, choice, torch.randn(2, 2)))
    assert kept.autocast_dtype is None
    assert len(messages) == 1 and "NoBF16Energy refuses bfloat16 autocast" in messages[0]
    assert "not implemented for 'BFloat16'" in messages[0]


def test_an_energy_that_fails_as_written_raises_its_own_error(monkeypatch):
    mock_cpu(monkeypatch)
    energy = conv_energy()
    choice = resolve_precision("auto", "cpu", torch.float32, state_dim=4, energy=energy)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        fast_energy(energy, choice, torch.randn(2, 3, 9, 9))


def test_fast_energy_refuses_what_is_not_a_choice():
    with pytest.raises(TypeError, match="PrecisionChoice"):
        fast_energy(conv_energy(), "auto")
