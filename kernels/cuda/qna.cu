// The QnA layer's windows (kernels/qna.py, qna_windows_ref): lv (B, H, W, nq*h + F) = x @ [folded queries | Wv];
// per output pixel (i, j), query qi and head hi, a softmax of logit + rpe over the k x k window's in-image cells
// (out-of-image cells dropped from both sums), each weight times attn_scale, summed over the queries, times the
// head's values. rpe, attn_scale (k*k, nq*h), column qi*h + hi. Window origin (s*i - p, s*j - p), p = (k-1)/2.
// One thread per (output pixel, head, chunk of FEATURE_CHUNK of the head's d features), features fastest: each
// softmax weight is made once and used for the whole chunk (QnA-ViT's heads have d = 8: one chunk), the
// chunk's sums stay in registers. Each window's own max is subtracted before exp, so large logits stay finite
// (where the official float32 code overflows). The queries go QUERY_CHUNK at a time through one pass over the
// values, so a cell's values are read once per chunk of queries, not once per query; where the layout allows
// (d a multiple of 8, rows and the values' start 16-byte aligned) they are read with vector loads.
// The window loops are what costs (ncu on an H200, k = 7: issue slots 71% busy, the integer pipe the busiest),
// so they are kept lean (attend_window): every load is an unsigned 32-bit offset from a pointer set once per
// thread, the layout and query-count branches are taken once per window (template arguments), and the queries'
// weights of a cell are summed before they meet its values. H200, 56x56x64, 8 heads, 2 queries, batch 64:
// k = 7 0.51 -> 0.37 ms, k = 3 0.146 -> 0.106 ms (the version before: a pass per query over the values for max
// and sums, 64-bit addresses recomputed per load; with exp2 by the special-function unit alone, no faster).
#include "common.cuh"

#ifndef FEATURE_CHUNK   // passed by the wrapper, qna.py (its FEATURE_CHUNK), which sizes the grid by it
#error "compile with -DFEATURE_CHUNK=<features per thread>, as kernels/cuda/qna.py does"
#endif
#define QUERY_CHUNK 2
#define LOG2E 1.4426950408889634f

// One thread's window and feature chunk: the in-image cells are rows a0 <= a < a1, columns b0 <= b < b1 of the
// k x k window; `first` points at cell (a0, b0), whose offsets are (a - a0) * row + (b - b0) * n_cols elements;
// the thread's nf <= FEATURE_CHUNK values start values_col elements into a cell.
struct Window {
    const store_t* first;
    unsigned row, n_cols, nc;
    int heads, ksize, values_col, nf, a0, a1, b0, b1;
};

// Adds to total[] the chunk of features this thread owns, weighted by NQ queries (columns c0, c0 + heads, ...)
// of its window. Two passes: each query's max and softmax denominator (online: the sum is rescaled when the max
// grows), then each cell's weights summed over the queries, times its values, so a cell's values cost 8 FMAs
// whatever NQ is. VECTOR: 8 features in vector loads, else nf <= 8 scalar ones. Logits are scaled by log2(e)
// once, so each weight is one exp2.
template <bool VECTOR, int NQ>
__device__ __forceinline__ void attend_window(const Window& win, const store_t* __restrict__ rpe,
                                              const store_t* __restrict__ attn_scale, int c0,
                                              float total[FEATURE_CHUNK]) {
    const store_t* first = win.first;
    unsigned row = win.row, n_cols = win.n_cols, nc = win.nc;
    int heads = win.heads, ksize = win.ksize, nf = win.nf, a0 = win.a0, a1 = win.a1, b0 = win.b0, b1 = win.b1;
    const store_t* logit[NQ];
    const store_t* bias[NQ];
    const store_t* scale[NQ];
    float top[NQ], den[NQ];
#pragma unroll
    for (int q = 0; q < NQ; ++q) {
        logit[q] = first + c0 + q * heads;
        bias[q] = rpe + c0 + q * heads;
        scale[q] = attn_scale + c0 + q * heads;
        top[q] = __int_as_float(0xff800000);   // -inf (no math headers under NVRTC)
        den[q] = 0.0f;
    }
    const store_t* values = first + win.values_col;
    // unsigned offsets: each address is one IMAD.WIDE.U32 from its base, not a sign-extending 64-bit add
    unsigned span = b1 - b0;
    for (unsigned a = a0, off = 0; a < (unsigned)a1; ++a, off += row)
        for (unsigned b = 0, cell = off, t = (a * ksize + b0) * nc; b < span; ++b, cell += n_cols, t += nc)
#pragma unroll
            for (int q = 0; q < NQ; ++q) {
                float z = (ld(logit[q][cell]) + ld(bias[q][t])) * LOG2E;
                float grown = fmaxf(top[q], z), e = exp2f(fminf(top[q], z) - grown);   // e = 0 at the first cell
                den[q] = z > top[q] ? den[q] * e + 1.0f : den[q] + e;
                top[q] = grown;
            }
    float inv_den[NQ];
#pragma unroll
    for (int q = 0; q < NQ; ++q) inv_den[q] = 1.0f / den[q];
    for (unsigned a = a0, off = 0; a < (unsigned)a1; ++a, off += row)
        for (unsigned b = 0, cell = off, t = (a * ksize + b0) * nc; b < span; ++b, cell += n_cols, t += nc) {
            float v[FEATURE_CHUNK];
            if (VECTOR) {
                load8_aligned(values + cell, v);
            } else {
#pragma unroll
                for (int u = 0; u < FEATURE_CHUNK; ++u) v[u] = u < nf ? ld(values[cell + u]) : 0.0f;
            }
            float weight = 0.0f;
#pragma unroll
            for (int q = 0; q < NQ; ++q)
                weight += exp2f(fmaf(ld(logit[q][cell]) + ld(bias[q][t]), LOG2E, -top[q])) * ld(scale[q][t]) *
                          inv_den[q];
#pragma unroll
            for (int u = 0; u < FEATURE_CHUNK; ++u) total[u] += weight * v[u];
        }
}

