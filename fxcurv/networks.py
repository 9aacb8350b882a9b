"""The networks of the papers and of issue #9, by name, for the main job, the tests and the benchmarks.

Each :class:`Network` says how to build the model, what one sample of input is (its shape, real
values or integer tokens), how many classes it scores and which loss it is trained with; it draws
example batches (:meth:`Network.example_input`, :meth:`Network.example_target`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor, nn


class InputKind(Enum):
    """What a sample of input is: real values (features, images) drawn from N(0, 1), or integer
    token ids drawn uniformly from ``[0, vocab)``."""

    REAL = "real"
    TOKENS = "tokens"


class LossKind(Enum):
    """The losses the zoo and the main job use, each with the target it takes for an output ``f`` of
    shape ``[N, C, *rest]``: ``cross_entropy`` class indices ``[N, *rest]`` in ``[0, C)``; ``mse`` and
    ``huber`` real values shaped like ``f``; ``bce_with_logits`` probabilities in ``[0, 1]`` shaped
    like ``f``. All reduce by the mean."""

    CROSS_ENTROPY = "cross_entropy"
    MSE = "mse"
    HUBER = "huber"
    BCE_WITH_LOGITS = "bce_with_logits"

    def module(self) -> nn.Module:
        return {LossKind.CROSS_ENTROPY: nn.CrossEntropyLoss, LossKind.MSE: nn.MSELoss,
                LossKind.HUBER: nn.HuberLoss, LossKind.BCE_WITH_LOGITS: nn.BCEWithLogitsLoss}[self]()

    def target(self, output_shape: tuple[int, ...], dtype: torch.dtype,
               generator: torch.Generator | None = None) -> Tensor:
        """A random target for a model output of shape ``output_shape`` (``[N, C, *rest]``)."""
        if self is LossKind.CROSS_ENTROPY:
            if len(output_shape) < 2:
                raise ValueError(f"cross_entropy needs an output [N, C, ...] of class scores, got shape {output_shape}")
            shape = (output_shape[0],) + tuple(output_shape[2:])
            return torch.randint(0, output_shape[1], shape, generator=generator)
        if self is LossKind.BCE_WITH_LOGITS:
            return torch.rand(output_shape, generator=generator, dtype=dtype)
        return torch.randn(output_shape, generator=generator, dtype=dtype)


@dataclass(frozen=True)
class Network:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]  # per sample
    classes: int
    source: str
    input_kind: InputKind = InputKind.REAL
    vocab: int | None = None  # token ids are in [0, vocab) (InputKind.TOKENS)
    loss: LossKind = LossKind.CROSS_ENTROPY

    def __post_init__(self) -> None:
        if (self.input_kind is InputKind.TOKENS) != (self.vocab is not None):
            raise ValueError(f"{self.source}: a vocabulary size is given exactly for token inputs")

    def example_input(self, batch: int, dtype: torch.dtype = torch.float32,
                      generator: torch.Generator | None = None) -> Tensor:
        """A batch of ``batch`` random samples: ``dtype`` values from N(0, 1), or (tokens) int64 ids."""
        shape = (batch,) + self.input_shape
        if self.input_kind is InputKind.TOKENS:
            assert self.vocab is not None
            return torch.randint(0, self.vocab, shape, generator=generator)
        return torch.randn(shape, generator=generator, dtype=dtype)

    def example_target(self, batch: int, dtype: torch.dtype = torch.float32,
                       generator: torch.Generator | None = None) -> Tensor:
        """A random target for ``batch`` samples (class indices, or values shaped like the output)."""
        return self.loss.target((batch, self.classes), dtype, generator)


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


# ------------------------------------------------------------------------------------------------
# modern networks (issue #9): ResNet-18 for 32x32 images, a small ViT, a small text transformer.
# Written here (torchvision is not a dependency); every builder returns the model in eval mode:
# batch norm then uses its running statistics, so samples are independent (the loss is a sum or mean
# of per-sample terms, which every quantity of fxcurv assumes).


class BasicBlock(nn.Module):
    """ResNet's basic block (He et al. 2016, Fig. 2): ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))``
    with 3x3 convolutions without bias, ``s`` the identity or, where the stride or the channel count
    changes, a 1x1 convolution of that stride followed by batch norm."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu2 = nn.ReLU()
        self.downsample: nn.Sequential | None = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNet(nn.Module):
    """ResNet for small images, the CIFAR adaptation of torchvision's ``resnet18``: a 3x3 stem
    convolution of stride 1 (no 7x7 stride-2 stem, no max-pool), stages of :class:`BasicBlock` (the
    first of stride 1, the others of stride 2), global average pooling
    (``nn.AdaptiveAvgPool2d(1)``) and a linear head."""

    def __init__(self, widths: tuple[int, ...] = (64, 128, 256, 512), blocks: tuple[int, ...] = (2, 2, 2, 2),
                 in_channels: int = 3, classes: int = 10):
        super().__init__()
        if len(widths) != len(blocks) or not widths:
            raise ValueError(f"ResNet: one block count per stage width, got widths={widths}, blocks={blocks}")
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        cin = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            layers = [BasicBlock(cin if j == 0 else w, w, (1 if i == 0 else 2) if j == 0 else 1) for j in range(n)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.pool(self.stages(h))
        return self.fc(torch.flatten(h, 1))


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 images (11.2 M parameters), in eval mode."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), 3, classes).eval()


def resnet_tiny(classes: int = 3) -> nn.Module:
    """The same architecture at test size: widths 4 and 8, one block per stage (the second with a 1x1
    downsample shortcut), for 3x8x8 images; in eval mode."""
    return ResNet((4, 8), (1, 1), 3, classes).eval()


def _encoder_layers(dim: int, depth: int, heads: int, mlp: int, activation: str, norm_first: bool) -> nn.ModuleList:
    return nn.ModuleList(
        nn.TransformerEncoderLayer(dim, heads, mlp, dropout=0.0, activation=activation, batch_first=True,
                                   norm_first=norm_first)
        for _ in range(depth))


class ViT(nn.Module):
    """A small vision transformer (Dosovitskiy et al. 2021): non-overlapping ``patch x patch`` patches
    embedded by a convolution of that stride, ``z_0 = [cls; P_1; ...; P_T] + E_pos`` (a learned class
    token and position embedding), pre-norm encoder layers (``nn.TransformerEncoderLayer``,
    ``norm_first=True``, GELU, no dropout), a final LayerNorm, and a linear head on the class token
    (``pool="cls"``) or on the mean over tokens (``pool="mean"``)."""

    def __init__(self, image: int = 32, patch: int = 4, in_channels: int = 3, dim: int = 128, depth: int = 4,
                 heads: int = 4, mlp: int = 256, classes: int = 10, pool: str = "cls"):
        super().__init__()
        if image % patch:
            raise ValueError(f"ViT: the image size {image} must be a multiple of the patch size {patch}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"ViT: pool must be 'cls' or 'mean', got {pool!r}")
        self.pool = pool
        tokens = (image // patch) ** 2 + (pool == "cls")
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, tokens, dim))
        self.layers = _encoder_layers(dim, depth, heads, mlp, "gelu", norm_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.patch_embed(x).flatten(2).transpose(1, 2)  # [N, T, D]
        if self.cls_token is not None:
            h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.pos_embed
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h)
        h = h[:, 0] if self.pool == "cls" else h.mean(dim=1)
        return self.head(h)


def vit_small(classes: int = 10) -> nn.Module:
    """ViT for 32x32 images: 4x4 patches (64 tokens + class token), width 128, 4 layers of 4 heads,
    MLP 256 (0.55 M parameters); in eval mode."""
    return ViT(32, 4, 3, 128, 4, 4, 256, classes, "cls").eval()


def vit_tiny(classes: int = 3) -> nn.Module:
    """ViT at test size: 8x8 images in 4x4 patches (4 tokens + class token), width 8, one layer of
    2 heads, MLP 16; in eval mode."""
    return ViT(8, 4, 3, 8, 1, 2, 16, classes, "cls").eval()


class TextTransformer(nn.Module):
    """A small transformer text classifier: token embedding (``nn.Embedding``) plus a learned position
    embedding, post-norm encoder layers (``nn.TransformerEncoderLayer``, ReLU, no dropout), the mean
    over tokens, a linear head. Takes integer token ids ``[N, seq_len]`` in ``[0, vocab)``."""

    def __init__(self, vocab: int = 1000, seq_len: int = 64, dim: int = 128, depth: int = 2, heads: int = 4,
                 mlp: int = 256, classes: int = 4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, seq_len, dim))
        self.layers = _encoder_layers(dim, depth, heads, mlp, "relu", norm_first=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.pos_embed
        for layer in self.layers:
            h = layer(h)
        return self.head(h.mean(dim=1))


def text_transformer(classes: int = 4) -> nn.Module:
    """Text classifier: vocabulary 1000, 64 tokens, width 128, 2 layers of 4 heads, MLP 256 (0.40 M
    parameters); in eval mode."""
    return TextTransformer(1000, 64, 128, 2, 4, 256, classes).eval()


def text_tiny(classes: int = 3) -> nn.Module:
    """Text classifier at test size: vocabulary 11, 5 tokens, width 8, one layer of 2 heads, MLP 16;
    in eval mode."""
    return TextTransformer(11, 5, 8, 1, 2, 16, classes).eval()


NETWORKS: dict[str, Network] = {
    "hesscale_tanh": Network(hesscale_tanh, (6,), 10, "HesScale Sec. 4: 6-16-16-16-10 tanh"),
    "mnist_mlp": Network(mnist_mlp, (1, 28, 28), 10, "DeepOBS MNIST-MLP 784-1000-500-100-10 tanh (HesScale Sec. 5)"),
    "fcnn": Network(fcnn, (3, 32, 32), 10, "HBP Table S.2a: FCNN 3072-1024-...-16-10 sigmoid"),
    "cnn": Network(cnn, (3, 32, 32), 10, "HBP Table S.2b: CNN with sigmoids"),
    "c3d3": Network(c3d3, (3, 32, 32), 10, "HBP Table S.2c: DeepOBS c3d3 with sigmoids"),
    "resnet18": Network(resnet18, (3, 32, 32), 10, "ResNet-18 for 32x32 images (3x3 stem, no max-pool), eval mode"),
    "resnet_tiny": Network(resnet_tiny, (3, 8, 8), 3, "ResNet at test size: widths 4, 8, one block each, eval mode"),
    "vit_small": Network(vit_small, (3, 32, 32), 10, "ViT: 4x4 patches, width 128, 4 layers, 4 heads, class token"),
    "vit_tiny": Network(vit_tiny, (3, 8, 8), 3, "ViT at test size: 4x4 patches of 8x8 images, width 8, 1 layer"),
    "text_transformer": Network(text_transformer, (64,), 4, "transformer text classifier: 64 tokens of 1000, "
                                "width 128, 2 layers, mean over tokens", InputKind.TOKENS, vocab=1000),
    "text_tiny": Network(text_tiny, (5,), 3, "text classifier at test size: 5 tokens of 11, width 8, 1 layer",
                         InputKind.TOKENS, vocab=11),
}
