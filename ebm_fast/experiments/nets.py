"""The energies published EBM code uses, for the benchmarks: each built from its paper's and
repository's description (no code taken from them), unconditional, on 3x32x32 images.

NETS maps a name to (a constructor, the sample shape): igebm, jem_wrn, icd, and the MLPs the
experiments already build (mlp784, mlp2).
"""

from __future__ import annotations

import torch
from torch import nn

from ebm_fast.experiments.models import build_energy

__all__ = ["IGEBMResNet", "JEMWideResNet", "ICDConvEnergy", "NETS"]


class IGEBMBlock(nn.Module):
    """IGEBM's residual block: two 3x3 convolutions with a leaky ReLU between, a 3x3 convolution
    on the shortcut where the width changes, 2x2 average pooling where it downsamples, then a
    leaky ReLU."""

    def __init__(self, c_in: int, c_out: int, downsample: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.shortcut = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 3, padding=1)
        self.pool = nn.AvgPool2d(2) if downsample else nn.Identity()
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x):
        h = self.conv2(self.act(self.conv1(x)))
        return self.act(self.pool(h + self.shortcut(x)))


class IGEBMResNet(nn.Module):
    """IGEBM's unconditional CIFAR-10 energy, "ResNet-32" (Du & Mordatch 2019, "Implicit
    Generation and Generalization in Energy-Based Models"; openai/ebm_code_release, models.py
    ResNet32): a 3x3 convolution to ``filters`` channels and six residual blocks (widths F, F,
    2F, 2F, 2F, 2F; downsampling in the 1st, 3rd and 5th: 32 -> 4 pixels), ReLU, a sum over the
    pixels and a linear read-out. Left out: spectral normalisation (a training-time weight
    constraint) and the per-channel gain and bias around each convolution (the conv's own bias
    stands in)."""

    def __init__(self, filters: int = 128):
        super().__init__()
        f = filters
        self.stem = nn.Sequential(nn.Conv2d(3, f, 3, padding=1), nn.LeakyReLU(0.2))
        self.blocks = nn.Sequential(
            IGEBMBlock(f, f, True),
            IGEBMBlock(f, f, False),
            IGEBMBlock(f, 2 * f, True),
            IGEBMBlock(2 * f, 2 * f, False),
            IGEBMBlock(2 * f, 2 * f, True),
            IGEBMBlock(2 * f, 2 * f, False),
        )
        self.read_out = nn.Linear(2 * f, 1)

    def forward(self, x):
        return self.read_out(torch.relu(self.blocks(self.stem(x))).sum((2, 3)))


class WideBlock(nn.Module):
    """JEM's pre-activation wide block without normalisation: leaky ReLU, 3x3 conv, leaky ReLU,
    3x3 conv (the stride on the second), plus a 1x1 (strided) conv shortcut where the shape
    changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.act = nn.LeakyReLU(0.2)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, stride=stride, padding=1)
        self.shortcut = (
            nn.Identity()
            if stride == 1 and c_in == c_out
            else nn.Conv2d(c_in, c_out, 1, stride=stride)
        )

    def forward(self, x):
        return self.conv2(self.act(self.conv1(self.act(x)))) + self.shortcut(x)


class JEMWideResNet(nn.Module):
    """JEM's classifier-energy (Grathwohl et al. 2020, "Your Classifier is Secretly an Energy
    Based Model"; wgrathwohl/JEM, wideresnet.py with its default norm=None): WRN-depth-widen,
    (depth - 4) / 6 wide blocks per group of widths 16k, 32k, 64k (strides 1, 2, 2), leaky ReLU,
    mean over the pixels, linear logits. The energy is -logsumexp of the logits. JEM trains
    WRN-28-10; the default WRN-16-4 is scaled to a CPU (16x fewer multiply-adds)."""

    def __init__(self, depth: int = 16, widen: int = 4, classes: int = 10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"depth must be 6n + 4 with n >= 1, got {depth}")
        per_group = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1)]
        for group, stride in enumerate((1, 2, 2)):
            for block in range(per_group):
                layers.append(
                    WideBlock(
                        widths[group + (block > 0)], widths[group + 1], stride if block == 0 else 1
                    )
                )
        layers.append(nn.LeakyReLU(0.2))
        self.features = nn.Sequential(*layers)
        self.classify = nn.Linear(widths[3], classes)

    def logits(self, x):
        return self.classify(self.features(x).mean((2, 3)))

    def forward(self, x):
        return -torch.logsumexp(self.logits(x), dim=1)


class StandardizedConv2d(nn.Conv2d):
    """A convolution whose filters are standardised (zero mean, unit variance per output
    channel) at each call: ICD's convolutions without spectral normalisation."""

    def forward(self, x):
        mean = self.weight.mean((1, 2, 3), keepdim=True)
        std = self.weight.std((1, 2, 3), keepdim=True)
        return self._conv_forward(x, (self.weight - mean) / (std + 1e-5), self.bias)


