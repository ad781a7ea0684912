"""LangevinSampler / MALASampler: the noise-spec contract, invariances (chunking, resume,
chain_offset, schedules), parameter safety, diagnostics, non-finite detection, bad input, and the
compile / CUDA-graph fallbacks. Statistics on known densities: tests/samplers/test_stationary.py."""

import math
import warnings

import pytest
import torch

import ebm_fast
from ebm_fast import LangevinSampler, MALASampler
from ebm_fast.reference.langevin_update import langevin_update_ref
from ebm_fast.samplers import NonFiniteChainError, SampleInfo, base as sampler_base, linear_schedule
from tests.helpers import kernel_backends, kernel_device

SAMPLERS = [pytest.param(LangevinSampler, id="langevin"), pytest.param(MALASampler, id="mala")]


def quadratic(x):
    """E = |x|^2 / 2 per chain: elementwise, so every batch size computes each chain identically."""
    return 0.5 * (x * x).reshape(x.shape[0], -1).sum(1)


def double_well(x):
    return ((x * x - 1.0) ** 2).reshape(x.shape[0], -1).sum(1)


def mlp(d=3, hidden=16, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
    )


def x_init(shape=(10, 3), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_first_updates_follow_the_noise_spec_and_the_counter_continues_across_calls():
    x0 = x_init()
    sampler = LangevinSampler(double_well, step_size=0.05, noise_scale=0.3, seed=11, n_steps=1)
    expected = x0
    for step in range(3):  # a fresh sampler uses steps 0, 1, 2, ... for successive updates
        x_var = expected.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(double_well(x_var).sum(), x_var)
        expected = langevin_update_ref(
            expected, grad, torch.tensor(0.05), torch.tensor(0.3), seed=11, step=step
        )
        x0 = sampler.sample(x0)
        torch.testing.assert_close(x0, expected, rtol=1e-6, atol=1e-6)
    assert sampler.step == 3


def test_temperature_means_sigma_sqrt_2_eps_t_and_default_is_t_1():
    x0 = x_init()
    eps, temp = 0.03, 0.7
    by_t = LangevinSampler(double_well, step_size=eps, temperature=temp, n_steps=5, seed=0).sample(
        x0
    )
    by_sigma = LangevinSampler(
        double_well, step_size=eps, noise_scale=math.sqrt(2 * eps * temp), n_steps=5, seed=0
    ).sample(x0)
    torch.testing.assert_close(by_t, by_sigma, rtol=1e-6, atol=1e-6)
    default = LangevinSampler(double_well, step_size=eps, n_steps=5, seed=0).sample(x0)
    t_one = LangevinSampler(double_well, step_size=eps, temperature=1.0, n_steps=5, seed=0).sample(
        x0
    )
    assert torch.equal(default, t_one)
    assert not torch.allclose(default, by_t)


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_changed_parameters_and_dtypes_take_effect_on_the_next_call(sampler_cls):
    """A sampler keeps the tables of its number parameters between calls: setting a parameter,
    or chains of another dtype, must not reuse the old ones."""
    x0 = x_init()
    sampler = sampler_cls(double_well, step_size=0.05, n_steps=3, seed=2)
    sampler.sample(x0)
    sampler.step_size = 0.02
    sampler.temperature = 0.5
    changed = sampler.sample(x0)
    fresh = sampler_cls(double_well, step_size=0.02, temperature=0.5, n_steps=3, seed=2)
    fresh.load_state_dict({"step": 3, "seed": 2})
    assert torch.equal(changed, fresh.sample(x0))
    in_float64 = sampler.sample(x0.double())
    assert in_float64.dtype == torch.float64
    fresh.load_state_dict({"step": 6, "seed": 2})
    torch.testing.assert_close(in_float64, fresh.sample(x0.double()))


@pytest.mark.parametrize("backend", kernel_backends())
def test_whole_trajectories_agree_with_the_reference_backend(backend):
    device = kernel_device(backend)
    x0 = x_init((5, 3)).to(device)
    options = dict(n_steps=3, seed=21)
    for make in (
        lambda b: LangevinSampler(
            double_well,
            step_size=0.05,
            noise_scale=0.2,
            grad_clip=1.0,
            clamp=(-1.5, 1.5),
            backend=b,
            **options,
        ),
        lambda b: MALASampler(double_well, step_size=0.05, backend=b, **options),
    ):
        reference, ref_info = make("reference").sample(x0, return_info=True)
        got, info = make(backend).sample(x0, return_info=True)
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
        if info.accept_rate is not None:
            assert torch.equal(info.accept_rate, ref_info.accept_rate)


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_chunking_gives_the_unchunked_result_bit_for_bit(sampler_cls):
    x0 = x_init((11, 2, 3))
    eps = torch.linspace(0.005, 0.05, 11)  # per-chain tables are sliced per chunk
    whole, info = sampler_cls(double_well, step_size=eps, n_steps=6, seed=5).sample(
        x0, return_info=True
    )
    chunked, chunked_info = sampler_cls(
        double_well, step_size=eps, n_steps=6, seed=5, chunk_size=4
    ).sample(x0, return_info=True)
    assert torch.equal(whole, chunked)
    for field in (
        "initial_energy",
        "final_energy",
        "mean_grad_norm",
        "displacement",
        "accept_rate",
        "step_size",
    ):
        a, b = getattr(info, field), getattr(chunked_info, field)
        assert (a is None and b is None) or torch.equal(a, b), field


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_a_strided_per_chain_step_size_gives_the_contiguous_result(sampler_cls):
    x0 = x_init((6, 3))
    strided = torch.linspace(0.05, 0.3, 12)[::2]
    assert not strided.is_contiguous()

    def run(eps):
        return sampler_cls(quadratic, step_size=eps, n_steps=4, seed=2).sample(x0)

    assert torch.equal(run(strided), run(strided.contiguous()))


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_chain_offset_and_per_chain_step_size_select_one_chain_of_the_batch(sampler_cls):
    x0 = x_init((7, 3))
    eps = torch.linspace(0.005, 0.05, 7)
    batch = sampler_cls(double_well, step_size=eps, n_steps=5, seed=3).sample(x0)
    alone = sampler_cls(
        double_well, step_size=float(eps[4]), n_steps=5, seed=3, chain_offset=4
    ).sample(x0[4:5])
    assert torch.equal(batch[4:5], alone)


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_resume_continues_the_same_trajectories(sampler_cls, tmp_path):
    x0 = x_init()
    straight = sampler_cls(double_well, step_size=0.02, n_steps=8, seed=9).sample(x0)
    first = sampler_cls(double_well, step_size=0.02, n_steps=8, seed=9)
    half = first.sample(x0, 3)
    torch.save(first.state_dict(), tmp_path / "sampler.pt")
    resumed = sampler_cls(double_well, step_size=0.02, n_steps=8, seed=0)  # the seed is restored
    resumed.load_state_dict(torch.load(tmp_path / "sampler.pt", weights_only=True))
    assert resumed.step == 3
    assert torch.equal(resumed.sample(half, 5), straight)


def test_a_schedule_equals_one_call_per_step_with_that_step_size():
    x0 = x_init()
    schedule = linear_schedule(0.2, 0.02)
    scheduled = LangevinSampler(double_well, step_size=schedule, n_steps=4, seed=2).sample(x0)
    stepwise = LangevinSampler(double_well, step_size=1.0, seed=2)
    x = x0
    for k in range(4):
        x = stepwise.sample(x, 1, step_size=schedule(k, 4))
    assert torch.equal(scheduled, x)


def test_annealed_noise_scale_schedule_ends_at_gradient_descent():
    x0 = x_init()
    sigmas = [0.5, 0.25, 0.0]

    def schedule(k, n_steps):
        return sigmas[k]

    annealed = LangevinSampler(
        quadratic, step_size=0.1, noise_scale=schedule, n_steps=3, seed=4
    ).sample(x0)
    first_two = LangevinSampler(
        quadratic, step_size=0.1, noise_scale=schedule, n_steps=2, seed=4
    ).sample(x0)
    # The last step has sigma = 0: an exact gradient-descent step on E = |x|^2 / 2.
    torch.testing.assert_close(annealed, first_two * 0.9, rtol=0, atol=1e-6)
    assert not torch.allclose(first_two, x0 * 0.81, atol=1e-2)


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_parameters_grads_requires_grad_and_mode_are_left_as_they_were(sampler_cls):
    model = mlp()
    model[0].bias.requires_grad_(False)
    model.train()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    x0 = x_init()
    x0_copy = x0.clone()
    _, info = sampler_cls(model, step_size=0.05, n_steps=4).sample(x0, return_info=True)
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad == flags[name], name
        assert torch.equal(p, before[name]), name
    assert model.training
    assert torch.equal(x0, x0_copy)  # x0 is not modified
    assert isinstance(info, SampleInfo)


def test_requires_grad_is_restored_when_the_energy_raises():
    model = mlp()
    with pytest.raises(RuntimeError, match="energy exploded"):
        LangevinSampler(_RaiseOnCall(model, 3), step_size=0.1, n_steps=5).sample(x_init())
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())


