"""float32 GEMM with pre-packed weights: y (M, N) = x (M, K) @ w (K, N), the NumPy reference being x @ w.

Every linear layer of a model multiplies activations by a fixed weight, so the weight is packed once, at
load time, into panels of 16 columns, (P, K, 16), P = ceil(N / 16), zero-padded: a micro-kernel then reads
it as one contiguous stream. The loop nest is BLIS's, with the weight already packed and x read in place:

    for each M block (MC)            -> its partial last tile packed once
      for each K block (KC)          -> x[rows, K block] stays in L2; the later blocks add into y
        for each weight panel        -> KC x 16, stays in L1 while
          for each 6 rows            -> a 6x16 tile of y: 12 vec8 accumulators in registers

An x small enough to stay in L2 whole (X_IN_L2: batch 1 past stage 0) is one M block, and its panels and K
blocks swap: each panel is taken over all of K before the next, so the weight, which no cache holds between
calls, streams from memory once and in order (LITv2-S batch 1: 0.86-0.93x the time of those GEMMs). Every
element is summed in the same order in both, so the outputs are the same bits.

Threads split the rows (large M) or the panels (small M) between them; each output element is summed in
the same order either way, so the result does not depend on the thread count.

On a CPU with AVX-512 (simd.HAS_AVX512) the tile is 6x32: two panels side by side, a 16-lane vector of each
per row, still 12 accumulators, now of 32 registers; it sums each element exactly as the 6x16 tile does, so
the outputs are the same bits either way. On this project's Zen 5 machine it doubled the GEMM's speed
(one thread, LITv2-S shapes: 87-117 -> 149-210 GFLOP/s).

Alone, on the LITv2 shapes (benchmarks/bench_gemm.py, 2 threads), it took 0.9-1.15x the time of NumPy's
OpenBLAS on the large shapes and 1.3-1.4x on the small ones with the 6x16 tile on an AVX2-class machine, and
0.57-1.03x (by the mean) with the 6x32 tile on the Zen 5 one. In a whole LITv2-S pass it also leaves no BLAS
threads spinning on the other core after each call, which had slowed the Numba kernels that run between the
GEMMs."""
import math

import numba as nb
import numpy as np

from . import threads
from ._jit import array, inline_kernel, kernel, one_signature_kernel
from .threads import split_rows
from .simd import (HAS_AVX512, prefetch, vadd, vbroadcast, vfma, vload, vstore, vzero, wadd, wbroadcast, wfma, wload,
                   wstore, wzero)

MR, NR = 6, 16          # micro-tile: 6 rows x 16 columns = 12 accumulators of 8 lanes (+2 B, 1 A: 15 of 16 ymm)
KC = 256                # K block: the 16 x KC weight panel (16 KiB) stays in L1
MC = 120                # M block: x's 120 x 256 block (120 KiB) stays in L2 while the panels pass over it
X_IN_L2 = 3 << 16       # floats (768 KiB, 3/4 of an L2 here): an x this small stays there whole while each
                        # panel is taken over all of K in turn (gemm_tiles)
ALIGN = 16              # floats (64 bytes, a cache line): where packed panels and new outputs start, so that no
                        # 16-lane load or store of a panel row or an output tile straddles two lines


