"""autocast=: only the energy's passes run in bfloat16/float16; the chain state, its noise and
update, MALA's accept ratio and the training losses' averages stay in float32.

(LangevinSampler's trajectory under autocast is pinned in tests/samplers/test_statistics.py.)
"""

import json

import pytest
import torch

from ebm_fast import LangevinSampler, MALASampler, ReplayBuffer, cli, precision
from ebm_fast.training import JEM, LogitsEnergy
from ebm_fast.training.losses import ContrastiveDivergence, KLPersistentML, PersistentML

LOW = [torch.bfloat16, torch.float16]


def model_2d(hidden=32):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(2, hidden), torch.nn.SiLU(), torch.nn.Linear(hidden, 1)
    )


def autocast_by_hand(model, dtype):
    """The energy as the sampler's autocast is specified to evaluate it: the model under
    torch.autocast, its energies cast to float32 before anything else reads them."""

    def energy(x):
        with torch.autocast("cpu", dtype=dtype, cache_enabled=False):
            value = model(x)
        return value.float()

    return energy


def x_start(chains=64):
    return torch.randn(chains, 2, generator=torch.Generator().manual_seed(1))


def assert_not_on_low_grid(x, x0, dtype):
    """Each chain moved by far less than the low dtype's spacing near |x| ~ 1 (2**-8 for
    bfloat16, 2**-11 for float16), and the state is not a grid point of that dtype: a state
    rounded to it between steps could not hold these values."""
    moved = (x - x0).abs()
    assert moved.max() < 1e-3 and (moved > 0).float().mean() > 0.9
    assert (x.to(dtype).float() != x).float().mean() > 0.9


@pytest.mark.parametrize("dtype", LOW)
def test_mala_under_autocast_is_mala_on_the_low_precision_energy_cast_to_float32(dtype):
    """The accept ratio reads float32 energies: MALA with autocast= takes exactly the path of
    MALA on the hand-autocast energy returning float32 (an accept ratio in the low dtype would
    differ), and with steps below the low dtype's spacing the state stays off its grid."""
    model, x0 = model_2d(), x_start()
    for eps in (0.05, 1e-10):  # a working step size, and steps far below the grid spacing
        got, info = MALASampler(
            model, step_size=eps, n_steps=8, seed=3, autocast=dtype, backend="reference"
        ).sample(x0, return_info=True)
        want, want_info = MALASampler(
            autocast_by_hand(model, dtype), step_size=eps, n_steps=8, seed=3, backend="reference"
        ).sample(x0, return_info=True)
        assert got.dtype == torch.float32 and info.final_energy.dtype == torch.float32
        assert torch.equal(got, want) and torch.equal(info.accept_rate, want_info.accept_rate)
    assert info.accept_rate.min() > 0.9  # 1e-10 steps: nearly every proposal is accepted
    assert_not_on_low_grid(got, x0, dtype)


def twin_losses(loss_cls, dtype):
    """Two identical losses (same model, seeds, buffers), one sampling under autocast=dtype."""
    made = []
    for autocast in (dtype, None):
        model = model_2d()
        sampler = LangevinSampler(
            model,
            step_size=1e-7,
            noise_scale=1e-7,
            n_steps=3,
            seed=4,
            autocast=autocast,
            backend="reference",
        )
        if loss_cls is ContrastiveDivergence:
            made.append(ContrastiveDivergence(sampler, k=3, alpha=0.1))
            continue
        buffer = ReplayBuffer(32, (2,), init_range=(-2.0, 2.0), reinit_prob=0.0, seed=7)
        made.append(loss_cls(sampler, buffer, alpha=0.1))
    return made