class _RaiseOnCall(torch.nn.Module):
    def __init__(self, inner, fail_at):
        super().__init__()
        self.inner, self.fail_at, self.calls = inner, fail_at, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("energy exploded")
        assert not any(p.requires_grad for p in self.parameters())  # frozen while sampling
        return self.inner(x)


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_info_reports_per_chain_diagnostics(sampler_cls):
    x0 = x_init((6, 4))
    x, info = sampler_cls(double_well, step_size=0.05, n_steps=5).sample(x0, return_info=True)
    torch.testing.assert_close(info.initial_energy, double_well(x0))
    torch.testing.assert_close(info.final_energy, double_well(x))
    torch.testing.assert_close(info.displacement, (x - x0).norm(dim=1))
    assert info.mean_grad_norm.shape == (6,) and bool((info.mean_grad_norm > 0).all())
    assert info.time_s > 0
    if sampler_cls is MALASampler:
        assert info.accept_rate.shape == (6,)
        assert bool(((info.accept_rate >= 0) & (info.accept_rate <= 1)).all())
        torch.testing.assert_close(info.step_size, torch.full((6,), 0.05))
    else:
        assert info.accept_rate is None and info.step_size is None


def test_mean_grad_norm_averages_the_evaluated_gradients():
    x0 = x_init((6, 4))
    # E = |x|^2 / 2 has gradient x: one Langevin step evaluates it at x0 only.
    _, info = LangevinSampler(quadratic, step_size=0.1, n_steps=1, check_finite=False).sample(
        x0, return_info=True
    )
    torch.testing.assert_close(info.mean_grad_norm, x0.norm(dim=1))
    # MALA evaluates the current state before and after its one step.
    x, info = MALASampler(quadratic, step_size=0.1, n_steps=1).sample(x0, return_info=True)
    torch.testing.assert_close(info.mean_grad_norm, (x0.norm(dim=1) + x.norm(dim=1)) / 2)


