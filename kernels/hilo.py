"""HiLo attention branches on channels-last token maps, with the projections' biases folded in.

The engine runs one GEMM over the normalised tokens for [h_qkv | l_q] (no bias) and one for l_kv on the pooled
map; these kernels add the biases, attend and write each branch's heads into its column range of one output
buffer [Hi-Fi | Lo-Fi], which the block then projects branch by branch (h_proj, l_proj).

Padding follows the official dense-prediction copy: the normalised map is zero-padded bottom/right to a multiple
of ws, unmasked. A padded token's projections are therefore exactly the biases (it is a real key and value in
its Hi-Fi window), and it counts as a zero in the Lo-Fi ws x ws average. Queries at padded positions are dropped.
The score scale multiplies q.k (not q), as in the official code."""
import math

import numba as nb
import numpy as np

from ._jit import ahead_kernel, array, one_signature_kernel
from .threads import split_rows
from .gemm import NR, gemm_tiles
from .softmax import padded_width, softmax_padded_rows


def _softmax_ref(s):
    s = s - s.max(axis=-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(axis=-1, keepdims=True)


def window_avgpool_ref(x, ws):
    """x (B, H, W, C) -> (B, ceil(H/ws), ceil(W/ws), C): mean over ws x ws blocks of the zero-padded map."""
    b, h, w, c = x.shape
    gh, gw = -(-h // ws), -(-w // ws)
    padded = np.zeros((b, gh * ws, gw * ws, c), dtype=np.float64)
    padded[:, :h, :w] = x
    return padded.reshape(b, gh, ws, gw, ws, c).mean(axis=(2, 4)).astype(x.dtype)


def hifi_attention_ref(qkv, qkv_bias, ws, heads, head_dim, scale, out):
    """Window attention in ws x ws windows. qkv (B, H, W, >= 3*heads*hd): columns [0, 3*heads*hd) hold
    (q|k|v) x head x hd without bias; qkv_bias (>= 3*heads*hd,), its first 3*heads*hd used. Writes
    out[..., :heads*hd]."""
    b, h, w, _ = qkv.shape
    dim = heads * head_dim
    gh, gw = -(-h // ws), -(-w // ws)
    padded = np.zeros((b, gh * ws, gw * ws, 3 * dim), dtype=np.float64)
    padded[:, :h, :w] = qkv[..., :3 * dim]
    padded += qkv_bias[:3 * dim]
    win = padded.reshape(b, gh, ws, gw, ws, 3, heads, head_dim).transpose(5, 0, 1, 3, 6, 2, 4, 7)
    q, k, v = win.reshape(3, b, gh, gw, heads, ws * ws, head_dim)
    attn = _softmax_ref((q @ np.swapaxes(k, -1, -2)) * scale)
    o = (attn @ v).reshape(b, gh, gw, heads, ws, ws, head_dim).transpose(0, 1, 4, 2, 5, 3, 6)
    out[..., :dim] = o.reshape(b, gh * ws, gw * ws, dim)[:, :h, :w]
    return out


def lofi_attention_ref(qkv, q_col, q_bias, kv, kv_bias, heads, head_dim, scale, out, out_col):
    """Every query attends to all M keys. qkv (B, H, W, *): the queries are columns [q_col, q_col + heads*hd)
    without bias; kv (B, M, 2*heads*hd): (k|v) x head x hd without bias. Writes out[..., out_col:out_col+dim]."""
    b, h, w, _ = qkv.shape
    dim = heads * head_dim
    q = (qkv[..., q_col:q_col + dim].astype(np.float64) + q_bias).reshape(b, h * w, heads, head_dim)
    kvb = (kv.astype(np.float64) + kv_bias).reshape(b, kv.shape[1], 2, heads, head_dim)
    q = q.transpose(0, 2, 1, 3)
    k = kvb[:, :, 0].transpose(0, 2, 1, 3)
    v = kvb[:, :, 1].transpose(0, 2, 1, 3)
    attn = _softmax_ref((q @ np.swapaxes(k, -1, -2)) * scale)
    o = (attn @ v).transpose(0, 2, 1, 3).reshape(b, h, w, dim)
    out[..., out_col:out_col + dim] = o
    return out


@ahead_kernel(array(4), nb.int64)
def window_avgpool(x, ws):
    b, h, w, c = x.shape
    gh = (h + ws - 1) // ws
    gw = (w + ws - 1) // ws
    pooled = np.zeros((b, gh, gw, c), dtype=x.dtype)
    inv = np.float32(1.0 / (ws * ws))
    for row in range(b * gh):
        n = row // gh
        gy = row % gh
        for gx in range(gw):
            dst = pooled[n, gy, gx]
            for y in range(gy * ws, min(gy * ws + ws, h)):
                for x_ in range(gx * ws, min(gx * ws + ws, w)):
                    src = x[n, y, x_]
                    for j in range(c):
                        dst[j] += src[j]
            for j in range(c):
                dst[j] *= inv
    return pooled


def hifi_attention(qkv, qkv_bias, ws, heads, head_dim, scale, out):
    b, h, w, _ = qkv.shape
    windows = b * -(-h // ws) * -(-w // ws)
    split_rows(_hifi_windows, windows, 4 * ws ** 4 * heads * head_dim, qkv, qkv_bias, ws, heads, head_dim,
               np.float32(scale), out)
    return out


@ahead_kernel(array(4), array(1), nb.int64, nb.int64, nb.int64, nb.float32, array(4), nb.int64, nb.int64)
def _hifi_windows(qkv, qkv_bias, ws, heads, head_dim, scale32, out, start, stop):
    b, h, w, _ = qkv.shape
    dim = heads * head_dim
    gh = (h + ws - 1) // ws
    gw = (w + ws - 1) // ws
    seq = ws * ws
    q = np.empty((seq, head_dim), dtype=np.float32)
    k = np.empty((seq, head_dim), dtype=np.float32)
    v = np.empty((seq, head_dim), dtype=np.float32)
    p = np.empty(seq, dtype=np.float32)
    o = np.empty(head_dim, dtype=np.float32)
    for task in range(start, stop):
        n = task // (gh * gw)
        gy = (task // gw) % gh
        gx = task % gw
        for hd in range(heads):
            qo = hd * head_dim
            ko = dim + qo
            vo = 2 * dim + qo
            for t in range(seq):
                y = gy * ws + t // ws
                x = gx * ws + t % ws
                if y < h and x < w:
                    src = qkv[n, y, x]
                    for d in range(head_dim):
                        q[t, d] = src[qo + d] + qkv_bias[qo + d]
                        k[t, d] = src[ko + d] + qkv_bias[ko + d]
                        v[t, d] = src[vo + d] + qkv_bias[vo + d]
                else:  # padded token: zero input, so its projections are the biases
                    for d in range(head_dim):
                        q[t, d] = qkv_bias[qo + d]
                        k[t, d] = qkv_bias[ko + d]
                        v[t, d] = qkv_bias[vo + d]
            for t in range(seq):
                y = gy * ws + t // ws
                x = gx * ws + t % ws
                if y >= h or x >= w:
                    continue
                m = -np.inf
                for s in range(seq):
                    acc = np.float32(0.0)
                    for d in range(head_dim):
                        acc += q[t, d] * k[s, d]
                    p[s] = acc * scale32
                    m = max(m, p[s])
                tot = np.float32(0.0)
                for s in range(seq):
                    p[s] = math.exp(p[s] - m)
                    tot += p[s]
                for d in range(head_dim):
                    o[d] = 0.0
                for s in range(seq):
                    ps = p[s] / tot
                    for d in range(head_dim):
                        o[d] += ps * v[s, d]
                dst = out[n, y, x]
                for d in range(head_dim):
                    dst[qo + d] = o[d]


def lofi_attention(qkv, q_col, q_bias, kv, kv_bias, heads, head_dim, scale, out, out_col):
    """Same contract as lofi_attention_ref. Per image and head, both products run on the GEMM micro-kernel
    (kernels/gemm.py) with k^T and v packed as its weight panels; images x heads are split across threads.
    The biases are added where each head's q, k and v are gathered, so qkv and kv are left as they are."""
    b, h, w, _ = qkv.shape
    dim = heads * head_dim
    q = qkv.reshape(b, h * w, -1)[:, :, q_col:q_col + dim]
    o = out.reshape(b, h * w, -1)[:, :, out_col:out_col + dim]
    split_rows(_lofi_heads, b * heads, 4 * h * w * kv.shape[1] * head_dim, q, np.ascontiguousarray(q_bias, np.float32),
               kv, np.ascontiguousarray(kv_bias, np.float32), heads, head_dim, np.float32(scale), o)
    return out


@one_signature_kernel(array(3, "A", readonly=True), array(1, readonly=True), array(3, readonly=True),
                      array(1, readonly=True), nb.int64, nb.int64, nb.float32, array(3, "A"), nb.int64, nb.int64)
def _lofi_heads(q, q_bias, kv, kv_bias, heads, head_dim, scale32, out, start, stop):
    """Tasks start..stop of (image, head): out[n, :, head] = softmax(scale q_h k_h^T) v_h, q_h = q's head +
    q_bias's, k_h and v_h likewise from kv and kv_bias. q (B, N, heads*hd) and out (B, N, heads*hd) may be
    column slices; kv (B, M, 2*heads*hd) holds (k|v) x head x hd."""
    n_queries = q.shape[1]
    m_keys = kv.shape[1]
    dim = heads * head_dim
    q_head = np.empty((n_queries, head_dim), np.float32)                  # q_h, its rows contiguous
    k_panels = np.zeros((-(-m_keys // NR), head_dim, NR), np.float32)    # k_h^T (hd, M) as weight panels
    v_panels = np.zeros((-(-head_dim // NR), m_keys, NR), np.float32)    # v_h (M, hd)
    padded = np.empty((n_queries, padded_width(m_keys)), np.float32)
    scores = padded[:, :m_keys]
    for task in range(start, stop):
        n = task // heads
        col = (task % heads) * head_dim
        for t in range(n_queries):
            for d in range(head_dim):
                q_head[t, d] = q[n, t, col + d] + q_bias[col + d]
        for s in range(m_keys):
            for d in range(head_dim):
                k_panels[s // NR, d, s % NR] = kv[n, s, col + d] + kv_bias[col + d]
                v_panels[d // NR, s, d % NR] = kv[n, s, dim + col + d] + kv_bias[dim + col + d]
        gemm_tiles(q_head, k_panels, scores, 0, n_queries, 0, k_panels.shape[0])
        softmax_padded_rows(padded, m_keys, scale32, 0, n_queries)
        gemm_tiles(scores, v_panels, out[n, :, col:col + head_dim], 0, n_queries, 0, v_panels.shape[0])


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"window_avgpool": (window_avgpool_ref, window_avgpool), "hifi_attention": (hifi_attention_ref, hifi_attention),
       "lofi_attention": (lofi_attention_ref, lofi_attention)}
