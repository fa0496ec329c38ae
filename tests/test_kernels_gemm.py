"""The packed-weight Numba GEMM vs x @ w in float64."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from qnalo.kernels import gemm as k
from tolerances import assert_close


def _operands(seed, m, kk, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, kk)).astype(np.float32)
    w = (rng.standard_normal((kk, n)) / np.sqrt(max(kk, 1))).astype(np.float32)
    return x, w


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 70), kk=st.integers(1, 600), n=st.integers(1, 80),
       x_pad=st.integers(0, 5), out_pad=st.integers(0, 5))
@example(seed=0, m=196, kk=384, n=1536, x_pad=0, out_pad=0)    # LITv2-S layers.2 fc1
@example(seed=1, m=49, kk=3072, n=768, x_pad=0, out_pad=0)     # layers.3 fc2: 12 K blocks
@example(seed=2, m=3136, kk=96, n=384, x_pad=0, out_pad=0)     # layers.0 fc1: row split
@example(seed=3, m=196, kk=64, n=64, x_pad=320, out_pad=320)   # h_proj on a column slice, into one
@example(seed=4, m=1, kk=768, n=1000, x_pad=0, out_pad=0)      # the head, batch 1
@example(seed=5, m=1, kk=1, n=1, x_pad=0, out_pad=0)
@example(seed=6, m=400, kk=600, n=37, x_pad=0, out_pad=0)     # x over X_IN_L2: M blocks, K blocks, edge tiles
def test_matmul(seed, m, kk, n, x_pad, out_pad):
    x, w = _operands(seed, m, kk + x_pad, n)
    x = x[:, x_pad:]                               # rows with a stride wider than the row
    w = np.ascontiguousarray(w[x_pad:])
    out = np.full((m, n + out_pad), 7.0, np.float32)
    y = k.matmul(x, k.PackedWeight(w), out[:, out_pad:])
    assert y.base is out or y is out[:, out_pad:] or np.shares_memory(y, out)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert_close(out[:, out_pad:], ref, "gemm")
    assert (out[:, :out_pad] == 7.0).all(), "wrote outside the output slice"
    assert_close(k.matmul_ref(x, w), ref, "gemm", what="reference")


@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 40), kk=st.integers(1, 300), n=st.integers(1, 90),
       m0=st.integers(0, 7), first_panel=st.integers(0, 2))
@example(seed=0, m=400, kk=600, n=37, m0=0, first_panel=0)     # x over X_IN_L2: the other loop order
@example(seed=1, m=49, kk=768, n=3072, m0=0, first_panel=0)    # LITv2-S stage 3
def test_the_wide_tile_gives_the_same_sums_as_the_narrow_one(seed, m, kk, n, m0, first_panel):
    """The GEMM's AVX-512 6x32 tile (pairs of panels; it runs, slower, on any x86 CPU) and its 6x16 tile give
    bit-identical results on any block of rows and panels, odd panel counts and partial tiles included: which
    one a machine uses changes its speed, not its outputs."""
    x, w = _operands(seed, m0 + m, kk, n)
    panels = k.PackedWeight(w).panels
    p0 = min(first_panel, panels.shape[0] - 1)
    got = {}
    for wide in (False, True):
        y = np.full((m0 + m, n), 7.0, np.float32)
        k.GEMM_BLOCKS[wide](x, panels, y, m0, m0 + m, p0, panels.shape[0])
        got[wide] = y
    np.testing.assert_array_equal(got[True], got[False])
    assert (got[True][:m0] == 7.0).all() and (got[True][:, :p0 * k.NR] == 7.0).all(), "wrote outside the block"
    ref = x[m0:].astype(np.float64) @ w[:, p0 * k.NR:].astype(np.float64)
    assert_close(got[True][m0:, p0 * k.NR:], ref, "gemm")


def test_packed_weight_round_trip():
    w = np.random.default_rng(0).standard_normal((37, 21)).astype(np.float32)
    packed = k.PackedWeight(w)
    assert packed.panels.shape == (2, 37, 16)
    np.testing.assert_array_equal(packed.unpack(), w)
    assert (packed.panels[1, :, 21 - 16:] == 0.0).all(), "the last panel's padding columns must be zeros"


@pytest.mark.parametrize("shape", [(0,), (1,), (3, 5), (7, 37, 16), (2, 0, 3)])
def test_panels_and_new_outputs_start_on_a_cache_line(shape):
    """gemm.aligned_empty, and through it the packed panels and matmul's own outputs, start 64-byte aligned."""
    for _ in range(20):      # NumPy's 16-byte alignment lands on a line only now and then: try several
        a = k.aligned_empty(shape)
        assert a.shape == shape and a.dtype == np.float32 and a.flags.c_contiguous
        assert a.ctypes.data % 64 == 0 or a.size == 0
    w = np.ones((5, 40), np.float32)
    assert k.PackedWeight(w).panels.ctypes.data % 64 == 0
    assert k.matmul(np.ones((3, 5), np.float32), k.PackedWeight(w)).ctypes.data % 64 == 0


def test_empty_and_zero_depth():
    w = np.ones((0, 5), np.float32)
    np.testing.assert_array_equal(k.matmul(np.ones((3, 0), np.float32), k.PackedWeight(w)), np.zeros((3, 5)))
    assert k.matmul(np.ones((0, 4), np.float32), k.PackedWeight(np.ones((4, 5), np.float32))).shape == (0, 5)


def test_nan_stays_in_its_row():
    x, w = _operands(0, 13, 40, 20)
    x[4, 7] = np.nan
    y = k.matmul(x, k.PackedWeight(w))
    assert np.isnan(y[4]).all() and np.isfinite(np.delete(y, 4, axis=0)).all()


@pytest.mark.parametrize("x, out, message", [
    (np.ones((3, 5), np.float32), None, "x has 5 columns"),
    (np.ones((3, 4), np.float64), None, "float32"),
    (np.ones((4, 3), np.float32).T, None, "contiguous rows"),
    (np.ones((3, 4), np.float32), np.ones((3, 6), np.float32), r"out must be float32 \(3, 2\)"),
])
def test_bad_operands(x, out, message):
    with pytest.raises(ValueError, match=message):
        k.matmul(x, k.PackedWeight(np.ones((4, 2), np.float32)), out)