def test_mala_adaptation_moves_the_step_size_toward_the_target_acceptance():
    x0 = x_init((200, 8))
    too_big = MALASampler(quadratic, step_size=2.5, n_steps=10, seed=1)
    _, before = too_big.sample(x0, return_info=True)
    adapting = MALASampler(
        quadratic, step_size=2.5, n_steps=60, seed=1, adapt=True, adapt_steps=60, adapt_rate=0.2
    )
    _, adapted = adapting.sample(x0, return_info=True)
    _, after = MALASampler(quadratic, step_size=adapted.step_size, n_steps=10, seed=2).sample(
        x0, return_info=True
    )
    assert before.accept_rate.mean() < 0.3
    assert bool((adapted.step_size < 2.5).all())
    assert abs(after.accept_rate.mean().item() - 0.574) < 0.12


def test_non_finite_chains_raise_with_the_step_and_count():
    scale = torch.tensor([1.0, -1e6, 1.0, -1e6, -1e6, 1.0])

    def repulsive_for_some(x):  # x <- x - 0.5 * 2 scale x: 0 for scale 1, 1e6 x for -1e6
        return scale * (x * x).sum(1)

    sampler = LangevinSampler(repulsive_for_some, step_size=0.5, noise_scale=0.0, n_steps=40)
    sampler.sample(torch.zeros(6, 2), 7)  # x = 0 stays finite: the counter moves to step 7
    # x after update k is (1 + 1e6)^k for the repulsed chains: at k = 3 the float32 energy
    # -1e6 * 2e36 overflows, so update 3 of this call (noise step 7 + 2) is named.
    with pytest.raises(
        NonFiniteChainError,
        match=r"3 of 6 chains.*after update 3 of 40 in this "
        r"call \(sampler step 9\)",
    ):
        sampler.sample(torch.ones(6, 2))
    assert sampler.step == 47  # the steps were drawn: a retry does not replay the same noise
    quiet = LangevinSampler(
        repulsive_for_some, step_size=0.5, noise_scale=0.0, n_steps=40, check_finite=False
    )
    x = quiet.sample(torch.ones(6, 2))
    assert (~torch.isfinite(x).all(1)).sum() == 3