@pytest.mark.parametrize("loss_cls", [ContrastiveDivergence, PersistentML, KLPersistentML])
def test_losses_run_their_energy_passes_under_the_samplers_autocast(loss_cls):
    """The loss's energies are the autocast model's, cast to float32: the loss and its parameter
    gradients equal the hand-built ones; the negatives (and the buffer's states) stay float32
    off bfloat16's grid."""
    dtype = torch.bfloat16
    loss, _ = twin_losses(loss_cls, dtype)
    seen = []
    loss.energy[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x_pos = x_start(16)
    value = loss(x_pos)
    assert value.dtype == torch.float32 and set(seen) == {dtype}
    x_neg = loss.last.negatives
    assert x_neg.dtype == torch.float32
    start = x_pos if loss_cls is ContrastiveDivergence else None
    if start is not None:
        assert_not_on_low_grid(x_neg, start, dtype)
    else:
        assert (x_neg.to(dtype).float() != x_neg).float().mean() > 0.9  # from float32 noise
    grads = torch.autograd.grad(value, loss.parameters)

    energy = autocast_by_hand(loss.energy, dtype)
    e_pos, e_neg = energy(x_pos).reshape(-1), energy(x_neg).reshape(-1)
    want = e_pos.mean() - e_neg.mean() + 0.1 * ((e_pos**2).mean() + (e_neg**2).mean())
    if loss_cls is not KLPersistentML:  # its KL term adds to the surrogate
        torch.testing.assert_close(value, want, rtol=0, atol=0)
        want_grads = torch.autograd.grad(want, loss.parameters)
        for got_grad, want_grad in zip(grads, want_grads):
            assert got_grad.dtype == torch.float32
            torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)
    else:
        assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)


