"""Random small architectures built from every op of the vocabulary, for the exactness tests.

A net is a list of *blocks*; ``RandomNet`` applies them in order. Blocks cover module, functional
and method forms of each op, residual branches, a weight used twice and (for images) convolutions,
pooling and padding.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "relu": nn.ReLU, "leaky_relu": lambda: nn.LeakyReLU(0.2), "sigmoid": nn.Sigmoid, "tanh": nn.Tanh,
    "elu": lambda: nn.ELU(0.7), "softplus": lambda: nn.Softplus(beta=1.5), "silu": nn.SiLU,
    "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
}
# Functional and method spellings of the same activations.
FUNCTIONAL = {
    "relu": F.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": F.silu,
    "elu": lambda x: F.elu(x, alpha=1.3), "softplus": lambda x: F.softplus(x, beta=0.5),
    "leaky_relu": lambda x: F.leaky_relu(x, 0.1), "gelu": F.gelu,
    "tanh_method": lambda x: x.tanh(), "sigmoid_method": lambda x: x.sigmoid(), "relu_method": lambda x: x.relu(),
}


class Residual(nn.Module):
    """``h + act(W h + b)``: a skip connection (HBP Sec. B.3)."""

    def __init__(self, width: int, act: str):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]()

    def forward(self, h):
        return h + self.act(self.inner(h))


class SharedTwice(nn.Module):
    """``act(W act(W h + b) + b)``: one weight used twice (weight tying)."""

    def __init__(self, width: int, act: str):
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.act = ACTIVATIONS[act]()

    def forward(self, h):
        return self.act(self.lin(self.act(self.lin(h))))


class TiedThreeTimes(nn.Module):
    """``b(softplus(a(h')))`` with ``h' = h + sigmoid(a(h))``, ``h = tanh(a(x))``: one weight ``a``
    (``3 -> 3``) used three times, with a residual connection between the uses; ``[N, 3] -> [N, out_dim]``."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.a, self.b = nn.Linear(3, 3), nn.Linear(3, out_dim)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        h = h + torch.sigmoid(self.a(h))
        return self.b(F.softplus(self.a(h)))


class FunctionalLinear(nn.Module):
    """``F.linear`` with the block's own parameters, then a functional/method activation."""

    def __init__(self, width_in: int, width_out: int, act: str):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(width_out, width_in) / width_in**0.5)
        self.bias = nn.Parameter(torch.randn(width_out) * 0.1)
        self.act = act

    def forward(self, h):
        return FUNCTIONAL[self.act](F.linear(h, self.weight, self.bias))


class ViewFlatten(nn.Module):
    def forward(self, h):
        return h.view(h.size(0), -1)


@dataclass
class Spec:
    blocks: list
    in_shape: tuple
    out_dim: int


def random_mlp(rng: random.Random, in_dim: int = 5, out_dim: int = 3, depth: int = 3) -> nn.Module:
    """A random MLP over ``[N, in_dim]`` using residual, shared and functional blocks."""
    layers: list[nn.Module] = []
    width = in_dim
    for _ in range(depth):
        kind = rng.choice(["linear", "linear", "residual", "shared", "functional"])
        act = rng.choice(sorted(ACTIVATIONS))
        if kind == "linear":
            new = rng.randint(2, 5)
            layers += [nn.Linear(width, new, bias=rng.random() < 0.8), ACTIVATIONS[act]()]
            width = new
        elif kind == "residual":
            layers.append(Residual(width, act))
        elif kind == "shared":
            layers.append(SharedTwice(width, act))
        else:
            new = rng.randint(2, 5)
            layers.append(FunctionalLinear(width, new, rng.choice(sorted(FUNCTIONAL))))
            width = new
        if rng.random() < 0.2:
            layers.append(nn.Dropout(0.5))
    layers.append(nn.Linear(width, out_dim))
    return nn.Sequential(*layers).double().eval()


class ConvResidual(nn.Module):
    """``h + act(conv(h))`` with a shape-preserving convolution."""

    def __init__(self, channels: int, act: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = ACTIVATIONS[act]()

    def forward(self, h):
        return h + self.act(self.conv(h))


class ConvTwice(nn.Module):
    """One convolution kernel applied twice (a tied weight across two positions in the graph)."""

    def __init__(self, channels: int, act: str):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = ACTIVATIONS[act]()

    def forward(self, h):
        return self.act(self.conv(self.act(self.conv(h))))


def random_cnn(rng: random.Random, in_shape=(2, 7, 6), out_dim: int = 3, depth: int = 3) -> nn.Module:
    """A random CNN over ``[N, *in_shape]``: convolutions of varied stride/padding/dilation/groups,
    pooling, padding, residual and tied blocks, then a view and a linear head."""
    c, h, w = in_shape
    layers: list[nn.Module] = []
    for _ in range(depth):
        kind = rng.choice(["conv", "conv", "pool", "pad", "residual", "tied"])
        act = rng.choice(sorted(ACTIVATIONS))
        if kind == "conv":
            groups = rng.choice([1, 1, 2]) if c % 2 == 0 else 1
            out = rng.choice([2, 4]) if groups == 2 else rng.randint(1, 3)
            k = (rng.randint(1, 3), rng.randint(1, 3))
            stride, padding, dilation = rng.choice([1, 1, 2]), rng.choice([0, 1]), rng.choice([1, 1, 2])
            eff = [dilation * (kk - 1) + 1 for kk in k]
            if h + 2 * padding < eff[0] or w + 2 * padding < eff[1]:
                continue
            layers += [nn.Conv2d(c, out, k, stride=stride, padding=padding, dilation=dilation, groups=groups,
                                 bias=rng.random() < 0.8), ACTIVATIONS[act]()]
            h = (h + 2 * padding - eff[0]) // stride + 1
            w = (w + 2 * padding - eff[1]) // stride + 1
            c = out
        elif kind == "pool" and h >= 2 and w >= 2:
            if rng.random() < 0.5:
                layers.append(nn.MaxPool2d(2, stride=1, ceil_mode=rng.random() < 0.3))
                h, w = h - 1, w - 1
            else:
                layers.append(nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=rng.random() < 0.5))
                h, w = h + 1, w + 1
        elif kind == "pad":
            layers.append(nn.ZeroPad2d((0, 1, 1, 0)))
            h, w = h + 1, w + 1
        elif kind == "residual":
            layers.append(ConvResidual(c, act))
        elif kind == "tied":
            layers.append(ConvTwice(c, act))
    layers += [ViewFlatten(), nn.Linear(c * h * w, out_dim)]
    return nn.Sequential(*layers).double().eval()
