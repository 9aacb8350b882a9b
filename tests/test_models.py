"""Any model people train (issue #9): tiny transformers, ViTs, ResNets in eval mode, sequence and volume
convolutions, models written with functional calls and tensor methods, and the losses beyond
CrossEntropyLoss/MSELoss -- exact against torch.func (float64).

The models use ``nn.TransformerEncoderLayer``, ``nn.MultiheadAttention``, ``nn.LayerNorm``,
``nn.Embedding``, ``x.mean(1)``, ``torch.cat``, slicing, ``x.transpose(1, 2)`` and a class token expanded
over the batch: hand-written ops where fxcurv has them, the generic rule (fxcurv.rules.generic) for the
rest (the class token's concatenation, masked attention). grad, diag_ggn and diag_hessian
must equal the references of ``tests/reference.py`` (torch.func on the flattened parameters) to 1e-8;
hesscale must be finite and, for the last linear layer, exact (HesScale's claim).
"""

from __future__ import annotations

import pytest
import reference as ref
import torch
import torch.nn.functional as F
from helpers import GenericAffine, rel_error
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import fxcurv

DT = torch.float64
RTOL = 1e-8


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: tests/conftest.py


class TextClassifier(nn.Module):
    """Tokens -> embeddings + learned positions -> one encoder layer -> mean over tokens -> classes."""

    def __init__(self, vocab: int = 11, tokens: int = 4, d: int = 8, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.position = nn.Parameter(0.1 * torch.randn(1, tokens, d))
        self.encoder = nn.TransformerEncoderLayer(d, 2, 12, dropout=0.0, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.encoder(self.embed(x) + self.position)
        return self.head(h.mean(1))


class TinyViT(nn.Module):
    """Patches by a strided convolution, a class token expanded over the batch, attention with a
    pre-norm residual written out, GELU MLP, the class token's features to the head."""

    def __init__(self, d: int = 6, patch: int = 2, image: int = 4, classes: int = 3):
        super().__init__()
        self.patches = nn.Conv2d(2, d, patch, stride=patch)
        self.cls = nn.Parameter(0.1 * torch.randn(1, 1, d))
        self.position = nn.Parameter(0.1 * torch.randn(1, (image // patch) ** 2 + 1, d))
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 8), nn.GELU(), nn.Linear(8, d))
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.patches(x).flatten(2).transpose(1, 2)  # [N, P, d]
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), h], dim=1) + self.position
        a = self.norm1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h[:, 0])


class Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = (nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
                         if stride != 1 or c_in != c_out else nn.Identity())

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


