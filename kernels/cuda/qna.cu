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
#include "common.cuh"

#define FEATURE_CHUNK 8
#define QUERY_CHUNK 2

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
        // element offset of the window's (virtual) top-left cell; cell (a, b) is origin + (a * width + b) * n_cols
        long long origin = ((at.img * height + y0) * width + x0) * n_cols;
        float total[FEATURE_CHUNK];
#pragma unroll
        for (int u = 0; u < FEATURE_CHUNK; ++u) total[u] = 0.0f;
        for (int q0 = 0; q0 < nq; q0 += QUERY_CHUNK) {
            int nqc = min(QUERY_CHUNK, nq - q0);
            float top[QUERY_CHUNK], den[QUERY_CHUNK], num[QUERY_CHUNK][FEATURE_CHUNK];
#pragma unroll
            for (int q = 0; q < QUERY_CHUNK; ++q) {
                top[q] = __int_as_float(0xff800000);   // -inf (no math headers under NVRTC)
                den[q] = 0.0f;
#pragma unroll
                for (int u = 0; u < FEATURE_CHUNK; ++u) num[q][u] = 0.0f;
            }
            for (int a = a0; a < a1; ++a)
                for (int b = b0; b < b1; ++b) {
                    const store_t* cell = lv + (origin + (a * width + b) * n_cols);
                    const store_t* bias = rpe + (a * ksize + b) * nc;
#pragma unroll
                    for (int q = 0; q < QUERY_CHUNK; ++q)
                        if (q < nqc) {
                            int c = (q0 + q) * heads + hi;
                            top[q] = fmaxf(top[q], ld(cell[c]) + ld(bias[c]));
                        }
                }
            for (int a = a0; a < a1; ++a)
                for (int b = b0; b < b1; ++b) {
                    const store_t* cell = lv + (origin + (a * width + b) * n_cols);
                    int t = (a * ksize + b) * nc;
                    float v[FEATURE_CHUNK];
                    if (vector_loads) {
                        load8_aligned(cell + nc + f0, v);
                    } else {
#pragma unroll
                        for (int u = 0; u < FEATURE_CHUNK; ++u) v[u] = u < nf ? ld(cell[nc + f0 + u]) : 0.0f;
                    }
#pragma unroll
                    for (int q = 0; q < QUERY_CHUNK; ++q)
                        if (q < nqc) {
                            int c = (q0 + q) * heads + hi;
                            float w = expf(ld(cell[c]) + ld(rpe[t + c]) - top[q]);
                            den[q] += w;
                            float ws = w * ld(attn_scale[t + c]);
#pragma unroll
                            for (int u = 0; u < FEATURE_CHUNK; ++u) num[q][u] += ws * v[u];
                        }
                }
#pragma unroll
            for (int q = 0; q < QUERY_CHUNK; ++q)
                if (q < nqc) {
#pragma unroll
                    for (int u = 0; u < FEATURE_CHUNK; ++u) total[u] += num[q][u] / den[q];
                }
        }
        store_t* o = out + ((at.img * out_h + i) * out_w + j) * features + f0;
#pragma unroll
        for (int u = 0; u < FEATURE_CHUNK; ++u)
            if (u < nf) o[u] = st(total[u]);
    }
}
