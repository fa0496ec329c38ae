// Softmax attention of one query per thread against keys that a block loads together into shared memory, in
// tiles of KEY_TILE (hilo.cu's Lo-Fi, window_msa.cu). Online softmax, one rescale per tile.
// HD > 0 fixes head_dim at compile time, so the loops over it unroll and the query and its output row live in
// registers (the _hd32 kernels: every real model has head_dim 32); HD = 0 takes head_dim at run time, up to
// MAX_HEAD_DIM, with those rows in local memory.
#pragma once
#include "common.cuh"

#ifndef MAX_HEAD_DIM   // passed by the wrappers (window_msa.py's MAX_HEAD_DIM), which check head_dim against it
#error "compile with -DMAX_HEAD_DIM=<largest head_dim>, as kernels/cuda/window_msa.py and hilo.py do"
#endif
#define KEY_TILE 16   // 32 measured 157-168 registers per thread in the _hd32 builds (nvcc 13.0, sm_90), 16: 114-128

template <int HD>
struct HeadDim {
    static constexpr int STRIDE = HD ? HD : MAX_HEAD_DIM;   // row stride of the shared tiles and query arrays
};

// the running state of one query: max logit so far (top), sum of exp (den), and acc = sum of exp * v
template <int HD>
struct QueryState {
    float q[HeadDim<HD>::STRIDE], acc[HeadDim<HD>::STRIDE];
    float top, den;
};

// keys[s * STRIDE + j], values likewise, s < n (<= KEY_TILE); logit = scale * q.k + bias[s] (bias may be null)
template <int HD>
__device__ __forceinline__ void attend_tile(QueryState<HD>& query, const float* keys, const float* values, int n,
                                            int head_dim, float scale, const store_t* bias) {
    constexpr int S = HeadDim<HD>::STRIDE;
    const int hd = HD ? HD : head_dim;
    float z[KEY_TILE];
    float tile_top = __int_as_float(0xff800000);   // -inf
#pragma unroll
    for (int s = 0; s < KEY_TILE; ++s) {
        float v = __int_as_float(0xff800000);
        if (s < n) {
            float dot = 0.0f;
#pragma unroll
            for (int j = 0; j < hd; ++j) dot += query.q[j] * keys[s * S + j];
            v = dot * scale + (bias ? ld(bias[s]) : 0.0f);
        }
        z[s] = v;
        tile_top = fmaxf(tile_top, v);
    }
    float grown = fmaxf(query.top, tile_top), rescale = expf(query.top - grown);
    query.den *= rescale;
#pragma unroll
    for (int j = 0; j < hd; ++j) query.acc[j] *= rescale;
#pragma unroll
    for (int s = 0; s < KEY_TILE; ++s)
        if (s < n) {
            float p = expf(z[s] - grown);
            query.den += p;
#pragma unroll
            for (int j = 0; j < hd; ++j) query.acc[j] += p * values[s * S + j];
        }
    query.top = grown;
}

// Loads keys and values s < n of the next tile into the block's shared tiles, between the barriers that keep a
// tile from being overwritten while in use and from being read before it is whole; fetch(s, j, key, value)
// stores element j of tile key s.
template <int HD, class Fetch>
__device__ __forceinline__ void load_tile(float* keys, float* values, int n, int head_dim, Fetch fetch) {
    constexpr int S = HeadDim<HD>::STRIDE;
    __syncthreads();                           // every thread is done with the previous tile
    for (int i = threadIdx.x; i < n * head_dim; i += blockDim.x) {
        int s = i / head_dim, j = i % head_dim;
        fetch(s, j, keys[s * S + j], values[s * S + j]);
    }
    __syncthreads();
}
