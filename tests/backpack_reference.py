"""BackPACK's Kronecker-factored curvature (KFAC, KFLR, KFRA, HBP) as a test oracle.

Two independent halves:

* :func:`run_backpack` runs BackPACK itself (if installed: :func:`available`) and returns its
  factors keyed by ``model.named_parameters()`` names, in BackPACK's order, float64;
* :func:`kflr_factors`, :func:`kfac_factors`, :func:`kfra_factors` and :func:`hbp_factors` compute
  the same factors in plain torch from their defining equations (nothing from BackPACK or fxcurv),
  so that tests can compare against a formula where BackPACK is missing.

The conventions they implement were established by experiment against BackPACK 1.7.1 (torch 2.13)
and are written down in ``docs/kronecker_conventions.md``; ``tests/test_backpack_conventions.py``
checks both halves against each other and the ``N = 1`` identities against torch.func.

Notation (per layer; ``N`` samples, ``f_n`` the model output of sample ``n``, ``L`` the reduced
loss): ``H_n = d2L/df_n2`` the per-sample block of the loss Hessian **including the reduction's
scale** (``1/N`` for cross-entropy ``"mean"``, ``1/(N D)`` for MSE ``"mean"``, ``1`` for ``"sum"``);
``z_n`` the layer's output and ``J_n = df_n/dz_n``; ``x_n`` the layer's input (for ``Conv2d`` its
unfolded patches ``[[x_n]]``, ``[C_in k_h k_w, P]``). Factor orders are BackPACK's: a weight of shape
``[out, in]`` (``[C_out, C_in, k_h, k_w]``) gets ``(G, A)`` with ``kron(G, A)`` its block in
``torch``'s row-major flattening; a bias gets ``(G,)``.

* KFLR  ``G = sum_n J_n^T H_n J_n``, ``A = 1/N sum_n x_n x_n^T`` (conv: ``J_n`` summed over the
  ``P`` output positions; ``A = 1/N sum_n [[x_n]] [[x_n]]^T``, summed over positions).
* KFAC  the same with ``H_n`` replaced by ``sum_v c_vn c_vn^T``, ``c_vn`` BackPACK's Monte Carlo
  columns (:func:`mc_columns`).
* KFRA / HBP  Botev eq. 29-31 with batch averages: ``M`` starts at ``sum_n H_n``; a layer linear in
  its input maps ``M -> 1/N sum_n J_n^T M J_n`` (Linear: ``W^T M W``); an elementwise activation
  ``M -> M o (1/N sum_n phi'(h_n) phi'(h_n)^T) + diag(mod(sum_n phi''(h_n) o g_n))`` with ``g_n``
  the gradient of ``L`` w.r.t. the activation's output and ``mod`` nothing (``"hessian"``), ``|.|``
  (``"pch-abs"``), ``max(., 0)`` (``"pch-clip"``), or dropping the term (KFRA, ``"ggn"``). A layer's
  ``G`` is the ``M`` at its output (conv: summed over the output positions on both sides).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import math
import warnings
from collections.abc import Callable

import torch
from hesscale_reference import ELEMENTWISE, activation_derivatives, input_jacobian
from torch import nn
from torch.func import jacrev

SKIP_REASON = "BackPACK not installed"
QUANTITIES = ("kfac", "kflr", "kfra", "hbp")
CURV_TYPES = ("hessian", "pch-abs", "pch-clip", "ggn")
# BackPACK's option values (backpack/extensions/secondorder/hbp/hbp_options.py)
LOSS_HESSIAN_SUM = "sum"  # LossHessianStrategy.SUM
BACKPROP_BATCH_AVERAGE = "average"  # BackpropStrategy.BATCH_AVERAGE
EA_BOTEV_MARTENS = "E[J^T E(H) J]"  # ExpectationApproximation.BOTEV_MARTENS

Factors = dict[str, tuple[torch.Tensor, ...]]


# ---- BackPACK itself --------------------------------------------------------------------------

def available() -> bool:
    """Whether BackPACK (``backpack-for-pytorch``, with ``einops`` and ``unfoldNd``) imports."""
    try:
        import backpack.extensions  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str | None:
    try:
        return importlib.metadata.version("backpack-for-pytorch")
    except importlib.metadata.PackageNotFoundError:
        return None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def make_extension(quantity: str, *, mc_samples: int = 1, curv_type: str = "hessian"):
    """The BackPACK extension object for ``quantity`` (one of :data:`QUANTITIES`)."""
    from backpack.extensions import HBP, KFAC, KFLR, KFRA

    if quantity == "kfac":
        return KFAC(mc_samples=mc_samples)
    if quantity == "kflr":
        return KFLR()
    if quantity == "kfra":
        return KFRA()
    if quantity == "hbp":
        return HBP(curv_type=curv_type, loss_hessian_strategy=LOSS_HESSIAN_SUM,
                   backprop_strategy=BACKPROP_BATCH_AVERAGE, ea_strategy=EA_BOTEV_MARTENS)
    raise ValueError(f"unknown quantity {quantity!r}; expected one of {QUANTITIES}")


def run_backpack(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, quantity: str, *,
                 mc_samples: int = 1, seed: int = 0, curv_type: str = "hessian",
                 use_converter: bool = False) -> Factors:
    """BackPACK's factors of ``quantity`` for every trainable parameter, keyed by
    ``model.named_parameters()`` names, each a tuple in BackPACK's order, float64 (see
    :func:`run_extension`)."""
    ext = make_extension(quantity, mc_samples=mc_samples, curv_type=curv_type)
    out = run_extension(model, loss_fn, x, y, ext, seed=seed, use_converter=use_converter)
    return {name: tuple(t.detach().to(torch.float64).clone() for t in value) for name, value in out.items()}


def run_extension(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor, ext, *, seed: int = 0,
                  use_converter: bool = False) -> dict:
    """What BackPACK's extension ``ext`` stores on every trainable parameter (``p.<ext.savefield>``), keyed by
    ``model.named_parameters()`` names, as BackPACK returns it (a tensor or a list of factors).

    ``model`` and ``loss_fn`` are deep-copied (BackPACK's ``extend`` installs hooks) and run in
    float64 with float64 as the default dtype: BackPACK 1.7.1 builds MSELoss's summed Hessian
    (KFRA/HBP) with ``torch.eye`` in the default dtype, which fails on a float64 net otherwise.
    Monte Carlo targets (KFAC, DiagGGNMC, SqrtGGNMC, ...) are drawn right after ``torch.manual_seed(seed)``
    inside ``fork_rng`` (the global generator is left as it was); :func:`mc_columns` draws the same ones.
    """
    from backpack import backpack, extend

    net = copy.deepcopy(model).to(torch.float64)
    lossf = copy.deepcopy(loss_fn).to(torch.float64)  # buffers (CrossEntropyLoss.weight) too
    x64 = x.to(torch.float64) if x.is_floating_point() else x  # integer inputs (embedding indices) as they are
    y64 = y.to(torch.float64) if y.is_floating_point() else y
    with _default_dtype(torch.float64), warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # "Full backward hook is firing when gradients are computed with respect to module outputs
        # since no inputs require gradients": the first layer's input is data; expected.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        net = extend(net, use_converter=use_converter)
        lossf = extend(lossf)
        loss = lossf(net(x64), y64)
        torch.manual_seed(seed)
        with backpack(ext):
            loss.backward()
    out: dict = {}
    for name, p in net.named_parameters():
        if p.requires_grad:
            out[name] = getattr(p, ext.savefield)
    # the converter (residual nets) builds a GraphModule: same parameter names, maybe another order
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    if set(names) != set(out):
        raise RuntimeError(f"BackPACK's parameters {sorted(out)} are not the model's {sorted(names)}")
    return {name: out[name] for name in names}


# ---- the loss: per-sample Hessian blocks, gradients, reduction scale, MC columns --------------

def reduction_scale(loss_fn: nn.Module, f: torch.Tensor) -> float:
    """The factor ``s`` in ``L = s sum_n l(f_n, y_n)``: ``1/N`` (CE mean), ``1/(N D)`` (MSE mean), 1."""
    if loss_fn.reduction == "sum":
        return 1.0
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return 1.0 / f.shape[0]
    if isinstance(loss_fn, nn.MSELoss):
        return 1.0 / f.numel()
    raise NotImplementedError(f"reduction scale of {loss_fn!r}")


def _check_loss(loss_fn: nn.Module, f: torch.Tensor, y: torch.Tensor | None = None) -> None:
    """CrossEntropyLoss (no class weights, no ignored targets; label smoothing is fine: it leaves the
    Hessian w.r.t. the logits unchanged) or MSELoss, reduction mean or sum, outputs ``[N, C]``."""
    if not isinstance(loss_fn, (nn.CrossEntropyLoss, nn.MSELoss)) or loss_fn.reduction not in ("mean", "sum"):
        raise NotImplementedError(f"only CrossEntropyLoss / MSELoss with reduction mean/sum, got {loss_fn!r}")
    if f.dim() != 2:
        raise NotImplementedError("model outputs of shape [N, C] only")
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None:
            raise NotImplementedError("CrossEntropyLoss with class weights")
        if y is not None and (y.is_floating_point() or bool((y == loss_fn.ignore_index).any())):
            raise NotImplementedError("CrossEntropyLoss with probability or ignored targets")


def loss_hessian_blocks(loss_fn: nn.Module, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``[N, C, C]``: the per-sample blocks ``H_n = d2L/df_n2`` of the exact loss Hessian (torch.func),
    reduction scale included. Checks that the off-diagonal blocks vanish (independent samples)."""
    _check_loss(loss_fn, f, y)
    n, c = f.shape
    h = torch.func.hessian(lambda z: loss_fn(z, y))(f)  # [N, C, N, C]
    blocks = torch.diagonal(h, dim1=0, dim2=2).permute(2, 0, 1)  # [N, C, C]
    off = h.clone()
    off[torch.arange(n), :, torch.arange(n), :] = 0
    assert off.abs().max() <= 1e-12 * max(1.0, h.abs().max().item()), "loss couples samples"
    return blocks.contiguous()


def mc_columns(loss_fn: nn.Module, f: torch.Tensor, mc_samples: int, seed: int = 0) -> torch.Tensor:
    """``[M, N, C]``: the Monte Carlo square-root columns KFAC uses, ``sum_v c_vn c_vn^T ~ H_n``.

    ``c_vn = sqrt(s / M) * grad_f l(f_n, y~_vn)``: the per-sample loss gradient at a target drawn
    from the model's likelihood (softmax categorical for cross-entropy; ``N(f_n, 1/2)`` for squared
    error, whose negative log-likelihood is ``(y - f)^2`` up to a constant), ``s`` the reduction
    scale. The targets are drawn exactly as BackPACK 1.7.1 draws them right after
    ``torch.manual_seed(seed)`` (``Categorical(softmax(f)).sample((M,))``,
    ``Normal(f, sqrt(0.5)).sample((M,))``), so :func:`run_backpack` with the same ``seed`` matches.
    """
    _check_loss(loss_fn, f)
    f = f.detach().to(torch.float64)  # BackPACK draws from float64 probabilities in run_backpack
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(loss_fn, nn.CrossEntropyLoss):
            targets = torch.distributions.Categorical(torch.softmax(f, dim=1)).sample((mc_samples,))
        else:
            targets = torch.distributions.Normal(f, torch.tensor(math.sqrt(0.5), dtype=f.dtype)).sample((mc_samples,))
    per_sample = type(loss_fn)(reduction="sum")  # gradient of the sum = the per-sample gradients
    stacked = f.expand(mc_samples, *f.shape).reshape(-1, f.shape[1])  # [M N, C]
    cols = torch.func.grad(lambda z: per_sample(z, targets.reshape(-1, *targets.shape[2:])))(stacked)
    return cols.reshape(mc_samples, *f.shape) * math.sqrt(reduction_scale(loss_fn, f) / mc_samples)


# ---- the network: a Sequential walked layer by layer ------------------------------------------

PARAMETRIC = (nn.Linear, nn.Conv2d)
# layers the KFRA/HBP recursion passes with M <- 1/N sum_n J_n^T M J_n (linear in their input)
LINEAR_IN_INPUT = (nn.Linear, nn.Conv2d, nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.ZeroPad2d, nn.ConstantPad2d,
                   nn.Identity)


def _layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Sequential):
        raise NotImplementedError("the formulas walk an nn.Sequential")
    layers = list(model._modules.items())  # not named_children(): it skips repeated modules
    for name, layer in layers:
        if isinstance(layer, nn.Sequential):
            raise NotImplementedError(f"nested Sequential {name}: flatten it")
        if isinstance(layer, nn.Conv2d) and layer.groups != 1:
            raise NotImplementedError("Conv2d with groups != 1")
        if not isinstance(layer, PARAMETRIC) and any(True for _ in layer.parameters(recurse=False)):
            raise NotImplementedError(f"layer {name} ({type(layer).__name__}) has parameters")
    return layers


