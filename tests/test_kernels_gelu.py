"""The float32 GELU kernels vs their float64 references: exact (erf) GELU for LITv2, tanh GELU for QnA-ViT."""
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from qnalo.kernels import gelu as k
from qnalo.kernels import gelu_tanh as kt
from tolerances import assert_close

# (kernel, reference, tolerance op)
KERNELS = {"erf": (k.bias_gelu, k.bias_gelu_ref, k.gelu_ref, "gelu"),
           "tanh": (kt.bias_gelu_tanh, kt.bias_gelu_tanh_ref, kt.gelu_tanh_ref, "gelu_tanh")}
kinds = pytest.mark.parametrize("kind", sorted(KERNELS))


def test_gelu_ref_is_exact_erf_gelu():
    x = np.array([-3.0, -0.5, 0.0, 0.7, 5.0])
    expected = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(k.gelu_ref(x), expected, rtol=0, atol=1e-15)


def test_gelu_tanh_ref_is_the_tanh_formula():
    x = np.array([-3.0, -0.5, 0.0, 0.7, 5.0])
    expected = [0.5 * v * (1 + math.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3))) for v in x]
    np.testing.assert_allclose(kt.gelu_tanh_ref(x), expected, rtol=0, atol=1e-15)


@kinds
def test_gelu_kernel_on_a_dense_grid(kind):
    kernel, _, ref, op = KERNELS[kind]
    y = np.linspace(-12, 12, 240_001, dtype=np.float32).reshape(-1, 1)
    out = kernel(y.copy(), np.zeros(1, np.float32))
    assert_close(out, ref(y.astype(np.float64)), op)


@kinds
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 50), c=st.integers(1, 300),
       scale=st.sampled_from([0.1, 1.0, 10.0, 1e4]))
@example(seed=0, n=784, c=384, scale=1.0)
def test_bias_gelu(kind, seed, n, c, scale):
    kernel, ref_kernel, _, op = KERNELS[kind]
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((n, c)) * scale).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    ref = ref_kernel(y.copy(), bias)
    assert_close(kernel(y, bias), ref, op)


@kinds
def test_gelu_nan_and_inf(kind):
    kernel = KERNELS[kind][0]
    y = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    out = kernel(y, np.zeros(4, np.float32))
    assert np.isnan(out[0, 0]) and out[0, 1] == np.inf and np.isfinite(out[0, 3])
