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
so float32 overflows to inf/NaN once logit + rpe exceeds ~88; here each window's max is subtracted first, which
is exact where the official result is finite and stays finite where it is not.

Checked once against the official Flax layer itself (jax 0.10.2, flax 0.12.8; 12 layers with randomised
parameters, k 1-7, stride 1-2, odd and 1x1 maps, QnA-ViT-tiny shapes): qna_attention_ref vs official float64
max |diff| 5.3e-15 on outputs ~5; qna_attention vs official float32 max 3.3e-6 (official float32 vs float64:
3.5e-6); at logits ~290 the official float32 output was all inf/NaN and qna_attention finite (1.8e-5 off)."""
import math

import numpy as np

from . import gemm
from ._jit import kernel, split_rows
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


def _layer(x, w_in, w_out, rpe, attn_scale, heads, stride, windows, matmul, dtype):
    b, h, w, c = x.shape
    ksize, _, f = _layout(w_in.shape[1], rpe, attn_scale, heads, stride)
    lv = matmul(x.reshape(-1, c).astype(dtype, copy=False), w_in.astype(dtype, copy=False))
    out = np.empty((b, qna_output_size(h, ksize, stride), qna_output_size(w, ksize, stride), f), dtype)
    windows(lv.reshape(b, h, w, w_in.shape[1]), rpe, attn_scale, heads, stride, out)
    return matmul(out.reshape(-1, f), w_out.astype(dtype, copy=False)).reshape(*out.shape[:3], w_out.shape[1])


def _packed_matmul(x, w):
    # qnalo's GEMM, not NumPy's BLAS: BLAS threads left spinning after each call held back the window
    # kernel's second thread (k = 3 at 56x56x64, 2 threads: the layer took 5.3 ms with BLAS, 2.1 ms without)
    return gemm.matmul(np.ascontiguousarray(x), gemm.PackedWeight(w))


def qna_attention_ref(x, w_in, w_out, rpe, attn_scale, heads, stride):
    """The whole layer (see the module docstring), evaluated in float64; returns x's dtype."""
    return _layer(x, w_in, w_out, rpe, attn_scale, heads, stride, qna_windows_ref, np.matmul,
                  np.float64).astype(x.dtype)


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


def qna_attention(x, w_in, w_out, rpe, attn_scale, heads, stride):
    """Same contract as qna_attention_ref, in float32: qnalo's GEMMs around the fused window kernel."""
    if x.dtype != np.float32:
        raise TypeError(f"qna_attention takes float32 input, got {x.dtype}")
    return _layer(x, w_in, w_out, rpe, attn_scale, heads, stride, qna_windows, _packed_matmul, np.float32)


def qna_windows(lv, rpe, attn_scale, heads, stride, out):
    """Same contract as qna_windows_ref (float32 lv and out), split across threads by output rows."""
    b, _, _, n_cols = lv.shape
    ksize, nq, f = _layout(n_cols, rpe, attn_scale, heads, stride)
    ho, wo = out.shape[1], out.shape[2]
    split_rows(_qna_rows, b * ho, wo * ksize * ksize * (16 * nq * heads + 2 * f), np.ascontiguousarray(lv),
               np.ascontiguousarray(rpe, np.float32), np.ascontiguousarray(attn_scale, np.float32), heads, nq,
               ksize, stride, out)
    return out


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
