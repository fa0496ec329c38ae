"""Depthwise 3x3 conv + GELU kernel vs its NumPy reference."""
import numpy as np
from hypothesis import example, given, strategies as st

from qnalo.kernels import dwconv_gelu as k
from tolerances import assert_close


@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(1, 13), w=st.integers(1, 13),
       c=st.integers(1, 70))
@example(seed=0, b=1, h=56, w=56, c=384)    # LITv2-S stage 0
@example(seed=1, b=2, h=7, w=7, c=3072)     # stage 3
@example(seed=2, b=1, h=1, w=1, c=1)
@example(seed=3, b=2, h=3, w=5, c=139)     # 64-channel blocks, an 8-channel vector and a 3-channel tail
def test_dwconv3x3_gelu(seed, b, h, w, c):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((b, h, w, c)).astype(np.float32)
    pre_bias, bias = (rng.standard_normal(c).astype(np.float32) for _ in range(2))
    weight = rng.standard_normal((3, 3, c)).astype(np.float32)
    out = k.dwconv3x3_gelu(hidden, pre_bias, weight, bias)
    assert_close(out, k.dwconv3x3_gelu_ref(hidden, pre_bias, weight, bias), "dwconv_gelu")


def test_padding_is_zero_not_pre_bias():
    # a 1x1 map: only the centre tap sees data; the pre-bias must not leak into the 8 padded taps
    hidden = np.zeros((1, 1, 1, 1), np.float32)
    weight = np.ones((3, 3, 1), np.float32)
    out = k.dwconv3x3_gelu(hidden, np.ones(1, np.float32), weight, np.zeros(1, np.float32))
    assert_close(out, k.gelu_ref(np.ones((1, 1, 1, 1))), "dwconv_gelu")


def test_strided_inputs_are_read_correctly():
    """The kernel's vector loads index its arrays flat: views (a channel slice of a wider map, a reversed
    weight) must give what their contiguous copies give."""
    rng = np.random.default_rng(4)
    wide = rng.standard_normal((2, 5, 6, 100)).astype(np.float32)
    hidden = wide[..., 10:90]
    weight = rng.standard_normal((3, 3, 80)).astype(np.float32)[::-1]
    pre_bias, bias = (rng.standard_normal(80).astype(np.float32) for _ in range(2))
    out = k.dwconv3x3_gelu(hidden, pre_bias, weight, bias)
    assert_close(out, k.dwconv3x3_gelu_ref(np.ascontiguousarray(hidden), pre_bias, np.ascontiguousarray(weight),
                                           bias), "dwconv_gelu")
