"""Numba LayerNorm kernels vs their NumPy references."""
import numpy as np
from hypothesis import example, given, strategies as st

from qnalo.kernels import layernorm as k
from tolerances import assert_close


def _arrays(seed, n, c, spread):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, c)) * spread + rng.standard_normal()).astype(np.float32)
    y = rng.standard_normal((n, c)).astype(np.float32)
    w, b, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(3))
    return x, y, w, b, bias


shapes = dict(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 70), c=st.integers(1, 200),
              spread=st.sampled_from([1e-3, 1.0, 100.0]))


@given(**shapes)
@example(seed=0, n=3136, c=96, spread=1.0)     # LITv2-S stage 0 at 224
@example(seed=1, n=49, c=768, spread=100.0)    # stage 3
@example(seed=2, n=1, c=1, spread=1.0)
def test_layernorm(seed, n, c, spread):
    x, _, w, b, _ = _arrays(seed, n, c, spread)
    out = k.layernorm(x, w, b, 1e-5, np.empty_like(x))
    assert_close(out, k.layernorm_ref(x, w, b, 1e-5), "layernorm")


@given(**shapes)
@example(seed=0, n=196, c=384, spread=1.0)
def test_residual_add_layernorm(seed, n, c, spread):
    x, y, w, b, bias = _arrays(seed, n, c, spread)
    x_ref = x.copy()
    out = k.residual_add_layernorm(x, y, bias, w, b, 1e-5, np.empty_like(x))
    ref = k.residual_add_layernorm_ref(x_ref, y, bias, w, b, 1e-5, np.empty_like(x))
    assert_close(x, x_ref, "layernorm", what="residual stream")
    assert_close(out, ref, "layernorm")


@given(**shapes)
def test_residual_add(seed, n, c, spread):
    x, y, _, _, bias = _arrays(seed, n, c, spread)
    expected = x.astype(np.float64) + y + bias
    k.residual_add(x, y, bias)
    assert_close(x, expected, "layernorm")


def test_nan_propagates():
    x = np.ones((2, 8), np.float32)
    x[0, 3] = np.nan
    out = k.layernorm(x, np.ones(8, np.float32), np.zeros(8, np.float32), 1e-5, np.empty_like(x))
    assert np.isnan(out[0]).all() and np.isfinite(out[1]).all()
