"""Drop-in conveniences for real EBM code (issue 16): per-call conditioning (y and keyword
arguments, also through CUDA-graph replays), seeds drawn from torch's global generator, energies
given as -E (negate), zero-step calls, 0-dim energies of one chain, and eval mode for the call."""

import pytest
import torch

from ebm_fast import LangevinSampler, MALASampler
from ebm_fast.samplers import base as sampler_base
from ebm_fast.samplers.cuda_graph import CudaGraphChain

SAMPLERS = [pytest.param(LangevinSampler, id="langevin"), pytest.param(MALASampler, id="mala")]
CENTRES = torch.tensor([[-2.0, 0.0, 1.0], [3.0, 1.0, -1.0], [0.0, -3.0, 2.0]])


def class_energy(x, y, *, width=1.0):
    """E(x | y) = |x - centre_y|^2 / (2 width^2): a class-conditional Gaussian."""
    return ((x - CENTRES[y]) ** 2).sum(1) / (2 * width**2)


def x_init(shape=(6, 3), seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


LABELS = torch.tensor([0, 1, 2, 2, 1, 0])


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_y_and_energy_kwargs_reach_the_energy_and_y_is_split_with_the_chunks(sampler_cls):
    x0 = x_init()
    bound = sampler_cls(
        lambda x: class_energy(x, LABELS, width=0.5), step_size=0.05, n_steps=4, seed=3
    ).sample(x0)
    for chunk_size in (None, 4):
        given = sampler_cls(
            class_energy, step_size=0.05, n_steps=4, seed=3, chunk_size=chunk_size
        ).sample(x0, y=LABELS, width=0.5)
        assert torch.equal(given, bound)
    other = sampler_cls(class_energy, step_size=0.05, n_steps=4, seed=3).sample(x0, y=LABELS)
    assert not torch.equal(other, bound)  # width=1.0 by default: the keyword did reach it


def test_y_must_have_one_entry_per_chain():
    sampler = LangevinSampler(class_energy, step_size=0.05, n_steps=2, seed=0)
    for y in (torch.tensor([0, 1]), torch.tensor(1)):
        with pytest.raises(ValueError, match=r"y must have one entry per chain \(6\)"):
            sampler.sample(x_init(), y=y)


class EagerReplayChain(CudaGraphChain):
    """CudaGraphChain's bookkeeping (static inputs refilled, outputs copied out) with the graph
    replaced by re-running the captured call on the static inputs: what a replay computes."""

    captures = 0

    def _capture(self, run_chain, pool):
        EagerReplayChain.captures += 1
        self._run = lambda: run_chain(self.inputs)
        return self._run()

    def _replay(self):
        for key, value in self._run().items():
            self.outputs[key].copy_(value)


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_graph_replays_read_each_calls_y_and_kwargs_from_their_static_copies(
    sampler_cls, monkeypatch
):
    monkeypatch.setattr(sampler_base, "CudaGraphChain", EagerReplayChain)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(EagerReplayChain, "captures", 0)
    graphed = sampler_cls(class_energy, step_size=0.05, n_steps=3, seed=2)
    monkeypatch.setattr(graphed, "_use_cuda_graph", lambda x: True)  # as if x were on CUDA
    eager = sampler_cls(class_energy, step_size=0.05, n_steps=3, seed=2, cuda_graph=False)
    x0 = x_init()
    calls = [
        dict(y=LABELS, width=torch.tensor(0.5)),
        dict(y=LABELS.flip(0), width=torch.tensor(2.0)),
        dict(y=LABELS.roll(1), width=torch.tensor(2.0)),
    ]
    for kwargs in calls:  # one capture, replayed with each call's y and tensor keyword
        assert torch.equal(graphed.sample(x0, **kwargs), eager.sample(x0, **kwargs))
    assert EagerReplayChain.captures == 1
    # A non-tensor keyword is baked into a capture: another value, another capture; a y of
    # another dtype, another capture.
    for kwargs in (dict(y=LABELS, width=0.5), dict(y=LABELS, width=0.7), dict(y=LABELS.int())):
        assert torch.equal(graphed.sample(x0, **kwargs), eager.sample(x0, **kwargs))
    assert EagerReplayChain.captures == 4
    assert graphed.step == eager.step == 18


def test_seed_none_draws_from_torchs_global_generator():
    x0 = x_init()

    def run():
        return LangevinSampler(class_energy, step_size=0.05, n_steps=3).sample(x0, y=LABELS)

    torch.manual_seed(5)
    first, second = run(), run()
    torch.manual_seed(5)
    assert torch.equal(run(), first)  # torch.manual_seed makes it reproducible
    assert not torch.equal(first, second)  # two fresh samplers draw different noise


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_negate_samples_the_energy_minus_f(sampler_cls):
    x0 = x_init()

    def logits(x):  # f(x) = -E(x), as JEM's classifier logits
        return -class_energy(x, LABELS)

    by_energy, info = sampler_cls(
        lambda x: class_energy(x, LABELS), step_size=0.05, n_steps=4, seed=1
    ).sample(x0, return_info=True)
    by_f, info_f = sampler_cls(logits, step_size=0.05, n_steps=4, seed=1, negate=True).sample(
        x0, return_info=True
    )
    assert torch.equal(by_f, by_energy)
    torch.testing.assert_close(info_f.final_energy, info.final_energy)


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_zero_steps_return_a_copy_of_x0_and_draw_no_noise(sampler_cls):
    calls = []
    sampler = sampler_cls(
        lambda x: calls.append(None) or (x * x).sum(1), step_size=0.1, n_steps=0, seed=0
    )
    x0 = x_init()
    x = sampler.sample(x0)
    assert torch.equal(x, x0) and x.data_ptr() != x0.data_ptr()
    assert calls == [] and sampler.step == 0
    x, info = sampler.sample(x0, return_info=True)
    torch.testing.assert_close(info.initial_energy, (x0 * x0).sum(1))
    assert torch.equal(info.final_energy, info.initial_energy)
    assert torch.equal(info.displacement, torch.zeros(6))


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_a_0_dim_energy_of_one_chain_is_accepted(sampler_cls):
    x0 = x_init((1, 3))
    scalar = sampler_cls(lambda x: (x * x).sum(), step_size=0.1, n_steps=3, seed=0).sample(x0)
    per_chain = sampler_cls(lambda x: (x * x).sum(1), step_size=0.1, n_steps=3, seed=0).sample(x0)
    assert torch.equal(scalar, per_chain)


def batch_norm_energy():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    )


@pytest.mark.parametrize("sampler_cls", SAMPLERS)
def test_eval_mode_freezes_batch_norm_statistics_for_the_call_and_restores_each_mode(sampler_cls):
    model = batch_norm_energy()
    model[3].eval()  # a submodule in its own mode: restored as it was
    statistics = model[1].running_mean.clone()
    seen_modes = []
    model[1].register_forward_hook(lambda m, i, o: seen_modes.append(m.training))
    sampler_cls(model, step_size=0.05, n_steps=3, seed=0, eval_mode=True).sample(x_init())
    assert set(seen_modes) == {False}
    assert torch.equal(model[1].running_mean, statistics)
    assert model.training and model[1].training and not model[3].training
    sampler_cls(model, step_size=0.05, n_steps=3, seed=0).sample(x_init())  # default: as it is
    assert not torch.equal(model[1].running_mean, statistics)
