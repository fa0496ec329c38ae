// The QnA layer's windows (kernels/qna.py, qna_windows_ref): lv (B, H, W, nq*h + F) = x @ [folded queries | Wv];
// per output pixel (i, j), query qi and head hi, a softmax of logit + rpe over the k x k window's in-image cells
// (out-of-image cells dropped from both sums), each weight times attn_scale, summed over the queries, times the
// head's values. rpe, attn_scale (k*k, nq*h), column qi*h + hi. Window origin (s*i - p, s*j - p), p = (k-1)/2.
// One thread per (output pixel, head, chunk of FEATURE_CHUNK of the head's d features), features fastest: each
// softmax weight is made once and used for the whole chunk (QnA-ViT's heads have d = 8: one chunk), the
// chunk's sums stay in registers, and a warp's reads of the values are contiguous. Each window's own max is
// subtracted before exp, so large logits stay finite (where the official float32 code overflows).
#include "common.cuh"

#define FEATURE_CHUNK 8

extern "C" __global__ void qna_windows(const store_t* __restrict__ lv, const store_t* __restrict__ rpe,
                                       const store_t* __restrict__ attn_scale, store_t* __restrict__ out,
                                       int batch, int height, int width, int heads, int nq, int ksize,
                                       int stride, int out_h, int out_w, int features) {
    int nc = nq * heads, n_cols = nc + features, d = features / heads, pad = (ksize - 1) / 2;
    int chunks = (d + FEATURE_CHUNK - 1) / FEATURE_CHUNK;
    FOR_EACH_ELEMENT(e, (long long)batch * out_h * out_w * heads * chunks) {
        int chunk = (int)(e % chunks);
        Nhwc at = nhwc_index(e / chunks, out_h, out_w, heads);
        int hi = at.c, i = at.y, j = at.x;
        int f0 = hi * d + chunk * FEATURE_CHUNK, nf = min(FEATURE_CHUNK, d - chunk * FEATURE_CHUNK);
        int y0 = i * stride - pad, x0 = j * stride - pad;
        int a0 = max(0, -y0), a1 = min(ksize, height - y0), b0 = max(0, -x0), b1 = min(ksize, width - x0);
        float total[FEATURE_CHUNK];
#pragma unroll
        for (int u = 0; u < FEATURE_CHUNK; ++u) total[u] = 0.0f;
        for (int qi = 0; qi < nq; ++qi) {
            int c = qi * heads + hi;
            float top = __int_as_float(0xff800000);   // -inf (no math headers under NVRTC)
            for (int a = a0; a < a1; ++a)
                for (int b = b0; b < b1; ++b) {
                    long long cell = ((at.img * height + y0 + a) * width + x0 + b) * n_cols;
                    top = fmaxf(top, ld(lv[cell + c]) + ld(rpe[(a * ksize + b) * nc + c]));
                }
            float den = 0.0f, num[FEATURE_CHUNK];
#pragma unroll
            for (int u = 0; u < FEATURE_CHUNK; ++u) num[u] = 0.0f;
            for (int a = a0; a < a1; ++a)
                for (int b = b0; b < b1; ++b) {
                    long long cell = ((at.img * height + y0 + a) * width + x0 + b) * n_cols;
                    int t = (a * ksize + b) * nc + c;
                    float w = expf(ld(lv[cell + c]) + ld(rpe[t]) - top);
                    den += w;
                    float ws = w * ld(attn_scale[t]);
                    const store_t* v = lv + cell + nc + f0;
#pragma unroll
                    for (int u = 0; u < FEATURE_CHUNK; ++u)
                        if (u < nf) num[u] += ws * ld(v[u]);
                }
#pragma unroll
            for (int u = 0; u < FEATURE_CHUNK; ++u) total[u] += num[u] / den;
        }
        store_t* o = out + ((at.img * out_h + i) * out_w + j) * features + f0;
#pragma unroll
        for (int u = 0; u < FEATURE_CHUNK; ++u)
            if (u < nf) o[u] = st(total[u]);
    }
}
