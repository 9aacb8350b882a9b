"""The benchmarked methods. Each is set up lazily, called with no arguments on a fixed batch, and can
report what it computed (for the correctness checks).

Every method computes the loss and the gradient as well as its curvature quantity (that is what an
optimizer step needs, and what fxcurv returns), so the plain forward+backward is a fair denominator.
``reset()`` runs outside the timed region: it drops what the previous call left behind (``.grad``,
BackPACK's and ASDL's attributes, the last result) so that every timed or memory-profiled call
allocates its outputs afresh.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fxcurv

# The quantities fxcurv computes (the gradient is always returned as well).
FXCURV_QUANTITIES = ("grad", "diag_ggn", "diag_ggn_mc", "diag_hessian", "hesscale", "hesscale_gn")
COMBINED = ("grad", "diag_ggn", "hesscale")
COMBINED_Q = "+".join(COMBINED)
# The Kronecker-factored quantities benchmarked against BackPACK's KFAC, KFLR, KFRA. Their results are
# fxcurv.operators.Kronecker objects; for the checks they are flattened to one tensor per factor,
# keyed "<param>:G" and "<param>:A" (a bias has only G), in BackPACK's order and scaling.
KRONECKER_QUANTITIES = ("kfac", "kflr", "kfra")
KRON_FACTOR_NAMES = ("G", "A")
# The per-sample (first-order) quantities benchmarked against BackPACK's BatchGrad, BatchL2Grad and
# SumGradSquared: tensors per parameter ([N, *param], [N], shaped like the parameter), compared as they are.
FIRST_ORDER_QUANTITIES = ("batch_grad", "batch_l2_grad", "sum_grad_squared")
# the seed of the Monte Carlo draws of the checked call (fxcurv's generator, BackPACK's global RNG)
CHECK_SEED = 0


@contextlib.contextmanager
def composite_attention() -> Iterator[None]:
    """Attention as composite ops (matmul, softmax) for the block: the math backend of
    ``scaled_dot_product_attention`` and no fused fast path of ``nn.TransformerEncoderLayer``. On CPU
    the flash kernel has no forward-mode derivative and no vmap rule for its backward, and the fast
    path's fused kernel (taken in eval mode without autograd, e.g. under torch.func) no derivative at
    all. Nets without attention are unaffected."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def kron_factors(name: str, factors) -> dict[str, torch.Tensor]:
    """``{"<name>:G": G, "<name>:A": A}`` (``A`` only for a weight) of one parameter's factors."""
    return {f"{name}:{k}": f.detach().clone() for k, f in zip(KRON_FACTOR_NAMES, factors)}


class Method:
    """Base class. ``family``: autograd, fxcurv, backpack, asdl, torch.func, floor."""

    family = ""
    backend: str | None = None

    def __init__(self, mid: str, label: str, quantity: str, skip: str | None = None):
        self.id = mid
        self.label = label
        self.quantity = quantity
        self.skip = skip
        self.last: Any = None

    def setup(self) -> None:  # build what the call needs (not timed)
        pass

    def call(self) -> Any:
        raise NotImplementedError

    def check_call(self) -> Any:
        """One call whose results are compared (fxcurv passes a freshly seeded generator)."""
        return self.call()

    def reset(self) -> None:
        self.last = None

    def values(self, result) -> dict[str, dict[str, torch.Tensor]]:
        """``{quantity: {param name: tensor}}`` of one call's result, ``grad`` included."""
        raise NotImplementedError


def _clear_grads(model: nn.Module) -> None:
    for p in model.parameters():
        p.grad = None


class Autograd(Method):
    """Plain forward + backward: the denominator of every ratio."""

    family = "autograd"

    def __init__(self, model, loss_fn, x, y):
        super().__init__("autograd/fwd+bwd", "autograd fwd+bwd", "grad")
        self.model, self.loss_fn, self.x, self.y = model, loss_fn, x, y

    def call(self):
        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        return loss.detach()

    def reset(self):
        super().reset()
        _clear_grads(self.model)

    def values(self, result):
        return {"grad": {n: p.grad.detach().clone() for n, p in self.model.named_parameters()}}


