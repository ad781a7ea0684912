"""docs/drop-in.md is executable: each of its python blocks marked "# name: before|after|loop"
runs here, the library version against the code it replaces, on the same models and data.

* The sampler loops ("igebm", "jem"): before and after from the same start points give samples
  with the same per-dimension means and variances within the sampling error (the noise differs:
  torch.randn there, the noise spec here); twice the step size must disagree, so the comparison
  has power.
* JEM's script ("jem-train", "jem-loss"): a small copy of train_wrn_ebm.py's structure
  (sample_p_0, sample_q, the three-term loss) with a batch-normalised classifier. With the noise
  off and every buffer slot holding the same row, both versions are deterministic: losses and
  the parameters after one optimiser step agree to float rounding (this also checks eval_mode:
  batch norm in training mode would give other gradients and move its statistics). With noise:
  no parameter gradients from sampling, the 5% re-initialisation rate.
* IGEBM's loop ("igebm-train"): the first iteration's negatives (uniform noise start in both)
  agree in distribution, a doubled step size is told apart, and both FIFO buffers hold the
  last batch in the same slots after wrapping around.
"""

import math
import random
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import ebm_fast
import ebm_fast.training  # noqa: F401  (the blocks use ebm_fast.training.*)

DOC = Path(__file__).resolve().parents[2] / "docs" / "drop-in.md"
SIGMAS_OF_TOLERANCE = 5.0
CHAINS, DIM, N_CLASSES = 2000, 6, 3


def doc_blocks() -> dict:
    """The python blocks of the doc, keyed by their first-line marker ("igebm: before", ...)."""
    blocks = {}
    for body in re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S):
        first, _, _ = body.partition("\n")
        match = re.fullmatch(r"# ([\w-]+: (?:before|after|loop))", first.strip())
        if match:
            blocks[match.group(1)] = body
    return blocks


def run_block(name: str, namespace: dict) -> dict:
    """Execute the block in namespace (with torch and ebm_fast added); returns the namespace."""
    namespace.setdefault("torch", torch)
    namespace.setdefault("ebm_fast", ebm_fast)
    exec(compile(doc_blocks()[name], f"{DOC}:{name}", "exec"), namespace)
    return namespace


def statistics_agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Per-dimension means and variances equal within SIGMAS_OF_TOLERANCE standard errors."""
    a, b = a.double(), b.double()
    n = a.shape[0]
    mean_se = torch.sqrt((a.var(0) + b.var(0)) / n)
    dev_a, dev_b = (a - a.mean(0)) ** 2, (b - b.mean(0)) ** 2
    var_se = torch.sqrt((dev_a.var(0) + dev_b.var(0)) / n)
    return bool(
        ((a.mean(0) - b.mean(0)).abs() <= SIGMAS_OF_TOLERANCE * mean_se).all()
        and ((a.var(0) - b.var(0)).abs() <= SIGMAS_OF_TOLERANCE * var_se).all()
    )


def network(out_features: int, in_features: int = DIM) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(in_features, 32), torch.nn.SiLU(), torch.nn.Linear(32, out_features)
    )


def test_the_doc_has_every_block():
    assert set(doc_blocks()) == {
        "igebm: before",
        "igebm: after",
        "jem: before",
        "jem: after",
        "jem-train: before",
        "jem-train: after",
        "jem-train: loop",
        "jem-loss: after",
        "jem-loss: loop",
        "igebm-train: before",
        "igebm-train: after",
    }


# -- the sampler loops -----------------------------------------------------------------------


@pytest.mark.parametrize("style", ["igebm", "jem"])
def test_the_sampler_call_reproduces_the_loop_statistics(style):
    gen = torch.Generator().manual_seed(1)
    x0 = torch.rand(CHAINS, DIM, generator=gen)
    if style == "igebm":
        names = {"model": network(1), "x0": x0, "step_lr": 2.0, "noise_std": 0.05, "num_steps": 20}
        wrong = dict(names, step_lr=4.0)
    else:
        names = {"classifier": network(4), "x0": x0, "step_size": 0.5, "sigma": 0.1, "n_steps": 20}
        wrong = dict(names, step_size=1.0)
    torch.manual_seed(2)
    before = run_block(f"{style}: before", dict(names))["x"]
    after = run_block(f"{style}: after", dict(names))["x"]
    assert after.shape == before.shape and after.dtype == before.dtype
    assert statistics_agree(before, after)
    assert not statistics_agree(before, run_block(f"{style}: after", dict(wrong))["x"])
    moved = (after - x0).norm(dim=1).mean().item()
    assert moved > 5 * math.sqrt(DIM) * 0.01  # the chains went somewhere: this compares work


# -- JEM's training script -------------------------------------------------------------------


class CCF(torch.nn.Module):
    """JEM's model in small: classify(x) the logits of a batch-normalised MLP; f(x) their
    logsumexp, f(x, y) the y-th logit (shape (B, 1), as JEM's gather returns)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(
            torch.nn.Linear(DIM, 16),
            torch.nn.BatchNorm1d(16),
            torch.nn.SiLU(),
            torch.nn.Linear(16, N_CLASSES),
        )

    def classify(self, x):
        return self.body(x)

    def forward(self, x, y=None):
        logits = self.classify(x)
        return logits.logsumexp(1) if y is None else torch.gather(logits, 1, y[:, None])


