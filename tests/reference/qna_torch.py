"""PyTorch reference of the QnA layer (FusedKQnA), test-time only.

Written from /work/shared/spec/qna.md (section 2) and checked against the official Flax code, moabarar/qna
layers/qna.py at 1f8e8e3; no code was copied. The parameter names are those of the public PyTorch port of the
layer (LeapLabTHU/DAT models/qna.py): proj_k, proj_v, proj_out, q_param, attn_scale, rpb_table, with its shapes.
Semantics follow the official code, not the port, where they differ:

* q_param holds the raw official `query`: forward() normalises it per head, q / (||q||_2 + 1e-6), then divides
  by sqrt(d), as the official code does (normalize_q=True in every QnA-ViT builder). The DAT port has that
  normalisation commented out and only scales by 1/sqrt(d), so its q_param must be pre-normalised.
* The output side is (H + 2p - k) // s + 1 with p = (k - 1) // 2 (the official QnA-ViT padding), not DAT's
  H // s, which breaks for odd H at stride 2.
* The constructor takes the official (in_channels, features, heads): features and heads are the layer's own
  (the stride-2 layer of QnA-ViT passes 2C and 2h), where DAT multiplies by the stride internally.

Formulation: the official one, unlike the engine's. The keys are materialised (proj_k), the logits are q . k,
and the window sums are two grouped (depthwise) convolutions of exp(logits) and exp(logits) * v with the kernels
exp(rpb) and exp(rpb) * attn_scale (zero padding, so out-of-image cells drop out of both sums). Before the exps
a per-image, per-channel max is subtracted from the logits and a per-channel max from rpb_table; both cancel
exactly (the official code subtracts nothing and overflows in float32 above ~88). Checked once against the
official Flax layer (jax 0.10.2, flax 0.12.8, float64, 12 randomised layers): max |diff| 7.5e-15.

Public API::

    FusedKQnA(in_channels, features, heads, kernel_size, stride=1, n_queries=2)
        .forward(x) -> (B, features, Ho, Wo)       # x NCHW (B, in_channels, H, W)
    randomize_(module, seed=0, key_scale=1.0)      # non-trivial random parameters
    engine_weights(state_dict, heads)              # -> dict(w_in, w_out, rpe, attn_scale), kernels/qna.py layout
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from qnalo.kernels.qna import fold_queries

__all__ = ["FusedKQnA", "randomize_", "engine_weights", "QUERY_EPS"]

QUERY_EPS = 1e-6


class FusedKQnA(nn.Module):
    def __init__(self, in_channels, features, heads, kernel_size, stride=1, n_queries=2):
        super().__init__()
        assert features % heads == 0, (features, heads)
        self.heads, self.head_dim = heads, features // heads
        self.n_queries, self.kernel_size, self.stride = n_queries, kernel_size, stride
        self.padding = (kernel_size - 1) // 2
        nc = n_queries * heads
        self.proj_k = nn.Linear(in_channels, features, bias=False)
        self.proj_v = nn.Linear(in_channels, features, bias=False)
        self.proj_out = nn.Conv2d(features, features, 1, bias=False)
        self.q_param = nn.Parameter(torch.empty(n_queries, features))
        self.attn_scale = nn.Parameter(torch.empty(1, 1, kernel_size ** 2, nc))
        self.rpb_table = nn.Parameter(torch.empty(kernel_size ** 2, nc))
        with torch.no_grad():   # the official training init (qna.py: query, attn_scale_weights; rpe_bias zeros)
            nn.init.trunc_normal_(self.q_param, std=1.0, a=-2.0, b=2.0)
            self.q_param.mul_(math.sqrt(1.0 / self.head_dim))
            nn.init.normal_(self.attn_scale, std=0.02)
            nn.init.zeros_(self.rpb_table)

    def queries(self):
        """(nq, heads, d): per head q / (||q|| + 1e-6) / sqrt(d), the official _normalize_and_reshape_query."""
        q = self.q_param.reshape(self.n_queries, self.heads, self.head_dim)
        q = q / (torch.linalg.vector_norm(q, ord=2, dim=-1, keepdim=True) + QUERY_EPS)
        return q / math.sqrt(self.head_dim)

    def forward(self, x):
        b, _, h, w = x.shape
        nq, heads, d, k = self.n_queries, self.heads, self.head_dim, self.kernel_size
        nc = nq * heads
        tokens = x.permute(0, 2, 3, 1)                                     # (B, H, W, C)
        keys = self.proj_k(tokens).reshape(b, h, w, heads, d)
        values = self.proj_v(tokens).reshape(b, h, w, heads, d).permute(0, 3, 4, 1, 2)   # (B, heads, d, H, W)
        logits = torch.einsum("byxhd,qhd->bqhyx", keys, self.queries()).reshape(b, nc, h, w)   # qi*heads + hi
        logits = logits - logits.amax(dim=(2, 3), keepdim=True).detach()
        rpb = self.rpb_table - self.rpb_table.amax(dim=0, keepdim=True).detach()
        e = torch.exp(logits)
        ev = (e.reshape(b, nq, heads, 1, h, w) * values.unsqueeze(1)).reshape(b, nc * d, h, w)   # (qi, hi, j)
        kern = torch.exp(rpb).t().reshape(nc, 1, k, k)                     # row a*k + b -> (a, b): OIHW
        scale = self.attn_scale.reshape(k * k, nc).t().reshape(nc, 1, k, k)
        num = F.conv2d(ev, (kern * scale).repeat_interleave(d, dim=0), stride=self.stride,
                       padding=self.padding, groups=nc * d)
        den = F.conv2d(e, kern, stride=self.stride, padding=self.padding, groups=nc)
        ho, wo = num.shape[-2:]
        out = (num.reshape(b, nq, heads, d, ho, wo) / den.reshape(b, nq, heads, 1, ho, wo)).sum(dim=1)
        return self.proj_out(out.reshape(b, heads * d, ho, wo))


@torch.no_grad()
def randomize_(module, seed=0, key_scale=1.0):
    """Deterministic non-trivial parameters, drawn in float32 (then cast): projections ~ N(0, 1/fan_in),
    proj_k times key_scale (logits ~ key_scale / sqrt(d) on unit inputs: large ones test the max shift);
    q_param ~ N(0, 1) with per-row norms spread over [0.1, 10]; attn_scale and rpb_table ~ N(0, 1), so
    the signed scale and the bias both matter (the official init would make the output ~0). Returns it."""
    gen = torch.Generator().manual_seed(int(seed))

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    for lin in (module.proj_k, module.proj_v, module.proj_out):
        fan_in = lin.weight[0].numel()
        lin.weight.copy_(randn(lin.weight.shape) / math.sqrt(fan_in))
    module.proj_k.weight.mul_(key_scale)
    norms = 10.0 ** (2.0 * torch.rand((module.n_queries, 1), generator=gen) - 1.0)
    module.q_param.copy_(randn(module.q_param.shape) * norms)
    module.attn_scale.copy_(randn(module.attn_scale.shape))
    module.rpb_table.copy_(randn(module.rpb_table.shape))
    return module


def engine_weights(state_dict, heads):
    """A FusedKQnA state dict -> the arguments of kernels/qna.py (NumPy, the state dict's dtype):
    w_in = [fold_queries(q_param, proj_k.weight^T) | proj_v.weight^T], w_out = proj_out.weight[:, :, 0, 0]^T,
    rpe = rpb_table, attn_scale = attn_scale reshaped (k*k, nq*heads)."""
    sd = {name: t.detach().cpu().numpy() for name, t in state_dict.items()}
    m = fold_queries(sd["q_param"], sd["proj_k.weight"].T, heads)
    return {"w_in": np.concatenate([m, sd["proj_v.weight"].T], axis=1),
            "w_out": np.ascontiguousarray(sd["proj_out.weight"][:, :, 0, 0].T),
            "rpe": sd["rpb_table"].copy(),
            "attn_scale": sd["attn_scale"].reshape(sd["rpb_table"].shape).copy()}
