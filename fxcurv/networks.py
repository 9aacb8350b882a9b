"""The papers' networks, by name, for the main job, the tests and the benchmarks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Network:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # per sample
    classes: int
    source: str


def hesscale_tanh() -> nn.Module:
    """HesScale Sec. 4 accuracy experiment: 6 inputs, three tanh layers of 16 units, 10 outputs."""
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
        nn.Linear(16, 10),
    )


def mnist_mlp() -> nn.Module:
    """DeepOBS MNIST-MLP (HesScale Sec. 5): 784-1000-500-100-10 with tanh."""
    return nn.Sequential(
        nn.Flatten(), nn.Linear(784, 1000), nn.Tanh(), nn.Linear(1000, 500), nn.Tanh(),
        nn.Linear(500, 100), nn.Tanh(), nn.Linear(100, 10),
    )


def fcnn() -> nn.Module:
    """HBP Table S.2a: the FCNN of Chen et al., 3072-1024-512-256-128-64-32-16-10 with sigmoids."""
    widths = [3072, 1024, 512, 256, 128, 64, 32, 16, 10]
    layers: list[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def cnn() -> nn.Module:
    """HBP Table S.2b: four 3x3 convolutions with sigmoids, two max-pools, three linear layers."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.Sigmoid(), nn.Conv2d(16, 16, 3, padding=1), nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(16, 32, 3, padding=1), nn.Sigmoid(), nn.Conv2d(32, 32, 3, padding=1), nn.Sigmoid(),
        nn.MaxPool2d(2, 2),
        nn.Flatten(), nn.Linear(2048, 512), nn.Sigmoid(), nn.Linear(512, 64), nn.Sigmoid(), nn.Linear(64, 10),
    )


def c3d3() -> nn.Module:
    """HBP Table S.2c: the DeepOBS c3d3 net with sigmoids (CIFAR-10, 895 210 parameters)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 5), nn.Sigmoid(), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 96, 3), nn.Sigmoid(), nn.ZeroPad2d((0, 1, 0, 1)), nn.MaxPool2d(3, 2),
        nn.ZeroPad2d((1, 1, 1, 1)), nn.Conv2d(96, 128, 3), nn.Sigmoid(), nn.ZeroPad2d((0, 1, 0, 1)),
        nn.MaxPool2d(3, 2),
        nn.Flatten(), nn.Linear(1152, 512), nn.Sigmoid(), nn.Linear(512, 256), nn.Sigmoid(), nn.Linear(256, 10),
    )


NETWORKS: dict[str, Network] = {
    "hesscale_tanh": Network(hesscale_tanh, (6,), 10, "HesScale Sec. 4: 6-16-16-16-10 tanh"),
    "mnist_mlp": Network(mnist_mlp, (1, 28, 28), 10, "DeepOBS MNIST-MLP 784-1000-500-100-10 tanh (HesScale Sec. 5)"),
    "fcnn": Network(fcnn, (3, 32, 32), 10, "HBP Table S.2a: FCNN 3072-1024-...-16-10 sigmoid"),
    "cnn": Network(cnn, (3, 32, 32), 10, "HBP Table S.2b: CNN with sigmoids"),
    "c3d3": Network(c3d3, (3, 32, 32), 10, "HBP Table S.2c: DeepOBS c3d3 with sigmoids"),
}
