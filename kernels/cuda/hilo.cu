// LITv2's HiLo branches (kernels/hilo.py): the references there define every index and padding rule.
// Hi-Fi: attention inside ws x ws windows of the map zero-padded bottom/right to a multiple of ws (a padded
// token's k and v are the biases alone), one thread per (query token, head), online softmax over the window;
// Lo-Fi: every query attends to the M keys of the ws x ws-averaged map, one thread per query, a block per
// (tile of queries, head, image) sharing tiles of keys in shared memory (attention.cuh). Each has a generic
// kernel (head_dim <= MAX_HEAD_DIM at run time) and a _hd32 one (head_dim 32 compiled in, as in every LITv2).
#include "attention.cuh"

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
// The biases enter once per query, not per key: q.(k + kb) = q.k + q.kb, and since the weights sum to 1,
// sum_s p_s (v_s + vb) / den = sum_s p_s v_s / den + vb (a padded key is k = v = 0 here); holding the biases
// through the key loop instead took 167 registers per thread in the _hd32 build.
template <int HD>
__device__ __forceinline__ void hifi_body(const store_t* __restrict__ qkv, const store_t* __restrict__ qkv_bias,
                                          store_t* __restrict__ out, int batch, int height, int width, int qkv_cols,
                                          int out_cols, int heads, int head_dim, int ws, float scale) {
    const int hd_len = HD ? HD : head_dim;
    int dim = heads * hd_len;
    FOR_EACH_ELEMENT(e, (long long)batch * height * width * heads) {
        Nhwc at = nhwc_index(e, height, width, heads);
        int hd = at.c, qo = hd * hd_len, ko = dim + qo, vo = 2 * dim + qo;
        const store_t* qrow = qkv + ((at.img * height + at.y) * width + at.x) * qkv_cols;
        float q[HeadDim<HD>::STRIDE], acc[HeadDim<HD>::STRIDE], q_kb = 0.0f;
#pragma unroll
        for (int j = 0; j < hd_len; ++j) {
            q[j] = ld(qrow[qo + j]) + ld(qkv_bias[qo + j]);
            q_kb += q[j] * ld(qkv_bias[ko + j]);
            acc[j] = 0.0f;
        }
        int gy = at.y / ws * ws, gx = at.x / ws * ws;
        float top = __int_as_float(0xff800000), den = 0.0f;
        for (int s = 0; s < ws * ws; ++s) {
            int ky = gy + s / ws, kx = gx + s % ws;
            bool inside = ky < height && kx < width;
            const store_t* krow = qkv + ((at.img * height + (inside ? ky : 0)) * width + (inside ? kx : 0)) * qkv_cols;
            float z = q_kb;
            if (inside) {
#pragma unroll
                for (int j = 0; j < hd_len; ++j) z += q[j] * ld(krow[ko + j]);
            }
            z *= scale;
            float grown = fmaxf(top, z), rescale = expf(top - grown), p = expf(z - grown);
            den = den * rescale + p;
#pragma unroll
            for (int j = 0; j < hd_len; ++j) acc[j] = acc[j] * rescale + (inside ? p * ld(krow[vo + j]) : 0.0f);
            top = grown;
        }
        store_t* orow = out + ((at.img * height + at.y) * width + at.x) * out_cols + qo;
#pragma unroll
        for (int j = 0; j < hd_len; ++j) orow[j] = st(acc[j] / den + ld(qkv_bias[vo + j]));
    }
}

extern "C" __global__ void hifi_attention(const store_t* __restrict__ qkv, const store_t* __restrict__ qkv_bias,
                                          store_t* __restrict__ out, int batch, int height, int width, int qkv_cols,
                                          int out_cols, int heads, int head_dim, int ws, float scale) {
    hifi_body<0>(qkv, qkv_bias, out, batch, height, width, qkv_cols, out_cols, heads, head_dim, ws, scale);
}

