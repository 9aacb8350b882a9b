"""Compilation is deterministic: the same model gives the same program in every process.

Nothing the compiler decides may depend on the iteration order of a set of fx nodes (their hashes
are object ids, which vary between runs and with every allocation) or of a set of strings (whose
hashes vary with ``PYTHONHASHSEED``).
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch
from architectures import SharedTwice

import fxcurv

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fxcurv.__file__)))

# Residual MLP blocks with several activations (every diagonal quantity at once, and HesScale alone)
# and a residual CNN with padding, pooling and a convolution used twice. Prints the programs.
_SCRIPT = r"""
import torch
from torch import nn
import fxcurv

torch.manual_seed(0)

class Residual(nn.Module):
    def __init__(self, width, act):
        super().__init__()
        self.inner, self.act = nn.Linear(width, width), act

    def forward(self, h):
        return h + self.act(self.inner(h))

class ConvResidual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, h):
        return h + torch.tanh(self.conv(h))

class ConvTwice(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, h):
        return torch.sigmoid(self.conv(torch.tanh(self.conv(h))))

quantities = ("hesscale", "hesscale_gn", "diag_ggn", "diag_hessian")
mlp = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), Residual(5, nn.Tanh()), Residual(5, nn.Sigmoid()),
                    Residual(5, nn.GELU()), nn.Linear(5, 3))
cnn = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Sigmoid(), nn.ZeroPad2d((1, 0, 0, 1)), nn.MaxPool2d(2, stride=1),
                    ConvResidual(3), ConvTwice(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
# hesscale alone: the bundle [1, N, D] and the diagonals [N, D] tie in size.
for model, x, qs in ((mlp, torch.randn(3, 4), quantities), (mlp, torch.randn(3, 4), ("hesscale",)),
                     (cnn, torch.randn(2, 2, 6, 6), quantities)):
    engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=qs)
    y = torch.tensor([0, 2, 1])[: x.shape[0]]
    engine(x, y)
    engine(x, y)  # the fused program
    print(engine.graph)
    print(engine.code)
"""


def _program_text(hash_seed: int) -> subprocess.Popen:
    env = dict(os.environ, PYTHONHASHSEED=str(hash_seed))
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.Popen([sys.executable, "-c", _SCRIPT], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_same_program_in_every_process():
    procs = [_program_text(seed) for seed in (0, 1, 2, 3)]
    texts = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
        texts.append(out)
    assert "fuses:" in texts[0]
    for seed, text in zip((1, 2, 3), texts[1:]):
        assert text == texts[0], f"PYTHONHASHSEED={seed} compiled another program than PYTHONHASHSEED=0"


def test_same_program_whatever_the_allocation_history():
    """Sets of fx nodes iterate in the order of their ids: allocations between compilations change
    it. With hesscale alone the bundle ``[1, N, D]`` and the diagonals ``[N, D]`` tie in size, which
    chose a region's iteration space by that order."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), SharedTwice(3, "tanh"), nn.Linear(3, 3))
    x, y = torch.randn(5, 4), torch.tensor([0, 2, 1, 0, 1])
    texts, keep = set(), []
    for i in range(6):
        keep.append([object() for _ in range(1 + 733 * i)])  # shift the addresses of the next nodes
        engine = fxcurv.compile(model, nn.CrossEntropyLoss(), quantities=("hesscale",))
        engine(x, y)
        engine(x, y)
        texts.add(str(engine.graph) + engine.code)
    assert len(texts) == 1
