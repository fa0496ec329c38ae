"""PyTorch reference of QnA-ViT (test-time only), in the PyTorch layout of /work/shared/spec/qna.md section 6.4.

Written from the spec (sections 3, 4, 6.4) and checked against the official Flax code, moabarar/qna
models/qna_vit.py, layers/self_attention.py, layers/positional_encoding.py, layers/utils.py at 1f8e8e3; no code
was copied. The QnA layers are tests/reference/qna_torch.py's FusedKQnA (DAT port names, official semantics).

The layout (a project choice: no official PyTorch layout exists), parameter names and shapes::

    stem.weight                          (C0, 3, 4, 4)       Conv 4x4 stride 4, 'SAME' padding, no bias
    stages.i.msa.j.norm1 / norm2          LayerNorm(C_i), eps 1e-6
    stages.i.msa.j.attn.qkv.weight        (3C_i, C_i)         no bias; output rows in the OFFICIAL per-head
                                                              interleaved order: head hi owns rows hi*3d + [0, 3d),
                                                              [q | k | v] inside it (not timm's (3, heads, d))
    stages.i.msa.j.attn.rpb_table         ((2w-1)^2, heads)   Swin-style relative position bias, official index
    stages.i.msa.j.attn.proj.weight       (C_i, C_i)          no bias
    stages.i.msa.j.mlp.fc1 / fc2          Linear C -> 4C -> C with bias, tanh GELU between
    stages.i.qna.j.norm1 / norm2, .mlp    as above
    stages.i.qna.j.attn.{proj_k, proj_v, proj_out, q_param, attn_scale, rpb_table}   FusedKQnA(C, C, h, k, 1)
    stages.i.downsample.skip.weight       (2C_i, C_i, 1, 1)   1x1 stride-2 conv, no bias, on the PRE-norm input
    stages.i.downsample.norm1 (C_i), .attn FusedKQnA(C_i, 2C_i, 2h, k, 2), .norm2 (2C_i), .mlp at 2C_i
    norm, head                            LayerNorm(C_3) -> mean over tokens -> Linear(C_3, num_classes)

q_param holds the RAW official `query` (FusedKQnA normalises it per head in forward, as the official code does);
it is not DAT's pre-normalised query. Within a stage the MSA blocks run first, then the QnA blocks, then the
stride-2 block (stages 0-2 only), as in the official QnAViT. Official Flax names map 1:1 (spec 4.1):
StemBlock_0/conv_1x1 -> stem, LSAStage_i/MSA_Block_{j+1} -> stages.i.msa.j, QnAStage_i/QnA_Block_{j+1} ->
stages.i.qna.j, QnAStage_i/QnA_Block_{n+1}_stride_2 -> stages.i.downsample (Conv_0 -> skip), LayerNorm_0/1 ->
norm1/2, MlpBlock_0/Dense_0/1 -> mlp.fc1/fc2, to_qkv / to_out / RelativePositionalEmbedding_0/rpe_bias ->
qkv / proj / rpb_table, ClassificationHead_0/LayerNorm_0 -> norm, head_logits -> head.

MSA blocks see the map split into w x w windows (no shift); the split asserts that w divides the map, as the
official LSAStage does. forward_features returns, per stage, the map entering its stride-2 block (stage 3: its
output), NCHW: strides 4/8/16/32 (spec 3.11, the first choice).

Public API::

    QnAViT(embed_dim=64, qna_depths=(2,3,2,0), msa_depths=(0,0,4,2), qna_heads=(8,16,32,64), msa_heads=(2,4,8,16),
           qna_kernel_sizes=(3,3,3,3), msa_windows=(7,7,14,7), n_queries=2, num_classes=1000)
        .forward(x NCHW) -> logits     .forward_features(x) -> [4 NCHW maps]
    QNA_VIT_REFERENCE_VARIANTS, qna_vit_reference(name, **overrides)
    randomize_(model, seed=0)
    engine_tensors(state_dict) -> {name: float32 array} in the engine layout of docs/format.md
"""
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from reference.qna_torch import FusedKQnA, randomize_ as randomize_qna_

__all__ = ["QnAViT", "QNA_VIT_REFERENCE_VARIANTS", "qna_vit_reference", "randomize_", "engine_tensors",
           "relative_position_index", "LN_EPS"]

LN_EPS = 1e-6   # Flax nn.LayerNorm default (Flax uses the fast variance E[x^2] - E[x]^2; ~1e-7 apart)


def relative_position_index(w):
    """(w*w, w*w) int64: for query token i = (yi, xi) and key token j (row-major in the window), the row
    (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1) of the bias table (official RelativePositionalEmbedding)."""
    ys, xs = np.divmod(np.arange(w * w), w)
    return (ys[:, None] - ys[None, :] + w - 1) * (2 * w - 1) + (xs[:, None] - xs[None, :] + w - 1)


