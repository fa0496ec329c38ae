"""PyTorch reference implementation of LITv2 / HiLo (test- and benchmark-time only).

Written from /work/shared/spec/litv2.md and checked against the official code of ziplab/LITv2
(classification/models/* and detection/mmdet/models/backbones/litv2.py); no code was copied.

Module and parameter names reproduce the official state-dict keys exactly, so
``LITv2().load_state_dict(official['model'])`` works and ``LITv2().state_dict()`` saved under
``'model'`` looks like an official checkpoint.

Size rules: the DENSE copy's rules are used for every input size (they equal the classification
copy at the official sizes):

* the patch embedding zero-pads the image right/bottom to a multiple of 4;
* HiLo zero-pads the normalised (B, H, W, C) map bottom/right to a multiple of ws, without a mask,
  runs both branches on the padded map and crops each branch to [:H, :W] before the concat;
* DTM (deformable conv k2 s2 p0) floors odd sizes; the depthwise conv of the FFN uses the true H, W.

Public API::

    LITv2(embed_dim=96, depths=(2,2,6,2), num_heads=(3,6,12,24), window_sizes=(0,0,2,1), alpha=0.9,
          mlp_ratio=4, num_classes=1000, out_norms=None, lo_heads=None)
        .forward_features(x) -> [4 NCHW tensors]     .forward(x) -> logits (classification only)
    HiLo(dim, num_heads, window_size, alpha, lo_heads=None).forward(x, H, W)   # x: (B, N, C)
    deform_conv2d(x, offset, weight, bias)          # DCNv1, kernel 2, stride 2, pad 0
    deform_conv2d_loop(...)                         # slow scalar version of the same (tests)
    LITV2_REFERENCE_VARIANTS, litv2_reference(name, **overrides)
    randomize_(model, seed=0, offset_std=1.0)
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["LITv2", "HiLo", "DWMlp", "DTM", "PatchEmbed", "deform_conv2d", "deform_conv2d_loop",
           "LITV2_REFERENCE_VARIANTS", "litv2_reference", "randomize_", "official_lo_heads"]

LN_EPS = 1e-5
BN_EPS = 1e-5


def official_lo_heads(num_heads, window_size, alpha):
    """Lo-Fi head count of the official HiLo: int(heads * alpha) truncated; ws 1 -> all heads."""
    if window_size == 1:
        return num_heads
    return int(num_heads * alpha)


# ----------------------------------------------------------------------------------------------
# Deformable convolution (DCNv1, kernel 2, stride 2, padding 0, dilation 1, one offset group)
# ----------------------------------------------------------------------------------------------
def deform_conv2d(x, offset, weight, bias=None):
    """DCNv1 with kernel 2x2, stride 2, padding 0, as the official CUDA im2col kernel computes it.

    x (B, C, H, W); offset (B, 8, Ho, Wo) with Ho = H // 2, Wo = W // 2, channel 2k = dy and
    2k+1 = dx of tap k = 2i + j; weight (O, C, 2, 2); bias (O,) or None. Returns (B, O, Ho, Wo).

    A sample at (y, x) is 0 unless -1 < y < H and -1 < x < W; inside that band it is bilinear
    over the 4 integer neighbours, a neighbour outside the image contributing 0 (no
    renormalisation). Vectorised: the image gets a one-pixel zero border, so every neighbour of a
    sample inside the band is a valid index into the bordered image, and out-of-image neighbours
    read exact zeros; samples outside the band get all four weights zeroed. One row-gather
    (index_select on a (B*(H+2)*(W+2), C) table) per neighbour; exports to ONNX as Gather.
    """
    B, C, H, W = x.shape
    O = weight.shape[0]
    Ho, Wo = (H - 2) // 2 + 1, (W - 2) // 2 + 1
    assert offset.shape[1] == 8 and offset.shape[2] == Ho and offset.shape[3] == Wo, offset.shape
    dt = x.dtype
    off = offset.reshape(B, 4, 2, Ho, Wo)
    # base sampling positions of tap k = 2i + j at output (ho, wo): (2ho + i, 2wo + j)
    ki = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=dt, device=x.device).reshape(1, 4, 1, 1)
    kj = torch.tensor([0.0, 1.0, 0.0, 1.0], dtype=dt, device=x.device).reshape(1, 4, 1, 1)
    gy = (torch.arange(Ho, dtype=dt, device=x.device) * 2.0).reshape(1, 1, Ho, 1)
    gx = (torch.arange(Wo, dtype=dt, device=x.device) * 2.0).reshape(1, 1, 1, Wo)
    y = (gy + ki) + off[:, :, 0]                      # (B, 4, Ho, Wo), same op order as CUDA
    xx = (gx + kj) + off[:, :, 1]
    inside = (y > -1.0) & (y < float(H)) & (xx > -1.0) & (xx < float(W))
    y0f = torch.floor(y)
    x0f = torch.floor(xx)
    ly = y - y0f
    lx = xx - x0f
    hy = 1.0 - ly
    hx = 1.0 - lx
    mask = inside.to(dt)
    # indices into the bordered image (H+2, W+2): row y0 -> y0 + 1; clamp samples outside the band
    Hp, Wp = H + 2, W + 2
    y0 = torch.clamp(y0f, -1.0, float(H - 1)).to(torch.int64) + 1
    x0 = torch.clamp(x0f, -1.0, float(W - 1)).to(torch.int64) + 1
    base = (torch.arange(B, dtype=torch.int64, device=x.device) * (Hp * Wp)).reshape(B, 1, 1, 1)
    i00 = base + y0 * Wp + x0
    table = F.pad(x, (1, 1, 1, 1)).permute(0, 2, 3, 1).reshape(B * Hp * Wp, C)

    def corner(idx):
        return torch.index_select(table, 0, idx.reshape(-1)).reshape(B, 4, Ho, Wo, C)

    w1 = (hy * hx * mask).unsqueeze(-1)
    w2 = (hy * lx * mask).unsqueeze(-1)
    w3 = (ly * hx * mask).unsqueeze(-1)
    w4 = (ly * lx * mask).unsqueeze(-1)
    val = w1 * corner(i00) + w2 * corner(i00 + 1) + w3 * corner(i00 + Wp) + w4 * corner(i00 + Wp + 1)
    # val (B, 4, Ho, Wo, C) -> columns (B, Ho*Wo, 4*C) ordered (k, c); weight (O, C, 2, 2) -> (O, 4*C)
    cols = val.permute(0, 2, 3, 1, 4).reshape(B, Ho * Wo, 4 * C)
    wmat = weight.reshape(O, C, 4).permute(0, 2, 1).reshape(O, 4 * C)
    out = torch.matmul(cols, wmat.t())
    if bias is not None:
        out = out + bias
    return out.permute(0, 2, 1).reshape(B, O, Ho, Wo)


def deform_conv2d_loop(x, offset, weight, bias=None):
    """Plain scalar-loop DCNv1 (k2 s2 p0) straight from the CUDA im2col kernel. Slow; tests only."""
    B, C, H, W = x.shape
    O = weight.shape[0]
    Ho, Wo = (H - 2) // 2 + 1, (W - 2) // 2 + 1
    xd = x.detach().to(torch.float64)
    od = offset.detach().to(x.dtype)   # positions are computed in the compute dtype, as in CUDA
    cols = torch.zeros(B, C, 2, 2, Ho, Wo, dtype=torch.float64)
    for b in range(B):
        for ho in range(Ho):
            for wo in range(Wo):
                for i in range(2):
                    for j in range(2):
                        k = 2 * i + j
                        ys = float(torch.tensor(2 * ho + i, dtype=x.dtype) + od[b, 2 * k, ho, wo])
                        xs = float(torch.tensor(2 * wo + j, dtype=x.dtype) + od[b, 2 * k + 1, ho, wo])
                        if not (ys > -1 and xs > -1 and ys < H and xs < W):
                            continue
                        yl, xl = math.floor(ys), math.floor(xs)
                        ly, lx = ys - yl, xs - xl
                        for yy, xc, wgt in ((yl, xl, (1 - ly) * (1 - lx)), (yl, xl + 1, (1 - ly) * lx),
                                            (yl + 1, xl, ly * (1 - lx)), (yl + 1, xl + 1, ly * lx)):
                            if 0 <= yy <= H - 1 and 0 <= xc <= W - 1:
                                cols[b, :, i, j, ho, wo] += wgt * xd[b, :, yy, xc]
    out = torch.einsum("ocij,bcijhw->bohw", weight.detach().to(torch.float64), cols)
    if bias is not None:
        out = out + bias.detach().to(torch.float64).reshape(1, O, 1, 1)
    return out.to(x.dtype)


class DeformConv2dPack(nn.Module):
    """DCNv1 k2 s2 with its own offset conv, named like the official DeformConv2dPack."""

    def __init__(self, in_channels, out_channels):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, 2, 2))
        self.bias = nn.Parameter(torch.empty(out_channels))
        self.conv_offset = nn.Conv2d(in_channels, 8, kernel_size=2, stride=2, padding=0, bias=True)
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(in_channels * 4)
        nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x):
        return deform_conv2d(x, self.conv_offset(x), self.weight, self.bias)


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------
class PatchEmbed(nn.Module):
    """Conv 4x4 stride 4 (image zero-padded right/bottom to a multiple of 4), then LayerNorm."""

    def __init__(self, embed_dim, in_chans=3, patch_size=4):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim, eps=LN_EPS)

    def forward(self, x):
        p = self.patch_size
        H, W = x.shape[2], x.shape[3]
        pad_r, pad_b = (-W) % p, (-H) % p
        if pad_r or pad_b:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        x = self.proj(x)
        Hn, Wn = x.shape[2], x.shape[3]
        return self.norm(x.flatten(2).transpose(1, 2)), Hn, Wn


class HiLo(nn.Module):
    """HiLo attention on (B, N, C) tokens with explicit H, W (dense-copy padding rules).

    lo_heads, when given, overrides the official int(num_heads * alpha); window_size 1 always makes
    every head Lo-Fi (plain global MSA), as in the official code.
    """

    def __init__(self, dim, num_heads, window_size=2, alpha=0.5, lo_heads=None, qkv_bias=True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by {num_heads} heads")
        if window_size < 1:
            raise ValueError("HiLo needs window_size >= 1")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.ws = window_size
        if window_size == 1:
            if lo_heads is not None and lo_heads != num_heads:
                raise ValueError("window_size 1 is a plain global MSA: every head is Lo-Fi")
            l_heads = num_heads
        else:
            l_heads = int(num_heads * alpha) if lo_heads is None else int(lo_heads)
        if not 0 <= l_heads <= num_heads:
            raise ValueError(f"lo_heads {l_heads} outside 0..{num_heads}")
        self.l_heads = l_heads
        self.h_heads = num_heads - l_heads
        self.l_dim = self.l_heads * self.head_dim
        self.h_dim = self.h_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        if self.l_heads > 0:
            self.l_q = nn.Linear(dim, self.l_dim, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_dim, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_dim, self.l_dim)
        if self.h_heads > 0:
            self.h_qkv = nn.Linear(dim, 3 * self.h_dim, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_dim, self.h_dim)

    def hifi(self, x):
        B, H, W, C = x.shape
        ws, nh, hd = self.ws, self.h_heads, self.head_dim
        gh, gw = H // ws, W // ws
        win = x.reshape(B, gh, ws, gw, ws, C).transpose(2, 3)                    # (B, gh, gw, ws, ws, C)
        qkv = self.h_qkv(win).reshape(B, gh * gw, ws * ws, 3, nh, hd).permute(3, 0, 1, 4, 2, 5)
        q, k, v = qkv[0], qkv[1], qkv[2]                                         # (B, G, nh, L, hd)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        o = torch.matmul(attn, v).transpose(2, 3).reshape(B, gh, gw, ws, ws, self.h_dim)
        o = o.transpose(2, 3).reshape(B, H, W, self.h_dim)
        return self.h_proj(o)

    def lofi(self, x):
        B, H, W, C = x.shape
        nh, hd, ws = self.l_heads, self.head_dim, self.ws
        q = self.l_q(x).reshape(B, H * W, nh, hd).permute(0, 2, 1, 3)
        if ws > 1:
            pooled = F.avg_pool2d(x.permute(0, 3, 1, 2), kernel_size=ws, stride=ws)
            src = pooled.reshape(B, C, -1).permute(0, 2, 1)
        else:
            src = x.reshape(B, H * W, C)
        kv = self.l_kv(src).reshape(B, -1, 2, nh, hd).permute(2, 0, 3, 1, 4)
        k, v = kv[0], kv[1]
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1)) * self.scale, dim=-1)
        o = torch.matmul(attn, v).transpose(1, 2).reshape(B, H, W, self.l_dim)
        return self.l_proj(o)

    def forward(self, x, H, W):
        B, N, C = x.shape
        x = x.reshape(B, H, W, C)
        pad_r, pad_b = (-W) % self.ws, (-H) % self.ws
        if pad_r or pad_b:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        outs = []
        if self.h_heads > 0:
            outs.append(self.hifi(x)[:, :H, :W, :])
        if self.l_heads > 0:
            outs.append(self.lofi(x)[:, :H, :W, :])
        out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return out.reshape(B, N, C)

    def flops(self, H, W):
        """Multiply-accumulates of the matmuls, as hilo.py's flops(H, W) (spec §2.8)."""
        ws = self.ws
        Hp, Wp = ws * math.ceil(H / ws), ws * math.ceil(W / ws)
        Np = Hp * Wp
        nW = (Hp // ws) * (Wp // ws)
        L = ws * ws
        hi = Np * self.dim * 3 * self.h_dim + nW * L * L * self.h_dim * 2 + Np * self.h_dim ** 2
        kv_len = (Hp // ws) * (Wp // ws)
        lo = (Np * self.dim * self.l_dim + kv_len * self.dim * 2 * self.l_dim
              + Np * self.l_dim * kv_len * 2 + Np * self.l_dim ** 2)
        return hi + lo


class DWConv(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x, H, W):
        B, _N, C = x.shape
        return self.dwconv(x.transpose(1, 2).reshape(B, C, H, W)).flatten(2).transpose(1, 2)


class DWMlp(nn.Module):
    """ConvFFN: fc1 -> depthwise 3x3 (zero pad 1, bias) -> exact GELU -> fc2."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = DWConv(hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x, H, W):
        return self.fc2(self.act(self.dwconv(self.fc1(x), H, W)))


class ConvFFNBlock(nn.Module):
    def __init__(self, dim, mlp_ratio=4):
        super().__init__()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = DWMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W):
        return x + self.mlp(self.norm2(x), H, W)


class Block(nn.Module):
    def __init__(self, dim, num_heads, window_size, alpha, lo_heads=None, mlp_ratio=4):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = HiLo(dim, num_heads, window_size, alpha, lo_heads=lo_heads)
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = DWMlp(dim, int(dim * mlp_ratio))

    def forward(self, x, H, W):
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x), H, W)


class DTM(nn.Module):
    """Deformable token merging: DCNv1 k2 s2 (C -> 2C) -> BatchNorm2d (running stats) -> GELU."""

    def __init__(self, dim):
        super().__init__()
        self.dconv = DeformConv2dPack(dim, 2 * dim)
        self.norm_layer = nn.BatchNorm2d(2 * dim, eps=BN_EPS)
        self.act_layer = nn.GELU()

    def forward(self, x, H, W):
        B, _N, C = x.shape
        y = self.dconv(x.reshape(B, H, W, C).permute(0, 3, 1, 2))
        Ho, Wo = y.shape[2], y.shape[3]
        return self.act_layer(self.norm_layer(y)).flatten(2).transpose(1, 2), Ho, Wo


class LITLayer(nn.Module):
    def __init__(self, dim, depth, num_heads, window_size, alpha, lo_heads, mlp_ratio, downsample):
        super().__init__()
        if window_size == 0:
            blocks = [ConvFFNBlock(dim, mlp_ratio) for _ in range(depth)]
        else:
            blocks = [Block(dim, num_heads, window_size, alpha, lo_heads, mlp_ratio) for _ in range(depth)]
        self.blocks = nn.ModuleList(blocks)
        self.downsample = DTM(dim) if downsample else None

    def forward(self, x, H, W):
        for blk in self.blocks:
            x = blk(x, H, W)
        return x


class LITv2(nn.Module):
    """LITv2 classifier (out_norms None: final `norm` + `head`) or dense backbone (out_norms a tuple:
    `norm{i}` for i in out_norms, no `norm`/`head`)."""

    def __init__(self, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_sizes=(0, 0, 2, 1),
                 alpha=0.9, mlp_ratio=4, num_classes=1000, out_norms=None, lo_heads=None):
        super().__init__()
        depths, num_heads, window_sizes = tuple(depths), tuple(num_heads), tuple(window_sizes)
        assert len(depths) == len(num_heads) == len(window_sizes) == 4
        self.embed_dim = embed_dim
        self.depths = depths
        self.num_heads = num_heads
        self.window_sizes = window_sizes
        self.alpha = alpha
        self.out_norms = None if out_norms is None else tuple(int(i) for i in out_norms)
        self.dims = tuple(embed_dim * 2 ** i for i in range(4))
        self.num_features = self.dims[3]
        self.patch_embed = PatchEmbed(embed_dim)
        self.layers = nn.ModuleList()
        for i in range(4):
            lh = None if lo_heads is None or window_sizes[i] in (0, 1) else lo_heads[i]
            self.layers.append(LITLayer(self.dims[i], depths[i], num_heads[i], window_sizes[i], alpha, lh,
                                        mlp_ratio, downsample=i < 3))
        if self.out_norms is None:
            self.norm = nn.LayerNorm(self.num_features, eps=LN_EPS)
            self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        else:
            for i in self.out_norms:
                self.add_module(f"norm{i}", nn.LayerNorm(self.dims[i], eps=LN_EPS))

    def _stages(self, x):
        """Yield (tokens before downsampling, H, W) for each stage."""
        x, H, W = self.patch_embed(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, H, W)
            yield x, H, W
            if layer.downsample is not None:
                x, H, W = layer.downsample(x, H, W)

    def forward_features(self, x):
        outs = []
        for i, (t, H, W) in enumerate(self._stages(x)):
            if self.out_norms is not None and i in self.out_norms:
                t = getattr(self, f"norm{i}")(t)
            outs.append(t.reshape(t.shape[0], H, W, self.dims[i]).permute(0, 3, 1, 2).contiguous())
        return outs

    def forward(self, x):
        if self.out_norms is not None:
            raise RuntimeError("a dense backbone (out_norms set) has no classification head; use forward_features")
        for t, H, W in self._stages(x):
            pass
        return self.head(self.norm(t).mean(dim=1))


LITV2_REFERENCE_VARIANTS = {
    "litv2_s": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "litv2_m": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "litv2_b": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "litv2_b_384": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
}


def litv2_reference(name, **overrides):
    """The reference model of a registered variant (window sizes (0,0,2,1), alpha 0.9), in eval mode."""
    kw = dict(LITV2_REFERENCE_VARIANTS[name])
    kw.update(overrides)
    return LITv2(**kw).eval()


@torch.no_grad()
def randomize_(model, seed=0, offset_std=1.0):
    """Fill every parameter and BatchNorm buffer with non-trivial random values, deterministically.

    Values are drawn in float32 (then cast), so a float32 and a float64 copy get the same numbers.
    Linear / conv weights ~ N(0, 1/fan_in); biases ~ N(0, 0.1^2); LayerNorm / BatchNorm weights
    ~ 1 + N(0, 0.1^2); BN running_mean ~ N(0, 0.2^2), running_var ~ U(0.5, 2). The DTM offset convs
    are scaled so that on unit-variance inputs the offsets have std ~ offset_std pixels (plus a
    bias of the same order): plenty of samples cross the image border. Returns the model.
    """
    gen = torch.Generator().manual_seed(int(seed))

    def randn(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32)

    def rand(shape):
        return torch.rand(shape, generator=gen, dtype=torch.float32)

    for mname, mod in model.named_modules():
        if isinstance(mod, (nn.LayerNorm, nn.BatchNorm2d)):
            mod.weight.copy_(1.0 + 0.1 * randn(mod.weight.shape))
            mod.bias.copy_(0.1 * randn(mod.bias.shape))
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(0.2 * randn(mod.running_mean.shape))
                mod.running_var.copy_(0.5 + 1.5 * rand(mod.running_var.shape))
        elif isinstance(mod, DeformConv2dPack):
            fan_in = mod.weight.shape[1] * 4
            mod.weight.copy_(randn(mod.weight.shape) / math.sqrt(fan_in))
            mod.bias.copy_(0.1 * randn(mod.bias.shape))
            co = mod.conv_offset
            co.weight.copy_(randn(co.weight.shape) * (offset_std / math.sqrt(fan_in)))
            co.bias.copy_(offset_std * randn(co.bias.shape))
        elif isinstance(mod, (nn.Linear, nn.Conv2d)):
            if mname.endswith("conv_offset"):
                continue  # filled with its DeformConv2dPack
            fan_in = mod.weight[0].numel()
            mod.weight.copy_(randn(mod.weight.shape) / math.sqrt(fan_in))
            if mod.bias is not None:
                mod.bias.copy_(0.1 * randn(mod.bias.shape))
    return model
