"""The scaled softmax of padded rows and the vectorised float32 exp vs float64 NumPy."""
import numpy as np
from hypothesis import example, given, strategies as st

from qnalo.kernels import softmax as k
from qnalo.kernels._jit import kernel
from tolerances import assert_close


@kernel()
def _exp(x):
    out = x.copy()
    k.exp_inplace(out, np.empty(x.shape[0], np.int32))
    return out


def test_exp_relative_error_on_a_dense_grid():
    x = np.linspace(-87, 88, 1_000_001, dtype=np.float32)
    ref = np.exp(x.astype(np.float64))
    rel = np.abs(_exp(x) - ref) / ref
    assert rel.max() < 3e-7, f"max relative error {rel.max():.3g} at x={x[rel.argmax()]}"


def test_exp_keeps_nan_in_vectors_and_in_the_tail():
    """A NaN stays NaN, in a whole vector (wexp) and past the last one (the scalar loop); its neighbours are
    unchanged."""
    x = np.linspace(-5, 5, 37, dtype=np.float32)
    x[[3, 20, 35]] = np.nan
    got = _exp(x)
    assert np.isnan(got[[3, 20, 35]]).all()
    keep = ~np.isnan(x)
    assert (np.abs(got[keep] - np.exp(x[keep].astype(np.float64))) <= 3e-7 * np.exp(x[keep])).all()


@given(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 30), m=st.integers(1, 70),
       spread=st.sampled_from([0.1, 1.0, 30.0]), scale=st.sampled_from([1.0, 32 ** -0.5]), garbage=st.booleans())
@example(seed=3, rows=196, m=49, spread=5.0, scale=32 ** -0.5, garbage=True)   # LITv2-S Lo-Fi, 7x7 windows
def test_softmax_padded_rows(seed, rows, m, spread, scale, garbage):
    """The first m columns of each padded row as scaled_softmax_rows_ref gives them, whatever the padding held
    before (a previous head's probabilities, or huge values)."""
    rng = np.random.default_rng(seed)
    padded = np.full((rows, k.padded_width(m)), 1e30 if garbage else 0.0, np.float32)
    padded[:, :m] = rng.standard_normal((rows, m)) * spread
    ref = k.scaled_softmax_rows_ref(padded[:, :m].copy(), scale)
    k.softmax_padded_rows(padded, m, np.float32(scale), 0, rows)
    assert_close(padded[:, :m], ref, "attention")
    assert padded.shape[1] % 16 == 0 and padded.shape[1] - m < 16


def test_nan_row_stays_nan():
    """A NaN score, in a whole vector or in the remainder, makes its row NaN; the other rows are untouched."""
    padded = np.zeros((3, k.padded_width(21)), np.float32)
    padded[0, 2] = np.nan
    padded[1, 18] = np.nan
    k.softmax_padded_rows(padded, 21, np.float32(1.0), 0, 3)
    assert np.isnan(padded[:2, :21]).all() and np.allclose(padded[2, :21], 1 / 21)


@given(m=st.integers(1, 70), at=st.integers(0, 69))
def test_row_maximum_anywhere_in_the_row(m, at):
    """The maximum in any lane of any vector, or in the scalar remainder, sets the shift (one huge score: the
    softmax is one-hot only if it is found)."""
    padded = np.zeros((1, k.padded_width(m)), np.float32)
    padded[0, at % m] = 100.0
    k.softmax_padded_rows(padded, m, np.float32(1.0), 0, 1)
    assert padded[0, at % m] == 1.0 and np.isfinite(padded).all()
