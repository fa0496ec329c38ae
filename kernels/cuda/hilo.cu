// LITv2's HiLo branches (kernels/hilo.py): the references there define every index and padding rule.
// Hi-Fi: attention inside ws x ws windows of the map zero-padded bottom/right to a multiple of ws (a padded
// token's k and v are the biases alone); Lo-Fi: every query attends to the M keys of the ws x ws-averaged map.
// One thread per (query token, head), online softmax; head_dim <= MAX_HEAD_DIM.
#include "common.cuh"

#define MAX_HEAD_DIM 128

// pooled (B, ceil(H/ws), ceil(W/ws), C) = mean over each ws x ws block of the zero-padded x (B, H, W, C)
extern "C" __global__ void window_avgpool(const store_t* __restrict__ x, store_t* __restrict__ pooled, int batch,
                                          int height, int width, int chans, int ws) {
    int gh = (height + ws - 1) / ws, gw = (width + ws - 1) / ws;
    float inv = 1.0f / (float)(ws * ws);
    FOR_EACH_ELEMENT(e, (long long)batch * gh * gw * chans) {
        Nhwc at = nhwc_index(e, gh, gw, chans);
        float s = 0.0f;
        for (int y = at.y * ws; y < min(at.y * ws + ws, height); ++y)
            for (int x0 = at.x * ws; x0 < min(at.x * ws + ws, width); ++x0)
                s += ld(x[((at.img * height + y) * width + x0) * chans + at.c]);
        pooled[e] = st(s * inv);
    }
}

// qkv (B, H, W, qkv_cols), columns [0, 3*heads*hd) = (q|k|v) x head x hd without bias; out (B, H, W, out_cols),
// head hd's output in columns hd*head_dim + [0, head_dim)
extern "C" __global__ void hifi_attention(const store_t* __restrict__ qkv, const store_t* __restrict__ qkv_bias,
                                          store_t* __restrict__ out, int batch, int height, int width, int qkv_cols,
                                          int out_cols, int heads, int head_dim, int ws, float scale) {
    int dim = heads * head_dim;
    FOR_EACH_ELEMENT(e, (long long)batch * height * width * heads) {
        Nhwc at = nhwc_index(e, height, width, heads);
        int hd = at.c, qo = hd * head_dim, ko = dim + qo, vo = 2 * dim + qo;
        const store_t* qrow = qkv + ((at.img * height + at.y) * width + at.x) * qkv_cols;
        float q[MAX_HEAD_DIM], acc[MAX_HEAD_DIM];
        for (int j = 0; j < head_dim; ++j) {
            q[j] = ld(qrow[qo + j]) + ld(qkv_bias[qo + j]);
            acc[j] = 0.0f;
        }
        int gy = at.y / ws * ws, gx = at.x / ws * ws;
        float top = __int_as_float(0xff800000), den = 0.0f;
        for (int s = 0; s < ws * ws; ++s) {
            int ky = gy + s / ws, kx = gx + s % ws;
            bool inside = ky < height && kx < width;
            const store_t* krow = qkv + ((at.img * height + (inside ? ky : 0)) * width + (inside ? kx : 0)) * qkv_cols;
            float z = 0.0f;
            for (int j = 0; j < head_dim; ++j) z += q[j] * ((inside ? ld(krow[ko + j]) : 0.0f) + ld(qkv_bias[ko + j]));
            z *= scale;
            float grown = fmaxf(top, z), rescale = expf(top - grown), p = expf(z - grown);
            den = den * rescale + p;
            for (int j = 0; j < head_dim; ++j)
                acc[j] = acc[j] * rescale + p * ((inside ? ld(krow[vo + j]) : 0.0f) + ld(qkv_bias[vo + j]));
            top = grown;
        }
        store_t* orow = out + ((at.img * height + at.y) * width + at.x) * out_cols + qo;
        for (int j = 0; j < head_dim; ++j) orow[j] = st(acc[j] / den);
    }
}

// queries qkv (B, N, qkv_cols) columns [q_col, q_col + heads*hd) without bias; kv (B, M, 2*heads*hd) = (k|v) x
// head x hd without bias; out (B, N, out_cols), columns out_col + hd*head_dim + [0, head_dim)
extern "C" __global__ void lofi_attention(const store_t* __restrict__ qkv, const store_t* __restrict__ q_bias,
                                          const store_t* __restrict__ kv, const store_t* __restrict__ kv_bias,
                                          store_t* __restrict__ out, int batch, int tokens, int qkv_cols, int q_col,
                                          int keys, int out_cols, int out_col, int heads, int head_dim, float scale) {
    int dim = heads * head_dim;
    FOR_EACH_ELEMENT(e, (long long)batch * tokens * heads) {
        int hd = (int)(e % heads);
        long long tok = e / heads, img = tok / tokens;
        const store_t* qrow = qkv + tok * qkv_cols + q_col + hd * head_dim;
        float q[MAX_HEAD_DIM], acc[MAX_HEAD_DIM];
        for (int j = 0; j < head_dim; ++j) {
            q[j] = ld(qrow[j]) + ld(q_bias[hd * head_dim + j]);
            acc[j] = 0.0f;
        }
        float top = __int_as_float(0xff800000), den = 0.0f;
        for (int s = 0; s < keys; ++s) {
            const store_t* krow = kv + (img * keys + s) * 2 * dim + hd * head_dim;
            float z = 0.0f;
            for (int j = 0; j < head_dim; ++j) z += q[j] * (ld(krow[j]) + ld(kv_bias[hd * head_dim + j]));
            z *= scale;
            float grown = fmaxf(top, z), rescale = expf(top - grown), p = expf(z - grown);
            den = den * rescale + p;
            for (int j = 0; j < head_dim; ++j)
                acc[j] = acc[j] * rescale + p * (ld(krow[dim + j]) + ld(kv_bias[dim + hd * head_dim + j]));
            top = grown;
        }
        store_t* orow = out + tok * out_cols + out_col + hd * head_dim;
        for (int j = 0; j < head_dim; ++j) orow[j] = st(acc[j] / den);
    }
}
