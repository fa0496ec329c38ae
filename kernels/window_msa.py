"""Window multi-head self-attention with a relative position bias (QnA-ViT's MSA, official layers/self_attention.py)
on channels-last maps, the windows read in place (the map is never split into windows).

* qkv      (B, H, W, 3C)  the to_qkv projection of the normalised map, no bias, in the official per-head
                          interleaved order: head hi owns columns hi*3d + [0, 3d), [q | k | v] inside it.
* rel_bias (heads, L, L)  the relative position bias of a window of L = w*w tokens (row-major), already
                          gathered from its table at load time.
* out      (B, H, W, C)   head hi's output in columns hi*d + [0, d) (the official (head, d) concatenation).

Windows are w x w tiles of the map, row-major, no shift; w must divide H and W. Per window and head:
softmax((q / sqrt(d)) . k^T + rel_bias) @ v (q scaled before the product, as in the official code), the max
subtracted per query row."""
import numba as nb
import numpy as np

from ._jit import ahead_kernel, array
from .threads import split_rows
from .gemm import NR, gemm_tiles
from .softmax import padded_width, softmax_padded_rows


def _check(qkv, rel_bias, window, heads):
    b, h, w, n_cols = qkv.shape
    if n_cols % (3 * heads) or h % window or w % window or rel_bias.shape != (heads, window ** 2, window ** 2):
        raise ValueError(f"qkv {qkv.shape}, rel_bias {rel_bias.shape} do not fit window {window}, {heads} heads")
    return n_cols // (3 * heads)


def window_msa_ref(qkv, rel_bias, window, heads, out):
    """Evaluated in float64 on explicitly split windows; writes out (B, H, W, C) in out's dtype."""
    d = _check(qkv, rel_bias, window, heads)
    b, h, w, _ = qkv.shape
    ws, gh, gw = window, h // window, w // window
    t = qkv.astype(np.float64).reshape(b, gh, ws, gw, ws, heads, 3 * d).transpose(0, 1, 3, 5, 2, 4, 6)
    t = t.reshape(b, gh, gw, heads, ws * ws, 3 * d)
    q, k, v = t[..., :d], t[..., d:2 * d], t[..., 2 * d:]
    s = (q / np.sqrt(d)) @ np.swapaxes(k, -1, -2) + rel_bias.astype(np.float64)
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    o = (s / s.sum(axis=-1, keepdims=True)) @ v                     # (b, gh, gw, heads, L, d)
    o = o.reshape(b, gh, gw, heads, ws, ws, d).transpose(0, 1, 4, 2, 5, 3, 6)
    out[...] = o.reshape(b, h, w, heads * d)
    return out


def window_msa(qkv, rel_bias, window, heads, out):
    """Same contract as window_msa_ref, float32; tasks (window, head) split across threads. Both products of a
    task run on the GEMM micro-kernel (kernels/gemm.py), its k^T and v packed as weight panels, as Lo-Fi's."""
    d = _check(qkv, rel_bias, window, heads)
    b, h, w, _ = qkv.shape
    tasks = b * (h // window) * (w // window) * heads
    split_rows(_window_heads, tasks, 4 * window ** 4 * d, qkv, np.ascontiguousarray(rel_bias, np.float32),
               window, heads, np.float32(1.0 / np.sqrt(d)), out)
    return out


@ahead_kernel(array(4), array(3), nb.int64, nb.int64, nb.float32, array(4), nb.int64, nb.int64)
def _window_heads(qkv, rel_bias, ws, heads, scale, out, start, stop):
    b, h, w, n_cols = qkv.shape
    d = n_cols // (3 * heads)
    gh = h // ws
    gw = w // ws
    seq = ws * ws
    q = np.empty((seq, d), np.float32)                                # scaled, gathered from the window
    k_panels = np.zeros((-(-seq // NR), d, NR), np.float32)           # k^T (d, L) as weight panels
    v_panels = np.zeros((-(-d // NR), seq, NR), np.float32)           # v (L, d)
    padded = np.empty((seq, padded_width(seq)), np.float32)            # scores, rows padded to whole vectors
    scores = padded[:, :seq]
    o = np.empty((seq, d), np.float32)
    for task in range(start, stop):
        hd = task % heads
        win = task // heads
        n = win // (gh * gw)
        gy = (win // gw) % gh
        gx = win % gw
        base = hd * 3 * d
        for t in range(seq):
            src = qkv[n, gy * ws + t // ws, gx * ws + t % ws]
            for j in range(d):
                q[t, j] = src[base + j] * scale
                k_panels[t // NR, j, t % NR] = src[base + d + j]
                v_panels[j // NR, t, j % NR] = src[base + 2 * d + j]
        gemm_tiles(q, k_panels, scores, 0, seq, 0, k_panels.shape[0])
        bias = rel_bias[hd]
        for t in range(seq):
            for s in range(seq):
                scores[t, s] += bias[t, s]
        softmax_padded_rows(padded, seq, np.float32(1.0), 0, seq)
        gemm_tiles(scores, v_panels, o, 0, seq, 0, v_panels.shape[0])
        for t in range(seq):
            dst = out[n, gy * ws + t // ws, gx * ws + t % ws]
            for j in range(d):
                dst[hd * d + j] = o[t, j]


def relative_bias(table, window):
    """The (heads, L, L) bias of a w x w window from its ((2w-1)^2, heads) table (Swin-style, the official
    RelativePositionalEmbedding): query token i = (yi, xi), key token j (row-major in the window) read row
    (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1)."""
    pos = np.arange(window * window)
    dy = pos[:, None] // window - pos[None, :] // window + window - 1
    dx = pos[:, None] % window - pos[None, :] % window + window - 1
    return np.ascontiguousarray(np.asarray(table)[dy * (2 * window - 1) + dx].transpose(2, 0, 1))


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"window_msa": (window_msa_ref, window_msa)}