class Fxcurv(Method):
    family = "fxcurv"

    def __init__(self, engines: dict, model, loss_fn, x, y, quantities: tuple[str, ...], backend: str,
                 skip: str | None = None):
        q = "+".join(quantities)
        super().__init__(f"fxcurv/{backend}/{q}", f"fxcurv[{backend}] {q}", q, skip)
        self.backend = backend
        self.engines, self.model, self.loss_fn, self.x, self.y = engines, model, loss_fn, x, y
        self.quantities = quantities
        self.engine = None

    def setup(self):
        # Engines are cached across networks configs (fcnn at N=128 and N=500 share one engine, whose
        # programs are cached per input shape), so each program is built and compiled once.
        key = (id(self.model), self.quantities, self.backend)
        if key not in self.engines:
            self.engines[key] = fxcurv.compile(self.model, self.loss_fn, quantities=self.quantities,
                                               backend=self.backend, mc_samples=1, seed=0)
        self.engine = self.engines[key]

    def call(self):
        return self.engine(self.x, self.y)

    def check_call(self):
        # the generator lives where the samples are drawn (a CPU generator cannot draw on CUDA)
        return self.engine(self.x, self.y,
                           generator=torch.Generator(device=self.x.device).manual_seed(CHECK_SEED))

    def values(self, result):
        out = {}
        for q in result:
            per = dict(result[q])
            if q in KRONECKER_QUANTITIES:  # Kronecker objects -> one tensor per factor
                per = {k: v for n, op in per.items() for k, v in kron_factors(n, op.factors).items()}
            out[q] = per
        return out


class FxcurvSeparate(Method):
    """The combined quantities requested one at a time: one engine per quantity, called in sequence
    (results of all three kept, as a user would)."""

    family = "fxcurv"

    def __init__(self, engines: dict, model, loss_fn, x, y, quantities: tuple[str, ...], backend: str):
        q = "+".join(quantities)
        super().__init__(f"fxcurv/{backend}/separate({q})", f"fxcurv[{backend}] {q} as {len(quantities)} engines",
                         q)
        self.backend = backend
        self.parts = [Fxcurv(engines, model, loss_fn, x, y, (qq,), backend) for qq in quantities]

    def setup(self):
        for p in self.parts:
            p.setup()

    def call(self):
        return [p.call() for p in self.parts]

    def check_call(self):
        return [p.check_call() for p in self.parts]

    def values(self, result):
        out: dict[str, dict[str, torch.Tensor]] = {}
        for r in result:
            for q in r:
                out[q] = dict(r[q])
        return out


BACKPACK_EXT = {"diag_ggn": ("DiagGGNExact", "diag_ggn_exact"), "diag_ggn_mc": ("DiagGGNMC", "diag_ggn_mc"),
                "diag_hessian": ("DiagHessian", "diag_h")}
# BackPACK's Kronecker extensions: (extension, attribute holding the list of factors per parameter)
BACKPACK_KRON = {"kfac": ("KFAC", "kfac"), "kflr": ("KFLR", "kflr"), "kfra": ("KFRA", "kfra")}
# BackPACK's first-order extensions: (extension, attribute holding the per-parameter tensor)
BACKPACK_FIRST_ORDER = {"batch_grad": ("BatchGrad", "grad_batch"), "batch_l2_grad": ("BatchL2Grad", "batch_l2"),
                        "sum_grad_squared": ("SumGradSquared", "sum_grad_squared")}
BACKPACK_ALL = {**BACKPACK_EXT, **BACKPACK_KRON, **BACKPACK_FIRST_ORDER}
BACKPACK_MC = ("DiagGGNMC", "KFAC")  # extensions taking mc_samples


