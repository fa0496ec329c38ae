"""The QnA layer (FusedKQnA of moabarar/qna, layers/qna.py) on channels-last maps, queries folded into the keys.

Engine layout (float32; C = input channels, h = heads, nq = learned queries, F = h * d features, k = window):

* x          (B, H, W, C)       the layer input (the block's normalised map), NHWC.
* w_in       (C, nq*h + F)      [M | Wv]: columns [0, nq*h) are M = fold_queries(query, Wk, h), column
                                qi*h + hi (the official logit order); columns [nq*h, nq*h + F) are to_v/kernel,
                                column hi*d + j. One GEMM gives the logits and the values; keys never exist.
* w_out      (F, F_out)         to_out/kernel (F_out = F in QnA-ViT).
* rpe        (k*k, nq*h)        rpe_bias: row a*k + b (window offset, row-major), column qi*h + hi.
* attn_scale (k*k, nq*h)        attn_scale_weights (1, 1, k*k, nq*h) reshaped, same indexing.
* heads, stride                 h and s (1 or 2, any s >= 1 works); k and nq are read from rpe's shape.

The official layer has no biases in QnA-ViT (use_bias=False) and none are taken here. Output: (B, Ho, Wo, F_out)
with padding p = (k - 1) // 2 on every side and Ho = (H + 2p - k) // s + 1 (= ceil(H / 2) for s = 2, odd k);
output pixel (i, j) sees input cells (s*i - p + a, s*j - p + b), a, b in [0, k). For even k this is the
official formula with that padding (an off-centre window); QnA-ViT uses k = 3 and 7.

Per output pixel, query qi and head hi, over the window's cells inside the image only (the official code
zero-pads exp(logit), so outside cells drop out of both sums; they are not zero logits):
    w[a, b] = softmax(logit[y, x, qi, hi] + rpe[a*k + b, qi*h + hi]) * attn_scale[a*k + b, qi*h + hi]
    out[i, j, hi*d:(hi+1)*d] += sum_(a,b) w[a, b] * v[y, x, hi*d:(hi+1)*d]         (summed over the queries)
then out @ w_out. The scale is signed and applied after the normalisation, so this is not a convex combination.

Numerics differ from the official code in one way: it takes exp() of raw logits and of rpe (no max subtracted),
so float32 overflows to inf/NaN once logit + rpe exceeds ~88. Here the exponentials are always shifted so that
none exceeds 1: by the image's largest logit of the column and rpe's largest entry (the fast, factored path,
taken while the column's logits and rpe each span less than FACTORED_RANGE together, where no factor can leave
the normal float32 range), else by each window's own max. Both are exact where the official result is finite
and stay finite where it is not.

Checked once against the official Flax layer itself (jax 0.10.2, flax 0.12.8; 12 layers with randomised
parameters, k 1-7, stride 1-2, odd and 1x1 maps, QnA-ViT-tiny shapes): qna_attention_ref vs official float64
max |diff| 5.3e-15 on outputs ~5; the float32 layer vs official float32 max 3.3e-6 (official float32 vs float64:
3.5e-6); at logits ~290 the official float32 output was all inf/NaN and the float32 layer finite (1.8e-5 off)."""
import math

import numba as nb
import numpy as np

from ._jit import ahead_kernel, array, inline_kernel, kernel
from .threads import split_rows
from .simd import LANES, transpose8, vbroadcast, vfma, vload, vmul, vstore, vzero
from .softmax import exp_inplace

QUERY_EPS = 1e-6   # official _normalize_and_reshape_query: q / (||q||_2 + 1e-6), epsilon outside the sqrt


