"""Small float64 problems for the optimizer tests and a helper that records one step's update."""

from __future__ import annotations

import torch
from torch import nn

DT = torch.float64


def mlp(n: int, loss: str = "ce") -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Linear-Tanh-Linear on ``n`` samples: cross-entropy over 3 classes or summed squared error."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(DT)
    x = torch.randn(n, 3, dtype=DT)
    if loss == "ce":
        return model, nn.CrossEntropyLoss(), x, torch.tensor([0, 2, 1, 1, 0, 2][:n])
    return model, nn.MSELoss(reduction="sum"), x, torch.randn(n, 3, dtype=DT)


def cnn(n: int) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """Conv2d-Tanh-Flatten-Linear on ``n`` 2x4x4 inputs, cross-entropy over 3 classes."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(32, 3)).to(DT)
    return model, nn.CrossEntropyLoss(), torch.randn(n, 2, 4, 4, dtype=DT), torch.tensor([0, 2, 1, 1][:n])


PROBLEMS = {"mlp-N1": lambda: mlp(1), "mlp-N4": lambda: mlp(4), "mlp-mse-N3": lambda: mlp(3, "sum"),
            "cnn-N1": lambda: cnn(1), "cnn-N3": lambda: cnn(3)}


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def step_delta(opt, x, y) -> dict[str, torch.Tensor]:
    """``theta_after - theta_before`` of one ``opt.step(x, y)``."""
    before = params(opt.model)
    opt.step(x, y)
    return {n: p.detach() - before[n] for n, p in opt.model.named_parameters()}


def flat(tensors: dict[str, torch.Tensor], names) -> torch.Tensor:
    return torch.cat([tensors[n].reshape(-1) for n in names])
