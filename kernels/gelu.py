"""Exact (erf) GELU: a float32 rational erf that vectorises, and the NumPy reference with math.erf."""
import math

import numba as nb
import numpy as np

from ._jit import ahead_kernel, array, inline_kernel

# Rational approximation of erf on [-4, 4] (the float32 one of Eigen / XLA): erf(x) = x*P(x^2) / Q(x^2),
# |error| < 5e-7 against math.erf (measured on a 2e5-point grid over [-6, 6]); outside [-4, 4] erf is +-1
# to float32 precision.
_ALPHA = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)
_BETA = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
         -1.42647390514189e-02)
A13, A11, A9, A7, A5, A3, A1 = (np.float32(a) for a in _ALPHA)
B8, B6, B4, B2, B0 = (np.float32(b) for b in _BETA)
INV_SQRT2 = np.float32(1.0 / math.sqrt(2.0))


@inline_kernel()
def erf32(x):
    x = min(max(x, np.float32(-4.0)), np.float32(4.0))
    x2 = x * x
    p = x2 * A13 + A11
    p = x2 * p + A9
    p = x2 * p + A7
    p = x2 * p + A5
    p = x2 * p + A3
    p = x2 * p + A1
    q = x2 * B8 + B6
    q = x2 * q + B4
    q = x2 * q + B2
    q = x2 * q + B0
    return x * p / q


@inline_kernel()
def gelu32(x):
    return np.float32(0.5) * x * (np.float32(1.0) + erf32(x * INV_SQRT2))


_erf_exact = np.frompyfunc(math.erf, 1, 1)


def gelu_ref(x):
    """0.5 x (1 + erf(x / sqrt 2)) with math.erf, evaluated in float64, returned in x's dtype."""
    x = np.asarray(x)
    x64 = x.astype(np.float64)
    return (0.5 * x64 * (1.0 + _erf_exact(x64 / math.sqrt(2.0)).astype(np.float64))).astype(x.dtype)


def bias_gelu_ref(y, bias):
    """y <- gelu(y + bias) in place; y (N, C), bias (C,)."""
    y[...] = gelu_ref(y + bias)
    return y


@ahead_kernel(array(2), array(1))
def bias_gelu(y, bias):
    n, c = y.shape
    for i in range(n):
        for j in range(c):
            y[i, j] = gelu32(y[i, j] + bias[j])
    return y


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"bias_gelu": (bias_gelu_ref, bias_gelu)}
