"""ConvFFN middle: depthwise 3x3 conv (zero padding 1, with bias) followed by exact GELU, channels-last.

The fc1 bias is folded in here (`pre_bias`): fc1's GEMM leaves it out, and the conv adds it to every
in-image sample, so zero padding stays zero exactly as in the official fc1 -> dwconv order."""
import numpy as np

from ._jit import kernel, split_rows
from .gelu import gelu32, gelu_ref


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
    b, height, width, c = h.shape
    out = np.empty_like(h)
    split_rows(_dwconv3x3_gelu_rows, b * height, 30 * width * c, h, pre_bias, weight, bias, out)
    return out


@kernel()
def _dwconv3x3_gelu_rows(h, pre_bias, weight, bias, out, start, stop):
    b, height, width, c = h.shape
    acc = np.empty(c, dtype=np.float32)
    for row in range(start, stop):
        n = row // height
        y = row % height
        for x in range(width):
            for j in range(c):
                acc[j] = bias[j]
            for dy in range(3):
                yy = y + dy - 1
                if yy < 0 or yy >= height:
                    continue
                for dx in range(3):
                    xx = x + dx - 1
                    if xx < 0 or xx >= width:
                        continue
                    src = h[n, yy, xx]
                    w = weight[dy, dx]
                    for j in range(c):
                        acc[j] += w[j] * (src[j] + pre_bias[j])
            dst = out[n, y, x]
            for j in range(c):
                dst[j] = gelu32(acc[j])
