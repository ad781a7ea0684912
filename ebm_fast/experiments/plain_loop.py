"""The replay-buffer training loop as IGEBM/JEM code writes it, the baseline that ``ebm-fast
demo`` and benchmarks/bench_training.py measure ebm_fast's Trainer + PersistentML against.

One object, one iteration per call: a tensor buffer with torch.randint slots and torch.rand
re-initialisation, K steps of autograd.grad + ``x - eps g + sigma randn_like(x)`` + clamp, the
loss mean E(x+) - mean E(x-) + alpha (mean E(x+)^2 + mean E(x-)^2), backward, Adam. It checks
nothing and draws from the device's global generator, as such code does.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PlainLoop"]


class PlainLoop:
    """IGEBM/JEM-style replay-buffer training of ``energy`` on samples of ``sample_shape``;
    ``loop(x_pos)`` runs one iteration on the positive batch and returns the negatives."""

    def __init__(
        self,
        energy: nn.Module,
        sample_shape: tuple[int, ...],
        *,
        steps: int,
        step_size: float,
        noise_scale: float,
        clamp: tuple[float, float],
        buffer_size: int,
        reinit_prob: float,
        lr: float,
        alpha: float,
        device: torch.device | str = "cpu",
    ):
        self.energy = energy
        self.steps, self.step_size, self.noise_scale = steps, step_size, noise_scale
        self.lo, self.hi = clamp
        self.reinit_prob, self.alpha = reinit_prob, alpha
        self.storage = self._uniform((buffer_size, *sample_shape), device)
        self.optimizer = torch.optim.Adam(energy.parameters(), lr=lr, betas=(0.0, 0.999))

    def _uniform(self, shape, device) -> torch.Tensor:
        return self.lo + (self.hi - self.lo) * torch.rand(shape, device=device)

    def __call__(self, x_pos: torch.Tensor) -> torch.Tensor:
        batch, device = x_pos.shape[0], self.storage.device
        idx = torch.randint(len(self.storage), (batch,), device=device)
        x = self.storage[idx]
        fresh = torch.rand(batch, device=device) < self.reinit_prob
        x[fresh] = self._uniform(x[fresh].shape, device)
        for _ in range(self.steps):
            x = x.detach().requires_grad_(True)
            grad = torch.autograd.grad(self.energy(x).sum(), x)[0]
            x = (x - self.step_size * grad + self.noise_scale * torch.randn_like(x)).clamp(
                self.lo, self.hi
            )
        x = x.detach()
        self.storage[idx] = x
        e_pos, e_neg = self.energy(x_pos), self.energy(x)
        loss = e_pos.mean() - e_neg.mean() + self.alpha * ((e_pos**2).mean() + (e_neg**2).mean())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return x
