"""bfloat16 GEMM: y (M, N) float32 = bf16(x) @ bf16(w), the products of bfloat16 pairs accumulated in float32
by vdpbf16ps (AVX512_BF16: Intel Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later).

Rounding happens in exactly two places, both round-to-nearest-even (NaN stays NaN): the weight once, when it
is packed at load time, and each activation row as the GEMM reads it. A bfloat16 product is exact in float32,
so the only other rounding is the float32 accumulation, one rounding per product as vdpbf16ps adds them (the
odd element of each pair first); bfloat16 subnormals (|v| < 1.2e-38) count as 0.

Layouts (float32 arrays that hold the bits of bfloat16 pairs, the even k in the low 16 bits):
* weight panels (P, K2, 16), K2 = ceil(K / 2) rounded up to 16, P = ceil(N / 16) rounded up to 2: panel p,
  pair kk, column j holds (w[2kk, 16p + j], w[2kk + 1, 16p + j]), zero-padded past K and N;
* x pairs (M', K2), M' = M rounded up to 32 rows, plus 6: (x[i, 2kk], x[i, 2kk + 1]), zero past x; made per
  call.

On a CPU with AMX-BF16 (Intel Sapphire Rapids and later; kernels/amx.py) a 32x32 block of y is four 16x16
float32 tiles, each step of 16 pairs two tdpbf16ps-fed x tiles and two weight tiles: the panels already are
AMX's pair-interleaved layout, so K2 is padded to whole steps of 16 pairs and P to pairs of panels at packing.
Elsewhere the tile is the float32 GEMM's 6x32 (two panels, twelve 16-lane accumulators) with one vdpbf16ps
per pair of k where the float32 tile has one FMA per k. Rows are taken in blocks that stay in L2 while every
panel pair passes over them.

The NumPy reference, matmul_bf16_ref, rounds x and w the same way and sums the exact products in float64:
the kernel differs from it by the float32 accumulation only."""
import threading

import numpy as np

from . import amx, threads
from ._jit import inline_kernel, kernel
from .gelu_tanh import wgelu_tanh
from .gemm import MR, NR, _copy_edge, _wide_store, aligned_empty, checked_output
from .simd import HAS_AVX512_BF16, WIDE_LANES, wadd, wbf16_pairs, wbroadcast, wdpbf16, wload, wstore, wzero
from .threads import split_rows

MC = 120                # rows of x pairs (at most 120 x 768 x 4 B = 360 KiB) that stay in L2 per block
AMX_BLOCK = 32          # rows and columns of y per block of four AMX tiles
K_STEP = 16             # pairs of k per AMX tile
SPLIT_ROWS_FROM = 512   # vdpbf16ps tile: from this many rows the threads split the rows, below it the panels
TILE_CONFIG = amx.tile_config_bytes()