@pytest.mark.parametrize("bad_from", [1, 31, 32, 33, 70])
def test_the_first_non_finite_update_is_named_across_fold_boundaries(bad_from):
    evaluations = []

    def energy(x):  # evaluation k is at the state after update k; chain 1 turns infinite
        evaluations.append(None)
        e = (x * x).sum(1)
        if len(evaluations) > bad_from:
            e = e * torch.tensor([1.0, float("inf"), 1.0])
        return e

    sampler = LangevinSampler(energy, step_size=0.1, noise_scale=0.1, n_steps=80)
    message = rf"1 of 3 chains.*after update {bad_from} of 80 "
    with pytest.raises(NonFiniteChainError, match=message):
        sampler.sample(torch.zeros(3, 2))


def test_mala_reports_an_infinite_initial_energy_even_after_leaving_that_state():
    def energy(x):  # infinite only at x[:, 0] == 5 exactly: any proposal leaves it and is accepted
        return (x * x).sum(1) + torch.where(x[:, 0] == 5.0, float("inf"), 0.0)

    x0 = torch.zeros(4, 2)
    x0[2, 0] = 5.0
    sampler = MALASampler(energy, step_size=0.1, n_steps=3, check_finite=False)
    assert bool(torch.isfinite(energy(sampler.sample(x0))).all())  # the chain left the state
    with pytest.raises(NonFiniteChainError, match="1 of 4 chains.*initial state"):
        MALASampler(energy, step_size=0.1, n_steps=3).sample(x0)


@pytest.mark.parametrize("energy_dtype", [torch.float32, torch.float64])
def test_diagnostics_score_each_chains_first_non_finite_step(energy_dtype):
    from ebm_fast.samplers.diagnostics import ChainDiagnostics

    n_steps = 70
    # Around and across the folds of 32 steps; 70 = only the final state is non-finite.
    first = torch.tensor([-1, 0, 31, 32, 45, 64, 69, 70])
    diagnostics = ChainDiagnostics(torch.zeros(8, 2), n_steps, check_finite=True, track=False)
    for k in range(n_steps):
        energy = torch.zeros(8, dtype=energy_dtype)
        energy[(first >= 0) & (first <= k)] = float("nan")  # stays non-finite once it is
        energy[first == k] = float("-inf")
        if k == 40:
            energy[3] = 0.0  # a chain that turns finite again is still reported at its first
        diagnostics.check(energy)
    final = torch.zeros(8, 2)
    final[first >= 0, 1] = float("inf")
    score = diagnostics.finish(final, None)["nonfinite_score"]
    expected = torch.where(first >= 0, n_steps + 1 - first, 0)
    assert score.tolist() == expected.tolist()


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_non_finite_initial_state_is_reported(sampler_cls):
    x0 = x_init((5, 2))
    x0[2, 1] = float("nan")
    with pytest.raises(NonFiniteChainError, match="1 of 5 chains.*initial state"):
        sampler_cls(quadratic, step_size=0.1, n_steps=3).sample(x0)