def fold_queries(query, wk, heads):
    """Load-time fold of the learned queries into the key projection, evaluated in float64.

    query (nq, F) raw `query` parameter (official semantics: not yet normalised); wk (C, F) `Wk` ([in, out]).
    Per head the query is divided by (its L2 norm + 1e-6), then by sqrt(d), as the official code does in
    every released builder (normalize_q=True). Returns M (C, nq*heads), column qi*heads + hi, in the inputs'
    common float dtype, so that x @ M are the official logits."""
    nq, f = query.shape
    d = f // heads
    q = np.asarray(query, np.float64).reshape(nq, heads, d)
    q = q / (np.linalg.norm(q, axis=-1, keepdims=True) + QUERY_EPS) / math.sqrt(d)
    m = np.einsum("chd,qhd->cqh", np.asarray(wk, np.float64).reshape(-1, heads, d), q)
    return m.reshape(-1, nq * heads).astype(np.result_type(query, wk, np.float32))


def qna_output_size(n, ksize, stride):
    """Output side for an input side n: (n + 2p - k) // s + 1 with p = (k - 1) // 2."""
    return (n + 2 * ((ksize - 1) // 2) - ksize) // stride + 1


def _layout(n_cols, rpe, attn_scale, heads, stride):
    """(k, nq, F) from the shapes, with the checks both implementations share."""
    kk, nc = rpe.shape
    ksize = math.isqrt(kk)
    if ksize < 1 or ksize * ksize != kk or attn_scale.shape != rpe.shape:
        raise ValueError(f"rpe {rpe.shape} and attn_scale {attn_scale.shape} must both be (k*k, nq*heads)")
    if heads < 1 or nc % heads or stride < 1:
        raise ValueError(f"rpe has {nc} columns: not nq * heads for heads={heads} (stride {stride})")
    f = n_cols - nc
    if f < heads or f % heads:
        raise ValueError(f"{n_cols} projected columns leave F = {f} values, not a multiple of heads={heads}")
    return ksize, nc // heads, f


def qna_attention_ref(x, w_in, w_out, rpe, attn_scale, heads, stride):
    """The whole layer (see the module docstring) in float64, returned in x's dtype: the plain-NumPy reference of
    what the models run (qnalo.models.qna_vit.QnAAttention: qnalo's GEMMs around qna_windows)."""
    b, h, w, c = x.shape
    ksize, _, f = _layout(w_in.shape[1], rpe, attn_scale, heads, stride)
    lv = (x.reshape(-1, c).astype(np.float64) @ w_in.astype(np.float64)).reshape(b, h, w, -1)
    out = np.empty((b, qna_output_size(h, ksize, stride), qna_output_size(w, ksize, stride), f))
    qna_windows_ref(lv, rpe, attn_scale, heads, stride, out)
    return (out.reshape(-1, f) @ w_out.astype(np.float64)).reshape(*out.shape[:3], -1).astype(x.dtype)


def qna_windows_ref(lv, rpe, attn_scale, heads, stride, out):
    """The windowed part: lv (B, H, W, nq*h + F) = x @ w_in; writes out (B, Ho, Wo, F). Vectorised over the
    image as k*k strided slices of -inf-padded logits (float64), with a per-window max."""
    b, h, w, n_cols = lv.shape
    ksize, nq, f = _layout(n_cols, rpe, attn_scale, heads, stride)
    nc, d, p = nq * heads, f // heads, (ksize - 1) // 2
    ho, wo = out.shape[1], out.shape[2]
    lv = lv.astype(np.float64)
    logits = np.full((b, h + 2 * p, w + 2 * p, nc), -np.inf)
    logits[:, p:p + h, p:p + w] = lv[..., :nc]
    values = np.zeros((b, h + 2 * p, w + 2 * p, heads, d))
    values[:, p:p + h, p:p + w] = lv[..., nc:].reshape(b, h, w, heads, d)
    offsets = [(a, c) for a in range(ksize) for c in range(ksize)]

    def cells(arr, t):   # the cell at offset t of every window: (B, Ho, Wo, ...)
        a, c = offsets[t]
        return arr[:, a:a + stride * (ho - 1) + 1:stride, c:c + stride * (wo - 1) + 1:stride]

    z = [cells(logits, t) + rpe[t].astype(np.float64) for t in range(ksize * ksize)]
    top = np.maximum.reduce(z)                     # every window holds at least one cell of the image
    e = [np.exp(zt - top) for zt in z]             # outside cells: exp(-inf) = 0, dropped from both sums
    den = np.add.reduce(e)
    acc = np.zeros((b, ho, wo, heads, d))
    for t in range(ksize * ksize):
        wgt = (e[t] / den * attn_scale[t].astype(np.float64)).reshape(b, ho, wo, nq, heads).sum(axis=3)
        acc += wgt[..., None] * cells(values, t)
    out[...] = acc.reshape(b, ho, wo, f)
    return out


# The fast path factors each window's exponentials as exp(logit - top_c) * exp(rpe - max rpe_c), with top_c the
# image's largest logit of column c: exp runs once per input cell instead of once per (cell, window). That is
# exact while every factor stays a normal float32, i.e. while the logits' range in an image plus rpe's range
# stays below ~87 per column; 80 leaves room for rounding. Wider ranges take the per-window-max kernel.
FACTORED_RANGE = 80.0


def qna_windows(lv, rpe, attn_scale, heads, stride, out):
    """Same contract as qna_windows_ref (float32 lv and out). Logit exponentials and values are laid out per
    image as zero-padded planes (column phases split for stride 2), so that every inner loop runs over eight
    output pixels of a row at a time with unit stride; rows are split across threads. Logits spanning more
    than FACTORED_RANGE take _qna_rows (per-window max), which is slower but exact everywhere."""
    b, h, w, n_cols = lv.shape
    ksize, nq, f = _layout(n_cols, rpe, attn_scale, heads, stride)
    nc, pad = nq * heads, (ksize - 1) // 2
    ho, wo = out.shape[1], out.shape[2]
    if not out.flags.c_contiguous:
        raise ValueError("qna_windows writes into a C-contiguous `out`; pass np.empty(shape, np.float32)")
    lv = np.ascontiguousarray(lv)
    rpe = np.ascontiguousarray(rpe, np.float32)
    attn_scale = np.ascontiguousarray(attn_scale, np.float32)
    top = np.empty((b, nc), np.float32)
    spread = np.empty((b, nc), np.float32)
    _logit_stats(lv, nc, top, spread)
    if not (spread + (rpe.max(axis=0) - rpe.min(axis=0)) < FACTORED_RANGE).all():   # also catches NaN, inf
        split_rows(_qna_rows, b * ho, wo * ksize * ksize * (16 * nc + 2 * f), lv, rpe, attn_scale, heads, nq,
                   ksize, stride, out)
        return out
    # a plane row holds (w + 2p) / s cells per phase, and the kernel reads whole vectors past the last pixel
    wq = max(-(-(w + 2 * pad) // stride), (ksize - 1) // stride + -(-wo // LANES) * LANES)
    rpe_exp = np.exp(rpe - rpe.max(axis=0))
    split_rows(_qna_factored_rows, b * ho, (wo * ksize * ksize * (2 * nc + f) * 2 + w * n_cols * 8) * stride,
               lv, top, rpe_exp, rpe_exp * attn_scale, heads, nq, ksize, stride, wq, out)
    return out


@ahead_kernel(array(4), nb.int64, array(2), array(2))
def _logit_stats(lv, nc, top, spread):
    """Per image n and logit column c of lv (B, H, W, nc + F): top = max, spread = max - min, NaN if any logit
    is NaN or infinite."""
    b, h, w, _ = lv.shape
    low = np.empty(nc, np.float32)
    poison = np.empty(nc, np.float32)
    for n in range(b):
        hi = top[n]
        for c in range(nc):
            hi[c], low[c], poison[c] = -np.inf, np.inf, 0.0
        for y in range(h):
            for x in range(w):
                cell = lv[n, y, x]
                for c in range(nc):
                    v = cell[c]
                    hi[c] = max(hi[c], v)
                    low[c] = min(low[c], v)
                    poison[c] += v * np.float32(0.0)   # NaN once any logit is NaN or infinite
        for c in range(nc):
            spread[n, c] = (hi[c] - low[c]) + poison[c]


@kernel()
def _plane_row(lv, n, y, nc, pad, top, block, bits):
    """One padded row of image n's planes: block (nc + F, s, Wq) <- row y of lv (B, H, W, nc + F) (y may lie in
    the padding). Column c < nc holds exp(logit - top[n, c]), the others the values; input cell x sits at
    [c, (x + p) % s, (x + p) // s], every other cell is 0 (an out-of-image cell adds nothing to a window's
    sums). The row is transposed within this one block, which stays in L1."""
    _, h, w, n_cols = lv.shape
    stride, wq = block.shape[1], block.shape[2]
    flat = block.reshape(-1)
    flat[:] = 0.0
    if y < 0 or y >= h:
        return
    src = lv[n, y]
    line = stride * wq
    if stride == 1:   # 8x8 blocks transposed in registers, the ragged edges one by one
        w8, c8 = w // LANES * LANES, n_cols // LANES * LANES
        row_at = (n * h + y) * w * n_cols
        for x0 in range(0, w8, LANES):
            for c0 in range(0, c8, LANES):
                transpose8(lv, row_at + x0 * n_cols + c0, n_cols, flat, c0 * line + pad + x0, line)
        for x in range(w8, w):
            for c in range(c8):
                flat[c * line + pad + x] = src[x, c]
        for x in range(w):
            for c in range(c8, n_cols):
                flat[c * line + pad + x] = src[x, c]
    else:
        for c in range(n_cols):
            for ph in range(stride):
                x0 = (ph - pad) % stride            # the first x with (x + pad) % s == ph
                at = c * line + ph * wq + (x0 + pad) // stride
                cells = flat[at:at + (w - x0 + stride - 1) // stride]
                col = src[x0::stride, c]
                for q in range(cells.shape[0]):
                    cells[q] = col[q]
    for c in range(nc):
        hi = top[n, c]
        for ph in range(stride):
            x0 = (ph - pad) % stride
            at = c * line + ph * wq + (x0 + pad) // stride
            cells = flat[at:at + (w - x0 + stride - 1) // stride]
            for q in range(cells.shape[0]):
                cells[q] -= hi
            exp_inplace(cells, bits)


@inline_kernel()
def _den4(planes, at, line, offs, rpe_exp, c, nc):
    """For the four logit columns c..c+3 at planes.flat[at + (c' - c) * line]: the sum over window cells t of
    planes * rpe_exp[t, c'], eight pixels at once."""
    s0, s1, s2, s3 = vzero(), vzero(), vzero(), vzero()
    for t in range(offs.shape[0]):
        cell = at + offs[t]
        r = t * nc + c
        s0 = vfma(vload(planes, cell), vbroadcast(rpe_exp, r), s0)
        s1 = vfma(vload(planes, cell + line), vbroadcast(rpe_exp, r + 1), s1)
        s2 = vfma(vload(planes, cell + 2 * line), vbroadcast(rpe_exp, r + 2), s2)
        s3 = vfma(vload(planes, cell + 3 * line), vbroadcast(rpe_exp, r + 3), s3)
    return s0, s1, s2, s3


@inline_kernel()
def _den1(planes, at, offs, rpe_exp, c, nc):
    """_den4 for one column."""
    s = vzero()
    for t in range(offs.shape[0]):
        s = vfma(vload(planes, at + offs[t]), vbroadcast(rpe_exp, t * nc + c), s)
    return s


@inline_kernel()
def _weighted8(planes, at, line, offs, wgt, wv, m):
    """For the eight channels at planes.flat[at + j * line], j < 8: the sum over window cells t of
    planes * wgt[t * wv + m : +8]; one weight load serves eight FMAs, whose sums stay in registers."""
    sums = (vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero())
    for t in range(offs.shape[0]):
        sums = _fma8(planes, at + offs[t], line, vload(wgt, t * wv + m), sums)
    return sums


@inline_kernel()
def _fma8(planes, at, line, wt, sums):
    """sums[j] + planes.flat[at + j * line : +8] * wt, j < 8."""
    return (vfma(vload(planes, at), wt, sums[0]), vfma(vload(planes, at + line), wt, sums[1]),
            vfma(vload(planes, at + 2 * line), wt, sums[2]), vfma(vload(planes, at + 3 * line), wt, sums[3]),
            vfma(vload(planes, at + 4 * line), wt, sums[4]), vfma(vload(planes, at + 5 * line), wt, sums[5]),
            vfma(vload(planes, at + 6 * line), wt, sums[6]), vfma(vload(planes, at + 7 * line), wt, sums[7]))


@inline_kernel()
def _weighted1(planes, at, offs, wgt, wv, m):
    """_weighted8 for one channel."""
    s = vzero()
    for t in range(offs.shape[0]):
        s = vfma(vload(planes, at + offs[t]), vload(wgt, t * wv + m), s)
    return s


@inline_kernel()
def _store8(arr, at, step, sums):
    """arr.flat[at + j * step : +8] = sums[j], j < 8."""
    vstore(arr, at, sums[0])
    vstore(arr, at + step, sums[1])
    vstore(arr, at + 2 * step, sums[2])
    vstore(arr, at + 3 * step, sums[3])
    vstore(arr, at + 4 * step, sums[4])
    vstore(arr, at + 5 * step, sums[5])
    vstore(arr, at + 6 * step, sums[6])
    vstore(arr, at + 7 * step, sums[7])


@inline_kernel()
def _head8_two_queries(planes, window, line, offs, rpe_exp_scale, inv, nc, heads, hi, wv, m, acc):
    """Head hi's 8 channels for 8 pixels, with 2 queries: per window cell t the query-summed weight
    E0 * rpe_exp_scale[t, c0] / den0 + E1 * rpe_exp_scale[t, c1] / den1 is made in registers and used at once
    (no weight row stored and read back), then acc[hi*8 + j, m : m+8] = sum over t of weight * value j."""
    c0, c1 = hi, heads + hi
    inv0, inv1 = vload(inv, c0 * wv + m), vload(inv, c1 * wv + m)
    e0, e1 = window + c0 * line + m, window + c1 * line + m
    v = window + (nc + hi * 8) * line + m
    sums = (vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero())
    for t in range(offs.shape[0]):
        cell = offs[t]
        wt = vfma(vload(planes, e0 + cell), vmul(vbroadcast(rpe_exp_scale, t * nc + c0), inv0),
                  vmul(vload(planes, e1 + cell), vmul(vbroadcast(rpe_exp_scale, t * nc + c1), inv1)))
        sums = _fma8(planes, v + cell, line, wt, sums)
    _store8(acc, hi * 8 * wv + m, wv, sums)


@ahead_kernel(array(4), array(2), array(2), array(2), nb.int64, nb.int64, nb.int64, nb.int64, nb.int64, array(4),
              nb.int64, nb.int64)
def _qna_factored_rows(lv, top, rpe_exp, rpe_exp_scale, heads, nq, ksize, stride, wq, out, start, stop):
    """Output rows start..stop of (image, row). Each call first lays out the padded input rows its output rows
    read (a halo of k - 1 rows past its share) as planes (see _plane_row): for output pixel j and window cell
    t = (a, b) the input cell is planes[i*s + a - first row, :, b % s, j + b // s], contiguous in j, so every
    loop runs over eight pixels at once (vec8, flat offsets). Per row: the softmax denominators per column,
    den = sum over cells of E * exp(rpe); then per head, the query-summed weight E * exp(rpe) * attn_scale / den
    of every cell, and each of the head's channels as the sum over cells of weight * value, accumulated in
    registers eight channels at a time. Lanes past the row's last pixel compute garbage that is never stored."""
    _, h, w, n_cols = lv.shape
    ho, wo, f = out.shape[1], out.shape[2], out.shape[3]
    nc = nq * heads
    d = f // heads
    kk = ksize * ksize
    pad = (ksize - 1) // 2
    wv = (wo + LANES - 1) // LANES * LANES
    line = stride * wq                          # one column's elements in a padded row
    row_step = n_cols * line                    # one padded row of all columns
    offs = np.empty(kk, np.int64)               # window cell t = (a, b) from the window's first cell
    for t in range(kk):
        offs[t] = (t // ksize) * row_step + (t % ksize % stride) * wq + t % ksize // stride
    rows_per_image = (ho - 1) * stride + ksize
    planes = np.empty((min(stop - start, ho) * stride + ksize, n_cols, stride, wq), np.float32)
    bits = np.empty(wq, np.int32)
    inv = np.empty(nc * wv, np.float32)         # (nc, wv): 1 / den
    wgt = np.empty(kk * wv, np.float32)         # (kk, wv): one head's weights
    acc = np.empty(f * wv, np.float32)          # (F, wv): the row's output, transposed
    first = -1                                  # planes[0] is padded row `first` of image `n_planes`
    n_planes = -1
    for row in range(start, stop):
        n = row // ho
        i = row % ho
        if n != n_planes:                       # this image's padded rows from this share's first output row
            n_planes, first = n, i * stride
            last = min(rows_per_image, (min(stop - n * ho, ho) - 1) * stride + ksize)
            for yy in range(first, last):
                _plane_row(lv, n, yy - pad, nc, pad, top, planes[yy - first], bits)
        window = (i * stride - first) * row_step        # the first cell of pixel 0's window, column 0
        for m in range(0, wv, LANES):
            c = 0
            while c + 4 <= nc:
                s0, s1, s2, s3 = _den4(planes, window + c * line + m, line, offs, rpe_exp, c, nc)
                vstore(inv, c * wv + m, s0)
                vstore(inv, (c + 1) * wv + m, s1)
                vstore(inv, (c + 2) * wv + m, s2)
                vstore(inv, (c + 3) * wv + m, s3)
                c += 4
            while c < nc:
                vstore(inv, c * wv + m, _den1(planes, window + c * line + m, offs, rpe_exp, c, nc))
                c += 1
        for e in range(nc * wv):
            inv[e] = np.float32(1.0) / inv[e]
        for hi in range(heads):
            if nq == 2 and d == 8:   # QnA-ViT's layers: the weights made where they are used, in registers
                for m in range(0, wv, LANES):
                    _head8_two_queries(planes, window, line, offs, rpe_exp_scale, inv, nc, heads, hi, wv, m, acc)
                continue
            for t in range(kk):
                cell = window + offs[t]
                dst = t * wv
                c = hi
                coef = vbroadcast(rpe_exp_scale, t * nc + c)
                for m in range(0, wv, LANES):
                    vstore(wgt, dst + m, vmul(vload(planes, cell + c * line + m), vmul(coef, vload(inv, c * wv + m))))
                for qi in range(1, nq):
                    c = qi * heads + hi
                    coef = vbroadcast(rpe_exp_scale, t * nc + c)
                    for m in range(0, wv, LANES):
                        vstore(wgt, dst + m, vfma(vload(planes, cell + c * line + m),
                                                  vmul(coef, vload(inv, c * wv + m)), vload(wgt, dst + m)))
            jj = hi * d
            while jj + 8 <= hi * d + d:
                for m in range(0, wv, LANES):
                    _store8(acc, jj * wv + m, wv,
                            _weighted8(planes, window + (nc + jj) * line + m, line, offs, wgt, wv, m))
                jj += 8
            while jj < hi * d + d:
                for m in range(0, wv, LANES):
                    vstore(acc, jj * wv + m, _weighted1(planes, window + (nc + jj) * line + m, offs, wgt, wv, m))
                jj += 1
        dst_row = out[n, i]                     # (wo, F) <- acc (F, wv): 8x8 blocks, then the edges
        row_at = (n * ho + i) * wo * f
        w8, f8 = wo // LANES * LANES, f // LANES * LANES
        for j0 in range(0, w8, LANES):
            for jj0 in range(0, f8, LANES):
                transpose8(acc, jj0 * wv + j0, wv, out, row_at + j0 * f + jj0, f)
        for jj in range(f):
            for j in range(w8 if jj < f8 else 0, wo):
                dst_row[j, jj] = acc[jj * wv + j]


@kernel()
def _qna_rows(lv, rpe, scale, heads, nq, ksize, stride, out, start, stop):
    """Output rows start..stop of (image, row). Per output pixel, two passes over the window's cells inside
    the image (listed first): the max of logit + rpe per (query, head), then exp (vectorised), the sums, and
    the scaled, query-summed weights spread over each head's channels times the values. Only the current
    pixel's k*k*nq*h weights are held. (Flat row indexing and the spread weights: 1.4x faster than views
    and per-head loops, k = 7 at 56x56x64, one thread: 12 vs 17 ms.)"""
    _, h, w, n_cols = lv.shape
    ho, wo, f = out.shape[1], out.shape[2], out.shape[3]
    nc = nq * heads
    d = f // heads
    pad = (ksize - 1) // 2
    flat = lv.reshape(-1, n_cols)
    kk = ksize * ksize
    top = np.empty(nc, np.float32)
    inv = np.empty(nc, np.float32)
    wc = np.empty(nc, np.float32)
    wf = np.empty(f, np.float32)
    e = np.empty(kk * nc, np.float32)
    bits = np.empty(kk * nc, np.int32)
    cell_row = np.empty(kk, np.int64)
    cell_off = np.empty(kk, np.int64)
    for row in range(start, stop):
        n = row // ho
        y0 = (row % ho) * stride - pad
        a0 = max(0, -y0)
        a1 = min(ksize, h - y0)
        for j in range(wo):
            x0 = j * stride - pad
            b0 = max(0, -x0)
            b1 = min(ksize, w - x0)
            nv = 0
            for a in range(a0, a1):
                for bb in range(b0, b1):
                    cell_row[nv] = (n * h + y0 + a) * w + x0 + bb
                    cell_off[nv] = a * ksize + bb
                    nv += 1
            for c in range(nc):
                top[c] = -np.inf
            for t in range(nv):
                src = flat[cell_row[t]]
                r = rpe[cell_off[t]]
                for c in range(nc):
                    z = src[c] + r[c]
                    e[t * nc + c] = z
                    top[c] = max(top[c], z)
            for t in range(nv):
                for c in range(nc):
                    e[t * nc + c] -= top[c]
            cells = e[:nv * nc]
            exp_inplace(cells, bits)
            for c in range(nc):
                inv[c] = 0.0
            for t in range(nv):
                for c in range(nc):
                    inv[c] += cells[t * nc + c]
            for c in range(nc):
                inv[c] = np.float32(1.0) / inv[c]
            dst = out[n, row % ho, j]
            for jj in range(f):
                dst[jj] = 0.0
            for t in range(nv):
                sc = scale[cell_off[t]]
                for c in range(nc):
                    wc[c] = cells[t * nc + c] * sc[c] * inv[c]
                for hi in range(heads):
                    cf = wc[hi]
                    for qi in range(1, nq):
                        cf += wc[qi * heads + hi]
                    for jj in range(d):
                        wf[hi * d + jj] = cf
                src = flat[cell_row[t]]
                for jj in range(f):
                    dst[jj] += wf[jj] * src[nc + jj]


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"qna_windows": (qna_windows_ref, qna_windows)}