class Backpack(Method):
    family = "backpack"

    def __init__(self, model, x, y, quantity: str, skip: str | None = None, bp_model=None, converter: bool = False):
        ext, attr = BACKPACK_ALL[quantity]
        super().__init__(f"backpack/{quantity}", f"BackPACK {ext}", quantity, skip)
        self.base, self.x, self.y, self.ext_name, self.attr = model, x, y, ext, attr
        self.bp_model = bp_model  # a shared extended copy (a dict holder), set up once
        # extend(..., use_converter=True): BackPACK retraces the model with torch.fx so that functional
        # calls (a residual block's ``out + shortcut``) become modules it has extensions for; parameter
        # names are kept
        self.converter = converter

    def setup(self):
        from backpack import extend, extensions

        if self.bp_model.get("model") is None:
            m = copy.deepcopy(self.base)
            self.bp_model["model"] = extend(m, use_converter=self.converter)
            self.bp_model["loss"] = extend(nn.CrossEntropyLoss())
        self.model = self.bp_model["model"]
        self.loss_fn = self.bp_model["loss"]
        cls = getattr(extensions, self.ext_name)
        self.extension = cls(mc_samples=1) if self.ext_name in BACKPACK_MC else cls()

    def call(self):
        from backpack import backpack

        loss = self.loss_fn(self.model(self.x), self.y)
        with backpack(self.extension):
            loss.backward()
        return loss.detach()

    def check_call(self):
        if self.quantity != "kfac":
            return self.call()
        # KFAC samples classes with torch.multinomial on the global RNG (Categorical.sample), fxcurv's
        # kfac with torch.multinomial on its generator, both from the same probabilities and one
        # sample per row: seeded alike, they draw the same classes (checked: the factors then agree
        # to float32 precision), so KFAC's G is compared in full. The global RNG is restored.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CHECK_SEED)
            return self.call()

    def reset(self):
        super().reset()
        model = self.bp_model.get("model")
        for p in model.parameters() if model is not None else ():
            p.grad = None
            for a in ("diag_ggn_exact", "diag_ggn_mc", "diag_h", "kfac", "kflr", "kfra", "grad_batch", "batch_l2",
                      "sum_grad_squared"):
                if hasattr(p, a):
                    delattr(p, a)

    def values(self, result):
        named = list(self.model.named_parameters())
        if self.quantity in BACKPACK_KRON:  # a list of factors per parameter
            q = {k: v for n, p in named for k, v in kron_factors(n, getattr(p, self.attr)).items()}
        else:
            q = {n: getattr(p, self.attr).detach().clone() for n, p in named}
        return {"grad": {n: p.grad.detach().clone() for n, p in named}, self.quantity: q}


class Asdl(Method):
    """ASDL's Fisher diagonal (exact: one backward per class; MC: one sampled backward), plus the loss
    gradient (``calc_loss_grad=True``). For softmax cross-entropy the exact Fisher is the GGN."""

    family = "asdl"

    def __init__(self, model, x, y, quantity: str, holder: dict, skip: str | None = None):
        kind = "fisher_exact" if quantity == "diag_ggn" else "fisher_mc"
        super().__init__(f"asdl/{kind}", f"ASDL {kind} diag", quantity, skip)
        self.base, self.x, self.y, self.kind, self.holder = model, x, y, kind, holder

    def setup(self):
        from asdl import FISHER_EXACT, FISHER_MC, LOSS_CROSS_ENTROPY, SHAPE_DIAG, FisherConfig, get_fisher_maker

        if self.holder.get("model") is None:
            self.holder["model"] = copy.deepcopy(self.base)
        self.model = self.holder["model"]
        N = self.x.shape[0]
        cfg = FisherConfig(fisher_type=FISHER_EXACT if self.kind == "fisher_exact" else FISHER_MC,
                           fisher_shapes=[SHAPE_DIAG], loss_type=LOSS_CROSS_ENTROPY, n_mc_samples=1, data_size=N)
        self.maker = get_fisher_maker(self.model, cfg)
        dummy_y = self.maker.setup_model_call(self.model, self.x)
        # ASDL's losses are sums; forward_and_backward divides loss and gradient by data_size.
        self.maker.setup_loss_call(F.cross_entropy, dummy_y, self.y, reduction="sum")

    def call(self):
        _, loss = self.maker.forward_and_backward(calc_loss_grad=True)
        return loss.detach()

    def reset(self):
        super().reset()
        if self.holder.get("model") is not None:
            _clear_grads(self.holder["model"])
            for m in self.holder["model"].modules():
                if hasattr(m, "fisher"):
                    delattr(m, "fisher")

    def values(self, result):
        diag = {}
        for mname, m in self.model.named_modules():
            f = getattr(m, "fisher", None)
            if f is None or f.diag is None:
                continue
            prefix = f"{mname}." if mname else ""
            if f.diag.weight is not None:
                diag[prefix + "weight"] = f.diag.weight.detach().clone()
            if f.diag.bias is not None:
                diag[prefix + "bias"] = f.diag.bias.detach().clone()
        return {"grad": {n: p.grad.detach().clone() for n, p in self.model.named_parameters()},
                self.quantity: diag}


