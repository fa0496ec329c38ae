"""The float32 erf-GELU kernel vs math.erf."""
import math

import numpy as np
from hypothesis import example, given, strategies as st

from qnalo.kernels import gelu as k
from tolerances import assert_close


def test_gelu_ref_is_exact_erf_gelu():
    x = np.array([-3.0, -0.5, 0.0, 0.7, 5.0])
    expected = [0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x]
    np.testing.assert_allclose(k.gelu_ref(x), expected, rtol=0, atol=1e-15)


def test_gelu_kernel_on_a_dense_grid():
    y = np.linspace(-12, 12, 240_001, dtype=np.float32).reshape(-1, 1)
    out = k.bias_gelu(y.copy(), np.zeros(1, np.float32))
    assert_close(out, k.gelu_ref(y.astype(np.float64)), "gelu")


@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 50), c=st.integers(1, 300),
       scale=st.sampled_from([0.1, 1.0, 10.0, 1e4]))
@example(seed=0, n=784, c=384, scale=1.0)
def test_bias_gelu(seed, n, c, scale):
    rng = np.random.default_rng(seed)
    y = (rng.standard_normal((n, c)) * scale).astype(np.float32)
    bias = rng.standard_normal(c).astype(np.float32)
    ref = k.bias_gelu_ref(y.copy(), bias)
    assert_close(k.bias_gelu(y, bias), ref, "gelu")


def test_gelu_nan_and_inf():
    y = np.array([[np.nan, np.inf, -np.inf, 1.0]], np.float32)
    out = k.bias_gelu(y, np.zeros(4, np.float32))
    assert np.isnan(out[0, 0]) and out[0, 1] == np.inf and np.isfinite(out[0, 3])