extern "C" __global__ void qna_windows(const store_t* __restrict__ lv, const store_t* __restrict__ rpe,
                                       const store_t* __restrict__ attn_scale, store_t* __restrict__ out,
                                       int batch, int height, int width, int heads, int nq, int ksize,
                                       int stride, int out_h, int out_w, int features) {
    int nc = nq * heads, n_cols = nc + features, d = features / heads, pad = (ksize - 1) / 2;
    int chunks = (d + FEATURE_CHUNK - 1) / FEATURE_CHUNK;
    // the same for every thread: no divergence
    bool vector_loads = d % FEATURE_CHUNK == 0 && (n_cols * sizeof(store_t)) % 16 == 0 &&
                        (unsigned long long)(lv + nc) % 16 == 0;
    FOR_EACH_ELEMENT(e, (long long)batch * out_h * out_w * heads * chunks) {
        int chunk = (int)(e % chunks);
        Nhwc at = nhwc_index(e / chunks, out_h, out_w, heads);
        int hi = at.c, i = at.y, j = at.x;
        int f0 = hi * d + chunk * FEATURE_CHUNK, nf = min(FEATURE_CHUNK, d - chunk * FEATURE_CHUNK);
        int y0 = i * stride - pad, x0 = j * stride - pad;
        int a0 = max(0, -y0), a1 = min(ksize, height - y0), b0 = max(0, -x0), b1 = min(ksize, width - x0);
        Window win{lv + ((at.img * height + y0 + a0) * width + x0 + b0) * n_cols, (unsigned)(width * n_cols),
                   (unsigned)n_cols, (unsigned)nc, heads, ksize, nc + f0, nf, a0, a1, b0, b1};
        float total[FEATURE_CHUNK];
#pragma unroll
        for (int u = 0; u < FEATURE_CHUNK; ++u) total[u] = 0.0f;
        for (int q0 = 0; q0 < nq; q0 += QUERY_CHUNK) {
            int c0 = q0 * heads + hi;
            bool pair = nq - q0 >= QUERY_CHUNK;
            if (vector_loads && pair)
                attend_window<true, QUERY_CHUNK>(win, rpe, attn_scale, c0, total);
            else if (vector_loads)
                attend_window<true, 1>(win, rpe, attn_scale, c0, total);
            else if (pair)
                attend_window<false, QUERY_CHUNK>(win, rpe, attn_scale, c0, total);
            else
                attend_window<false, 1>(win, rpe, attn_scale, c0, total);
        }
        store_t* o = out + ((at.img * out_h + i) * out_w + j) * features + f0;
#pragma unroll
        for (int u = 0; u < FEATURE_CHUNK; ++u)
            if (u < nf) o[u] = st(total[u]);
    }
}
