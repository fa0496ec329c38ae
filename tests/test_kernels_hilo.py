"""HiLo attention kernels (Hi-Fi windows, Lo-Fi pooled keys, window pooling) vs their NumPy references."""
import numpy as np
from hypothesis import example, given, strategies as st

from qnalo.kernels import hilo as k
from tolerances import assert_close, hilo_scale

cases = dict(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(1, 11), w=st.integers(1, 11),
             ws=st.integers(1, 4), hi=st.integers(0, 3), lo=st.integers(0, 3), hd=st.integers(1, 9),
             # q, k, v entries ~ N(0, logit_scale^2), scores up to ~ +-100 at 6
             logit_scale=st.sampled_from([1.0, 6.0]))


def _run(ops_hifi, ops_lofi, ops_pool, seed, b, h, w, ws, hi, lo, hd, logit_scale):
    rng = np.random.default_rng(seed)
    dim = (hi + lo) * hd
    cols = 3 * hi * hd + lo * hd
    qkv = (rng.standard_normal((b, h, w, cols)) * logit_scale).astype(np.float32)
    qkv_bias = rng.standard_normal(cols).astype(np.float32)
    xn = rng.standard_normal((b, h, w, max(dim, 1))).astype(np.float32)
    pooled = ops_pool(xn, ws) if ws > 1 else xn
    m = pooled.shape[1] * pooled.shape[2]
    kv = rng.standard_normal((b, m, 2 * lo * hd)).astype(np.float32)
    kv_bias = rng.standard_normal(2 * lo * hd).astype(np.float32)
    out = np.zeros((b, h, w, dim), np.float32)
    scale = hd ** -0.5
    if hi:
        ops_hifi(qkv, qkv_bias[:3 * hi * hd], ws, hi, hd, scale, out)
    if lo:
        ops_lofi(qkv, 3 * hi * hd, qkv_bias[3 * hi * hd:], kv, kv_bias, lo, hd, scale, out, hi * hd)
    return out, pooled


@given(**cases)
@example(seed=0, b=1, h=14, w=14, ws=2, hi=2, lo=10, hd=32, logit_scale=1.0)    # LITv2-S layers.2
@example(seed=1, b=2, h=7, w=7, ws=1, hi=0, lo=24, hd=32, logit_scale=1.0)      # layers.3: global MSA
@example(seed=2, b=1, h=15, w=21, ws=2, hi=2, lo=14, hd=32, logit_scale=1.0)    # LITv2-B, padded map
@example(seed=3, b=1, h=1, w=1, ws=4, hi=1, lo=1, hd=1, logit_scale=6.0)
@example(seed=0, b=3, h=6, w=7, ws=2, hi=1, lo=3, hd=9, logit_scale=6.0)
def test_hilo_branches(seed, b, h, w, ws, hi, lo, hd, logit_scale):
    args = (seed, b, h, w, ws, hi, lo, hd, logit_scale)
    out, pooled = _run(k.hifi_attention, k.lofi_attention, k.window_avgpool, *args)
    ref, pooled_ref = _run(k.hifi_attention_ref, k.lofi_attention_ref, k.window_avgpool_ref, *args)
    assert_close(pooled, pooled_ref, "hilo", what="window_avgpool")
    # float32 scores carry ~eps*|score| rounding, |score| ~ logit_scale^2, so atol grows by hilo_scale(logit_scale)
    # = logit_scale^2 (the rule and its measurements beside ("hilo", "float32") in tolerances.py)
    assert_close(out, ref, "hilo", scale=hilo_scale(logit_scale))


def test_padded_tokens_count_as_zeros_in_the_pool():
    x = np.ones((1, 3, 3, 1), np.float32)
    pooled = k.window_avgpool(x, 2)
    np.testing.assert_allclose(pooled[0, :, :, 0], [[1.0, 0.5], [0.5, 0.25]])
