// QnA-ViT's window self-attention (kernels/window_msa.py, window_msa_ref): qkv (B, H, W, 3C) in the official
// per-head interleaved order (head hi: columns hi*3d + [q | k | v]), w x w windows that tile the map, no shift;
// softmax((q * scale) . k + rel_bias[hi, query, key]) @ v; out (B, H, W, C), head hi in columns hi*d + [0, d).
// Grid (windows of one image, heads, B), a block per (window, head, image), a thread per query; a window of more
// queries than the block has threads is done in rounds of blockDim.x queries (a block of w*w threads would need
// more registers than a GPU has for w > 22). The window's keys and values are shared in tiles (attention.cuh).
// A generic kernel (head_dim <= MAX_HEAD_DIM at run time) and a _hd32 one (head_dim 32 compiled in, as in every
// QnA-ViT).
#include "attention.cuh"

template <int HD>
__device__ __forceinline__ void window_msa_body(const store_t* __restrict__ qkv, const store_t* __restrict__ rel_bias,
                                                store_t* __restrict__ out, int height, int width, int heads,
                                                int head_dim, int ws, float scale) {
    constexpr int S = HeadDim<HD>::STRIDE;
    __shared__ float key_tile[KEY_TILE * S], value_tile[KEY_TILE * S];
    const int hd_len = HD ? HD : head_dim;
    int chans = heads * hd_len, seq = ws * ws, head = blockIdx.y;
    int windows_x = width / ws, gy = blockIdx.x / windows_x * ws, gx = blockIdx.x % windows_x * ws;
    long long img = blockIdx.z;
    // the row of window token s (in row-major order inside the window) for this head
    auto token = [&](int s) { return (img * height + gy + s / ws) * width + gx + s % ws; };
    for (int q0 = 0; q0 < seq; q0 += blockDim.x) {   // the same rounds in every thread: the barriers stay uniform
        int t = q0 + threadIdx.x;
        bool live = t < seq;                       // the others only help load the tiles
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
            load_tile<HD>(key_tile, value_tile, n, hd_len, [&](int s, int j, float& key, float& value) {
                const store_t* krow = qkv + token(k0 + s) * 3 * chans + head * 3 * hd_len + hd_len;
                key = ld(krow[j]);
                value = ld(krow[hd_len + j]);
            });
            if (live)
                attend_tile<HD>(query, key_tile, value_tile, n, hd_len, scale,
                                rel_bias + ((long long)head * seq + t) * seq + k0);
        }
        if (live) {
            store_t* orow = out + token(t) * chans + head * hd_len;
#pragma unroll
            for (int j = 0; j < hd_len; ++j) orow[j] = st(query.acc[j] / query.den);
        }
    }
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
