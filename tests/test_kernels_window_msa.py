"""Window MSA with relative position bias (QnA-ViT): Numba kernel vs its float64 NumPy reference."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from qnalo.kernels import window_msa as k
from tolerances import assert_close


def _args(seed, b, gh, gw, ws, heads, hd, logit_scale):
    rng = np.random.default_rng(seed)
    qkv = (rng.standard_normal((b, gh * ws, gw * ws, 3 * heads * hd)) * logit_scale).astype(np.float32)
    table = rng.standard_normal(((2 * ws - 1) ** 2, heads)).astype(np.float32)
    return qkv, k.relative_bias(table, ws)


@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), gh=st.integers(1, 3), gw=st.integers(1, 3),
       ws=st.integers(1, 6), heads=st.integers(1, 4), hd=st.integers(1, 9), logit_scale=st.sampled_from([1.0, 4.0]))
@example(seed=0, b=1, gh=1, gw=1, ws=14, heads=8, hd=32, logit_scale=1.0)    # QnA-ViT-tiny stage 2 (global)
@example(seed=1, b=2, gh=1, gw=1, ws=7, heads=16, hd=32, logit_scale=1.0)    # stage 3
@example(seed=2, b=1, gh=2, gw=3, ws=7, heads=3, hd=32, logit_scale=1.0)     # base stage 3 at 448x672
def test_window_msa(seed, b, gh, gw, ws, heads, hd, logit_scale):
    qkv, bias = _args(seed, b, gh, gw, ws, heads, hd, logit_scale)
    out = np.empty((b, gh * ws, gw * ws, heads * hd), np.float32)
    ref = k.window_msa_ref(qkv, bias, ws, heads, out.copy())
    # scores are q.k of entries ~ N(0, logit_scale^2): their float32 rounding grows with hd * logit_scale^2
    # and moves each output by that times |v| ~ logit_scale (see tolerances.py)
    assert_close(k.window_msa(qkv, bias, ws, heads, out), ref, "window_msa",
                 scale=logit_scale ** 3 * max(1.0, hd / 8))


def test_relative_bias_index():
    # query token i = (yi, xi) and key j read row (yi - yj + w - 1) * (2w - 1) + (xi - xj + w - 1)
    ws, heads = 3, 2
    table = np.arange(25 * heads, dtype=np.float32).reshape(25, heads)
    bias = k.relative_bias(table, ws)
    for i in range(9):
        for j in range(9):
            (yi, xi), (yj, xj) = divmod(i, ws), divmod(j, ws)
            assert (bias[:, i, j] == table[(yi - yj + 2) * 5 + (xi - xj + 2)]).all()


def test_windows_are_independent():
    # one window's tokens never see another's: changing window (0, 1) leaves window (0, 0) as it was
    qkv, bias = _args(0, 1, 1, 2, 3, 2, 4, 1.0)
    out1 = k.window_msa(qkv, bias, 3, 2, np.empty((1, 3, 6, 8), np.float32))
    qkv[:, :, 3:] += 5.0
    out2 = k.window_msa(qkv, bias, 3, 2, np.empty((1, 3, 6, 8), np.float32))
    np.testing.assert_array_equal(out1[:, :, :3], out2[:, :, :3])
    assert not np.allclose(out1[:, :, 3:], out2[:, :, 3:])


def test_window_must_divide_the_map():
    qkv = np.zeros((1, 5, 6, 6), np.float32)
    with pytest.raises(ValueError, match="window 3"):
        k.window_msa(qkv, np.zeros((1, 9, 9), np.float32), 3, 1, np.empty((1, 5, 6, 2), np.float32))
