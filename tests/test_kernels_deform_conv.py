"""DCNv1 2x2/s2 sampling kernel vs its NumPy reference, with offsets that cross the border."""
import numpy as np
from hypothesis import example, given, strategies as st

from qnalo.kernels import deform_conv as k
from tolerances import assert_close


@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(2, 15), w=st.integers(2, 15),
       c=st.integers(1, 40), offset_scale=st.sampled_from([0.0, 0.5, 3.0, 20.0]))
@example(seed=0, b=1, h=56, w=56, c=96, offset_scale=1.0)
@example(seed=1, b=2, h=14, w=14, c=384, offset_scale=3.0)
@example(seed=2, b=1, h=3, w=5, c=1, offset_scale=3.0)   # odd sizes: last row/column dropped
def test_deform_sample(seed, b, h, w, c, offset_scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w, c)).astype(np.float32)
    offsets = (rng.standard_normal((b, h // 2, w // 2, 8)) * offset_scale).astype(np.float32)
    assert_close(k.deform_sample(x, offsets), k.deform_sample_ref(x, offsets), "deform_conv")


def test_zero_offsets_are_plain_patches():
    x = np.random.default_rng(0).standard_normal((2, 6, 7, 5)).astype(np.float32)
    cols = k.deform_sample(x, np.zeros((2, 3, 3, 8), np.float32))
    np.testing.assert_array_equal(cols, k.space_to_depth2_ref(x))


def test_border_band():
    # sample points: just inside the (-1, H) band get partial bilinear weight; at -1 or H exactly, zero
    x = np.ones((1, 2, 2, 1), np.float32)
    offsets = np.zeros((1, 1, 1, 8), np.float32)
    offsets[..., 0] = -0.5          # tap 0 at y = -0.5: half its weight is outside -> 0.5
    offsets[..., 2] = -1.0          # tap 1 at y = -1: outside the band -> 0
    offsets[..., 5] = 1.0           # tap 2 at x = 1: inside -> 1
    offsets[..., 7] = 0.25          # tap 3 at (1, 1.25): right neighbour outside -> 0.75
    cols = k.deform_sample(x, offsets)
    np.testing.assert_allclose(cols[0, 0, 0, :, 0], [0.5, 0.0, 1.0, 0.75], atol=1e-7)
    np.testing.assert_allclose(k.deform_sample_ref(x, offsets)[0, 0, 0, :, 0], [0.5, 0.0, 1.0, 0.75], atol=1e-7)