class Mlp(nn.Module):
    """Dense(C -> 4C, bias) -> GELU (tanh approximation, Flax nn.gelu's default) -> Dense(4C -> C, bias)."""

    def __init__(self, dim):
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class WindowMSA(nn.Module):
    """Multi-head self-attention inside one window of w*w tokens, (Bw, w*w, C) -> (Bw, w*w, C)."""

    def __init__(self, dim, heads, window):
        super().__init__()
        assert dim % heads == 0, (dim, heads)
        self.heads, self.head_dim, self.window = heads, dim // heads, window
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.rpb_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        self.register_buffer("rp_index", torch.from_numpy(relative_position_index(window)), persistent=False)

    def forward(self, x):
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, self.heads, 3 * self.head_dim)   # per-head [q | k | v]
        q, k, v = qkv.permute(0, 2, 1, 3).split(self.head_dim, dim=-1)   # (Bw, heads, n, d) each
        bias = self.rpb_table[self.rp_index].permute(2, 0, 1)              # (heads, n, n)
        attn = torch.softmax((q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1) + bias, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))


class MSABlock(nn.Module):
    def __init__(self, dim, heads, window):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = WindowMSA(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim)

    def forward(self, x):   # windowed tokens (Bw, w*w, C)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _qna(layer, x):
    """FusedKQnA on an NHWC map (the layer takes NCHW)."""
    return layer(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)


class QnABlock(nn.Module):
    def __init__(self, dim, heads, kernel_size, n_queries):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = FusedKQnA(dim, dim, heads, kernel_size, 1, n_queries)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim)

    def forward(self, x):   # NHWC
        x = x + _qna(self.attn, self.norm1(x))
        return x + self.mlp(self.norm2(x))


