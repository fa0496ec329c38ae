"""tanh-approximation GELU (Flax nn.gelu's default, QnA-ViT's MLP): 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))).

The kernel evaluates the identical x * sigmoid(2u) = x / (1 + exp(-2u)), u = sqrt(2/pi) (x + 0.044715 x^3), on
simd's sixteen-lane float32 exp (relative error < 3e-7), so its relative error stays below ~5e-7 for every
x, the far negative tail included (there 1 + tanh(u) would cancel: a rational tanh that rounds to -1 - 1e-7
made gelu(-4e4) = +2e-3). Every element goes through the one vector function wgelu_tanh (a row's last
elements through a zero-padded vector), which the bfloat16 GEMM also applies to its output blocks, so the
fused and the separate GELU agree bit for bit. The reference uses np.tanh in float64."""
import math

import numba as nb
import numpy as np

from ._jit import ahead_kernel, array, inline_kernel
from .simd import WIDE_LANES, wadd, wdiv, wexp, wload, wmin, wmul, wsplat, wstore
from .threads import split_rows

C1 = math.sqrt(2.0 / math.pi)
C3 = 0.044715
M1 = np.float32(-2.0 * C1)           # -2u = x * (M1 + M3 x^2)
M3 = np.float32(-2.0 * C1 * C3)
EXP_MAX = np.float32(88.0)           # wexp's upper limit; x / (1 + e^88) is 0 to float32 precision


def gelu_tanh_ref(x):
    """The tanh GELU evaluated in float64 with np.tanh, returned in x's dtype."""
    x = np.asarray(x)
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + np.tanh(C1 * (x64 + C3 * x64 ** 3)))).astype(x.dtype)


def bias_gelu_tanh_ref(y, bias):
    """y <- gelu_tanh(y + bias) in place; y (N, C), bias (C,)."""
    y[...] = gelu_tanh_ref(y.astype(np.float64) + bias)
    return y


@inline_kernel()
def wgelu_tanh(x):
    """The tanh GELU of sixteen lanes, x / (1 + exp(-2u))."""
    minus_2u = wmul(x, wadd(wsplat(M1), wmul(wsplat(M3), wmul(x, x))))
    return wdiv(x, wadd(wsplat(np.float32(1.0)), wexp(wmin(minus_2u, wsplat(EXP_MAX)))))


@ahead_kernel(array(2), array(1, readonly=True), nb.int64, nb.int64)
def _bias_gelu_tanh_rows(y, bias, start, stop):
    c = y.shape[1]
    whole = c - c % WIDE_LANES
    tail = np.zeros(WIDE_LANES, np.float32)
    for i in range(start, stop):
        row = y[i]
        for j in range(0, whole, WIDE_LANES):
            wstore(row, j, wgelu_tanh(wadd(wload(row, j), wload(bias, j))))
        if whole < c:
            for j in range(whole, c):
                tail[j - whole] = row[j] + bias[j]
            wstore(tail, 0, wgelu_tanh(wload(tail, 0)))
            for j in range(whole, c):
                row[j] = tail[j - whole]


def bias_gelu_tanh(y, bias):
    split_rows(_bias_gelu_tanh_rows, y.shape[0], 16 * y.shape[1], y, bias)
    return y


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"bias_gelu_tanh": (bias_gelu_tanh_ref, bias_gelu_tanh)}
