"""The input gradient of an MLP energy without autograd, bit for bit what autograd computes.

Most energies of 2-D and tabular EBMs (and the 784-D MNIST MLPs) are an ``nn.Sequential`` of
Linear layers and elementwise activations ending in one output. For them a chain step's
forward and input-gradient passes are a fixed list of ATen calls: the layers' forwards, then
``g = ones @ W_L`` and, layer by layer back, the activation's own backward function (the one
autograd's formula calls) and ``g @ W_l`` (what autograd's addmm backward computes, its
column-major branch included). Calling them directly skips the modules' ``__call__``, the graph
and the engine: the passes of a small MLP ran 1.07-1.29x faster on this repository's CPU
(bench_training's ``direct_passes``), with the same bits as autograd
(tests/samplers/test_mlp_gradient.py holds it to that).

Anything else goes through autograd: other modules, in-place activations, a Linear with more
than one output at the end, hooks, parametrisations or a ``forward`` replaced on an instance of
any layer, parameters of another dtype or device than the chains, conditioning arguments, and
calls under an enclosing torch.autocast (autograd follows its casts).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

aten = torch.ops.aten

# activation type -> (grad_output, module, input z, output a) -> grad_input, as autograd's
# derivative formula for the activation computes it.
ACTIVATION_BACKWARD = {
    nn.SiLU: lambda g, m, z, a: aten.silu_backward.default(g, z),
    nn.Tanh: lambda g, m, z, a: aten.tanh_backward.default(g, a),
    nn.Sigmoid: lambda g, m, z, a: aten.sigmoid_backward.default(g, a),
    nn.ReLU: lambda g, m, z, a: aten.threshold_backward.default(g, a, 0),
    nn.Softplus: lambda g, m, z, a: aten.softplus_backward.default(g, z, m.beta, m.threshold),
    nn.ELU: lambda g, m, z, a: aten.elu_backward.default(g, m.alpha, 1, 1, False, z),
    nn.LeakyReLU: lambda g, m, z, a: aten.leaky_relu_backward.default(
        g, z, m.negative_slope, False
    ),
    nn.GELU: lambda g, m, z, a: aten.gelu_backward.default(g, z, approximate=m.approximate),
}


# torch.nn's module hooks registered for every module (register_module_forward_hook, ...).
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


def _altered(module: nn.Module) -> bool:
    """Whether the module's call is not its class's forward alone: hooks would run around its
    forward or backward, or ``forward`` was replaced on the instance (whose backward the route
    would not know)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
    )


class MLPGradient:
    """(energy (B, 1), dE/dx) of an MLP energy, computed with the layers' own forward and
    backward functions. Build it with :meth:`of`, which returns None for an energy it does not
    cover; :meth:`covers` says per call whether it still applies."""

    def __init__(self, sequential: nn.Sequential):
        self.sequential = sequential
        self.modules = tuple(sequential)

    @classmethod
    def of(cls, energy) -> MLPGradient | None:
        """An MLPGradient for ``energy`` when it is an nn.Sequential of an optional leading
        nn.Flatten(), then Linear layers with one activation of ACTIVATION_BACKWARD (not in
        place) between each two, the last Linear with one output; else None."""
        if type(energy) is not nn.Sequential or not cls._layout_supported(tuple(energy)):
            return None
        return cls(energy)

    @staticmethod
    def _layout_supported(modules: tuple) -> bool:
        """[Flatten,] Linear, activation, Linear, ..., activation, Linear (one output)."""
        if modules and type(modules[0]) is nn.Flatten:
            if (modules[0].start_dim, modules[0].end_dim) != (1, -1):
                return False
            modules = modules[1:]
        alternating = len(modules) % 2 == 1 and all(
            type(m) is nn.Linear
            if i % 2 == 0
            else type(m) in ACTIVATION_BACKWARD and not getattr(m, "inplace", False)
            for i, m in enumerate(modules)
        )
        return alternating and modules[-1].out_features == 1

    def covers(self, x: torch.Tensor, conditioning) -> bool:
        """Whether this call can take the direct route: the same layers of the same classes as
        at construction (a Sequential can be edited, a parametrisation swaps a layer's class),
        none with hooks or a replaced forward, parameters of x's dtype and device, x at least
        2-D, no conditioning, no global module hooks, no enclosing autocast."""
        if (
            conditioning.y is not None
            or conditioning.kwargs
            or x.dim() < 2
            or torch.is_autocast_enabled(x.device.type)
        ):
            return False
        # The layout again, by exact class: a parametrisation (spectral_norm, ...) swaps a
        # layer's class for a subclass, which the layout refuses.
        if (
            tuple(self.sequential) != self.modules
            or not self._layout_supported(self.modules)
            or _altered(self.sequential)
        ):
            return False
        if any(getattr(nn.modules.module, hooks) for hooks in _GLOBAL_HOOKS):
            return False
        for module in self.modules:
            if _altered(module):
                return False
            if type(module) is nn.Linear and (
                module.weight.dtype != x.dtype or module.weight.device != x.device
            ):
                return False
        return x.dim() == 2 or type(self.modules[0]) is nn.Flatten

    def __call__(
        self, x: torch.Tensor, autocast: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(energy (B, 1), dE/dx shaped like x) at x; builds no graph. autocast: the forward
        runs under torch.autocast(autocast) and the backward follows its casts as autograd
        does (each layer's backward in the dtype its forward ran in, its input gradient cast
        back to its input's dtype), so the bits are autograd-under-autocast's."""
        h = x.flatten(1) if type(self.modules[0]) is nn.Flatten else x
        linears = []  # (layer, its input, its output's dtype)
        activations = []  # (activation, its input z, its output a)
        with (
            contextlib.nullcontext()
            if autocast is None
            else torch.autocast(x.device.type, dtype=autocast, cache_enabled=False)
        ):
            for module in self.modules:
                if type(module) is nn.Linear:
                    layer_input, h = h, module.forward(h)
                    linears.append((module, layer_input, h.dtype))
                elif type(module) is not nn.Flatten:
                    z, h = h, module.forward(h)
                    activations.append((module, z, h))
        # d(sum E)/dE = ones, then back through each layer (the activations sit between them).
        grad = torch.ones_like(h)
        for i in range(len(linears) - 1, -1, -1):
            if i < len(linears) - 1:
                module, z, a = activations[i]
                if autocast is None:
                    grad = ACTIVATION_BACKWARD[type(module)](grad, module, z, a)
                else:  # autocast may have run the activation on z cast to a's dtype
                    grad = ACTIVATION_BACKWARD[type(module)](
                        grad.to(a.dtype), module, z.to(a.dtype), a
                    ).to(z.dtype)
            layer, layer_input, dtype = linears[i]
            if autocast is None:
                grad = _linear_input_grad(grad, layer.weight, layer_input)
            else:  # autocast ran the layer on its input and weight cast to dtype
                grad = _linear_input_grad(
                    grad.to(dtype), layer.weight.to(dtype), layer_input.to(dtype)
                ).to(layer_input.dtype)
        return h, grad.view(x.shape)


def _linear_input_grad(
    grad: torch.Tensor, weight: torch.Tensor, layer_input: torch.Tensor
) -> torch.Tensor:
    """d/d(input) of F.linear(input, weight, bias) given grad of its output, as autograd's addmm
    backward computes it: grad @ weight, or (weight^T @ grad^T)^T for an input whose strides
    read as column-major (a 1 x 1 one), which rounds differently."""
    if layer_input.stride(0) == 1 and layer_input.stride(1) == layer_input.shape[0]:
        return weight.t().mm(grad.t()).t()
    return grad.mm(weight)