def test_jem_runs_its_classifier_passes_under_the_samplers_autocast():
    """All three JEM terms on: the classifier's passes (positives' logits, both kinds of
    negatives) run in bfloat16, their logits cast to float32: the loss and its gradients equal
    the hand-built loss on the hand-autocast classifier; the negatives stay float32."""
    dtype, n_classes = torch.bfloat16, 3
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(
        torch.nn.Linear(2, 32), torch.nn.SiLU(), torch.nn.Linear(32, n_classes)
    )
    sampler = LangevinSampler(
        LogitsEnergy(classifier),
        step_size=1e-7,
        noise_scale=1e-7,
        n_steps=3,
        seed=4,
        autocast=dtype,
        backend="reference",
    )
    buffer = ReplayBuffer(
        8 * n_classes, (2,), init_range=(-2.0, 2.0), reinit_prob=0.0, n_classes=n_classes, seed=7
    )
    loss = JEM(
        classifier, sampler, buffer, p_x_weight=1.0, p_y_given_x_weight=1.0, p_x_y_weight=1.0
    )
    seen = []
    classifier[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x_pos, y = x_start(12), torch.arange(12) % n_classes
    value = loss(x_pos, y)
    assert value.dtype == torch.float32 and set(seen) == {dtype}
    x_neg, x_neg_y = loss.last.negatives, loss.last.conditional_negatives
    assert x_neg.dtype == x_neg_y.dtype == torch.float32
    for negatives in (x_neg, x_neg_y):  # the buffer's float32 uniform draws, barely moved
        assert (negatives.to(dtype).float() != negatives).float().mean() > 0.9
    grads = torch.autograd.grad(value, loss.parameters)

    logits = autocast_by_hand(classifier, dtype)
    logits_pos, logits_neg, logits_neg_y = logits(x_pos), logits(x_neg), logits(x_neg_y)
    assert logits_pos.dtype == torch.float32
    rows = torch.arange(12)
    want = (
        -logits_pos.logsumexp(1).mean()
        + logits_neg.logsumexp(1).mean()
        + torch.nn.functional.cross_entropy(logits_pos, y)
        + (-logits_pos[rows, y].mean() + logits_neg_y[rows, y].mean())
    )
    torch.testing.assert_close(value, want, rtol=0, atol=0)
    want_grads = torch.autograd.grad(want, loss.parameters)
    for got_grad, want_grad in zip(grads, want_grads):
        assert got_grad.dtype == torch.float32
        torch.testing.assert_close(got_grad, want_grad, rtol=0, atol=0)


@pytest.mark.parametrize("loss_cls", [ContrastiveDivergence, PersistentML])
def test_loss_under_autocast_stays_close_to_the_full_precision_loss(loss_cls):
    low, full = twin_losses(loss_cls, torch.bfloat16)
    x_pos = x_start(16)
    low_value, full_value = low(x_pos), full(x_pos)
    torch.testing.assert_close(low.last.negatives, full.last.negatives, rtol=0, atol=1e-5)
    torch.testing.assert_close(low_value, full_value, rtol=0.02, atol=0.02)


def test_train_command_takes_precision_and_saves_it(tmp_path):
    out = tmp_path / "run"
    assert (
        cli.main(
            [
                "train",
                "--data",
                "ring",
                "--out",
                str(out),
                "--precision",
                "bf16",
                "--iterations",
                "2",
                "--log-every",
                "2",
                "--plot-every",
                "2",
                "--checkpoint-every",
                "2",
                "--steps",
                "2",
                "--batch",
                "16",
                "--n-data",
                "200",
                "--hidden",
                "8",
                "--buffer-size",
                "64",
            ]
        )
        == 0
    )
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    assert cli.main(["train", "--resume", str(out), "--iterations", "3"]) == 0
    # A run saved before --precision replaced --autocast resumes with what it used.
    config = json.loads((out / "config.json").read_text())
    config["autocast"] = "bf16"
    del config["precision"]
    (out / "config.json").write_text(json.dumps(config))
    assert cli.main(["train", "--resume", str(out), "--iterations", "4"]) == 0
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_autocast_auto_picks_bf16_only_where_native_and_reports_it(monkeypatch, native):
    """autocast="auto": the passes run in bf16 on a CPU with bf16 units (the chains' samples
    are then those of autocast=torch.bfloat16), in float32 elsewhere (those of autocast=None);
    sample info names the choice and why."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    energy = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    auto = LangevinSampler(energy, step_size=0.01, n_steps=4, seed=1, autocast="auto")
    samples, info = auto.sample(x0, return_info=True)
    explicit = LangevinSampler(
        energy, step_size=0.01, n_steps=4, seed=1, autocast=torch.bfloat16 if native else None
    )
    assert torch.equal(samples, explicit.sample(x0))
    assert info.precision.autocast_dtype == (torch.bfloat16 if native else None)
    assert ("avx512_bf16" in info.precision.reason) == native
    # The loss's passes follow the same choice.
    assert auto.energies(x0).dtype == torch.float32
    torch.testing.assert_close(auto.energies(x0), explicit.energies(x0), rtol=0, atol=0)


def test_a_resumed_auto_sampler_keeps_the_recorded_precision(monkeypatch):
    """The choice "auto" made is in state_dict; a sampler resumed from it on a machine that
    would pick otherwise runs the recorded dtype (reproducible resume), and says so."""
    energy = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.SiLU(), torch.nn.Linear(16, 1))
    x0 = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    first = LangevinSampler(energy, step_size=0.01, n_steps=4, seed=1, autocast="auto")
    first.sample(x0)
    state = first.state_dict()
    assert state["precision"]["autocast"] == "bfloat16"
    expected = first.sample(x0)

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(precision, "_warned", set())  # each warning is given once per process
    resumed = LangevinSampler(energy, step_size=0.01, n_steps=4, seed=1, autocast="auto")
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match="emulated"):
        samples, info = resumed.sample(x0, return_info=True)
    assert torch.equal(samples, expected)
    assert info.precision.autocast_dtype == torch.bfloat16
    assert "recorded" in info.precision.reason
    # Without a record (or with an explicit autocast), the machine's own choice.
    fresh = LangevinSampler(energy, step_size=0.01, n_steps=4, seed=1, autocast="auto")
    assert fresh.sample(x0, return_info=True)[1].precision.autocast_dtype is None