def test_failed_cuda_graph_capture_warns_once_and_runs_eagerly(monkeypatch):
    class FailingCapture:
        def __init__(self, *args):
            raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(sampler_base, "CudaGraphChain", FailingCapture)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    x0 = x_init()
    eager = LangevinSampler(double_well, step_size=0.02, n_steps=4, cuda_graph=False, seed=0)
    graphed = LangevinSampler(double_well, step_size=0.02, n_steps=4, seed=0)
    monkeypatch.setattr(
        graphed, "_use_cuda_graph", lambda x: not graphed._graph_failed
    )  # as if x were on CUDA
    with pytest.warns(RuntimeWarning, match="CUDA graph capture failed"):
        got = graphed.sample(x0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got_again = graphed.sample(got)
    assert torch.equal(got, eager.sample(x0))
    assert torch.equal(got_again, eager.sample(got))


def test_failed_compilation_warns_and_falls_back_to_the_eager_energy(monkeypatch):
    def broken_compile(fn, **kwargs):
        def compiled(x):
            raise RuntimeError("backend compiler failed")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    x0 = x_init()
    with pytest.warns(RuntimeWarning, match="torch.compile of the energy failed"):
        got = LangevinSampler(double_well, step_size=0.02, n_steps=3, compile=True, seed=0).sample(
            x0
        )
    assert torch.equal(
        got, LangevinSampler(double_well, step_size=0.02, n_steps=3, seed=0).sample(x0)
    )


def test_compiled_energy_gives_the_eager_samples():
    model = mlp(d=2, hidden=8)
    x0 = x_init((16, 2))
    eager = MALASampler(model, step_size=0.05, n_steps=3, seed=0).sample(x0)
    compiled = MALASampler(model, step_size=0.05, n_steps=3, compile=True, seed=0).sample(x0)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_autocast_runs_the_energy_in_low_precision_and_keeps_the_state_float32():
    model = mlp(d=4, hidden=32)
    seen = []
    model[0].register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    x0 = x_init((8, 4))
    full = LangevinSampler(model, step_size=0.1, n_steps=3, seed=0).sample(x0)
    low = LangevinSampler(model, step_size=0.1, n_steps=3, autocast=torch.bfloat16, seed=0).sample(
        x0
    )
    assert seen[:3] == [torch.float32] * 3 and set(seen[3:]) == {torch.bfloat16}
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, full, rtol=0, atol=0.05)


def test_float64_chains_stay_float64():
    x0 = x_init().double()
    x, info = MALASampler(double_well, step_size=0.05, n_steps=3).sample(x0, return_info=True)
    assert x.dtype == torch.float64 and info.final_energy.dtype == torch.float64


def test_public_exports():
    assert ebm_fast.LangevinSampler is LangevinSampler
    assert ebm_fast.MALASampler is MALASampler


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_cuda_graph_replays_give_the_eager_samples(sampler_cls):
    model = mlp(d=3, hidden=16).cuda()
    x0 = x_init((12, 3)).cuda()
    graphed = sampler_cls(model, step_size=0.02, n_steps=5, cuda_graph=True, chunk_size=8, seed=0)
    eager = sampler_cls(model, step_size=0.02, n_steps=5, cuda_graph=False, chunk_size=8, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture would warn
        first, info = graphed.sample(x0, return_info=True)
        second = graphed.sample(first)  # without diagnostics: its own graphs, one per chunk
        with torch.no_grad():
            model[0].bias.add_(0.5)  # in-place parameter updates are seen by the replay
        third = graphed.sample(second)  # replays the second call's graphs
    assert len(graphed._graphs) == 4  # (2 chunks) x (diagnostics on, off): the third captured none
    expected_first, expected_info = eager.sample(x0, return_info=True)
    torch.testing.assert_close(first, expected_first)
    torch.testing.assert_close(info.final_energy, expected_info.final_energy)
    torch.testing.assert_close(second, eager.sample(expected_first))
    torch.testing.assert_close(third, eager.sample(second))
    assert graphed.step == eager.step == 15


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_sampling_does_not_synchronise_on_cuda(sampler_cls, cuda_graph):
    model = mlp(d=3, hidden=16).cuda()
    x0 = x_init((12, 3)).cuda()
    sampler = sampler_cls(
        model, step_size=0.02, n_steps=4, cuda_graph=cuda_graph, check_finite=False
    )  # the non-finite check reads the device once
    step_sizes = (0.02, linear_schedule(0.03, 0.01), torch.full((12,), 0.02, device="cuda"))
    for step_size in step_sizes:  # compile the kernels, capture the graphs, move the counter
        sampler.sample(x0, step_size=step_size)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step_size in step_sizes:
            sampler.sample(x0, step_size=step_size)
    finally:
        torch.cuda.set_sync_debug_mode("default")
