"""Saving results: ``torch.save(result)`` and ``torch.load(path, weights_only=True)`` give the result back
(loss, gradient, tensor quantities, Kronecker blocks); ``result.to_dict()`` is plain tensors and tuples;
matrix-free blocks are refused by both with what to save instead."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import fxcurv
from fxcurv.api import Result

DT = torch.float64


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(6, 3)).to(DT)
    return model, nn.CrossEntropyLoss(), torch.randn(4, 2, 4, 3, dtype=DT), torch.tensor([0, 2, 1, 1])


def roundtrip(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_result_roundtrips_with_weights_only():
    model, loss_fn, x, y = model_and_data()
    quantities = ("diag_ggn", "batch_grad", "batch_l2_grad", "sqrt_ggn", "kflr")
    out = fxcurv.compile(model, loss_fn, quantities=quantities)(x, y)
    back = roundtrip(out)
    assert isinstance(back, Result) and list(back) == list(out)
    assert torch.equal(back.loss, out.loss)
    for q in out:
        assert list(back[q]) == list(out[q])
        for name, value in out[q].items():
            if q == "kflr":
                assert isinstance(back[q][name], fxcurv.Kronecker)
                assert back[q][name].param_shape == value.param_shape
                assert all(torch.equal(a, b) for a, b in zip(back[q][name].factors, value.factors))
                v = torch.randn(value.param_shape, dtype=DT)
                assert torch.allclose(back[q][name] @ v, value @ v)
            else:
                assert torch.equal(back[q][name], value), (q, name)


def test_transposed_layout_roundtrips_with_weights_only():
    """A transposed convolution's block keeps its KroneckerLayout through torch.save / weights_only load."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.ConvTranspose2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(27, 3)).to(DT)
    out = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("kflr",))(torch.randn(2, 2, 2, 2, dtype=DT),
                                                                             torch.tensor([0, 2]))
    back = roundtrip(out)["kflr"]["0.weight"]
    assert back.layout is fxcurv.KroneckerLayout.TRANSPOSED
    assert torch.equal(back.to_dense(), out["kflr"]["0.weight"].to_dense())


def test_to_dict_is_plain():
    model, loss_fn, x, y = model_and_data()
    out = fxcurv.compile(model, loss_fn, quantities=("variance", "kfac"), seed=0)(x, y)
    plain = out.to_dict()
    assert list(plain) == ["loss", "grad", "variance", "kfac"]
    back = roundtrip(plain)
    assert torch.equal(back["loss"], out.loss)
    assert all(torch.equal(back["variance"][k], v) for k, v in out["variance"].items())
    for name, block in out["kfac"].items():
        assert isinstance(back["kfac"][name], tuple)
        rebuilt = fxcurv.Kronecker(back["kfac"][name], block.param_shape)
        assert torch.equal(rebuilt.to_dense(), block.to_dense())


def test_matrix_free_blocks_are_refused_with_what_to_save():
    model, loss_fn, x, y = model_and_data()
    out = fxcurv.compile(model, loss_fn, quantities=("block_ggn",))(x, y)
    with pytest.raises(TypeError, match=r"block_ggn\['0.weight'\].*to_dense\(\)"):
        torch.save(out, io.BytesIO())
    with pytest.raises(TypeError, match=r"block_ggn\['0.weight'\]"):
        out.to_dict()


def test_deep_copies_are_not_saves():
    model, loss_fn, x, y = model_and_data()
    out = fxcurv.compile(model, loss_fn, quantities=("block_ggn", "kflr"))(x, y)
    copied = copy.deepcopy(out)
    v = torch.randn(3, 2, 3, 3, dtype=DT)
    assert torch.allclose(copied["block_ggn"]["0.weight"] @ v, out["block_ggn"]["0.weight"] @ v)
    assert copied["kflr"]["0.weight"].factors[0] is not out["kflr"]["0.weight"].factors[0]
