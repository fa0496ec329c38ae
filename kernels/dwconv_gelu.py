"""ConvFFN middle: depthwise 3x3 conv (zero padding 1, with bias) followed by exact GELU, channels-last.

The fc1 bias is folded in here (`pre_bias`): fc1's GEMM leaves it out, and the conv adds it to every
in-image sample, so zero padding stays zero exactly as in the official fc1 -> dwconv order."""
import numba as nb
import numpy as np

from ._jit import ahead_kernel, array
from .threads import split_rows
from .gelu import gelu32, gelu_ref
from .gemm_bf16 import NO_PAIRS, row_pairs
from .simd import vadd, vfma, vload, vstore, wadd, wfma, wload, wstore


def dwconv3x3_gelu_ref(h, pre_bias, weight, bias):
    """h (B, H, W, C) without fc1's bias; pre_bias (C,); weight (3, 3, C); bias (C,) -> (B, H, W, C)."""
    b, height, width, c = h.shape
    padded = np.zeros((b, height + 2, width + 2, c), dtype=np.float64)
    padded[:, 1:-1, 1:-1] = h.astype(np.float64) + pre_bias
    acc = np.broadcast_to(bias.astype(np.float64), h.shape).copy()
    for dy in range(3):
        for dx in range(3):
            acc += padded[:, dy:dy + height, dx:dx + width] * weight[dy, dx].astype(np.float64)
    return gelu_ref(acc).astype(h.dtype)


def dwconv3x3_gelu(h, pre_bias, weight, bias, pairs=NO_PAIRS):
    """The kernel of dwconv3x3_gelu_ref; with `pairs` (B*H*W rows or more, K2) its output is instead rounded
    into them as bfloat16 pairs (gemm_bf16.row_pairs: the x pairs of the bfloat16 GEMM that takes it), and
    pairs is returned."""
    # the vector loads index these flat
    h, pre_bias, weight, bias = (np.ascontiguousarray(a) for a in (h, pre_bias, weight, bias))
    out = np.empty((0, 0, 0, 0), np.float32) if pairs.size else np.empty_like(h)
    b, height, width, c = h.shape
    split_rows(_dwconv3x3_gelu_rows, b * height, 30 * width * c, h, pre_bias, weight, bias, out, pairs)
    return pairs if pairs.size else out


@ahead_kernel(array(4), array(1, readonly=True), array(3, readonly=True), array(1, readonly=True), array(4),
              array(2), nb.int64, nb.int64)
def _dwconv3x3_gelu_rows(h, pre_bias, weight, bias, out, pairs, start, stop):
    """Rows [start, stop) of the B*H output rows. Per pixel, channels in blocks of 64: four 16-lane sums stay in
    registers over the pixel's in-image taps (separate chains, so the FMA latency overlaps: one chain per 8
    channels, or the sums in memory, ran at 4.5 cycles a channel), then 8-channel vectors, then single
    channels; GELU over the pixel's sums. fc1's bias is added to each in-image sample, so padding stays zero;
    where all nine taps are in the image it is added once, through the taps' summed weights
    (interior_bias), instead of to each sample."""
    b, height, width, c = h.shape
    h_flat, w_flat = h.reshape(-1), weight.reshape(-1)
    sums = np.empty(c, np.float32)
    interior_bias = np.empty(c, np.float32)   # bias + fc1's bias through all nine taps
    for j in range(c):
        tap_sum = np.float32(0.0)
        for t in range(9):
            tap_sum += w_flat[t * c + j]
        interior_bias[j] = bias[j] + tap_sum * pre_bias[j]
    pairs_flat, k2 = pairs.reshape(-1), pairs.shape[1]
    tail = np.zeros(32, np.float32)
    tail_pairs = np.empty(16, np.float32)
    taps = np.empty(9, np.int64)        # flat offset of each in-image tap's source pixel ...
    tap_weights = np.empty(9, np.int64)  # ... and of its weights
    for row in range(start, stop):
        n = row // height
        y = row % height
        for x in range(width):
            valid = 0
            for dy in range(3):
                yy = y + dy - 1
                for dx in range(3):
                    xx = x + dx - 1
                    if 0 <= yy < height and 0 <= xx < width:
                        taps[valid] = ((n * height + yy) * width + xx) * c
                        tap_weights[valid] = (dy * 3 + dx) * c
                        valid += 1
            j = 0
            while valid == 9 and j + 64 <= c:   # all taps in the image: fc1's bias is in interior_bias
                a0, a1 = wload(interior_bias, j), wload(interior_bias, j + 16)
                a2, a3 = wload(interior_bias, j + 32), wload(interior_bias, j + 48)
                for t in range(9):
                    s, w = taps[t] + j, tap_weights[t] + j
                    a0 = wfma(wload(weight, w), wload(h, s), a0)
                    a1 = wfma(wload(weight, w + 16), wload(h, s + 16), a1)
                    a2 = wfma(wload(weight, w + 32), wload(h, s + 32), a2)
                    a3 = wfma(wload(weight, w + 48), wload(h, s + 48), a3)
                wstore(sums, j, a0)
                wstore(sums, j + 16, a1)
                wstore(sums, j + 32, a2)
                wstore(sums, j + 48, a3)
                j += 64
            while j + 64 <= c:
                a0, a1, a2, a3 = wload(bias, j), wload(bias, j + 16), wload(bias, j + 32), wload(bias, j + 48)
                for t in range(valid):
                    s, w = taps[t] + j, tap_weights[t] + j
                    a0 = wfma(wload(weight, w), wadd(wload(h, s), wload(pre_bias, j)), a0)
                    a1 = wfma(wload(weight, w + 16), wadd(wload(h, s + 16), wload(pre_bias, j + 16)), a1)
                    a2 = wfma(wload(weight, w + 32), wadd(wload(h, s + 32), wload(pre_bias, j + 32)), a2)
                    a3 = wfma(wload(weight, w + 48), wadd(wload(h, s + 48), wload(pre_bias, j + 48)), a3)
                wstore(sums, j, a0)
                wstore(sums, j + 16, a1)
                wstore(sums, j + 32, a2)
                wstore(sums, j + 48, a3)
                j += 64
            while j + 8 <= c:
                a0 = vload(bias, j)
                for t in range(valid):
                    a0 = vfma(vload(weight, tap_weights[t] + j), vadd(vload(h, taps[t] + j), vload(pre_bias, j)),
                              a0)
                vstore(sums, j, a0)
                j += 8
            for jj in range(j, c):
                total = bias[jj]
                for t in range(valid):
                    total += w_flat[tap_weights[t] + jj] * (h_flat[taps[t] + jj] + pre_bias[jj])
                sums[jj] = total
            if pairs.size:
                for jj in range(c):
                    sums[jj] = gelu32(sums[jj])
                row_pairs(sums, pairs_flat, ((n * height + y) * width + x) * k2, k2, tail, tail_pairs)
            else:
                dst = out[n, y, x]
                for jj in range(c):
                    dst[jj] = gelu32(sums[jj])


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"dwconv3x3_gelu": (dwconv3x3_gelu_ref, dwconv3x3_gelu)}