class ICDBlock(nn.Module):
    """ICD's block (CondResBlock, unconditional): standardised 3x3 conv, norm, swish, twice; where
    it downsamples, a 3x3 conv (doubling the width if it rescales), 3x3 average pooling with
    stride 2, swish. The norm is an affine instance norm up to 128 channels, else a 32-group
    group norm. There is no skip connection."""

    def __init__(self, filters: int, downsample: bool, rescale: bool = True):
        super().__init__()
        layers: list[nn.Module] = []
        for _ in range(2):
            norm = (
                nn.InstanceNorm2d(filters, affine=True)
                if filters <= 128
                else nn.GroupNorm(32, filters)
            )
            layers += [StandardizedConv2d(filters, filters, 3, padding=1), norm, nn.SiLU()]
        if downsample:
            layers += [
                nn.Conv2d(filters, 2 * filters if rescale else filters, 3, padding=1),
                nn.AvgPool2d(3, stride=2, padding=1),
                nn.SiLU(),
            ]
        self.layers = nn.Sequential(*layers)

    def forward(self, x):
        return self.layers(x)


class SelfAttention(nn.Module):
    """SAGAN's self-attention, as ICD uses it: 1x1-conv queries and keys (C/8 channels) and
    values, softmax over the pixels, gamma * attended + x with gamma starting at 0."""

    def __init__(self, channels: int):
        super().__init__()
        self.query = nn.Conv2d(channels, channels // 8, 1)
        self.key = nn.Conv2d(channels, channels // 8, 1)
        self.value = nn.Conv2d(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        q, k, v = (conv(x).flatten(2) for conv in (self.query, self.key, self.value))
        attention = torch.softmax(q.transpose(1, 2) @ k, dim=-1)  # (B, pixels, pixels)
        return self.gamma * (v @ attention.transpose(1, 2)).reshape(x.shape) + x


class ICDConvEnergy(nn.Module):
    """ICD's CIFAR-10 energy (Du et al. 2021, "Improved Contrastive Divergence Training of
    Energy-Based Models"; yilundu/improved_contrastive_divergence, models.py ResNetModel with
    train.py's defaults: filter_dim 64, norm, self-attention, no spectral norm): a 3x3 conv and
    swish, four pairs of blocks (the second of each downsamples; widths F, F, 2F, 4F, ending at
    8F on 2x2 pixels), self-attention after the second pair, swish, mean over the pixels, linear
    read-out. The multiscale option's two extra nets on downsampled images are left out."""

    def __init__(self, filters: int = 64):
        super().__init__()
        f = filters
        self.stem = nn.Sequential(nn.Conv2d(3, f, 3, padding=1), nn.SiLU())
        self.blocks = nn.Sequential(
            ICDBlock(f, False),
            ICDBlock(f, True, rescale=False),
            ICDBlock(f, False),
            ICDBlock(f, True),
            SelfAttention(2 * f),
            ICDBlock(2 * f, False),
            ICDBlock(2 * f, True),
            ICDBlock(4 * f, False),
            ICDBlock(4 * f, True),
            nn.SiLU(),
        )
        self.read_out = nn.Linear(8 * f, 1)

    def forward(self, x):
        return self.read_out(self.blocks(self.stem(x)).mean((2, 3)))


IMAGE = (3, 32, 32)
NETS = {
    "igebm": (IGEBMResNet, IMAGE),
    "jem_wrn": (JEMWideResNet, IMAGE),
    "icd": (ICDConvEnergy, IMAGE),
    "mlp784": (lambda: build_energy("mlp", (784,), 256), (784,)),
    "mlp2": (lambda: build_energy("mlp", (2,), 128), (2,)),
}
