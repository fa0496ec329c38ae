// QnA-ViT's window self-attention (kernels/window_msa.py, window_msa_ref): qkv (B, H, W, 3C) in the official
// per-head interleaved order (head hi: columns hi*3d + [q | k | v]), w x w windows that tile the map, no shift;
// softmax((q * scale) . k + rel_bias[hi, query, key]) @ v; out (B, H, W, C), head hi in columns hi*d + [0, d).
// Grid (windows of one image, heads, B), a block per (window, head, image) with a thread per query (blockDim.x
// >= w*w), the window's keys and values shared in tiles (attention.cuh). A generic kernel (head_dim <=
// MAX_HEAD_DIM at run time) and a _hd32 one (head_dim 32 compiled in, as in every QnA-ViT).
#include "attention.cuh"

template <int HD>
__device__ __forceinline__ void window_msa_body(const store_t* __restrict__ qkv, const store_t* __restrict__ rel_bias,
                                                store_t* __restrict__ out, int height, int width, int heads,
                                                int head_dim, int ws, float scale) {
    constexpr int S = HeadDim<HD>::STRIDE;
    __shared__ float key_tile[KEY_TILE * S], value_tile[KEY_TILE * S];
    const int hd_len = HD ? HD : head_dim;
    int chans = heads * hd_len, seq = ws * ws, head = blockIdx.y, t = threadIdx.x;
    int windows_x = width / ws, gy = blockIdx.x / windows_x * ws, gx = blockIdx.x % windows_x * ws;
    long long img = blockIdx.z;
    bool live = t < seq;                       // the others only help load the tiles
    // the row of window token s (in row-major order inside the window) for this head
    auto token = [&](int s) { return (img * height + gy + s / ws) * width + gx + s % ws; };
    QueryState<HD> query;
    query.top = __int_as_float(0xff800000);
    query.den = 0.0f;
    const store_t* qrow = qkv + token(live ? t : 0) * 3 * chans + head * 3 * hd_len;
#pragma unroll
    for (int j = 0; j < hd_len; ++j) {
        query.q[j] = ld(qrow[j]);
        query.acc[j] = 0.0f;
    }
    for (int k0 = 0; k0 < seq; k0 += KEY_TILE) {
        int n = min(KEY_TILE, seq - k0);
        __syncthreads();                       // every thread is done with the previous tile
        for (int i = t; i < n * hd_len; i += blockDim.x) {
            int s = i / hd_len, j = i % hd_len;
            const store_t* krow = qkv + token(k0 + s) * 3 * chans + head * 3 * hd_len + hd_len;
            key_tile[s * S + j] = ld(krow[j]);
            value_tile[s * S + j] = ld(krow[hd_len + j]);
        }
        __syncthreads();
        if (live)
            attend_tile<HD>(query, key_tile, value_tile, n, hd_len, scale,
                            rel_bias + ((long long)head * seq + t) * seq + k0);
    }
    if (!live) return;
    store_t* orow = out + token(t) * chans + head * hd_len;
#pragma unroll
    for (int j = 0; j < hd_len; ++j) orow[j] = st(query.acc[j] / query.den);
}

extern "C" __global__ void window_msa(const store_t* __restrict__ qkv, const store_t* __restrict__ rel_bias,
                                      store_t* __restrict__ out, int height, int width, int heads, int head_dim,
                                      int ws, float scale) {
    window_msa_body<0>(qkv, rel_bias, out, height, width, heads, head_dim, ws, scale);
}

extern "C" __global__ void window_msa_hd32(const store_t* __restrict__ qkv, const store_t* __restrict__ rel_bias,
                                           store_t* __restrict__ out, int height, int width, int heads,
                                           int head_dim, int ws, float scale) {
    window_msa_body<32>(qkv, rel_bias, out, height, width, heads, head_dim, ws, scale);
}
