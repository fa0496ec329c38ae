"""Row softmax with the attention scale over rows padded to whole vectors (Lo-Fi, window MSA), and a float32 exp
that vectorises (math.exp is a scalar libm call: it made the Lo-Fi softmax 3x slower)."""
import numpy as np

from ._jit import inline_kernel, kernel
from .simd import (EXP_MIN, LN2_HI, LN2_LO, LOG2E, P0, P1, P2, P3, P4, P5, WIDE_LANES, wadd, wexp, wload, wmax,
                   wmax_lanes, wmul, wsplat, wstore, wsub, wsum_lanes, wzero)


def scaled_softmax_rows_ref(scores, scale):
    """scores (..., M) <- softmax(scores * scale) over the last axis, in place, evaluated in float64."""
    s = scores.astype(np.float64) * scale
    s = np.exp(s - s.max(axis=-1, keepdims=True))
    scores[...] = s / s.sum(axis=-1, keepdims=True)
    return scores


@inline_kernel()
def exp_inplace(x, bits):
    """x <- exp(x) for x <= 88 (simd's Cephes expf); `bits` is int32 scratch at least as long as x (holds 2^n
    as float bits for the elements past the last whole vector). Whole vectors of a contiguous x go through
    wexp: sixteen lanes whatever vector width the compiler would have chosen for the loop."""
    whole = x.shape[0] - x.shape[0] % WIDE_LANES if x.strides[0] == 4 else 0
    for i in range(0, whole, WIDE_LANES):
        wstore(x, i, wexp(wload(x, i)))
    scaled = bits.view(np.float32)
    for i in range(whole, x.shape[0]):
        v = max(x[i], EXP_MIN)
        n = np.floor(v * LOG2E + np.float32(0.5))
        r = v - n * LN2_HI - n * LN2_LO
        p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
        x[i] = (p * r * r + r) + np.float32(1.0)
        bits[i] = (np.int32(n) + np.int32(127)) << np.int32(23)
    for i in range(whole, x.shape[0]):
        x[i] *= scaled[i]


@inline_kernel()
def padded_width(m_keys):
    """The row length of a padded score buffer for m_keys keys: the next multiple of sixteen."""
    return -(-m_keys // WIDE_LANES) * WIDE_LANES


@kernel()
def softmax_padded_rows(padded, m_keys, scale, start, stop):
    """Rows start..stop of padded (R, padded_width(m_keys)), C-contiguous, whose first m_keys columns hold the
    scores: those become softmax(scale * scores); the columns past them become ~1e-35. The rows are taken
    sixteen lanes at a time and the exp over all of them at once: rows of 49 keys had spent most of their
    time in the scalar remainders and set-up of short vectorised loops."""
    width = padded.shape[1]
    whole = m_keys - m_keys % WIDE_LANES          # columns in vectors of keys only
    scale_v = wsplat(scale)
    for i in range(start, stop):
        at = i * width
        top_v = wsplat(np.float32(-np.inf))
        for v in range(at, at + width, WIDE_LANES):
            scaled = wmul(wload(padded, v), scale_v)
            wstore(padded, v, scaled)
            if v < at + whole:
                top_v = wmax(top_v, scaled)
        top = wmax_lanes(top_v)
        for s in range(whole, m_keys):   # read, not overwritten: a vector load of a line just written by
            top = max(top, padded[i, s])  # scalar stores waits for them (~80 cycles a row)
        top_v = wsplat(top)
        for v in range(at, at + width, WIDE_LANES):
            wstore(padded, v, wsub(wload(padded, v), top_v))
        for s in range(m_keys, width):     # exp(-80) ~ 2e-35: nothing beside a row's sum (>= 1), and not a
            padded[i, s] = np.float32(-80.0)   # subnormal (exp(-inf) is, and slows every operation on it ~100x)
    flat = padded.reshape(-1)[start * width:stop * width]
    exp_inplace(flat, np.empty(flat.shape[0], np.int32))
    for i in range(start, stop):
        at = i * width
        total = wzero()
        for v in range(at, at + width, WIDE_LANES):
            total = wadd(total, wload(padded, v))
        inv = wsplat(np.float32(1.0) / wsum_lanes(total))
        for v in range(at, at + width, WIDE_LANES):
            wstore(padded, v, wmul(wload(padded, v), inv))
