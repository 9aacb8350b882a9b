"""Hand-written "floor" reference: gradient and exact GGN diagonal of softmax cross-entropy (mean).

A minimal torch loop, no hooks, no graph: one forward that keeps what the backward needs, then one
backward that carries the gradient ``g`` and the ``C`` columns ``S_k`` of the loss Hessian's square
root *stacked* as a single message ``M = [g; S_1; ...; S_C]`` of shape ``[1 + C, N, ...]``, so each
layer costs one GEMM (linear: ``M @ W``) or one transposed convolution (conv) for all ``1 + C``
columns. Per layer it forms

* linear ``y = x W^T + b``:  grad ``g^T x``, GGN diagonal ``(sum_k S_k^2)^T x^2``
* conv: grad via unfold + einsum; GGN diagonal from the per-sample weight factor
  ``V_kn = sum_positions S_k[n] [[x_n]]^T`` (unfold + batched GEMM over blocks of samples), squared
  *after* summing positions
* elementwise ``phi``: ``M * phi'(x)``; max-pool: scatter-add through the argmax indices;
  zero-pad: crop; flatten: reshape.

For softmax cross-entropy with mean reduction over ``N`` samples, the per-sample loss Hessian w.r.t.
the logits is ``(diag(p) - p p^T) / N = S S^T`` with columns ``S_k = sqrt(p_k) (e_k - p) / sqrt(N)``,
and the gradient is ``(p - onehot(y)) / N``.

Supports ``nn.Sequential`` of Linear, Conv2d (groups=1), Tanh, Sigmoid, ReLU, Flatten, ZeroPad2d,
MaxPool2d — enough for the benchmark networks (MNIST MLP, FCNN, c3d3).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Floor:
    def __init__(self, model: nn.Sequential):
        if not isinstance(model, nn.Sequential):
            raise TypeError("the floor reference handles nn.Sequential models only")
        self.layers = list(model.named_children())
        for name, m in self.layers:
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                raise NotImplementedError(f"{name}: grouped convolution")
            if isinstance(m, nn.MaxPool2d) and (m.dilation not in (1, (1, 1)) or m.ceil_mode or m.padding not in (0, (0, 0))):
                raise NotImplementedError(f"{name}: max-pool with dilation/padding/ceil_mode")
            if not isinstance(m, (nn.Linear, nn.Conv2d, nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Flatten, nn.ZeroPad2d,
                                  nn.MaxPool2d)):
                raise NotImplementedError(f"{name}: {type(m).__name__} is not supported by the floor reference")

    @staticmethod
    def _conv_weight_diag(S: torch.Tensor, cols: torch.Tensor, block_bytes: int = 32 * 2**20) -> torch.Tensor:
        """``sum_{k,n} V_kn^2`` with the per-sample weight factors ``V_kn = S_k[n] [[x_n]]^T`` (summed
        over output positions by the GEMM, *then* squared): ``S`` is ``[C, N, C_out, L]``, ``cols`` the
        unfolded input ``[N, C_in*k*k, L]``. One batched GEMM per block of samples (blocks of about
        ``block_bytes``), squared in place and reduced, so the factors never exist for all samples at once."""
        C, N, Co, L = S.shape
        I = cols.shape[1]
        A = S.permute(1, 0, 2, 3).reshape(N, C * Co, L)  # [N, C*Co, L]: all columns of a sample in one GEMM
        colsT = cols.transpose(1, 2)  # [N, L, I]
        out = S.new_zeros(C * Co, I)
        B = max(1, int(block_bytes // (C * Co * I * S.element_size())))
        for n0 in range(0, N, B):
            V = torch.bmm(A[n0:n0 + B], colsT[n0:n0 + B])  # [b, C*Co, I]
            out += V.square_().sum(0)
        return out.view(C, Co, I).sum(0)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor):
        saved = []
        h = x
        for _name, m in self.layers:
            if isinstance(m, nn.Linear):
                saved.append(h)
                h = F.linear(h, m.weight, m.bias)
            elif isinstance(m, nn.Conv2d):
                saved.append(h)
                h = F.conv2d(h, m.weight, m.bias, m.stride, m.padding, m.dilation)
            elif isinstance(m, nn.Sigmoid):
                h = torch.sigmoid(h)
                saved.append(h * (1 - h))
            elif isinstance(m, nn.Tanh):
                h = torch.tanh(h)
                saved.append(1 - h * h)
            elif isinstance(m, nn.ReLU):
                saved.append((h > 0).to(h.dtype))
                h = torch.relu(h)
            elif isinstance(m, nn.Flatten):
                saved.append(h.shape[1:])
                h = h.flatten(1)
            elif isinstance(m, nn.ZeroPad2d):
                saved.append(m.padding)
                h = F.pad(h, m.padding)
            elif isinstance(m, nn.MaxPool2d):
                in_hw = h.shape[-2:]
                h, idx = F.max_pool2d(h, m.kernel_size, m.stride, return_indices=True)
                saved.append((idx, in_hw))
        logits = h
        N, C = logits.shape
        logp = torch.log_softmax(logits, 1)
        loss = -logp.gather(1, y[:, None]).mean()
        p = logp.exp()
        # Stacked message [1 + C, N, C]: the gradient, then the C loss-factor columns.
        M = torch.empty(1 + C, N, C, dtype=logits.dtype, device=logits.device)
        M[0] = p
        M[0].scatter_add_(1, y[:, None], -torch.ones(N, 1, dtype=p.dtype, device=p.device))
        M[0] /= N
        eye = torch.eye(C, dtype=p.dtype, device=p.device)
        M[1:] = (eye[:, None, :] - p[None]) * (p.t().sqrt() / math.sqrt(N))[:, :, None]

        grad: dict[str, torch.Tensor] = {}
        diag: dict[str, torch.Tensor] = {}
        first_param_layer = next(i for i, (_, m) in enumerate(self.layers) if isinstance(m, (nn.Linear, nn.Conv2d)))
        for i in range(len(self.layers) - 1, -1, -1):
            name, m = self.layers[i]
            s = saved[i]
            last = i == first_param_layer  # nothing below needs the message
            if isinstance(m, nn.Linear):
                g, S = M[0], M[1:]
                grad[f"{name}.weight"] = g.t() @ s
                s2 = S.square().sum(0)  # [N, out]
                diag[f"{name}.weight"] = s2.t() @ s.square()
                if m.bias is not None:
                    grad[f"{name}.bias"] = g.sum(0)
                    diag[f"{name}.bias"] = s2.sum(0)
                if not last:
                    out = M.shape[-1]
                    M = (M.reshape(-1, out) @ m.weight).view(M.shape[0], N, -1)  # one GEMM, 1 + C columns
            elif isinstance(m, nn.Conv2d):
                W = m.weight
                cols = F.unfold(s, W.shape[-2:], m.dilation, m.padding, m.stride)  # [N, Cin*k*k, L]
                Mf = M.flatten(3)  # [1 + C, N, Cout, L]
                grad[f"{name}.weight"] = torch.einsum("nol,nil->oi", Mf[0], cols).view_as(W)
                diag[f"{name}.weight"] = self._conv_weight_diag(Mf[1:], cols).view_as(W)
                if m.bias is not None:
                    grad[f"{name}.bias"] = Mf[0].sum((0, 2))
                    diag[f"{name}.bias"] = Mf[1:].sum(3).square().sum((0, 1))
                if not last:
                    K, _, Co, Ho, Wo = M.shape
                    in_hw = s.shape[-2:]
                    # output_padding recovers the input size when the stride drops rows/columns
                    op = tuple(
                        in_hw[d] - ((M.shape[3 + d] - 1) * m.stride[d] - 2 * m.padding[d]
                                    + m.dilation[d] * (W.shape[2 + d] - 1) + 1)
                        for d in range(2)
                    )
                    M = F.conv_transpose2d(M.reshape(K * N, Co, Ho, Wo), W, None, m.stride, m.padding, op, 1,
                                           m.dilation).view(K, N, s.shape[1], *in_hw)
            elif isinstance(m, (nn.Sigmoid, nn.Tanh, nn.ReLU)):
                M = M.mul_(s) if M.is_contiguous() else M * s  # M is a fresh buffer when contiguous
            elif isinstance(m, nn.Flatten):
                M = M.view(M.shape[0], N, *s)
            elif isinstance(m, nn.ZeroPad2d):
                left, right, top, bottom = s
                H, Wd = M.shape[-2:]
                M = M[..., top:H - bottom, left:Wd - right]
            elif isinstance(m, nn.MaxPool2d):
                idx, in_hw = s
                K = M.shape[0]
                flat = M.flatten(3)  # [K, N, ch, Ho*Wo]
                out = flat.new_zeros(K, *flat.shape[1:3], in_hw[0] * in_hw[1])
                out.scatter_add_(3, idx.flatten(2).unsqueeze(0).expand_as(flat), flat)
                M = out.view(K, *flat.shape[1:3], *in_hw)
            if last:
                break
        return loss, grad, diag