def jem_args(**changes) -> SimpleNamespace:
    defaults = dict(
        sgld_lr=1.0,
        sgld_std=0.01,
        n_steps=5,
        buffer_size=30,
        reinit_freq=0.05,
        batch_size=8,
        p_x_weight=1.0,
        p_y_given_x_weight=1.0,
        p_x_y_weight=0.0,
    )
    return SimpleNamespace(**{**defaults, **changes})


def jem_names(args: SimpleNamespace) -> dict:
    f = CCF()
    return {
        "args": args,
        "f": f,
        "shape": (DIM,),
        "n_classes": N_CLASSES,
        "device": torch.device("cpu"),
        "optim": torch.optim.SGD(f.parameters(), lr=0.1),
    }


def labelled_batch(seed: int = 3):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(8, DIM, generator=gen) * 2 - 1, torch.arange(8) % N_CLASSES


def one_row_buffer(version: str, args: SimpleNamespace):
    """A full buffer whose every slot holds the same row: the draws do not depend on which
    slots the two versions pick."""
    row = torch.linspace(-0.5, 0.5, DIM)
    rows = row.repeat(args.buffer_size, 1)
    if version == "before":
        return rows
    return ebm_fast.ReplayBuffer.from_tensor(
        rows, n_classes=N_CLASSES, init_range=(-1, 1), reinit_prob=args.reinit_freq, seed=0
    )


def run_jem_iteration(version: str, args: SimpleNamespace, x_lab, y_lab) -> dict:
    """One iteration of the doc's JEM loop: "before" / "after" (jem-train blocks) or "loss"
    (the JEM loss on the after version's sampler), from a one-row buffer, x_p_d = x_lab."""
    ns = run_block(
        "jem-train: before" if version == "before" else "jem-train: after", jem_names(args)
    )
    ns["replay_buffer"] = one_row_buffer(version, args)
    if version == "loss":
        run_block("jem-loss: after", ns)
        ns["labelled_batches"] = [(x_lab, y_lab)]
        return run_block("jem-loss: loop", ns)
    ns["batches"] = [(x_lab, x_lab, y_lab)]
    return run_block("jem-train: loop", ns)


@pytest.mark.parametrize(
    "weights",
    [
        dict(p_x_weight=1.0, p_y_given_x_weight=1.0),
        dict(p_x_weight=0.0, p_y_given_x_weight=0.0, p_x_y_weight=1.0),
    ],
    ids=["p_x+p_y_given_x", "p_x_y"],
)
def test_jem_script_with_the_library_equals_jems_own_without_noise(weights):
    args = jem_args(sgld_std=0.0, reinit_freq=0.0, **weights)
    x_lab, y_lab = labelled_batch()
    before = run_jem_iteration("before", args, x_lab, y_lab)
    for version in ("after", "loss"):
        ns = run_jem_iteration(version, args, x_lab, y_lab)
        torch.testing.assert_close(ns["L"], before["L"], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(ns["f"].named_parameters(), before["f"].parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=f"{version}: {name}")
        assert ns["f"].training
        if version == "after":  # the same forward passes: batch-norm statistics alike
            for (name, b), c in zip(ns["f"].named_buffers(), before["f"].buffers()):
                torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6, msg=name)