class TinyResNet(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU())
        self.blocks = nn.Sequential(Block(3, 3, 1), Block(3, 4, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class Functional(nn.Module):
    """Functional calls and tensor methods on raw parameters: F.linear, chunk, cat, scalar
    arithmetic, slicing, transpose, softmax, F.layer_norm, a weight used transposed."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(0.5 * torch.randn(6, 4))
        self.b1 = nn.Parameter(0.1 * torch.randn(6))
        self.w2 = nn.Parameter(0.5 * torch.randn(3, 5))
        self.gain = nn.Parameter(1 + 0.1 * torch.randn(5))

    def forward(self, x):  # x [N, 3, 4]
        h = torch.tanh(F.linear(x, self.w1, self.b1))  # [N, 3, 6]
        a, b = h.chunk(2, dim=-1)
        h = torch.cat([a * torch.sigmoid(b), 0.5 * a - 1.0], dim=-1)[:, :, :5]  # [N, 3, 5]
        h = h.transpose(1, 2).softmax(-1).transpose(1, 2)
        h = F.layer_norm(h, (5,)) * self.gain
        return h.mean(1) @ self.w2.t()


class Encoder(nn.Module):
    """``nn.TransformerEncoder`` of pre-norm GELU layers with a final norm; with ``causal``, a causal mask
    (then the encoder is kept whole, a generic node; without, it is traced through its math path)."""

    def __init__(self, causal: bool, d: int = 6, tokens: int = 3, classes: int = 3):
        super().__init__()
        layer = nn.TransformerEncoderLayer(d, 2, 8, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d), enable_nested_tensor=False)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(tokens) if causal else None)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        h = self.encoder(x, mask=self.mask) if self.mask is not None else self.encoder(x)
        return self.head(h[:, -1])


def sequence_net() -> nn.Module:
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ELU(), nn.MaxPool1d(2), nn.Conv1d(3, 2, 2),
                         nn.Flatten(), nn.Linear(4, 3))


def volume_net() -> nn.Module:
    return nn.Sequential(nn.Conv3d(1, 2, 2), nn.Sigmoid(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(2, 3))


class Segmenter(nn.Module):
    """Per-pixel classes, ``[N, C, H, W]``: cross-entropy over a map of targets."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.c2(torch.tanh(self.c1(x)))


def _eval_bn(model: nn.Module) -> nn.Module:
    """Random running statistics and affine parameters, then eval mode: BatchNorm is a per-channel affine map."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def _classes(n: int, c: int = 3, *rest: int) -> torch.Tensor:
    return torch.randint(0, c, (n, *rest))


# name -> (model factory, input, target, loss)
MODELS = {
    "transformer_text": (TextClassifier, lambda: torch.randint(0, 11, (3, 4)), lambda: _classes(3),
                         nn.CrossEntropyLoss()),
    "transformer_encoder": (lambda: Encoder(causal=False), lambda: torch.randn(3, 3, 6, dtype=DT),
                            lambda: _classes(3), nn.CrossEntropyLoss()),
    "transformer_encoder_causal": (lambda: Encoder(causal=True), lambda: torch.randn(3, 3, 6, dtype=DT),
                                   lambda: _classes(3), nn.CrossEntropyLoss()),
    "vit": (TinyViT, lambda: torch.randn(3, 2, 4, 4, dtype=DT), lambda: _classes(3), nn.CrossEntropyLoss()),
    "resnet_eval_bn": (lambda: _eval_bn(TinyResNet()), lambda: torch.randn(2, 2, 6, 6, dtype=DT),
                       lambda: _classes(2), nn.CrossEntropyLoss()),
    "functional": (Functional, lambda: torch.randn(3, 3, 4, dtype=DT), lambda: _classes(3), nn.CrossEntropyLoss()),
    "conv1d": (sequence_net, lambda: torch.randn(3, 2, 6, dtype=DT), lambda: _classes(3), nn.CrossEntropyLoss()),
    "conv3d": (volume_net, lambda: torch.randn(2, 1, 3, 3, 3, dtype=DT), lambda: torch.randn(2, 3, dtype=DT),
               nn.MSELoss()),
    "segmentation_ce": (Segmenter, lambda: torch.randn(2, 2, 3, 3, dtype=DT), lambda: _classes(2, 3, 3, 3),
                        nn.CrossEntropyLoss()),
    "bce_with_logits": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)),
                        lambda: torch.randn(3, 4, dtype=DT), lambda: torch.rand(3, 3, dtype=DT),
                        nn.BCEWithLogitsLoss()),
    "nll_after_log_softmax": (lambda: nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LogSoftmax(1)),
                              lambda: torch.randn(3, 4, dtype=DT), lambda: _classes(3), nn.NLLLoss()),
}


def _build(name: str):
    torch.manual_seed(sum(map(ord, name)))
    make, x, y, loss = MODELS[name]
    return make().to(DT), x(), y(), loss


def _references(model, loss, x, y):
    with sdpa_kernel([SDPBackend.MATH]):  # SDPA's CPU flash kernel has no second derivatives
        return {"grad": ref.grad(model, loss, x, y), "diag_ggn": ref.diag_ggn(model, loss, x, y),
                "diag_hessian": ref.diag_hessian(model, loss, x, y)}


@pytest.mark.parametrize("name", list(MODELS))
def test_exact_on_model_family(name):
    model, x, y, loss = _build(name)
    out = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian", "hesscale"))(x, y)
    want = _references(model, loss, x, y)
    for quantity, values in want.items():
        got = out["grad"] if quantity == "grad" else out[quantity]
        for pname, value in values.items():
            if value.abs().max() == 0:
                assert got[pname].abs().max() == 0, f"{quantity}[{pname}] should be zero"
                continue
            err = rel_error(got[pname], value)
            assert err < RTOL, f"{name}: {quantity}[{pname}] relative error {err:.2e}"
    for pname, value in out["hesscale"].items():
        assert torch.isfinite(value).all(), f"{name}: hesscale[{pname}] is not finite"


def test_program_of_a_transformer_lists_generic_nodes():
    """The program stays printable: the generic nodes name what the user wrote."""
    model, x, y, loss = _build("transformer_text")
    engine = fxcurv.compile(model, loss, quantities=("diag_ggn",))
    engine(x, y)
    listing = engine.listing()
    # The encoder layer is traced through its math path, its attention too: linear, norm, slices of the
    # packed projection, softmax, the products of activations and the mean over tokens are all
    # hand-written ops (no generic node is left).
    forward = listing.split("# backward")[0]
    assert "= generic(" not in forward and "= index(" in forward and "= reduce_sum(" in forward
    for op in ("= matmul(", "= softmax(", "= layer_norm(", "= permute("):
        assert op in forward, op
    assert "encoder.linear1" in listing and "encoder.linear2" in listing
    assert "TransformerEncoderLayer" not in listing and "MultiheadAttention" not in listing


@pytest.mark.parametrize("norm", [nn.LayerNorm, GenericAffine], ids=["layer_norm", "generic_affine"])
def test_block_ggn_through_generic_op(norm):
    """The exact per-parameter GGN blocks (matrix-free products with the ops' own JVPs and VJPs) take a
    generic op's parameters too (``torch.addcmul``'s weight and bias), and the hand layer_norm op's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), norm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    with torch.no_grad():
        model[1].weight.normal_()
        model[1].bias.normal_()
    x, y, loss = torch.randn(4, 4, dtype=DT), torch.randint(0, 3, (4,)), nn.CrossEntropyLoss()
    out = fxcurv.compile(model, loss, quantities=("block_ggn",))(x, y)
    for name, block in ref.diagonal_blocks(ref.ggn(model, loss, x, y), model).items():
        dense = out["block_ggn"][name] @ torch.eye(block.shape[0], dtype=DT)
        assert rel_error(dense, block) < RTOL, name


class _Attention(nn.Module):
    """One attention block calling nn.MultiheadAttention the way ``call`` says (self or cross attention,
    masks, the averaged weights used or not)."""

    def __init__(self, call: str):
        super().__init__()
        self.call = call
        self.embed = nn.Linear(3, 8)
        self.other = nn.Linear(3, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.embed(x))
        if self.call == "self":
            a = self.attn(h, h, h, need_weights=False)[0]
        elif self.call == "weights_used":
            a, w = self.attn(h, h, h)  # [N, T, E] and the weights averaged over heads [N, T, T]
            a = a + w @ h
        elif self.call == "cross":
            c = torch.tanh(self.other(x))
            a = self.attn(h, c, c, need_weights=False)[0]
        else:  # causal
            t = x.shape[1]
            mask = torch.triu(torch.full((t, t), float("-inf"), dtype=x.dtype), diagonal=1)
            a = self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        return self.head((h + a).mean(1))


@pytest.mark.parametrize("call, expanded", [("self", True), ("weights_used", True), ("cross", False),
                                            ("causal", False)])
def test_multihead_attention_expanded_into_hand_ops_or_kept_whole(call, expanded):
    """Batch-first self-attention without masks is traced through its math path (linear, slices, heads,
    matmul, softmax: no generic node for the attention); cross attention and masks keep the module whole
    (one generic node). Both exact against torch.func."""
    torch.manual_seed(0)
    model, loss = _Attention(call).to(DT).eval(), nn.CrossEntropyLoss()
    x, y = torch.randn(3, 4, 3, dtype=DT), torch.randint(0, 3, (3,))
    engine = fxcurv.compile(model, loss, quantities=("diag_ggn", "diag_hessian"))
    out = engine(x, y)
    want = _references(model, loss, x, y)
    for quantity, values in want.items():
        got = out["grad"] if quantity == "grad" else out[quantity]
        for pname, value in values.items():
            err = rel_error(got[pname], value)
            assert err < RTOL, f"{call}: {quantity}[{pname}] relative error {err:.2e}"
    forward = engine.listing().split("# backward")[0]
    assert ("MultiheadAttention" not in forward) == expanded, forward
    assert ("= softmax(" in forward and "= matmul(" in forward) == expanded, forward