def _forward(model, loss_fn, x, y):
    """float64 forward: every layer's input, the output ``f`` and the gradient of ``L`` w.r.t. every
    layer's output (autograd)."""
    _layers(model)
    model = copy.deepcopy(model).to(torch.float64)
    layers = _layers(model)
    x = x.to(torch.float64)
    y = y.to(torch.float64) if y.is_floating_point() else y
    inputs, outputs = [], []
    h = x.detach().requires_grad_(True)  # one graph through every layer, even with frozen parameters
    for _, layer in layers:
        inputs.append(h.detach().clone())  # clone: an in-place activation would overwrite it
        h = layer(h)
        outputs.append(h)
    f = h
    _check_loss(loss_fn, f)
    grads = torch.autograd.grad(loss_fn(f, y), outputs, allow_unused=True)
    grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
    return model, layers, inputs, [o.detach() for o in outputs], grads, f.detach(), y


def input_factor(layer: nn.Module, xin: torch.Tensor) -> torch.Tensor:
    """``A``: ``1/N sum_n x_n x_n^T`` (Linear; ``[in, in]``) or ``1/N sum_n [[x_n]] [[x_n]]^T``
    (Conv2d; the unfolded patches summed over the output positions; ``[C_in k_h k_w]^2``)."""
    n = xin.shape[0]
    if isinstance(layer, nn.Linear):
        if xin.dim() != 2:
            raise NotImplementedError("Linear on inputs [N, in] only")
        return xin.T @ xin / n
    if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
        raise NotImplementedError("Conv2d with zero padding given as numbers only")
    cols = torch.nn.functional.unfold(xin, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                      stride=layer.stride)  # [N, C_in k_h k_w, P]
    return torch.einsum("nip,njp->ij", cols, cols) / n