def test_jem_script_with_noise_trains_leaves_no_gradients_and_reinitialises_five_percent():
    torch.manual_seed(4)
    args = jem_args(p_x_y_weight=1.0)
    ns = run_block("jem-train: after", jem_names(args))
    x, y = labelled_batch()
    ns["batches"] = [(x, x, y)] * 4
    run_block("jem-train: loop", ns)
    assert torch.isfinite(ns["L"])
    buffer, f = ns["replay_buffer"], ns["f"]
    assert 0 < buffer.n_written <= args.buffer_size
    f.zero_grad(set_to_none=True)
    ns["sample_q"](f, buffer, y=y)
    assert all(p.grad is None and p.requires_grad for p in f.parameters()) and f.training
    buffer.push(
        torch.zeros(args.buffer_size, DIM),
        y=torch.arange(args.buffer_size) // (args.buffer_size // N_CLASSES),
    )  # every slot written: only reinit draws noise
    draws = 4000
    reinit = buffer.sample(draws, return_reinit=True)[2].float().mean().item()
    assert abs(reinit - args.reinit_freq) < SIGMAS_OF_TOLERANCE * math.sqrt(
        args.reinit_freq * (1 - args.reinit_freq) / draws
    )


# -- IGEBM's training loop -------------------------------------------------------------------


class IGEBMReplayBuffer:
    """IGEBM's replay buffer (OpenAI baselines' ReplayBuffer, images only): a FIFO list."""

    def __init__(self, size):
        self._storage = []
        self._maxsize = size
        self._next_idx = 0

    def __len__(self):
        return len(self._storage)

    def add(self, ims):
        batch_size = ims.shape[0]
        if self._next_idx >= len(self._storage):
            self._storage.extend(list(ims))
        elif batch_size + self._next_idx < self._maxsize:
            self._storage[self._next_idx : self._next_idx + batch_size] = list(ims)
        else:
            split_idx = self._maxsize - self._next_idx
            self._storage[self._next_idx :] = list(ims)[:split_idx]
            self._storage[: batch_size - split_idx] = list(ims)[split_idx:]
        self._next_idx = (self._next_idx + ims.shape[0]) % self._maxsize

    def sample(self, batch_size):
        idxes = [random.randint(0, len(self._storage) - 1) for _ in range(batch_size)]
        return np.array([self._storage[i] for i in idxes])


class ConditionalEnergy(torch.nn.Module):
    """IGEBM's conditional model in small: E(x, label) with a one-hot label."""

    def __init__(self):
        super().__init__()
        self.net = network(1, DIM + N_CLASSES)

    def forward(self, x, label):
        return self.net(torch.cat([x, label], 1))


def run_igebm(version: str, n_batches: int, step_lr: float = 2.0) -> dict:
    model = ConditionalEnergy()
    gen = torch.Generator().manual_seed(5)
    im = torch.rand(CHAINS, DIM, generator=gen)
    label = torch.nn.functional.one_hot(
        torch.randint(0, N_CLASSES, (CHAINS,), generator=gen), N_CLASSES
    ).float()
    names = {
        "model": model,
        "step_lr": step_lr,
        "noise_std": 0.005,
        "num_steps": 20,
        "l2_coeff": 1.0,
        "np": np,
        "ReplayBuffer": IGEBMReplayBuffer,
        "im_shape": (DIM,),
        "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3),
        "batches": [(im, label)] * n_batches,
    }
    return run_block(f"igebm-train: {version}", names)


def test_igebm_loop_with_the_library_draws_the_same_negatives():
    torch.manual_seed(6)
    random.seed(6)
    np.random.seed(6)
    before = run_igebm("before", 1)["im_neg"]
    after = run_igebm("after", 1)["im_neg"]
    assert statistics_agree(before, after)
    assert not statistics_agree(before, run_igebm("after", 1, step_lr=4.0)["im_neg"])
    assert (after - before.mean(0)).abs().mean() > 0.05  # negatives spread over the box


def test_igebm_loop_with_the_library_keeps_the_fifo_buffer():
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    batches = 6  # 12,000 pushes into 10,000 slots: the last batch wraps to slots [0, 2000)
    before, after = run_igebm("before", batches), run_igebm("after", batches)
    assert len(before["replay_buffer"]) == after["replay_buffer"].n_written == 10_000
    assert np.array_equal(
        np.stack(before["replay_buffer"]._storage[:CHAINS]), before["im_neg"].numpy()
    )
    storage = after["replay_buffer"].state_dict()["storage"]
    assert torch.equal(storage[:CHAINS].reshape(CHAINS, DIM), after["im_neg"])
    assert torch.isfinite(after["loss"]) and torch.isfinite(before["loss"])
