// QnA-ViT's window self-attention (kernels/window_msa.py, window_msa_ref): qkv (B, H, W, 3C) in the official
// per-head interleaved order (head hi: columns hi*3d + [q | k | v]), w x w windows that tile the map, no shift;
// softmax((q * scale) . k + rel_bias[hi, query, key]) @ v; out (B, H, W, C), head hi in columns hi*d + [0, d).
// One thread per (token, head), online softmax over the window's keys; head_dim <= MAX_HEAD_DIM.
#include "common.cuh"

#define MAX_HEAD_DIM 128

extern "C" __global__ void window_msa(const store_t* __restrict__ qkv, const store_t* __restrict__ rel_bias,
                                      store_t* __restrict__ out, int batch, int height, int width, int heads,
                                      int head_dim, int ws, float scale) {
    int chans = heads * head_dim, seq = ws * ws;
    FOR_EACH_ELEMENT(e, (long long)batch * height * width * heads) {
        Nhwc at = nhwc_index(e, height, width, heads);
        int hd = at.c;
        const store_t* qrow = qkv + ((at.img * height + at.y) * width + at.x) * 3 * chans + hd * 3 * head_dim;
        float q[MAX_HEAD_DIM], acc[MAX_HEAD_DIM];
        for (int j = 0; j < head_dim; ++j) {
            q[j] = ld(qrow[j]) * scale;
            acc[j] = 0.0f;
        }
        int gy = at.y / ws * ws, gx = at.x / ws * ws;
        const store_t* bias = rel_bias + ((long long)hd * seq + (at.y - gy) * ws + (at.x - gx)) * seq;
        float top = __int_as_float(0xff800000), den = 0.0f;   // running max (-inf) and sum of exp
        for (int s = 0; s < seq; ++s) {
            const store_t* krow = qkv + ((at.img * height + gy + s / ws) * width + gx + s % ws) * 3 * chans
                                + hd * 3 * head_dim + head_dim;
            float z = ld(bias[s]);
            for (int j = 0; j < head_dim; ++j) z += q[j] * ld(krow[j]);
            float grown = fmaxf(top, z), rescale = expf(top - grown), p = expf(z - grown);
            den = den * rescale + p;
            for (int j = 0; j < head_dim; ++j) acc[j] = acc[j] * rescale + p * ld(krow[head_dim + j]);
            top = grown;
        }
        store_t* orow = out + ((at.img * height + at.y) * width + at.x) * chans + hd * head_dim;
        for (int j = 0; j < head_dim; ++j) orow[j] = st(acc[j] / den);
    }
}
