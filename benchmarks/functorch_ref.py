"""torch.func references: gradient + exact (or Monte Carlo) GGN diagonal of softmax cross-entropy (mean).

Per sample ``n``: one ``vjp`` of the model at ``x_n``; the gradient is the vjp of ``(p - e_y) / N``
and the GGN diagonal is ``sum_k (J_n^T S_k)^2`` over the ``C`` loss-factor columns
``S_k = sqrt(p_k) (e_k - p) / sqrt(N)``, evaluated as ``vmap`` of the vjp over the columns. The
per-sample part is ``vmap``-ed over chunks of samples, so memory is bounded by
``chunk * columns * #params`` floats (the chunk is chosen from a memory budget). The Monte Carlo
variant uses one sampled column ``(p - e_yhat) / sqrt(N)`` with ``yhat ~ p`` (Gumbel-max, noise drawn
outside the vmap from a seeded generator).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap


class FuncGGN:
    def __init__(self, model: nn.Module, classes: int, mc: bool = False, budget_mb: float = 512.0,
                 seed: int = 0):
        self.model = model
        self.mc = mc
        self.classes = classes
        self.params = {k: v.detach() for k, v in model.named_parameters()}
        n_params = sum(p.numel() for p in self.params.values())
        cols = 1 if mc else classes
        # per sample: cols factor vjps + the gradient vjp + their squares, float32
        per_sample = (2 * cols + 2) * n_params * 4
        self.chunk = max(1, int(budget_mb * 2**20 // per_sample))
        self.generator = torch.Generator().manual_seed(seed)

    def _per_sample(self, params, xn, yn, noise, n_total):
        def f(p):
            return functional_call(self.model, p, (xn.unsqueeze(0),)).squeeze(0)

        logits, vjp_fn = vjp(f, params)
        logp = torch.log_softmax(logits, -1)
        p = logp.exp()
        onehot = torch.nn.functional.one_hot(yn, self.classes).to(p.dtype)
        loss = -(logp * onehot).sum() / n_total
        (g,) = vjp_fn((p - onehot) / n_total)
        if self.mc:
            yhat = torch.argmax(logp + noise, -1)
            S = ((p - torch.nn.functional.one_hot(yhat, self.classes).to(p.dtype)) / math.sqrt(n_total)).unsqueeze(0)
        else:
            eye = torch.eye(self.classes, dtype=p.dtype, device=p.device)
            S = (eye - p.unsqueeze(0)) * (p.sqrt() / math.sqrt(n_total)).unsqueeze(1)  # rows: S_k
        (JS,) = vmap(vjp_fn)(S)
        diag = {k: v.square().sum(0) for k, v in JS.items()}
        return loss, g, diag

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        N = x.shape[0]
        if self.mc:
            u = torch.rand(N, self.classes, generator=self.generator).clamp_(1e-20, 1.0)
            noise = -torch.log(-torch.log(u))
        else:
            noise = torch.zeros(N, 1)
        batched = vmap(self._per_sample, in_dims=(None, 0, 0, 0, None))
        loss = torch.zeros(())
        grad = {k: torch.zeros_like(v) for k, v in self.params.items()}
        diag = {k: torch.zeros_like(v) for k, v in self.params.items()}
        for s in range(0, N, self.chunk):
            e = min(N, s + self.chunk)
            l, g, d = batched(self.params, x[s:e], y[s:e], noise[s:e], N)
            loss += l.sum()
            for k in grad:
                grad[k] += g[k].sum(0)
                diag[k] += d[k].sum(0)
        return loss, grad, diag