class QnADownBlock(nn.Module):
    """The stride-2 block: skip = 1x1 stride-2 conv of the un-normalised input; QnA at 2C features, 2h heads."""

    def __init__(self, dim, heads, kernel_size, n_queries):
        super().__init__()
        self.skip = nn.Conv2d(dim, 2 * dim, 1, stride=2, bias=False)
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = FusedKQnA(dim, 2 * dim, 2 * heads, kernel_size, 2, n_queries)
        self.norm2 = nn.LayerNorm(2 * dim, eps=LN_EPS)
        self.mlp = Mlp(2 * dim)

    def forward(self, x):   # NHWC (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)
        skip = self.skip(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        x = skip + _qna(self.attn, self.norm1(x))
        return x + self.mlp(self.norm2(x))


class Stage(nn.Module):
    def __init__(self, dim, n_msa, n_qna, msa_heads, qna_heads, window, kernel_size, n_queries, downsample):
        super().__init__()
        self.window = window
        self.msa = nn.ModuleList([MSABlock(dim, msa_heads, window) for _ in range(n_msa)])
        self.qna = nn.ModuleList([QnABlock(dim, qna_heads, kernel_size, n_queries) for _ in range(n_qna)])
        self.downsample = QnADownBlock(dim, qna_heads, kernel_size, n_queries) if downsample else None

    def forward(self, x):
        """NHWC -> the map before the stride-2 block (the feature tap); the caller applies self.downsample."""
        if len(self.msa):
            b, h, w, c = x.shape
            ws = self.window
            assert h % ws == 0 and w % ws == 0, f"map {h}x{w} is not divisible by the window {ws}"
            t = x.reshape(b, h // ws, ws, w // ws, ws, c).transpose(2, 3).reshape(-1, ws * ws, c)
            for blk in self.msa:
                t = blk(t)
            x = t.reshape(b, h // ws, w // ws, ws, ws, c).transpose(2, 3).reshape(b, h, w, c)
        for blk in self.qna:
            x = blk(x)
        return x


class QnAViT(nn.Module):
    def __init__(self, embed_dim=64, qna_depths=(2, 3, 2, 0), msa_depths=(0, 0, 4, 2), qna_heads=(8, 16, 32, 64),
                 msa_heads=(2, 4, 8, 16), qna_kernel_sizes=(3, 3, 3, 3), msa_windows=(7, 7, 14, 7), n_queries=2,
                 num_classes=1000):
        super().__init__()
        self.dims = tuple(embed_dim * 2 ** i for i in range(4))
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, embed_dim, 4, stride=4, bias=False)
        self.stages = nn.ModuleList([
            Stage(self.dims[i], msa_depths[i], qna_depths[i], msa_heads[i], qna_heads[i], msa_windows[i],
                  qna_kernel_sizes[i], n_queries, downsample=i < 3) for i in range(4)])
        if num_classes:
            self.norm = nn.LayerNorm(self.dims[3], eps=LN_EPS)
            self.head = nn.Linear(self.dims[3], num_classes)

    def _stem(self, x):
        """'SAME' padding for stride 4 (XLA): total 4*ceil(H/4) - H, the smaller half at the top / left."""
        h, w = x.shape[2:]
        ph, pw = 4 * -(-h // 4) - h, 4 * -(-w // 4) - w
        x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return self.stem(x).permute(0, 2, 3, 1)   # NHWC

    def _stages(self, x):
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
            yield x
            if stage.downsample is not None:
                x = stage.downsample(x)

    def forward_features(self, x):
        return [t.permute(0, 3, 1, 2).contiguous() for t in self._stages(x)]

    def forward(self, x):
        for t in self._stages(x):
            pass
        return self.head(self.norm(t).mean(dim=(1, 2)))


_TINY = dict(embed_dim=64, qna_depths=(2, 3, 2, 0), msa_depths=(0, 0, 4, 2), qna_heads=(8, 16, 32, 64),
             msa_heads=(2, 4, 8, 16), qna_kernel_sizes=(3, 3, 3, 3), msa_windows=(7, 7, 14, 7))
QNA_VIT_REFERENCE_VARIANTS = {   # models/qna_vit.py builders (spec 3.1)
    "qna_vit_tiny": _TINY,
    "qna_vit_tiny_7x7": {**_TINY, "qna_kernel_sizes": (7, 7, 7, 7)},
    "qna_vit_small": {**_TINY, "qna_depths": (2, 3, 6, 0), "msa_depths": (0, 0, 12, 2)},
    "qna_vit_base": dict(embed_dim=96, qna_depths=(2, 3, 6, 0), msa_depths=(0, 0, 12, 2), qna_heads=(6, 12, 24, 48),
                         msa_heads=(3, 6, 12, 24), qna_kernel_sizes=(3, 3, 3, 3), msa_windows=(7, 7, 14, 7)),
}


def qna_vit_reference(name, **overrides):
    """The reference model of a registered variant, in eval mode."""
    return QnAViT(**{**QNA_VIT_REFERENCE_VARIANTS[name], **overrides}).eval()


@torch.no_grad()
def randomize_(model, seed=0):
    """Deterministic non-trivial parameters, drawn in float32: Linear / conv weights ~ N(0, 1/fan_in), biases
    ~ N(0, 0.1^2), LayerNorm weights ~ 1 + N(0, 0.1^2) and biases ~ N(0, 0.1^2), MSA rpb_table ~ N(0, 1); QnA
    layers by qna_torch.randomize_ (queries of norms 0.1-10, rpb_table and attn_scale ~ N(0, 1)), then
    attn_scale divided by k * sqrt(nq) so that a layer's output stays of the order of its input through deep
    stacks. Returns the model."""
    gen = torch.Generator().manual_seed(int(seed))

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    qna_seeds = torch.randint(0, 2**31 - 1, (10_000,), generator=gen)
    n_qna = 0
    for mname, mod in model.named_modules():
        if isinstance(mod, FusedKQnA):
            randomize_qna_(mod, seed=int(qna_seeds[n_qna]))
            mod.attn_scale.div_(mod.kernel_size * math.sqrt(mod.n_queries))
            n_qna += 1
        elif isinstance(mod, nn.LayerNorm):
            mod.weight.copy_(1.0 + 0.1 * randn(mod.weight.shape))
            mod.bias.copy_(0.1 * randn(mod.bias.shape))
        elif isinstance(mod, WindowMSA):
            mod.rpb_table.copy_(randn(mod.rpb_table.shape))
        elif isinstance(mod, (nn.Linear, nn.Conv2d)) and ".attn.proj_" not in "." + mname:
            mod.weight.copy_(randn(mod.weight.shape) / math.sqrt(mod.weight[0].numel()))
            if mod.bias is not None:
                mod.bias.copy_(0.1 * randn(mod.bias.shape))
    return model


def engine_tensors(state_dict):
    """The reference's state dict -> the engine layout (docs/format.md), float32 NumPy: Linear weights (out, in)
    -> (in, out); the stem (C0, 3, 4, 4) -> (48, C0), row c*16 + ky*4 + kx; 1x1 convs (proj_out, skip)
    (out, in, 1, 1) -> (in, out); attn_scale (1, 1, k*k, nq*h) -> (k*k, nq*h); q_param (raw), rpb_table,
    LayerNorm parameters and biases as they are. The MSA qkv column order is kept (per-head interleaved)."""
    out = {}
    for name, t in state_dict.items():
        a = t.detach().cpu().numpy().astype(np.float32)
        leaf = name.rsplit(".", 1)[-1]
        if name == "stem.weight":
            a = a.reshape(a.shape[0], -1).T
        elif leaf == "attn_scale":
            a = a.reshape(a.shape[2], a.shape[3])
        elif leaf == "weight" and a.ndim == 4:    # proj_out, skip: 1x1 convs
            a = a[:, :, 0, 0].T
        elif leaf == "weight" and a.ndim == 2:    # Linear
            a = a.T
        out[name] = np.ascontiguousarray(a)
    return out