def _output_factor_from_columns(layer: nn.Module, cols: torch.Tensor) -> torch.Tensor:
    """``G = sum_{v,n} (J_n^T c_vn)(J_n^T c_vn)^T`` from ``cols = [V, N, *z]`` (``J_n^T c_vn`` already
    applied); a conv output's positions are summed first (the bias's Jacobian ``1_P``, HBP D.4)."""
    if isinstance(layer, nn.Conv2d):
        cols = cols.flatten(start_dim=3).sum(3)  # [V, N, C_out]
    cols = cols.flatten(start_dim=2)
    return torch.einsum("vni,vnj->ij", cols, cols)


def _parametric_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    mods = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, PARAMETRIC)
            and any(p.requires_grad for p in mod.parameters(recurse=False))]
    for name, mod in model.named_modules():
        if not isinstance(mod, PARAMETRIC) and any(p.requires_grad for p in mod.parameters(recurse=False)):
            raise NotImplementedError(f"{name} ({type(mod).__name__}): only Linear and Conv2d have parameters")
        if isinstance(mod, nn.Conv2d) and mod.groups != 1:
            raise NotImplementedError(f"{name}: Conv2d with groups != 1")
    return mods


def _layer_io(model: nn.Module, mods, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The model output and every parametric module's ``(input, output)`` (forward hooks)."""
    io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name):
        def record(mod, inp, out):
            if name in io:
                raise NotImplementedError(f"{name} is called twice (shared module)")
            io[name] = (inp[0].detach().clone(), out.detach().clone())
        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in mods]
    try:
        with torch.no_grad():
            f = model(x)
    finally:
        for h in handles:
            h.remove()
    return f, io


