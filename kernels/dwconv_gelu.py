"""ConvFFN middle: depthwise 3x3 conv (zero padding 1, with bias) followed by exact GELU, channels-last.

The fc1 bias is folded in here (`pre_bias`): fc1's GEMM leaves it out, and the conv adds it to every
in-image sample, so zero padding stays zero exactly as in the official fc1 -> dwconv order."""
import numba as nb
import numpy as np

from ._jit import ahead_kernel, array, split_rows
from .gelu import gelu32, gelu_ref
from .simd import vadd, vfma, vload, vstore


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


def dwconv3x3_gelu(h, pre_bias, weight, bias):
    # the vector loads index these flat
    h, pre_bias, weight, bias = (np.ascontiguousarray(a) for a in (h, pre_bias, weight, bias))
    out = np.empty_like(h)
    b, height, width, c = h.shape
    split_rows(_dwconv3x3_gelu_rows, b * height, 30 * width * c, h, pre_bias, weight, bias, out)
    return out


@ahead_kernel(array(4), array(1, readonly=True), array(3, readonly=True), array(1, readonly=True), array(4), nb.int64,
              nb.int64)
def _dwconv3x3_gelu_rows(h, pre_bias, weight, bias, out, start, stop):
    """Rows [start, stop) of the B*H output rows. Per pixel, channels in blocks of 64: eight vec8 sums stay in
    registers over the pixel's in-image taps (eight chains, so the FMA latency overlaps: one chain per 8
    channels, or the sums in memory, ran at 4.5 cycles a channel), then 8-channel vectors, then single
    channels; GELU over the pixel's sums. fc1's bias is added to each in-image sample, so padding stays zero."""
    b, height, width, c = h.shape
    h_flat, w_flat = h.reshape(-1), weight.reshape(-1)
    sums = np.empty(c, np.float32)
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
            while j + 64 <= c:
                a0, a1, a2, a3 = vload(bias, j), vload(bias, j + 8), vload(bias, j + 16), vload(bias, j + 24)
                a4, a5, a6, a7 = vload(bias, j + 32), vload(bias, j + 40), vload(bias, j + 48), vload(bias, j + 56)
                for t in range(valid):
                    s, w = taps[t] + j, tap_weights[t] + j
                    a0 = vfma(vload(weight, w), vadd(vload(h, s), vload(pre_bias, j)), a0)
                    a1 = vfma(vload(weight, w + 8), vadd(vload(h, s + 8), vload(pre_bias, j + 8)), a1)
                    a2 = vfma(vload(weight, w + 16), vadd(vload(h, s + 16), vload(pre_bias, j + 16)), a2)
                    a3 = vfma(vload(weight, w + 24), vadd(vload(h, s + 24), vload(pre_bias, j + 24)), a3)
                    a4 = vfma(vload(weight, w + 32), vadd(vload(h, s + 32), vload(pre_bias, j + 32)), a4)
                    a5 = vfma(vload(weight, w + 40), vadd(vload(h, s + 40), vload(pre_bias, j + 40)), a5)
                    a6 = vfma(vload(weight, w + 48), vadd(vload(h, s + 48), vload(pre_bias, j + 48)), a6)
                    a7 = vfma(vload(weight, w + 56), vadd(vload(h, s + 56), vload(pre_bias, j + 56)), a7)
                vstore(sums, j, a0)
                vstore(sums, j + 8, a1)
                vstore(sums, j + 16, a2)
                vstore(sums, j + 24, a3)
                vstore(sums, j + 32, a4)
                vstore(sums, j + 40, a5)
                vstore(sums, j + 48, a6)
                vstore(sums, j + 56, a7)
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
            dst = out[n, y, x]
            for jj in range(c):
                dst[jj] = gelu32(sums[jj])
