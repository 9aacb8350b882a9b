"""Embeddings (``fxcurv/rules/embedding.py``) end to end: models whose input is integer indices (float64).

The rules are checked one by one against torch.func in ``tests/rules/test_generic.py``; here nets
with an embedding are compiled and ``grad``, ``diag_ggn``, ``diag_hessian`` (torch.func),
``hesscale`` / ``hesscale_gn`` (brute-force HesScale) and ``diag_ggn`` (BackPACK's DiagGGNExact) are
compared, with rows read several times by one sample and a padding row; the per-sample quantities
against per-sample references; a weight tied between the embedding and the output layer (a language
model's) with its mixed second derivatives; and the refused configurations.
"""

from __future__ import annotations

import per_sample_reference as ps_ref
import pytest
import reference
import torch
import torch.nn.functional as F
from helpers import assert_close, check_against_references, check_layer_net
from torch import nn

import fxcurv

DT = torch.float64


def tokens(n: int = 3, length: int = 4, vocab: int = 7, seed: int = 0) -> torch.Tensor:
    """Indices ``[n, length]``; sample 0 reads row 1 twice and every sample reads the padding row 2
    at its last position."""
    x = torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))
    x[0, :2] = 1
    x[:, -1] = 2
    return x


def bag_of_embeddings(padding_idx: int | None = 2) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(7, 3, padding_idx=padding_idx), nn.Tanh(), nn.Flatten(),
                         nn.Linear(12, 3)).to(DT)


@pytest.mark.parametrize("padding_idx", [None, 2], ids=["no_padding", "padding"])
@pytest.mark.parametrize("loss_fn", [nn.CrossEntropyLoss(), nn.MSELoss(reduction="sum")], ids=["ce", "mse_sum"])
def test_embedding_net_is_exact(loss_fn, padding_idx):
    model = bag_of_embeddings(padding_idx)
    x = tokens()
    y = torch.tensor([0, 2, 1]) if isinstance(loss_fn, nn.CrossEntropyLoss) else torch.randn(3, 3, dtype=DT)
    # BackPACK 1.7's embedding takes padding_idx=None only
    out = check_layer_net(model, loss_fn, x, y, backpack=padding_idx is None)
    if padding_idx is not None:  # torch gives the padding row no gradient: nothing is collected there
        for q in ("diag_ggn", "diag_hessian", "hesscale"):
            assert out[q]["0.weight"][padding_idx].abs().max() == 0
        assert out["diag_ggn"]["0.weight"].abs().max() > 0


def test_per_sample_quantities():
    """``batch_grad``, ``batch_l2_grad``, ``sum_grad_squared`` and ``batch_diag_ggn`` against ``vmap(grad)``
    and per-sample GGNs from torch.func."""
    model = bag_of_embeddings()
    loss_fn, x, y = nn.CrossEntropyLoss(), tokens(), torch.tensor([0, 2, 1])
    first = ("batch_grad", "batch_l2_grad", "sum_grad_squared")
    out = fxcurv.compile(model, loss_fn, quantities=first + ("batch_diag_ggn",))(x, y)
    want = ps_ref.first_order(model, loss_fn, x, y)
    for q in first:
        assert_close(out[q], want[q], rtol=1e-10, what=q)
    assert_close(out["batch_diag_ggn"], ps_ref.batch_diag_ggn(model, loss_fn, x, y), rtol=1e-10,
                 what="batch_diag_ggn")


class TiedLanguageModel(nn.Module):
    """Logits from the embedding's own weight (``h E^T``): one weight read by the embedding and by a
    linear map whose input depends on it -- the mixed second derivative of HBP eq. S.6."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.mix = nn.Linear(9, 3)

    def forward(self, x):
        h = torch.tanh(self.mix(self.emb(x).flatten(1)))
        return F.linear(h, self.emb.weight)


def test_tied_embedding_and_output_weight():
    torch.manual_seed(4)
    model = TiedLanguageModel().to(DT)
    x = tokens(vocab=6, length=3)
    check_against_references(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 5, 3]))


def test_one_index_per_sample_functional_negative_padding():
    """Integer inputs of another shape: one index per sample ``[N]``, ``F.embedding`` with ``padding_idx=-1``."""
    torch.manual_seed(5)

    class OneToken(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(5, 4))
            self.out = nn.Linear(4, 3)

        def forward(self, x):
            return self.out(torch.sigmoid(F.embedding(x, self.weight, padding_idx=-1)))

    model = OneToken().to(DT)
    x = torch.tensor([0, 4, 2, 0])
    out = check_against_references(model, nn.CrossEntropyLoss(), x, torch.tensor([0, 1, 2, 1]))
    assert out["diag_ggn"]["weight"][4].abs().max() == 0  # padding_idx=-1 is row 4


@pytest.mark.parametrize("kw, match", [({"max_norm": 1.0}, "max_norm=1.0"),
                                       ({"scale_grad_by_freq": True}, "couples the samples")],
                         ids=["max_norm", "scale_grad_by_freq"])
def test_refused_configurations(kw, match):
    model = nn.Sequential(nn.Embedding(7, 3, **kw), nn.Flatten(), nn.Linear(12, 3)).to(DT)
    with pytest.raises(fxcurv.UnsupportedOpError, match=match) as info:
        fxcurv.compile(model, nn.CrossEntropyLoss())(tokens(), torch.tensor([0, 2, 1]))
    assert str(info.value).startswith("node '") and "Embedding" in str(info.value).split(":")[0]


def test_int32_indices_and_data_set_accumulation():
    """``int32`` indices, and ``engine.accumulate`` over batches of integer inputs: the data set's exact
    GGN diagonal and gradient."""
    model = bag_of_embeddings()
    loss_fn, x, y = nn.CrossEntropyLoss(), tokens(n=5, seed=3), torch.tensor([0, 2, 1, 1, 0])
    engine = fxcurv.compile(model, loss_fn, quantities=("diag_ggn",))
    out = engine.accumulate([(x[:2].int(), y[:2]), (x[2:].int(), y[2:])])
    assert_close(out.grad, reference.grad(model, loss_fn, x, y), what="grad")
    assert_close(out["diag_ggn"], reference.diag_ggn(model, loss_fn, x, y), what="diag_ggn")