def to_bfloat16_bits(x):
    """float32 values -> their bfloat16 bits (uint16), rounded to nearest even; a NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    return np.where(nan, (bits >> np.uint32(16)) | np.uint32(0x40), rounded).astype(np.uint16)


def round_to_bfloat16(x):
    """float32 values rounded to bfloat16 (nearest even), as float32."""
    return (to_bfloat16_bits(x).astype(np.uint32) << np.uint32(16)).view(np.float32)


def _flush_subnormals(v):
    return np.where(np.abs(v) < np.finfo(np.float32).tiny, np.float32(0.0), v)


def matmul_bf16_ref(x, w, out=None):
    """The reference: bf16(x) (M, K) @ bf16(w) (K, N), products and sums in float64 -> (M, N) float32."""
    product = _flush_subnormals(round_to_bfloat16(x)).astype(np.float64) @ \
        _flush_subnormals(round_to_bfloat16(w)).astype(np.float64)
    if out is None:
        return product.astype(np.float32)
    out[...] = product
    return out


def _pairs(bits_even, bits_odd):
    """Two uint16 arrays of bfloat16 bits -> the float32 array holding them as pairs."""
    return (bits_even.astype(np.uint32) | (bits_odd.astype(np.uint32) << np.uint32(16))).view(np.float32)


class PackedWeightBF16:
    """A (K, N) float32 weight rounded to bfloat16 and packed into (P, K2, 16) panels of pairs (half the
    float32 weight's bytes)."""

    def __init__(self, w):
        k, n = w.shape
        k2, p = -(-k // (2 * K_STEP)) * K_STEP, -(-n // (2 * NR)) * 2
        bits = np.zeros((2 * k2, p * NR), np.uint16)
        bits[:k, :n] = to_bfloat16_bits(w)
        self.panels = aligned_empty((p, k2, NR))
        self.panels[...] = _pairs(bits[0::2], bits[1::2]).reshape(k2, p, NR).transpose(1, 0, 2)
        self.shape = (k, n)

    def unpack(self):
        """The weight as float32 (its bfloat16 values: the rounding is not undone)."""
        k, n = self.shape
        bits = self.panels.view(np.uint32).transpose(1, 0, 2).reshape(-1, self.panels.shape[0] * NR)
        both = np.stack([bits & np.uint32(0xFFFF), bits >> np.uint32(16)], axis=1).reshape(-1, bits.shape[1])
        return (both.astype(np.uint32) << np.uint32(16)).view(np.float32)[:k, :n]


@inline_kernel()
def row_pairs(src, flat, row, k2, tail, tail_pairs):
    """flat[row:row + k2] <- the floats of the row src (contiguous) as rounded bfloat16 pairs (a pair is two
    consecutive bfloat16, so a row's pairs are its bfloat16 values in order): 32 at a time by vcvtne2ps2bf16,
    the last ones through a zero-padded vector (tail: 32 floats, zero past what this writes; tail_pairs: 16),
    the pairs past the row's zero."""
    k = src.shape[0]
    whole = k - k % (2 * WIDE_LANES)
    used = -(-k // 2)                                # pairs holding src's values
    for c in range(0, whole, 2 * WIDE_LANES):
        wstore(flat, row + c // 2, wbf16_pairs(wload(src, c), wload(src, c + WIDE_LANES)))
    if whole < k:
        for kx in range(whole, k):
            tail[kx - whole] = src[kx]
        wstore(tail_pairs, 0, wbf16_pairs(wload(tail, 0), wload(tail, WIDE_LANES)))
        flat[row + whole // 2:row + used] = tail_pairs[:used - whole // 2]
    flat[row + used:row + k2] = 0.0


@kernel()
def _x_pairs(x, start, stop, out):
    """Rows start..stop of out (M', K2) <- x's rows as rounded bfloat16 pairs (row_pairs); rows past x's are
    zero."""
    m = x.shape[0]
    k2 = out.shape[1]
    flat = out.reshape(-1)
    tail = np.zeros(2 * WIDE_LANES, np.float32)      # the columns past the last 32, zero-padded
    tail_pairs = np.empty(WIDE_LANES, np.float32)
    for i in range(start, stop):
        if i >= m:
            flat[i * k2:(i + 1) * k2] = 0.0
        else:
            row_pairs(x[i], flat, i * k2, k2, tail, tail_pairs)


@kernel()
def _bf16_tile(xp, ia, k2, panels, ib, ib2):
    """The 6x32 tile: rows at xp.flat[ia + r*k2] (pairs) times the panels at ib and ib2, over k2 pairs."""
    z = wzero()
    a0 = a1 = a2 = a3 = a4 = a5 = z
    c0 = c1 = c2 = c3 = c4 = c5 = z
    for kk in range(k2):
        b0 = wload(panels, ib + kk * NR)
        b1 = wload(panels, ib2 + kk * NR)
        x = wbroadcast(xp, ia + kk)
        a0, c0 = wdpbf16(a0, x, b0), wdpbf16(c0, x, b1)
        x = wbroadcast(xp, ia + k2 + kk)
        a1, c1 = wdpbf16(a1, x, b0), wdpbf16(c1, x, b1)
        x = wbroadcast(xp, ia + 2 * k2 + kk)
        a2, c2 = wdpbf16(a2, x, b0), wdpbf16(c2, x, b1)
        x = wbroadcast(xp, ia + 3 * k2 + kk)
        a3, c3 = wdpbf16(a3, x, b0), wdpbf16(c3, x, b1)
        x = wbroadcast(xp, ia + 4 * k2 + kk)
        a4, c4 = wdpbf16(a4, x, b0), wdpbf16(c4, x, b1)
        x = wbroadcast(xp, ia + 5 * k2 + kk)
        a5, c5 = wdpbf16(a5, x, b0), wdpbf16(c5, x, b1)
    return (a0, c0, a1, c1, a2, c2, a3, c3, a4, c4, a5, c5)


@inline_kernel()
def _gelu_tanh_pairs(scratch, i, m, p, bias, hp):
    """The 32x32 block of y at row i, panel pair p, stored in scratch: + bias, tanh GELU (the float32 kernel's
    vector function), then rounded into hp's pairs (the x pairs of the next GEMM); rows past m are zero."""
    k2 = hp.shape[1]
    b0, b1 = wload(bias, p * NR), wload(bias, p * NR + NR)
    for r in range(AMX_BLOCK):
        at = (i + r) * k2 + p * (NR // 2)
        if i + r >= m:
            wstore(hp, at, wzero())
        else:
            g0 = wgelu_tanh(wadd(wload(scratch, r * AMX_BLOCK), b0))
            g1 = wgelu_tanh(wadd(wload(scratch, r * AMX_BLOCK + NR), b1))
            wstore(hp, at, wbf16_pairs(g0, g1))


@kernel()   # compiled when first used: only a bfloat16 model on an AMX-BF16 CPU runs it
def gemm_amx_blocks(cfg, xp, panels, y, m, m0, m1, p0, p1, bias, hp):
    """y[m0:m1 (clipped to m), panels p0:p1] = x pairs [m0:m1] @ the packed weight by 32x32 blocks of four
    AMX tiles; m0 is a multiple of 32 and p0 even. A block past y's edge goes through scratch.
    With a non-empty hp (pairs, rows x the padded width / 2) each block instead gets bias (padded with zeros
    to the panels' width) and the tanh GELU in scratch and is rounded into hp (y is not written)."""
    amx.tile_config(cfg)
    k2 = xp.shape[1]
    n = y.shape[1]
    ldx, ldy = k2 * 4, y.strides[0]
    scratch = np.empty(AMX_BLOCK * AMX_BLOCK, np.float32)
    for i0 in range(m0, m1, 4 * AMX_BLOCK):
        for p in range(p0, p1, 2):
            w0, w1 = p * k2 * NR, (p + 1) * k2 * NR
            for i in range(i0, min(i0 + 4 * AMX_BLOCK, m1), AMX_BLOCK):
                amx.zero_y00()
                amx.zero_y01()
                amx.zero_y10()
                amx.zero_y11()
                for kk in range(0, k2, K_STEP):
                    amx.load_x0(xp, i * k2 + kk, ldx)
                    amx.load_x1(xp, (i + 16) * k2 + kk, ldx)
                    amx.load_w0(panels, w0 + kk * NR, NR * 4)
                    amx.load_w1(panels, w1 + kk * NR, NR * 4)
                    amx.multiply_y00()
                    amx.multiply_y01()
                    amx.multiply_y10()
                    amx.multiply_y11()
                rows, cols = min(AMX_BLOCK, m - i), min(AMX_BLOCK, n - p * NR)
                if hp.size:
                    amx.store_y00(scratch, 0, AMX_BLOCK * 4)
                    amx.store_y01(scratch, NR, AMX_BLOCK * 4)
                    amx.store_y10(scratch, 16 * AMX_BLOCK, AMX_BLOCK * 4)
                    amx.store_y11(scratch, 16 * AMX_BLOCK + NR, AMX_BLOCK * 4)
                    _gelu_tanh_pairs(scratch, i, m, p, bias, hp)
                elif rows == AMX_BLOCK and cols == AMX_BLOCK:
                    at = i * (ldy // 4) + p * NR
                    amx.store_y00(y, at, ldy)
                    amx.store_y01(y, at + NR, ldy)
                    amx.store_y10(y, at + 16 * (ldy // 4), ldy)
                    amx.store_y11(y, at + 16 * (ldy // 4) + NR, ldy)
                else:
                    amx.store_y00(scratch, 0, AMX_BLOCK * 4)
                    amx.store_y01(scratch, NR, AMX_BLOCK * 4)
                    amx.store_y10(scratch, 16 * AMX_BLOCK, AMX_BLOCK * 4)
                    amx.store_y11(scratch, 16 * AMX_BLOCK + NR, AMX_BLOCK * 4)
                    _copy_edge(y, i, p * NR, scratch, AMX_BLOCK, rows, cols, False)
    amx.tile_release()


@kernel()   # compiled when first used: only a bfloat16 model on an AVX512_BF16 CPU without AMX runs it
def gemm_bf16_tiles(xp, panels, y, m, m0, m1, p0, p1):
    """y[m0:m1 (clipped to m), panels p0:p1] = x pairs [m0:m1] @ the packed weight, by pairs of panels (a last
    single panel fills both halves of the tile, the second dropped); m0 is a multiple of 6."""
    k2 = xp.shape[1]
    n = y.shape[1]
    scratch = np.empty(MR * 2 * NR, np.float32)
    for i0 in range(m0, m1, MC):
        i1 = min(i0 + MC, m1)
        for p in range(p0, p1, 2):
            ib = p * k2 * NR
            ib2 = ib + k2 * NR if p + 1 < p1 else ib
            cols = min(2 * NR if p + 1 < p1 else NR, n - p * NR)
            for row in range(i0, i1, MR):
                rows = min(MR, m - row)
                if rows <= 0:
                    break
                acc = _bf16_tile(xp, row * k2, k2, panels, ib, ib2)
                _wide_store(y, row, p * NR, acc, rows, cols, False, scratch)


@kernel()
def _amx_share(cfg, x, xp, panels, y, r0, r1, p0, p1, bias, hp):
    """One thread's share on AMX: x's rows r0:r1 rounded into xp's, then y[r0:r1, panels p0:p1] (or hp's, see
    gemm_amx_blocks) from them; the pairs a thread multiplies are the ones it wrote, still in its own caches."""
    _x_pairs(x, r0, r1, xp)
    gemm_amx_blocks(cfg, xp, panels, y, x.shape[0], r0, r1, p0, p1, bias, hp)


@kernel()
def _tiles_share(x, xp, panels, y, r0, r1, p0, p1):
    """As _amx_share, by the vdpbf16ps tile (r0 a multiple of its 6 rows)."""
    _x_pairs(x, r0, r1, xp)
    gemm_bf16_tiles(xp, panels, y, x.shape[0], r0, r1, p0, p1)


_scratch = threading.local()
NO_BIAS, NO_PAIRS = np.zeros(0, np.float32), np.zeros((0, K_STEP), np.float32)   # gemm_amx_blocks writes y


KEEP_AT_MOST = 8 << 20   # floats (32 MiB) of pairs a thread keeps per use; a larger buffer is made per call


def pairs_buffers(count, rows, k2, use="x"):
    """count (rows, k2) buffers for pairs, kept by the calling thread between calls for each use (grown when too
    small, up to KEEP_AT_MOST, so that one large batch does not hold its memory for the process's life): a fresh
    one per call cost its page faults every call, ~15% of a batch-1 GEMM."""
    size = count * rows * k2
    if size > KEEP_AT_MOST:
        return aligned_empty((count, rows, k2))
    flat = getattr(_scratch, use, None)
    if flat is None or flat.size < size:
        flat = aligned_empty((size,))
        setattr(_scratch, use, flat)
    return flat[:size].reshape(count, rows, k2)


def pairs_rows(m):
    """The rows of an x-pairs buffer for m rows of x: whole AMX blocks, and the 6-row tile's reach past them
    (the rows past x's are zero or ignored)."""
    return -(-m // AMX_BLOCK) * AMX_BLOCK + MR


def _split_by_rows(blocks, p):
    """With enough 32-row blocks for every thread an AMX GEMM's threads split the rows, else the panel pairs."""
    return blocks >= 2 * threads.NUM_THREADS or p < 2 * threads.NUM_THREADS


def amx_gemm_pairs(hp, m, panels, out):
    """out (m, N) = the rounded pairs hp (rows past m ignored) @ the panels on AMX, the threads split as in
    matmul_bf16 (by rows, each reading the rows its thread wrote when the producer split them alike)."""
    p, k2 = panels.shape[0], panels.shape[1]
    blocks = -(-m // AMX_BLOCK)
    if _split_by_rows(blocks, p):
        split_rows(lambda start, stop: gemm_amx_blocks(TILE_CONFIG, hp, panels, out, m, start * AMX_BLOCK,
                                                       stop * AMX_BLOCK, 0, p, NO_BIAS, NO_PAIRS),
                   blocks, AMX_BLOCK * k2 * 2 * p * NR)
    else:
        split_rows(lambda start, stop: gemm_amx_blocks(TILE_CONFIG, hp, panels, out, m, 0, blocks * AMX_BLOCK,
                                                       2 * start, 2 * stop, NO_BIAS, NO_PAIRS),
                   p // 2, m * k2 * 4 * NR)
    return out


def amx_gemm(x, panels, out, bias=NO_BIAS, hp=NO_PAIRS):
    """out (or hp's pairs) = bf16(x) @ the panels on AMX, split across the threads (see matmul_bf16)."""
    m, k = x.shape
    p, k2 = panels.shape[0], panels.shape[1]
    blocks = -(-m // AMX_BLOCK)
    rows = pairs_rows(m)
    work = AMX_BLOCK * k * p * NR
    if _split_by_rows(blocks, p):
        xp = pairs_buffers(1, rows, k2)[0]
        split_rows(lambda start, stop: _amx_share(TILE_CONFIG, x, xp, panels, out, start * AMX_BLOCK,
                                                  stop * AMX_BLOCK, 0, p, bias, hp), blocks, work)
        return
    pairs = p // 2
    bounds = threads.share_bounds(pairs, m * k * 2 * NR)
    own = pairs_buffers(len(bounds) - 1, rows, k2)
    split_rows(lambda start, stop: _amx_share(TILE_CONFIG, x, own[bounds.index(start)], panels, out, 0,
                                              blocks * AMX_BLOCK, 2 * start, 2 * stop, bias, hp), pairs,
               m * k * 2 * NR)


def matmul_bf16(x, weight: PackedWeightBF16, out=None):
    """x (M, K) float32, rows of any stride (columns contiguous) -> bf16(x) @ bf16(w) (M, N) float32, into
    `out` (contiguous rows) when given.

    Each thread rounds the rows of x it multiplies itself. With enough row blocks for every thread they split
    the rows; otherwise (a batch-1 pass past stage 0) the panels, each thread rounding all of x into a buffer of
    its own: x pairs written by one core and read by another made a 196-row GEMM up to 2x slower than one
    thread."""
    if not HAS_AVX512_BF16:
        raise RuntimeError("matmul_bf16 needs a CPU with AVX512_BF16 (vdpbf16ps)")
    out = checked_output("matmul_bf16", x, weight.shape, out)
    m, k = x.shape
    n = weight.shape[1]
    if m == 0 or k == 0:
        return out
    panels = weight.panels
    p, k2 = panels.shape[0], panels.shape[1]
    if amx.HAS_AMX_BF16:
        amx_gemm(x, panels, out)
        return out
    tiles = -(-m // MR)
    rows = pairs_rows(m)
    if m >= SPLIT_ROWS_FROM or p < 4 * threads.NUM_THREADS:
        xp = pairs_buffers(1, rows, k2)[0]
        split_rows(lambda start, stop: _tiles_share(x, xp, panels, out, start * MR, min(stop * MR, rows), 0, p),
                   tiles, MR * k * n)
        return out
    pairs = -(-p // 2)
    bounds = threads.share_bounds(pairs, m * k * 2 * NR)
    own = pairs_buffers(len(bounds) - 1, rows, k2)
    split_rows(lambda start, stop: _tiles_share(x, own[bounds.index(start)], panels, out, 0, tiles * MR, 2 * start,
                                                min(2 * stop, p)), pairs, m * k * 2 * NR)
    return out


def _unpacked(w):
    return w


# op name -> (NumPy reference, Numba kernel) of the bfloat16 op set (qnalo.models.ops: dtype="bfloat16" on the
# CPU replaces the float32 GEMM's ops by these; every other op stays float32).
OPS = {"matmul": (matmul_bf16_ref, matmul_bf16), "pack_weight": (_unpacked, PackedWeightBF16)}