class TorchFunc(Method):
    family = "torch.func"

    def __init__(self, model, x, y, classes: int, quantity: str, budget_mb: float, skip: str | None = None):
        super().__init__(f"torch.func/{quantity}", f"torch.func vmap(vjp) {quantity}", quantity, skip)
        self.model, self.x, self.y, self.classes, self.budget_mb = model, x, y, classes, budget_mb

    def setup(self):
        from functorch_ref import FuncGGN

        self.fn = FuncGGN(self.model, self.classes, mc=self.quantity == "diag_ggn_mc", budget_mb=self.budget_mb)

    def call(self):
        with composite_attention():  # else torch.func loops over the columns through the flash backward
            return self.fn(self.x, self.y)

    def values(self, result):
        _, g, d = result
        return {"grad": g, self.quantity: d}


class CurvlinopsHutchinson(Method):
    """curvlinops' Hutchinson estimate of the GGN diagonal, ``(1/K) sum_k v_k * (G v_k)`` with ``K``
    Rademacher vectors ``v_k`` and ``G v`` by ``GGNLinearOperator`` (a Jacobian-vector and a
    vector-Jacobian product of the whole batch per ``v``), plus the loss gradient (one backward), as
    every method returns it. An unbiased estimate of ``diag(G)`` as ``diag_ggn_mc`` is, so it sits in
    that row; its values are not compared (other random draws). curvlinops has no exact diagonal."""

    family = "curvlinops"

    def __init__(self, model, loss_fn, x, y, matvecs: int, skip: str | None = None):
        super().__init__("curvlinops/diag_ggn_mc", f"curvlinops GGN Hutchinson diagonal ({matvecs} GGN-vector "
                         f"product{'s' if matvecs > 1 else ''})", "diag_ggn_mc", skip)
        self.model, self.loss_fn, self.x, self.y, self.matvecs = model, loss_fn, x, y, matvecs

    def setup(self):
        from curvlinops import GGNLinearOperator

        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.op = GGNLinearOperator(self.model, self.loss_fn, self.params, [(self.x, self.y)],
                                    check_deterministic=False)

    def call(self):
        from curvlinops import hutchinson_diag

        loss = self.loss_fn(self.model(self.x), self.y)
        loss.backward()
        with composite_attention():  # GGN-vector products use forward-mode AD (jvp)
            return loss.detach(), hutchinson_diag(self.op, self.matvecs)

    def check_call(self):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(CHECK_SEED)
            return self.call()

    def reset(self):
        super().reset()
        _clear_grads(self.model)

    def values(self, result):
        _, flat = result
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        diag, start = {}, 0
        for n, p in named:
            diag[n] = flat[start:start + p.numel()].reshape(p.shape).detach().clone()
            start += p.numel()
        return {"grad": {n: p.grad.detach().clone() for n, p in named}, self.quantity: diag}


class FloorRef(Method):
    family = "floor"

    def __init__(self, model, x, y, skip: str | None = None):
        super().__init__("floor/diag_ggn", "floor (hand-written) diag_ggn", "diag_ggn", skip)
        self.model, self.x, self.y = model, x, y

    def setup(self):
        from floor import Floor

        self.fn = Floor(self.model)

    def call(self):
        return self.fn(self.x, self.y)

    def values(self, result):
        _, g, d = result
        return {"grad": g, "diag_ggn": d}
