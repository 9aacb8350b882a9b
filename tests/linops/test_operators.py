"""fxcurv.linops against dense references from torch.func (float64): GGN ``J^T H J`` from jacrev and the
loss's Hessian at the output, the Hessian of the data set's loss, the empirical Fisher from per-sample
gradients, the Monte Carlo Fisher from its definition with the same draws; on data sets of unequal
batches against the concatenated data set; and against curvlinops' operators."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from architectures import Residual, SharedTwice
from torch import nn

import fxcurv
from fxcurv import linops
from fxcurv.errors import InputError, UnsupportedOpError
from fxcurv.linops import rop

DT = torch.float64
C = 3  # classes / output width


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, C))


def cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Sigmoid(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(12, C))


def residual() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), Residual(5, "tanh"), nn.Linear(5, C))


def tied() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), SharedTwice(5, "sigmoid"), nn.Linear(5, C))


def sequence() -> nn.Module:
    """Linear layers on ``[N, T, in]`` inputs, a bias-free layer, a frozen layer, an attribute-taking
    activation: the program's own ops (:mod:`fxcurv.linops.rop`) with every case of their tangents."""
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(approximate="tanh"), nn.Linear(5, 3, bias=False), nn.Flatten(),
                          nn.Softplus(beta=2.0), nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, C))
    model[5].requires_grad_(False)
    return model


NETS = {"mlp": (mlp, (4,)), "cnn": (cnn, (2, 4, 4)), "residual": (residual, (4,)), "tied": (tied, (4,))}
LINEAR_NETS = {"mlp": (mlp, (4,)), "tied": (tied, (4,)), "sequence": (sequence, (2, 4))}


@dataclass(frozen=True)
class Loss:
    """A loss, its per-sample terms ``l_n`` (``L = (1/W) sum_n l_n``, ``W`` the batch's normalizer for
    ``mean``; ``L = sum_n l_n`` for ``sum``)."""

    fn: nn.Module
    terms: object  # (f, y) -> [N]
    mean: bool
    classes: bool

    def normalizer(self, f: torch.Tensor) -> float:
        if not self.mean:
            return 1.0
        return float(f.shape[0] if self.classes else f.numel())


LOSSES = {
    "ce_mean": Loss(nn.CrossEntropyLoss(), lambda f, y: F.cross_entropy(f, y, reduction="none"), True, True),
    "ce_sum": Loss(nn.CrossEntropyLoss(reduction="sum"), lambda f, y: F.cross_entropy(f, y, reduction="none"),
                   False, True),
    "mse_mean": Loss(nn.MSELoss(), lambda f, y: ((f - y) ** 2).sum(1), True, False),
    "mse_sum": Loss(nn.MSELoss(reduction="sum"), lambda f, y: ((f - y) ** 2).sum(1), False, False),
}


def setup(net: str, loss: str, sizes=(4, 3), seed: int = 0):
    build, in_shape = {**NETS, **LINEAR_NETS}[net]
    torch.manual_seed(seed)
    model = build().to(DT)
    g = torch.Generator().manual_seed(seed + 1)
    batches = []
    for n in sizes:
        x = torch.randn((n,) + in_shape, generator=g, dtype=DT)
        y = (torch.randint(0, C, (n,), generator=g) if LOSSES[loss].classes
             else torch.randn(n, C, generator=g, dtype=DT))
        batches.append((x, y))
    return model, batches


def concatenated(batches):
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


# ---- references ---------------------------------------------------------------------------------------

def flat(model: nn.Module, names=None):
    """``(theta0, out(theta, x))``: the named parameters flattened, and the model as a function of them."""
    params = dict(model.named_parameters())
    names = list(params) if names is None else names
    shapes = [params[n].shape for n in names]
    theta0 = torch.cat([params[n].detach().flatten() for n in names])

    def unflat(theta):
        out, start = {}, 0
        for n, s in zip(names, shapes):
            out[n] = theta[start:start + s.numel()].reshape(s)
            start += s.numel()
        return out

    return theta0, lambda theta, x: torch.func.functional_call(model, unflat(theta), (x,))


def hessian(fn):
    """Reverse over reverse: F.huber_loss has no forward-mode derivative."""
    return torch.func.jacrev(torch.func.jacrev(fn))


def dense_ggn(model, loss_fn, x, y, names=None):
    theta, out = flat(model, names)
    f = out(theta, x)
    J = torch.func.jacrev(lambda t: out(t, x).flatten())(theta)
    H = hessian(lambda ff: loss_fn(ff.reshape(f.shape), y))(f.detach().flatten())
    return J.T @ H @ J


