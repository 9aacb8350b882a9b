"""A table of small float64 problems in the spirit of BackPACK's own second-order test suite.

BackPACK (1.7.1) checks its extensions on a list of tiny networks, one per layer type and
configuration (``test/extensions/secondorder/*_settings.py`` in its repository). This module writes
our own such list, so that ``tests/test_backpack_problems.py`` can run BackPACK and fxcurv on every
entry and compare. An entry (:class:`Problem`) says how to build the model and the loss, what the
inputs look like (real tensors, or integer indices for an embedding) and how the targets are drawn.

Every model is a ``torch.nn.Sequential`` built from ``torch.nn`` layers and BackPACK's own custom
modules where BackPACK needs them to express an operation (``ScaleModule`` for ``x * c``,
``Slicing`` for ``x[...]``, ``Permute`` for a transposition, ``Parallel`` for a residual block), so
that the same module object runs under BackPACK (after ``extend``) and under fxcurv (which traces the
custom modules' ``forward`` like any other code).

Sizes are kept small (batch ``N = 3``, a few channels) so that the whole table runs in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

DT = torch.float64
N = 3


class Target(Enum):
    """How the targets of a problem are drawn from the model output ``f`` (shape ``[N, C, *d]``)."""

    CLASSES = "classes"  # integer classes in [0, C), shape [N, *d] (CrossEntropyLoss)
    REAL = "real"  # standard normal, shaped like f (MSELoss)
    BINARY = "binary"  # 0. / 1. in float, shaped like f (BCEWithLogitsLoss)


@dataclass(frozen=True)
class Problem:
    """One test problem.

    ``model`` builds the network (any dtype; the tests move it to float64); ``loss`` the loss module;
    ``input_shape`` is one sample's shape; ``vocabulary`` makes the input integer indices in
    ``[0, vocabulary)`` (an embedding's input) instead of standard normal reals; ``target`` says how
    the targets are drawn; ``eval_mode`` switches the model to evaluation (BatchNorm uses its running
    statistics, Dropout is the identity).
    """

    name: str
    model: Callable[[], nn.Module]
    loss: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    target: Target
    vocabulary: int | None = None
    eval_mode: bool = False
    converter: bool = False  # BackPACK needs extend(..., use_converter=True) (a plain residual module)
    note: str = field(default="", compare=False)


def inputs(problem: Problem, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` for ``problem``, drawn from a generator seeded with ``seed``; ``y`` from the output
    shape of the model (one float64 forward on ``x``)."""
    g = torch.Generator().manual_seed(seed)
    if problem.vocabulary is not None:
        x = torch.randint(0, problem.vocabulary, (N, *problem.input_shape), generator=g)
    else:
        x = torch.randn(N, *problem.input_shape, dtype=DT, generator=g)
    with torch.no_grad():
        f = build(problem)(x)
    if problem.target is Target.CLASSES:
        y = torch.randint(0, f.shape[1], (f.shape[0], *f.shape[2:]), generator=g)
    elif problem.target is Target.REAL:
        y = torch.randn(f.shape, dtype=DT, generator=g)
    else:
        y = torch.randint(0, 2, f.shape, generator=g).to(DT)
    return x, y


def build(problem: Problem, seed: int = 0) -> nn.Module:
    """The float64 model of ``problem`` with parameters (and BatchNorm's running statistics) drawn
    after ``torch.manual_seed(seed)``; in evaluation mode where the problem says so."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = problem.model().to(DT)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                # non-trivial statistics and affine parameters: the identity would hide mistakes
                mean, var = module.running_mean, module.running_var
                if mean is None or var is None:
                    raise ValueError(f"{problem.name}: a BatchNorm without running statistics")
                with torch.no_grad():
                    mean.copy_(torch.randn_like(mean))
                    var.copy_(torch.rand_like(var) + 0.5)
                    module.weight.copy_(torch.randn_like(module.weight))
                    module.bias.copy_(torch.randn_like(module.bias))
    if problem.eval_mode:
        model.eval()
    return model


# ---- building blocks ----------------------------------------------------------------------------

def with_head(body: Callable[[], list[nn.Module]], input_shape: tuple[int, ...], classes: int = 3
              ) -> Callable[[], nn.Sequential]:
    """``body`` followed by ``Flatten`` and a ``Linear`` to ``classes`` outputs, its input size read
    from one forward of ``body`` on a zero sample."""
    def make() -> nn.Sequential:
        layers = body()
        body_net = nn.Sequential(*layers).eval()  # eval: BatchNorm takes one sample, keeps its statistics
        with torch.no_grad():
            flat = body_net(torch.zeros(1, *input_shape)).numel()
        body_net.train()
        return nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, classes))
    return make


def _ce(reduction: str = "mean") -> Callable[[], nn.Module]:
    return lambda: nn.CrossEntropyLoss(reduction=reduction)


def _mse(reduction: str = "mean") -> Callable[[], nn.Module]:
    return lambda: nn.MSELoss(reduction=reduction)


def _bce(reduction: str = "mean") -> Callable[[], nn.Module]:
    return lambda: nn.BCEWithLogitsLoss(reduction=reduction)


def _mlp(act: Callable[[], nn.Module]) -> Callable[[], nn.Sequential]:
    return lambda: nn.Sequential(nn.Linear(5, 4), act(), nn.Linear(4, 3))


def _scale() -> nn.Module:
    from backpack.custom_module.scale_module import ScaleModule

    return ScaleModule(weight=0.7)


def _slicing() -> nn.Module:
    from backpack.custom_module.slicing import Slicing

    return Slicing((slice(None), slice(1, 5)))


def _permute(*dims: int) -> nn.Module:
    from backpack.custom_module.permute import Permute

    return Permute(*dims)


class PlainResidual(nn.Module):
    """``x + inner(x)`` written as plain torch: BackPACK handles it only through its converter."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


def _parallel(*branches: nn.Module) -> nn.Module:
    from backpack.custom_module.branching import Parallel

    return Parallel(*branches)


# ---- the table ----------------------------------------------------------------------------------

def _problems() -> list[Problem]:
    p: list[Problem] = []
    # dense networks and the three losses, both reductions
    p += [
        Problem("linear_ce_mean", lambda: nn.Sequential(nn.Linear(6, 4)), _ce("mean"), (6,), Target.CLASSES),
        Problem("linear_relu_ce_sum", lambda: nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)),
                _ce("sum"), (6,), Target.CLASSES),
        Problem("linear_sigmoid_mse_mean", lambda: nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 4)),
                _mse("mean"), (6,), Target.REAL),
        Problem("linear_tanh_mse_sum", lambda: nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)),
                _mse("sum"), (6,), Target.REAL),
        Problem("linear_nobias", lambda: nn.Sequential(nn.Linear(6, 5, bias=False), nn.Tanh(),
                                                       nn.Linear(5, 4, bias=False)), _ce("mean"), (6,), Target.CLASSES),
    ]
    # elementwise activations between two linear layers
    for act in (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.ELU, nn.LeakyReLU, nn.SELU, nn.LogSigmoid):
        p.append(Problem(f"act_{act.__name__.lower()}", _mlp(act), _ce("mean"), (5,), Target.CLASSES))
    # convolutions
    conv = [
        ("conv1d", lambda: [nn.Conv1d(2, 3, 2, stride=2, padding=1), nn.ReLU()], (2, 7)),
        ("conv1d_nobias_dilated", lambda: [nn.Conv1d(2, 3, 3, dilation=2, bias=False), nn.Sigmoid()], (2, 8)),
        ("conv2d", lambda: [nn.Conv2d(2, 3, 2, stride=2, padding=1), nn.ReLU()], (2, 5, 5)),
        ("conv2d_nobias_dilated", lambda: [nn.Conv2d(2, 3, 2, dilation=2, bias=False), nn.Tanh()], (2, 5, 5)),
        ("conv3d", lambda: [nn.Conv3d(2, 2, 2, stride=2, padding=1), nn.ReLU()], (2, 3, 4, 4)),
        ("conv_transpose1d", lambda: [nn.ConvTranspose1d(2, 3, 2, stride=2, padding=1), nn.ReLU()], (2, 4)),
        ("conv_transpose2d", lambda: [nn.ConvTranspose2d(2, 3, 2, stride=2, dilation=2), nn.ReLU()], (2, 3, 3)),
        ("conv_transpose2d_nobias", lambda: [nn.ConvTranspose2d(2, 3, 3, padding=1, bias=False), nn.Sigmoid()],
         (2, 3, 3)),
        ("conv_transpose3d", lambda: [nn.ConvTranspose3d(2, 2, 2), nn.ReLU()], (2, 2, 2, 3)),
        ("conv1d_grouped", lambda: [nn.Conv1d(4, 6, 2, groups=2), nn.ReLU()], (4, 5)),
        ("conv2d_grouped", lambda: [nn.Conv2d(4, 6, 2, groups=2), nn.ReLU()], (4, 4, 4)),
        ("conv2d_depthwise", lambda: [nn.Conv2d(3, 6, 2, padding=1, groups=3), nn.Tanh()], (3, 3, 3)),
        ("conv3d_grouped", lambda: [nn.Conv3d(4, 2, 2, groups=2), nn.ReLU()], (4, 2, 3, 3)),
        ("conv_transpose2d_grouped", lambda: [nn.ConvTranspose2d(4, 2, 2, groups=2), nn.ReLU()], (4, 3, 3)),
    ]
    for name, body, shape in conv:
        p.append(Problem(name, with_head(body, shape), _ce("sum" if "1d" in name else "mean"), shape, Target.CLASSES))
    # pooling: after a Conv2d (2-D), after a Linear on the last axis (1-D, 3-D), so a parameter sits below
    pool = [
        ("maxpool2d", lambda: [nn.Conv2d(2, 3, 2, padding=1), nn.MaxPool2d(2)], (2, 5, 5)),
        ("maxpool2d_overlapping", lambda: [nn.Conv2d(2, 2, 2), nn.MaxPool2d(3, stride=1, padding=1)], (2, 4, 4)),
        ("avgpool2d", lambda: [nn.Conv2d(2, 3, 2, padding=1), nn.ReLU(), nn.AvgPool2d(2, stride=1)], (2, 4, 4)),
        ("maxpool1d", lambda: [nn.Linear(6, 6), nn.MaxPool1d(2)], (2, 6)),
        ("avgpool1d", lambda: [nn.Linear(6, 6), nn.AvgPool1d(3, stride=1)], (2, 6)),
        ("maxpool3d", lambda: [nn.Linear(4, 4), nn.MaxPool3d(2)], (2, 2, 2, 4)),
        ("avgpool3d", lambda: [nn.Linear(4, 4), nn.AvgPool3d(2)], (2, 2, 2, 4)),
        ("adaptive_avgpool1d", lambda: [nn.Linear(6, 6), nn.AdaptiveAvgPool1d(3)], (2, 6)),
        ("adaptive_avgpool2d", lambda: [nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d((2, 3))], (2, 4, 6)),
        ("adaptive_avgpool3d", lambda: [nn.Linear(4, 4), nn.AdaptiveAvgPool3d((1, 2, 2))], (2, 2, 2, 4)),
    ]
    for name, body, shape in pool:
        p.append(Problem(name, with_head(body, shape), _ce("mean"), shape, Target.CLASSES))
    # BatchNorm with running statistics (evaluation mode)
    p += [
        Problem("batchnorm1d_eval", lambda: nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(),
                                                          nn.Linear(5, 3)), _ce("mean"), (4,), Target.CLASSES,
                eval_mode=True),
        Problem("batchnorm2d_eval", with_head(lambda: [nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3), nn.ReLU()], (2, 4, 4)),
                _ce("mean"), (2, 4, 4), Target.CLASSES, eval_mode=True),
        Problem("batchnorm3d_eval", with_head(lambda: [nn.Linear(3, 3), nn.BatchNorm3d(2)], (2, 2, 1, 3)),
                _mse("mean"), (2, 2, 1, 3), Target.REAL, eval_mode=True),
    ]
    # embeddings: integer inputs
    p += [
        Problem("embedding", lambda: nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)), _ce("mean"), (),
                Target.CLASSES, vocabulary=5),
        Problem("embedding_sequence", lambda: nn.Sequential(nn.Embedding(6, 2), nn.Flatten(), nn.Linear(6, 4)),
                _ce("sum"), (3,), Target.CLASSES, vocabulary=6),
    ]
    # reshaping, padding, scaling, slicing, identities
    p += [
        Problem("zeropad2d", with_head(lambda: [nn.Conv2d(2, 3, 2), nn.ZeroPad2d((1, 0, 2, 1)), nn.Sigmoid()],
                                       (2, 4, 4)), _ce("mean"), (2, 4, 4), Target.CLASSES),
        Problem("dropout_eval", lambda: nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.4), nn.Tanh(), nn.Linear(4, 3)),
                _ce("mean"), (5,), Target.CLASSES, eval_mode=True),
        Problem("identity", lambda: nn.Sequential(nn.Linear(5, 4), nn.Identity(), nn.Sigmoid(), nn.Linear(4, 3)),
                _ce("mean"), (5,), Target.CLASSES),
        Problem("scale", lambda: nn.Sequential(nn.Linear(5, 4), _scale(), nn.Sigmoid(), nn.Linear(4, 3)),
                _ce("mean"), (5,), Target.CLASSES),
        Problem("slicing", lambda: nn.Sequential(nn.Linear(5, 6), _slicing(), nn.Tanh(), nn.Linear(4, 3)),
                _ce("mean"), (5,), Target.CLASSES),
    ]
    # residual blocks (BackPACK's Parallel: a branch into Identity and a layer, merged by a sum)
    p += [
        Problem("residual_linear", lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(),
                                                         _parallel(nn.Identity(), nn.Linear(4, 4)), nn.Sigmoid(),
                                                         nn.Linear(4, 3)), _ce("mean"), (5,), Target.CLASSES),
        Problem("residual_conv", with_head(lambda: [nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(),
                                                    _parallel(nn.Identity(), nn.Sequential(
                                                        nn.Conv2d(3, 2, 3, padding=1), nn.Sigmoid(),
                                                        nn.Conv2d(2, 3, 3, padding=1))),
                                                    nn.MaxPool2d(2)], (2, 4, 4)),
                _ce("mean"), (2, 4, 4), Target.CLASSES),
        Problem("residual_plain_linear", lambda: nn.Sequential(nn.Linear(5, 4), nn.ReLU(),
                                                               PlainResidual(nn.Sequential(nn.Linear(4, 4), nn.Tanh())),
                                                               nn.Linear(4, 3)), _ce("mean"), (5,), Target.CLASSES,
                converter=True),
        Problem("residual_plain_conv", with_head(lambda: [nn.Conv2d(2, 3, 2), nn.ReLU(),
                                                          PlainResidual(nn.Conv2d(3, 3, 3, padding=1))], (2, 4, 4)),
                _mse("sum"), (2, 4, 4), Target.REAL, converter=True),
    ]
    # losses beyond [N, C] cross-entropy and squared error
    p += [
        # BackPACK's second-order BCEWithLogitsLoss takes one logit per sample ([N, 1]) only
        Problem("bce_mean", lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 1)), _bce("mean"), (5,),
                Target.BINARY),
        Problem("bce_sum", lambda: nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 1)), _bce("sum"), (5,),
                Target.BINARY),
        Problem("bce_multilabel", _mlp(nn.Tanh), _bce("mean"), (5,), Target.BINARY),
        Problem("ce_multidim_permute", lambda: nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3),
                                                             _permute(0, 2, 1)), _ce("mean"), (5, 4), Target.CLASSES),
        Problem("ce_multidim_conv1d", lambda: nn.Sequential(nn.Conv1d(2, 3, 2), nn.ReLU(), nn.Conv1d(3, 4, 1)),
                _ce("sum"), (2, 5), Target.CLASSES),
        Problem("ce_multidim_conv2d", lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.ReLU(), nn.Conv2d(3, 4, 1)),
                _ce("mean"), (2, 3, 3), Target.CLASSES),
        Problem("mse_multidim", lambda: nn.Sequential(nn.Linear(4, 3), nn.Sigmoid(), nn.Linear(3, 2)), _mse("mean"),
                (5, 4), Target.REAL),
    ]
    return p


PROBLEMS: dict[str, Problem] = {}
for _problem in _problems():
    if _problem.name in PROBLEMS:
        raise ValueError(f"two problems are named {_problem.name!r}")
    PROBLEMS[_problem.name] = _problem


__all__ = ["DT", "N", "PROBLEMS", "PlainResidual", "Problem", "Target", "build", "inputs", "with_head"]