extern "C" __global__ void hifi_attention_hd32(const store_t* __restrict__ qkv, const store_t* __restrict__ qkv_bias,
                                               store_t* __restrict__ out, int batch, int height, int width,
                                               int qkv_cols, int out_cols, int heads, int head_dim, int ws,
                                               float scale) {
    hifi_body<32>(qkv, qkv_bias, out, batch, height, width, qkv_cols, out_cols, heads, head_dim, ws, scale);
}

// queries qkv (B, N, qkv_cols) columns [q_col, q_col + heads*hd) without bias; kv (B, M, 2*heads*hd) = (k|v) x
// head x hd without bias; out (B, N, out_cols), columns out_col + hd*head_dim + [0, head_dim).
// Grid (ceil(N / blockDim.x), heads, B): thread t of block (x, head, img) is query x * blockDim.x + t.
template <int HD>
__device__ __forceinline__ void lofi_body(const store_t* __restrict__ qkv, const store_t* __restrict__ q_bias,
                                          const store_t* __restrict__ kv, const store_t* __restrict__ kv_bias,
                                          store_t* __restrict__ out, int tokens, int qkv_cols, int q_col, int keys,
                                          int out_cols, int out_col, int heads, int head_dim, float scale) {
    constexpr int S = HeadDim<HD>::STRIDE;
    __shared__ float key_tile[KEY_TILE * S], value_tile[KEY_TILE * S];
    const int hd_len = HD ? HD : head_dim;
    int dim = heads * hd_len, head = blockIdx.y, col = head * hd_len;
    long long img = blockIdx.z, tok = img * tokens + (long long)blockIdx.x * blockDim.x + threadIdx.x;
    bool live = blockIdx.x * blockDim.x + threadIdx.x < tokens;   // the others only help load the tiles
    QueryState<HD> query;
    query.top = __int_as_float(0xff800000);
    query.den = 0.0f;
#pragma unroll
    for (int j = 0; j < hd_len; ++j) {
        query.q[j] = live ? ld(qkv[tok * qkv_cols + q_col + col + j]) + ld(q_bias[col + j]) : 0.0f;
        query.acc[j] = 0.0f;
    }
    for (int k0 = 0; k0 < keys; k0 += KEY_TILE) {
        int n = min(KEY_TILE, keys - k0);
        load_tile<HD>(key_tile, value_tile, n, hd_len, [&](int s, int j, float& key, float& value) {
            const store_t* row = kv + (img * keys + k0 + s) * 2 * dim + col;
            key = ld(row[j]) + ld(kv_bias[col + j]);
            value = ld(row[dim + j]) + ld(kv_bias[dim + col + j]);
        });
        if (live) attend_tile<HD>(query, key_tile, value_tile, n, hd_len, scale, nullptr);
    }
    if (!live) return;
    store_t* orow = out + tok * out_cols + out_col + col;
#pragma unroll
    for (int j = 0; j < hd_len; ++j) orow[j] = st(query.acc[j] / query.den);
}

extern "C" __global__ void lofi_attention(const store_t* __restrict__ qkv, const store_t* __restrict__ q_bias,
                                          const store_t* __restrict__ kv, const store_t* __restrict__ kv_bias,
                                          store_t* __restrict__ out, int tokens, int qkv_cols, int q_col, int keys,
                                          int out_cols, int out_col, int heads, int head_dim, float scale) {
    lofi_body<0>(qkv, q_bias, kv, kv_bias, out, tokens, qkv_cols, q_col, keys, out_cols, out_col, heads, head_dim,
                 scale);
}

extern "C" __global__ void lofi_attention_hd32(const store_t* __restrict__ qkv, const store_t* __restrict__ q_bias,
                                               const store_t* __restrict__ kv, const store_t* __restrict__ kv_bias,
                                               store_t* __restrict__ out, int tokens, int qkv_cols, int q_col,
                                               int keys, int out_cols, int out_col, int heads, int head_dim,
                                               float scale) {
    lofi_body<32>(qkv, q_bias, kv, kv_bias, out, tokens, qkv_cols, q_col, keys, out_cols, out_col, heads, head_dim,
                  scale);
}