def dense_hessian(model, loss_fn, x, y, names=None):
    theta, out = flat(model, names)
    return hessian(lambda t: loss_fn(out(t, x), y))(theta)


def dense_ef(model, loss: Loss, x, y, names=None):
    theta, out = flat(model, names)
    g = torch.func.jacrev(lambda t: loss.terms(out(t, x), y))(theta)  # [N, P]: grad l_n
    return g.T @ g / loss.normalizer(out(theta, x))


# ---- the operators against the dense references ----------------------------------------------------------

@pytest.mark.parametrize("net", sorted(NETS))
@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_operators_on_unequal_batches_equal_the_concatenated_data_set(net, loss):
    model, batches = setup(net, loss)
    engine = fxcurv.compile(model, LOSSES[loss].fn)
    x, y = concatenated(batches)
    P = sum(p.numel() for p in model.parameters())
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    refs = {
        linops.GGN: dense_ggn(model, LOSSES[loss].fn, x, y),
        linops.Hessian: dense_hessian(model, LOSSES[loss].fn, x, y),
        linops.EmpiricalFisher: dense_ef(model, LOSSES[loss], x, y),
    }
    for cls, ref in refs.items():
        op = cls(engine, batches, chunk=2)  # 3 columns: a vectorized chunk of 2, then a single column
        assert op.shape == (P, P) and op.dtype == DT
        torch.testing.assert_close(op @ V, ref @ V, rtol=1e-10, atol=1e-12, msg=lambda m, c=cls: f"{c.__name__}: {m}")
        torch.testing.assert_close(op @ V[:, 0], ref @ V[:, 0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("net", sorted(LINEAR_NETS))
def test_products_by_the_programs_own_ops_equal_the_dense_matrices(net):
    """Nets of linear layers, activations and reshapes take :mod:`fxcurv.linops.rop` (the plan exists; a
    convolution or a residual addition does not have one), column by column, over unequal batches, for
    every parameter and a subset; GGN, EF and MC Fisher (whose products share the path) against dense
    references. The frozen layer of ``sequence`` gets no tangent but passes messages."""
    model, batches = setup(net, "ce_mean")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss())
    assert all(rop.plan(engine.program(x, y)) is not None for x, y in batches)
    x, y = concatenated(batches)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    subset = names[-1:] + names[:2]
    g = torch.Generator().manual_seed(4)
    for params in (None, subset):
        wanted = names if params is None else subset
        P = sum(dict(model.named_parameters())[n].numel() for n in wanted)
        V = torch.randn(P, 3, generator=g, dtype=DT)
        for op, ref in ((linops.GGN(engine, batches, params=params), dense_ggn(model, nn.CrossEntropyLoss(), x, y,
                                                                               wanted)),
                        (linops.EmpiricalFisher(engine, batches, params=params), dense_ef(model, LOSSES["ce_mean"], x,
                                                                                          y, wanted))):
            torch.testing.assert_close(op @ V, ref @ V, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(op @ V[:, 1], ref @ V[:, 1], rtol=1e-10, atol=1e-12)
    # The MC Fisher's draws are the same on both paths: chunk=2 runs the autograd path.
    mc, mc_autograd = (linops.MCFisher(engine, batches, seed=3, chunk=c) for c in (1, 2))
    V = torch.randn(mc.shape[0], 2, generator=g, dtype=DT)
    torch.testing.assert_close(mc @ V, mc_autograd @ V, rtol=1e-10, atol=1e-12)
    for other in ("cnn", "residual"):
        model, batches = setup(other, "ce_mean")
        assert rop.plan(fxcurv.compile(model, nn.CrossEntropyLoss()).program(*batches[0])) is None


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_one_batch_dense_matrices(loss):
    model, batches = setup("residual", loss, sizes=(5,))
    engine = fxcurv.compile(model, LOSSES[loss].fn)
    x, y = batches[0]
    torch.testing.assert_close(linops.GGN(engine, batches).to_dense(), dense_ggn(model, LOSSES[loss].fn, x, y),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(linops.Hessian(engine, [(x, y)], chunk=7).to_dense(),
                               dense_hessian(model, LOSSES[loss].fn, x, y), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(linops.EmpiricalFisher(engine, [(x, y)]).to_dense(),
                               dense_ef(model, LOSSES[loss], x, y), rtol=1e-10, atol=1e-12)


def test_parameter_subset_is_the_dense_submatrix_in_the_given_order():
    model, batches = setup("tied", "ce_mean")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss())
    x, y = concatenated(batches)
    names = ["2.weight", "1.lin.weight", "0.bias"]
    op = linops.GGN(engine, batches, params=names)
    assert op.names == tuple(names)
    torch.testing.assert_close(op.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), x, y, names),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(linops.Hessian(engine, batches, params=names).to_dense(),
                               dense_hessian(model, nn.CrossEntropyLoss(), x, y, names), rtol=1e-10, atol=1e-12)


def test_to_scipy_matvec_and_matmat():
    np = pytest.importorskip("numpy")
    model, batches = setup("mlp", "ce_mean")
    op = linops.GGN(fxcurv.compile(model, nn.CrossEntropyLoss()), batches)
    A = op.to_scipy()
    V = np.random.default_rng(0).standard_normal((op.shape[0], 4))
    expected = (op @ torch.from_numpy(V)).numpy()
    assert A.shape == op.shape and A.dtype == np.float64
    np.testing.assert_allclose(A.matmat(V), expected, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(A.matvec(V[:, 1]), expected[:, 1], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(A @ V[:, 2], expected[:, 2], rtol=1e-12, atol=1e-14)


def test_a_general_loss_with_its_reduction_and_a_loss_without_forward_mode():
    model, batches = setup("mlp", "mse_mean")
    x, y = concatenated(batches)

    def smooth(f, y):
        return (F.softplus(f - y) * (f - y)).sum(1).mean()

    def huber(f, y):
        return F.huber_loss(f, y, delta=0.5, reduction="sum") / f.shape[0]

    for loss_fn in (smooth, huber):
        engine = fxcurv.compile(model, loss_fn)
        with pytest.raises(fxcurv.LossError, match="reduction='mean'"):
            linops.GGN(engine, batches)
        torch.testing.assert_close(linops.GGN(engine, batches, reduction="mean").to_dense(),
                                   dense_ggn(model, loss_fn, x, y), rtol=1e-10, atol=1e-12)
        hessian = linops.Hessian(engine, batches, reduction="mean")
        torch.testing.assert_close(hessian.to_dense(), dense_hessian(model, loss_fn, x, y), rtol=1e-10, atol=1e-12)
        assert hessian.mode == ("reverse" if loss_fn is huber else "forward")
        with pytest.raises(UnsupportedOpError, match="sampler"):
            linops.MCFisher(engine, batches, reduction="mean")


# ---- Monte Carlo Fisher -------------------------------------------------------------------------------------

def dense_mc_fisher(model, loss: str, batches, mc_samples: int, seed: int):
    """``sum_b w_b sum_m (J_b^T s_bm)(J_b^T s_bm)^T`` with the draws of the definition: per batch in order
    from one generator seeded with ``seed``, ``c ~ Cat(softmax f_n)`` per sample (``M`` draws each) for
    cross-entropy, ``z ~ N(0, I)`` shaped ``[M, *f]`` for squared error."""
    theta, out = flat(model)
    gen = torch.Generator().manual_seed(seed)
    spec = LOSSES[loss]
    # the batch weight W_b / W (1 for a sum) times the batch loss's 1 / W_b (1): 1 / W (1) overall
    total = sum(spec.normalizer(out(theta, x)) for x, _ in batches) if spec.mean else 1.0
    result = 0
    for x, _ in batches:
        f = out(theta, x).detach()
        J = torch.func.jacrev(lambda t, x=x: out(t, x))(theta)  # [N, C, P]
        if spec.classes:
            p = torch.softmax(f, 1)
            draws = torch.multinomial(p, mc_samples, replacement=True, generator=gen)  # [N, M]
            S = p.unsqueeze(0) - F.one_hot(draws.T, C).to(DT)  # [M, N, C]: grad of l_n at sampled targets
        else:
            S = torch.randn((mc_samples,) + f.shape, generator=gen, dtype=DT) * 2 ** 0.5
        JS = torch.einsum("ncp,mnc->mnp", J, S).reshape(-1, theta.numel())
        result = result + JS.T @ JS / (mc_samples * total)
    return result


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_mc_fisher_with_the_definitions_draws(loss):
    model, batches = setup("cnn", loss)
    engine = fxcurv.compile(model, LOSSES[loss].fn)
    op = linops.MCFisher(engine, batches, mc_samples=3, seed=7, chunk=5)
    torch.testing.assert_close(op.to_dense(), dense_mc_fisher(model, loss, batches, 3, 7), rtol=1e-10, atol=1e-12)
    assert op.asymmetry() < 1e-12  # one fixed matrix: the draws restart at every chunk and product


def test_mc_fisher_converges_to_the_ggn():
    """``E[MCFisher] = GGN``: with ``M`` draws per sample the relative Frobenius error is
    ``O(1/sqrt(M))``; ``M = 4000`` on 7 samples stays below 0.1 (about 0.02 observed at this seed)."""
    model, batches = setup("mlp", "ce_mean")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss())
    ggn = linops.GGN(engine, batches).to_dense()
    mc = linops.MCFisher(engine, batches, mc_samples=4000, seed=0).to_dense()
    assert (mc - ggn).norm() / ggn.norm() < 0.1


# ---- the model as it is now, and bad input -----------------------------------------------------------------

def test_products_read_the_current_parameters():
    model, batches = setup("mlp", "ce_mean")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss())
    op = linops.GGN(engine, batches)
    with torch.no_grad():
        model[0].weight.mul_(1.5)
    x, y = concatenated(batches)
    torch.testing.assert_close(op.to_dense(), dense_ggn(model, nn.CrossEntropyLoss(), x, y), rtol=1e-10, atol=1e-12)
    model[2].weight = nn.Parameter(torch.randn(4, 5, dtype=DT))  # another shape: the model changed
    with pytest.raises(InputError, match="2.weight"):
        op @ torch.ones(op.shape[0], dtype=DT)


def test_bad_arguments_are_refused():
    model, batches = setup("mlp", "ce_mean")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="not parameters"):
        linops.GGN(engine, batches, params=["0.weight", "nope"])
    with pytest.raises(TypeError, match="one batch"):
        linops.GGN(engine, batches[0])
    with pytest.raises(ValueError, match="mc_samples"):
        linops.MCFisher(engine, batches, mc_samples=0)
    model[0].bias.requires_grad_(False)
    with pytest.raises(ValueError, match="do not require gradients"):
        linops.GGN(engine, batches, params=["0.bias"])
    assert "0.bias" not in linops.GGN(engine, batches).names


# ---- curvlinops ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("net", ["cnn", "tied"])
@pytest.mark.parametrize("loss", ["ce_mean", "mse_sum"])
def test_against_curvlinops(net, loss):
    curvlinops = pytest.importorskip("curvlinops")
    model, batches = setup(net, loss)
    loss_fn = LOSSES[loss].fn
    engine = fxcurv.compile(model, loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    P = sum(p.numel() for p in params)
    V = torch.randn(P, 4, generator=torch.Generator().manual_seed(3), dtype=DT)
    pairs = [(linops.GGN, curvlinops.GGNLinearOperator), (linops.EmpiricalFisher, curvlinops.EFLinearOperator),
             (linops.Hessian, curvlinops.HessianLinearOperator)]
    for ours, theirs in pairs:
        reference = theirs(model, loss_fn, params, batches, check_deterministic=False)
        torch.testing.assert_close(ours(engine, batches) @ V, reference @ V, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_mc_fisher_against_curvlinops_with_the_same_seed(loss):
    """curvlinops' ``FisherMCLinearOperator`` also reseeds at every product and draws batch by batch in order,
    ``torch.multinomial`` on the softmax rows for cross-entropy and a standard normal for squared error: the
    same draws. Cross-entropy agrees to rounding; squared error to float32's rounding of curvlinops' standard
    deviation ``sqrt(1/2)`` (a float32 tensor), a relative 3e-8."""
    curvlinops = pytest.importorskip("curvlinops")
    model, batches = setup("mlp", loss)
    loss_fn = LOSSES[loss].fn
    ours = linops.MCFisher(fxcurv.compile(model, loss_fn), batches, mc_samples=3, seed=11).to_dense()
    theirs = curvlinops.FisherMCLinearOperator(model, loss_fn, list(model.parameters()), batches, seed=11,
                                                mc_samples=3, check_deterministic=False)
    rtol = 1e-10 if LOSSES[loss].classes else 1e-7
    reference = theirs @ torch.eye(ours.shape[0], dtype=DT)
    torch.testing.assert_close(ours, reference, rtol=rtol, atol=rtol * float(reference.abs().max()))


def test_one_shot_iterators_are_kept_and_a_changed_data_set_is_refused():
    model, batches = setup("mlp", "ce_mean")
    engine = fxcurv.compile(model, nn.CrossEntropyLoss())
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=DT)
    expected = linops.GGN(engine, batches) @ v
    once = linops.GGN(engine, (b for b in batches))  # a generator: materialized, usable at every product
    torch.testing.assert_close(once @ v, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(once @ v, expected, rtol=1e-12, atol=0)
    data = list(batches)
    op = linops.GGN(engine, data)
    data.append(batches[0])
    with pytest.raises(InputError, match="more than 2 batches"):
        op @ v
    del data[1:]
    with pytest.raises(InputError, match="yielded 1 batches"):
        op @ v
