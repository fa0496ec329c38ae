"""LayerNorm over the last axis, alone and fused with the residual add that precedes it in every block.

Rows are tokens (N, C), float32, C-contiguous. Statistics are accumulated in float64 (two passes) so the
kernel is at least as accurate as PyTorch's float32 LayerNorm."""
import numba as nb
import numpy as np

from ._jit import ahead_kernel, array, inline_kernel
from .threads import split_rows


def layernorm_ref(x, weight, bias, eps, out=None):
    """out = (x - mean) / sqrt(var + eps) * weight + bias over the last axis (biased variance)."""
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(axis=-1, keepdims=True)
    y = ((x64 - mean) / np.sqrt(var + eps) * weight + bias).astype(x.dtype)
    if out is None:
        return y
    out[...] = y
    return out


def residual_add_ref(x, y, bias):
    """x <- x + y + bias in place (the residual of a sub-layer whose last GEMM left its bias out)."""
    x += y + bias
    return x


def residual_add_layernorm_ref(x, y, bias, weight, ln_bias, eps, out):
    """x <- x + y + bias in place, then out = LayerNorm(x)."""
    residual_add_ref(x, y, bias)
    return layernorm_ref(x, weight, ln_bias, eps, out)


@inline_kernel()
def _normalise_row(x, weight, bias, eps, out):
    c = x.shape[0]
    s = 0.0
    for j in range(c):
        s += x[j]
    mean = s / c
    v = 0.0
    for j in range(c):
        d = x[j] - mean
        v += d * d
    inv = 1.0 / np.sqrt(v / c + eps)
    for j in range(c):  # centre in float64: a float32 mean would lose digits when |mean| >> std
        out[j] = np.float32((x[j] - mean) * inv) * weight[j] + bias[j]


@ahead_kernel(array(2), array(1, readonly=True), array(1, readonly=True), nb.float64, array(2), nb.int64, nb.int64)
def _layernorm_rows(x, weight, bias, eps, out, start, stop):
    for i in range(start, stop):
        _normalise_row(x[i], weight, bias, eps, out[i])


@ahead_kernel(array(2), array(2), array(1, readonly=True), nb.int64, nb.int64)
def _residual_add_rows(x, y, bias, start, stop):
    for i in range(start, stop):
        for j in range(x.shape[1]):
            x[i, j] += y[i, j] + bias[j]


@ahead_kernel(array(2), array(2), array(1, readonly=True), array(1, readonly=True), array(1, readonly=True), nb.float64,
              array(2), nb.int64, nb.int64)
def _residual_add_layernorm_rows(x, y, bias, weight, ln_bias, eps, out, start, stop):
    for i in range(start, stop):
        row = x[i]
        for j in range(x.shape[1]):
            row[j] += y[i, j] + bias[j]
        _normalise_row(row, weight, ln_bias, eps, out[i])


def layernorm(x, weight, bias, eps, out):
    split_rows(_layernorm_rows, x.shape[0], 4 * x.shape[1], x, weight, bias, eps, out)
    return out


def residual_add(x, y, bias):
    split_rows(_residual_add_rows, x.shape[0], x.shape[1], x, y, bias)
    return x


def residual_add_layernorm(x, y, bias, weight, ln_bias, eps, out):
    split_rows(_residual_add_layernorm_rows, x.shape[0], 5 * x.shape[1], x, y, bias, weight, ln_bias, eps, out)
    return out


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"layernorm": (layernorm_ref, layernorm), "residual_add": (residual_add_ref, residual_add),
       "residual_add_layernorm": (residual_add_layernorm_ref, residual_add_layernorm)}