def aligned_empty(shape):
    """np.empty(shape, float32), its first element on a cache line (NumPy only promises 16 bytes). A 16-lane
    store that straddles two lines costs an Intel core two (an output tile's 12 of them per 6x32 tile):
    outputs that start 16 bytes into a line cost LITv2-S's GEMMs ~5-15% on an Intel Xeon with AVX-512, one
    thread, aligned and unaligned alternating."""
    size = math.prod(shape)
    buffer = np.empty(size + ALIGN - 1, np.float32)
    start = (-(buffer.ctypes.data // 4)) % ALIGN
    return buffer[start:start + size].reshape(shape)


def matmul_ref(x, w, out=None):
    """The reference: x (M, K) @ w (K, N) -> (M, N) float32, into `out` when given."""
    return np.matmul(x, w, out=out)


class PackedWeight:
    """A (K, N) float32 weight packed into (P, K, 16) column panels for `matmul`."""

    def __init__(self, w):
        k, n = w.shape
        full, rest = divmod(n, NR)
        self.panels = aligned_empty((full + (rest > 0), k, NR))           # (P, K, 16), copied in place:
        self.panels[:full] = w[:, :full * NR].reshape(k, full, NR).transpose(1, 0, 2)   # no temporaries
        if rest:
            self.panels[full, :, :rest] = w[:, full * NR:]
            self.panels[full, :, rest:] = 0.0
        self.shape = (k, n)

    def unpack(self):
        k, n = self.shape
        return self.panels.transpose(1, 0, 2).reshape(k, -1)[:, :n]


@kernel()
def _pack_rows(x, i0, mc, k0, kc, out):
    """x[i0:i0+mc, k0:k0+kc] -> out as ceil(mc/6) micro-panels (kc, 6), rows past mc zero."""
    for t in range((mc + MR - 1) // MR):
        base = t * kc * MR
        for r in range(MR):
            i = t * MR + r
            if i < mc:
                for k in range(kc):
                    out[base + k * MR + r] = x[i0 + i, k0 + k]
            else:
                for k in range(kc):
                    out[base + k * MR + r] = np.float32(0.0)


@kernel()
def _rank1(a, ia, rs, b, ib, acc):
    """acc += a[ia + r*rs for r < 6]^T (x) b[ib:ib+16]: one k step of the 6x16 tile."""
    b0 = vload(b, ib)
    b1 = vload(b, ib + 8)
    x0 = vbroadcast(a, ia)
    x1 = vbroadcast(a, ia + rs)
    x2 = vbroadcast(a, ia + 2 * rs)
    x3 = vbroadcast(a, ia + 3 * rs)
    x4 = vbroadcast(a, ia + 4 * rs)
    x5 = vbroadcast(a, ia + 5 * rs)
    return (vfma(x0, b0, acc[0]), vfma(x0, b1, acc[1]), vfma(x1, b0, acc[2]), vfma(x1, b1, acc[3]),
            vfma(x2, b0, acc[4]), vfma(x2, b1, acc[5]), vfma(x3, b0, acc[6]), vfma(x3, b1, acc[7]),
            vfma(x4, b0, acc[8]), vfma(x4, b1, acc[9]), vfma(x5, b0, acc[10]), vfma(x5, b1, acc[11]))


@kernel()
def _tile(a, ia, rs, ks, b, ib, kc, ahead, lines):
    """The 6x16 tile of six rows of a (row r, step k at a.flat[ia + r*rs + k*ks]) times one weight panel
    over kc steps, unrolled by 4; its first `lines` k steps also prefetch a line of b each, from ahead on."""
    z = vzero()
    acc = (z, z, z, z, z, z, z, z, z, z, z, z)
    for i in range(kc // 4):
        if 4 * i < lines:
            for line in range(4):
                prefetch(b, ahead + line * NR)
            ahead += 4 * NR
        acc = _rank1(a, ia, rs, b, ib, acc)
        acc = _rank1(a, ia + ks, rs, b, ib + NR, acc)
        acc = _rank1(a, ia + 2 * ks, rs, b, ib + 2 * NR, acc)
        acc = _rank1(a, ia + 3 * ks, rs, b, ib + 3 * NR, acc)
        ia += 4 * ks
        ib += 4 * NR
    for _ in range(kc % 4):
        acc = _rank1(a, ia, rs, b, ib, acc)
        ia += ks
        ib += NR
    return acc


@kernel()
def _store_row(y, iy, v0, v1, accumulate):
    if accumulate:
        v0 = vadd(v0, vload(y, iy))
        v1 = vadd(v1, vload(y, iy + 8))
    vstore(y, iy, v0)
    vstore(y, iy + 8, v1)


@kernel()
def _store_tile(y, iy, ldy, acc, accumulate):
    """Write (or add) a full 6x16 tile into y at flat offset iy, row stride ldy."""
    _store_row(y, iy, acc[0], acc[1], accumulate)
    _store_row(y, iy + ldy, acc[2], acc[3], accumulate)
    _store_row(y, iy + 2 * ldy, acc[4], acc[5], accumulate)
    _store_row(y, iy + 3 * ldy, acc[6], acc[7], accumulate)
    _store_row(y, iy + 4 * ldy, acc[8], acc[9], accumulate)
    _store_row(y, iy + 5 * ldy, acc[10], acc[11], accumulate)


@kernel()
def _copy_edge(y, row, col, scratch, width, rows, cols, accumulate):
    """Write (or add) the top-left rows x cols of a tile spilled to scratch (rows `width` apart) into
    y[row:, col:]."""
    for r in range(rows):
        for j in range(cols):
            if accumulate:
                y[row + r, col + j] += scratch[width * r + j]
            else:
                y[row + r, col + j] = scratch[width * r + j]


@kernel()
def _store(y, row, col, acc, rows, cols, accumulate, scratch):
    """Write (or add) the top-left rows x cols of a 6x16 tile into y[row:, col:] (through scratch unless whole)."""
    if rows == MR and cols == NR:
        ldy = y.strides[0] // 4
        _store_tile(y, row * ldy + col, ldy, acc, accumulate)
        return
    for r in range(MR):
        vstore(scratch, NR * r, acc[2 * r])
        vstore(scratch, NR * r + 8, acc[2 * r + 1])
    _copy_edge(y, row, col, scratch, NR, rows, cols, accumulate)


# -- the 6x32 tile of CPUs with AVX-512 (simd.HAS_AVX512): two weight panels side by side, one 16-lane vector
# of each per row, 12 accumulators of the 32 registers. Each element is summed exactly as in the 6x16 tile
# (one FMA per k step, in order), so the result does not depend on which tile computed it.

@kernel()
def _wide_rank1(a, ia, rs, b, ib, ib2, acc):
    """acc += a[ia + r*rs for r < 6]^T (x) [b[ib:ib+16] | b[ib2:ib2+16]]: one k step of the 6x32 tile."""
    b0 = wload(b, ib)
    b1 = wload(b, ib2)
    x0 = wbroadcast(a, ia)
    x1 = wbroadcast(a, ia + rs)
    x2 = wbroadcast(a, ia + 2 * rs)
    x3 = wbroadcast(a, ia + 3 * rs)
    x4 = wbroadcast(a, ia + 4 * rs)
    x5 = wbroadcast(a, ia + 5 * rs)
    return (wfma(x0, b0, acc[0]), wfma(x0, b1, acc[1]), wfma(x1, b0, acc[2]), wfma(x1, b1, acc[3]),
            wfma(x2, b0, acc[4]), wfma(x2, b1, acc[5]), wfma(x3, b0, acc[6]), wfma(x3, b1, acc[7]),
            wfma(x4, b0, acc[8]), wfma(x4, b1, acc[9]), wfma(x5, b0, acc[10]), wfma(x5, b1, acc[11]))


@kernel()
def _wide_tile(a, ia, rs, ks, b, ib, ib2, kc, ahead, ahead2, lines):
    """As _tile, for the two panels at ib and ib2; its first `lines` k steps also prefetch a line of each of two
    other streams of b, at ahead and ahead2 on."""
    z = wzero()
    acc = (z, z, z, z, z, z, z, z, z, z, z, z)
    for i in range(kc // 4):
        if 4 * i < lines:
            for line in range(4):
                prefetch(b, ahead + line * NR)
                prefetch(b, ahead2 + line * NR)
            ahead += 4 * NR
            ahead2 += 4 * NR
        acc = _wide_rank1(a, ia, rs, b, ib, ib2, acc)
        acc = _wide_rank1(a, ia + ks, rs, b, ib + NR, ib2 + NR, acc)
        acc = _wide_rank1(a, ia + 2 * ks, rs, b, ib + 2 * NR, ib2 + 2 * NR, acc)
        acc = _wide_rank1(a, ia + 3 * ks, rs, b, ib + 3 * NR, ib2 + 3 * NR, acc)
        ia += 4 * ks
        ib += 4 * NR
        ib2 += 4 * NR
    for _ in range(kc % 4):
        acc = _wide_rank1(a, ia, rs, b, ib, ib2, acc)
        ia += ks
        ib += NR
        ib2 += NR
    return acc


@kernel()
def _wide_store_row(y, iy, v0, v1, halves, accumulate):
    """Write (or add) the first `halves` (1 or 2) 16-lane halves of a tile row at y.flat[iy]."""
    if accumulate:
        v0 = wadd(v0, wload(y, iy))
    wstore(y, iy, v0)
    if halves == 2:
        if accumulate:
            v1 = wadd(v1, wload(y, iy + NR))
        wstore(y, iy + NR, v1)


@kernel()
def _wide_store(y, row, col, acc, rows, cols, accumulate, scratch):
    """Write (or add) the top-left rows x cols of a 6x32 tile into y[row:, col:] (through scratch unless whole
    rows of one or both panels)."""
    if rows == MR and (cols == NR or cols == 2 * NR):
        ldy = y.strides[0] // 4
        for r in range(MR):
            _wide_store_row(y, (row + r) * ldy + col, acc[2 * r], acc[2 * r + 1], cols // NR, accumulate)
        return
    for r in range(MR):
        wstore(scratch, 2 * NR * r, acc[2 * r])
        wstore(scratch, 2 * NR * r + NR, acc[2 * r + 1])
    _copy_edge(y, row, col, scratch, 2 * NR, rows, cols, accumulate)


@inline_kernel()
def _panel_times_rows(x, i0, mc, k0, kc, edge, edge_at, panels, p, y, scratch, ahead, ahead_kc):
    """y[i0:i0+mc, panel p] (+)= x[i0:i0+mc, k0:k0+kc] @ the panel's K block by the 6x16 tile: the full 6-row
    tiles read x in place, the partial last one reads `edge` (its rows packed, zero-padded to 6, at edge_at);
    the first K block writes, the later ones add. The tiles prefetch in turn a share of the next weight block's
    ahead_kc lines, at ahead: it streams in from memory while this block is computed from the caches, instead
    of stalling the next block's first tile."""
    ldx = x.strides[0] // 4
    cols = min(NR, y.shape[1] - p * NR)
    ib = (p * x.shape[1] + k0) * NR
    full = mc // MR
    tiles = -(-mc // MR)
    share = -(-ahead_kc // tiles)
    for t in range(tiles):
        rows = min(MR, mc - t * MR)
        lines = min(share, ahead_kc - t * share)
        if t < full:
            acc = _tile(x, (i0 + t * MR) * ldx + k0, ldx, 1, panels, ib, kc, ahead + t * share * NR, lines)
        else:
            acc = _tile(edge, edge_at, 1, MR, panels, ib, kc, ahead + t * share * NR, lines)
        _store(y, i0 + t * MR, p * NR, acc, rows, cols, k0 > 0, scratch)


@inline_kernel()
def _panel_pair_times_rows(x, i0, mc, k0, kc, edge, edge_at, panels, p, p1, y, scratch, ahead, ahead2, ahead_kc):
    """As _panel_times_rows for panels p and p+1 by the 6x32 tile, its tiles prefetching in turn a share of the
    next block's ahead_kc lines of each panel (at ahead and ahead2). A last single panel (p + 1 = p1) fills both
    halves of the tile and its second half is dropped: the tile sums each element as the 6x16 one does, so
    the 6x16 tile's code is left out of this kernel."""
    ldx = x.strides[0] // 4
    cols = min(2 * NR if p + 1 < p1 else NR, y.shape[1] - p * NR)
    ib = (p * x.shape[1] + k0) * NR
    ib2 = ib + x.shape[1] * NR if p + 1 < p1 else ib        # the next panel, at the same k
    full = mc // MR
    tiles = -(-mc // MR)
    share = -(-ahead_kc // tiles)
    for t in range(tiles):
        rows = min(MR, mc - t * MR)
        lines = min(share, ahead_kc - t * share)
        at, at2 = ahead + t * share * NR, ahead2 + t * share * NR
        if t < full:
            acc = _wide_tile(x, (i0 + t * MR) * ldx + k0, ldx, 1, panels, ib, ib2, kc, at, at2, lines)
        else:
            acc = _wide_tile(edge, edge_at, 1, MR, panels, ib, ib2, kc, at, at2, lines)
        _wide_store(y, i0 + t * MR, p * NR, acc, rows, cols, k0 > 0, scratch)


@inline_kernel()
def _block_order(step, steps, k_blocks, whole):
    """(panel step, K block) of a GEMM block's step: each panel over all of K in turn when x stays in L2 whole,
    else each K block over all the panels."""
    return (step // k_blocks, step % k_blocks) if whole else (step % steps, step // steps)


def _gemm_block_kernel(wide):
    """The GEMM kernel for one tile, the other's code left out (wide, a closure variable, is a constant to
    Numba): on an AVX-512 CPU the 6x16 tile took ~0.9 s of the kernel's ~2.8 s to compile."""

    @one_signature_kernel(array(2, "A", readonly=True), array(3, readonly=True), array(2, "A"), nb.int64,
                          nb.int64, nb.int64, nb.int64)
    def gemm_tiles(x, panels, y, m0, m1, p0, p1):
        """y[m0:m1, panels p0:p1] = x[m0:m1] @ w for the weight packed as `panels` (P, K, 16), by pairs of
        panels on the AVX-512 6x32 tile if wide, else by the 6x16 one (the same sums).

        x's rows may have any stride (its columns are contiguous). Full 6-row tiles read x in place: packing x
        (as BLIS does) measured slower here, a scalar copy costing as much as the products with 4-6 panels.
        Only the last partial tile of each M block is copied, zero-padded to 6 rows."""
        k_total = x.shape[1]
        k_blocks = -(-k_total // KC)
        steps = -(-(p1 - p0) // 2) if wide else p1 - p0       # tiles across the panels: pairs, or single panels
        # an x that stays in L2 whole is one M block, and each panel is taken over all of K before the next:
        # the weight, read once, streams from memory in order (a batch-1 pass past stage 0)
        whole = (m1 - m0) * k_total <= X_IN_L2
        block = max(m1 - m0, 1) if whole else MC               # (an empty block of rows does nothing)
        scratch = np.empty(MR * 2 * NR, np.float32)
        edge = np.empty(MR * k_total, np.float32)              # an M block's partial tile, zero-padded, all of K
        for i0 in range(m0, m1, block):
            mc = min(block, m1 - i0)
            full = mc // MR * MR
            _pack_rows(x, i0 + full, mc - full, 0, k_total, edge)
            for step in range(steps * k_blocks):
                across, down = _block_order(step, steps, k_blocks, whole)
                k0 = down * KC
                # the next step's weight block, prefetched while this one is computed
                ahead_across, ahead_down = _block_order(step + 1, steps, k_blocks, whole)
                ahead_kc = min(KC, k_total - ahead_down * KC) if step + 1 < steps * k_blocks else 0
                if wide:
                    ahead = ((p0 + 2 * ahead_across) * k_total + ahead_down * KC) * NR
                    ahead2 = ahead + k_total * NR if p0 + 2 * ahead_across + 1 < p1 else ahead
                    _panel_pair_times_rows(x, i0, mc, k0, min(KC, k_total - k0), edge, k0 * MR, panels,
                                           p0 + 2 * across, p1, y, scratch, ahead, ahead2, ahead_kc)
                else:
                    ahead = ((p0 + ahead_across) * k_total + ahead_down * KC) * NR
                    _panel_times_rows(x, i0, mc, k0, min(KC, k_total - k0), edge, k0 * MR, panels, p0 + across, y,
                                      scratch, ahead, ahead_kc)
    return gemm_tiles


# wide -> the GEMM kernel by that tile (the tests run both; the 6x32 tile runs, slower, on any x86 CPU)
GEMM_BLOCKS = {wide: _gemm_block_kernel(wide) for wide in (False, True)}
gemm_tiles = GEMM_BLOCKS[HAS_AVX512]   # the kernel this CPU runs (and the kernels that call it)


# From this many rows a GEMM's threads split the rows (each reads all of the weight); below, the panels.
SPLIT_ROWS_FROM = 512


def check_input(name, x, shape):
    """ValueError saying what does not fit, unless x is (M, K) float32 with contiguous rows for a (K, N) weight
    of `shape`."""
    k = x.shape[1]
    if shape[0] != k:
        raise ValueError(f"{name}: x has {k} columns but the weight has {shape[0]} rows")
    if x.dtype != np.float32 or (x.size and k > 1 and x.strides[1] != 4):
        raise ValueError(f"{name}: x must be float32 with contiguous rows, got {x.dtype} strides {x.strides}")


def output_array(name, m, n, out):
    """`out` checked to be float32 (m, n) with contiguous rows, or a new one."""
    if out is None:
        return aligned_empty((m, n))
    if out.shape != (m, n) or out.dtype != np.float32 or (out.size and n > 1 and out.strides[1] != 4):
        raise ValueError(f"{name}: out must be float32 ({m}, {n}) with contiguous rows, got {out.dtype} "
                         f"{out.shape} strides {out.strides}")
    return out


def checked_output(name, x, shape, out):
    """The output of GEMM `name` of x (M, K) float32 with contiguous rows and a (K, N) weight of `shape`: `out`
    checked, or a new one; ValueError saying what does not fit. Filled with 0 already when K = 0."""
    check_input(name, x, shape)
    out = output_array(name, x.shape[0], shape[1], out)
    if x.shape[1] == 0:
        out[...] = 0.0
    return out


def matmul(x, weight: PackedWeight, out=None):
    """x (M, K) float32, rows of any stride -> x @ w (M, N) float32, into `out` (contiguous rows) when given."""
    out = checked_output("matmul", x, weight.shape, out)
    m, k = x.shape
    n = weight.shape[1]
    if m == 0 or k == 0:
        return out
    panels = weight.panels
    p = panels.shape[0]
    if m >= SPLIT_ROWS_FROM or p < 2 * threads.NUM_THREADS:
        tiles = -(-m // MR)
        split_rows(lambda s, e: gemm_tiles(x, panels, out, s * MR, min(e * MR, m), 0, p), tiles, MR * k * n)
    else:
        split_rows(lambda s, e: gemm_tiles(x, panels, out, 0, m, s, e), p, m * k * NR)
    return out


def _float32_empty(shape):
    return np.empty(shape, np.float32)


def _unpacked(w):
    return w


# op name -> (NumPy reference, Numba kernel): qnalo.models.ops builds its op sets from these tables. A weight is
# packed once (the reference keeps it as it is), and a GEMM output starts on a cache line.
OPS = {"matmul": (matmul_ref, matmul), "pack_weight": (_unpacked, PackedWeight),
       "empty": (_float32_empty, aligned_empty)}