def output_jacobians(model: nn.Module, mod: nn.Module, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``[N, C, *z]``: per-sample ``J_n = df_n/dz_n``, ``z`` the output of ``mod`` (any model: a forward
    hook adds a perturbation to ``mod``'s output and torch.func differentiates w.r.t. it). Checks that
    ``f_n`` depends on ``z_m`` only for ``m = n`` (independent samples)."""

    def run(delta):
        handle = mod.register_forward_hook(lambda m, i, o: o + delta)
        try:
            return model(x)
        finally:
            handle.remove()

    jac = jacrev(run)(torch.zeros_like(z))  # [N, C, N, *z]
    n = z.shape[0]
    per_sample = torch.diagonal(jac, dim1=0, dim2=2).movedim(-1, 0)  # [N, C, *z]
    cross = jac.clone()
    cross[torch.arange(n), :, torch.arange(n)] = 0
    assert cross.abs().max() <= 1e-12 * max(1.0, jac.abs().max().item()), "samples are coupled"
    return per_sample


def _sqrt_factors(model, loss_fn, x, y, sqrt_h: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Factors:
    model = copy.deepcopy(model).to(torch.float64)
    mods = _parametric_modules(model)
    x = x.to(torch.float64)
    y = y.to(torch.float64) if y.is_floating_point() else y
    f, io = _layer_io(model, mods, x)
    _check_loss(loss_fn, f)
    s = sqrt_h(f, y)  # [V, N, C]
    out: Factors = {}
    for name, mod in mods:
        if name not in io:
            continue  # not on the path to the loss
        xin, z = io[name]
        cols = torch.einsum("vnc,nc...->vn...", s, output_jacobians(model, mod, x, z))  # J_n^T c_vn
        g = _output_factor_from_columns(mod, cols)
        prefix = f"{name}." if name else ""
        if mod.weight.requires_grad:
            out[f"{prefix}weight"] = (g, input_factor(mod, xin))
        if mod.bias is not None and mod.bias.requires_grad:
            out[f"{prefix}bias"] = (g,)
    return _in_parameter_order(model, out)


def _in_parameter_order(model, out: Factors) -> Factors:
    return {k: out[k] for k, _ in model.named_parameters() if k in out}


def _symmetric_sqrt_columns(blocks: torch.Tensor) -> torch.Tensor:
    """``[C, N, C]`` columns with ``sum_v s_vn s_vn^T = H_n`` (eigendecomposition; ``H_n`` PSD)."""
    evals, evecs = torch.linalg.eigh(blocks)
    assert evals.min() >= -1e-12 * max(1.0, evals.abs().max().item()), "loss Hessian not PSD"
    return (evecs * evals.clamp(min=0).sqrt().unsqueeze(1)).permute(2, 0, 1)


def kflr_factors(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Factors:
    """KFLR (Botev et al.; BackPACK ``KFLR``): weight ``(G, A)``, bias ``(G,)`` with
    ``G = sum_n J_n^T H_n J_n`` the exact GGN w.r.t. the layer's bias (``H_n`` with the reduction's
    scale; conv: ``J_n`` summed over output positions) and ``A`` from :func:`input_factor`."""
    def sqrt_h(f, yy):
        return _symmetric_sqrt_columns(loss_hessian_blocks(loss_fn, f, yy))

    return _sqrt_factors(model, loss_fn, x, y, sqrt_h)


def kfac_factors(model: nn.Module, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                 columns: torch.Tensor) -> Factors:
    """KFAC (Martens & Grosse; BackPACK ``KFAC``): KFLR with ``H_n`` replaced by
    ``sum_v c_vn c_vn^T``, ``columns = [M, N, C]`` (e.g. :func:`mc_columns`, reduction scale and
    ``1/sqrt(M)`` included)."""
    return _sqrt_factors(model, loss_fn, x, y, lambda f, yy: columns.to(torch.float64))


# ---- KFRA / HBP: the batch-averaged backward recursion ----------------------------------------

def _modify_residual(res: torch.Tensor, curv_type: str) -> torch.Tensor | None:
    if curv_type == "hessian":
        return res
    if curv_type == "pch-abs":  # EA-CG eq. 8b, gamma = -1
        return res.abs()
    if curv_type == "pch-clip":  # EA-CG eq. 8b, gamma = 0
        return res.clamp(min=0)
    if curv_type == "ggn":
        return None
    raise ValueError(f"unknown curv_type {curv_type!r}; expected one of {CURV_TYPES}")


def hbp_factors(model: nn.Sequential, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor,
                curv_type: str = "hessian") -> Factors:
    """BackPACK's ``HBP(curv_type, "sum", "average", BOTEV_MARTENS)`` from its equations.

    ``M_L = sum_n H_n`` (the loss Hessian "sum" strategy; with ``"mean"`` that is the batch average
    of the unscaled per-sample Hessians). Backward through each layer (HBP S.8/S.9/S.11 with the
    batch average of Botev eq. 29-31 / EA-CG eq. 6, 8b):

    * Linear ``z = W a + b``: record weight ``(M, 1/N sum_n a_n a_n^T)``, bias ``(M,)``; then
      ``M <- W^T M W`` (S.8a);
    * Conv2d: record ``G = sum_{p,q} M[(c,p),(c',q)]`` (the positions summed on both sides) for the
      weight ``(G, A)`` (A from :func:`input_factor`) and the bias ``(G,)``; then ``M <- J^T M J``
      with the conv's (input-independent) Jacobian;
    * an elementwise activation ``a = phi(h)``:
      ``M <- M o (1/N sum_n phi'(h_n) phi'(h_n)^T) + diag(mod(sum_n phi''(h_n) o g_n))``
      where ``g_n = dL/da_n`` (reduction scale included, so the residual is the batch *average* for
      ``"mean"`` and the *sum* for ``"sum"``), and ``mod`` is applied to that summed diagonal;
    * any other layer of :data:`LINEAR_IN_INPUT` (Flatten, pooling, padding, Identity):
      ``M <- 1/N sum_n J_n^T M J_n``; any other layer is an error.

    The first layer's input is data: nothing is propagated past it.
    """
    if curv_type not in CURV_TYPES:
        raise ValueError(f"unknown curv_type {curv_type!r}; expected one of {CURV_TYPES}")
    for name, layer in _layers(model):
        if not isinstance(layer, ELEMENTWISE + LINEAR_IN_INPUT):
            raise NotImplementedError(f"layer {name}: {type(layer).__name__} is neither an elementwise activation "
                                      f"nor one of {[t.__name__ for t in LINEAR_IN_INPUT]}")
    model, layers, inputs, outputs, grads, f, y = _forward(model, loss_fn, x, y)
    n = x.shape[0]
    m = loss_hessian_blocks(loss_fn, f, y).sum(0)  # [C, C]
    out: Factors = {}
    for i in range(len(layers) - 1, -1, -1):
        name, layer = layers[i]
        xin = inputs[i]
        if isinstance(layer, PARAMETRIC):
            if isinstance(layer, nn.Conv2d):
                c, p = outputs[i].shape[1], outputs[i][0, 0].numel()
                g = m.reshape(c, p, c, p).sum((1, 3))
            else:
                g = m
            if layer.weight.requires_grad:
                out[f"{name}.weight"] = (g, input_factor(layer, xin))
            if layer.bias is not None and layer.bias.requires_grad:
                out[f"{name}.bias"] = (g,)
        if i == 0:
            break
        if isinstance(layer, ELEMENTWISE):
            d1, d2 = activation_derivatives(layer, xin)
            d1, d2 = d1.flatten(1), d2.flatten(1)
            m = m * (d1.T @ d1 / n)  # Botev eq. 29/30 with the batch average (Algorithm 1)
            res = _modify_residual((d2 * grads[i].flatten(1)).sum(0), curv_type)  # eq. 31 summed over n
            if res is not None:
                m = m + torch.diag(res)
        elif isinstance(layer, nn.Linear):
            m = layer.weight.detach().T @ m @ layer.weight.detach()  # S.8a
        else:  # LINEAR_IN_INPUT: conv (its bias does not enter the Jacobian), flatten, pooling, padding
            jacs = torch.stack([input_jacobian(layer, xin[k]) for k in range(n)])  # [N, out, in]
            m = torch.einsum("noi,op,npj->ij", jacs, m, jacs) / n
    return _in_parameter_order(model, out)


def kfra_factors(model: nn.Sequential, loss_fn: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Factors:
    """KFRA (Botev et al. Algorithm 1; BackPACK ``KFRA``): :func:`hbp_factors` with the residual
    dropped (``curv_type="ggn"``)."""
    return hbp_factors(model, loss_fn, x, y, curv_type="ggn")


FORMULAS: dict[str, Callable[..., Factors]] = {"kflr": kflr_factors, "kfra": kfra_factors}


def kron_block(factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The curvature block a factor tuple stands for: ``kron(G, A)`` or ``G``."""
    block = factors[0]
    for a in factors[1:]:
        block = torch.kron(block.contiguous(), a.contiguous())  # torch.kron refuses transposed strides
    return block


__all__ = ["available", "version", "run_backpack", "run_extension", "make_extension", "kflr_factors", "kfac_factors",
           "kfra_factors", "hbp_factors", "mc_columns", "loss_hessian_blocks", "reduction_scale",
           "input_factor", "kron_block", "SKIP_REASON", "QUANTITIES", "CURV_TYPES"]
