// Helpers shared by qnalo's CUDA kernels (compiled by CuPy's NVRTC at run time, by nvcc --ptx in CI).
// No host headers: NVRTC has none; erff, expf, sqrt are device built-ins.
#pragma once

// Storage type of every array argument: float32, or IEEE binary16 when compiled with -DQNALO_HALF (the model's
// dtype="float16"). Kernels load with ld() and store with st(): every sum, product and statistic is computed
// in float (LayerNorm's in double), so half precision rounds what is stored, never what is accumulated.
// store_t is a one-member struct in both builds, so a load or store that skips ld()/st() does not compile.
// NVRTC has no cuda_fp16.h here, so the half conversions are PTX (round to nearest even on the way down).
#ifdef QNALO_HALF
struct store_t {
    unsigned short bits;
};
__device__ __forceinline__ float ld(store_t h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h.bits));
    return f;
}
__device__ __forceinline__ store_t st(float f) {
    store_t h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(f));
    return h;
}
#else
struct store_t {
    float value;
};
__device__ __forceinline__ float ld(store_t v) { return v.value; }
__device__ __forceinline__ store_t st(float f) {
    store_t v;
    v.value = f;
    return v;
}
#endif

// 8 consecutive elements from p, which must be 16-byte aligned (one or two 16-byte loads instead of 8 scalar ones:
// a warp's scalar loads at a stride of 8 elements touch 8x the L1 wavefronts its vector loads do)
__device__ __forceinline__ void load8_aligned(const store_t* p, float v[8]) {
#ifdef QNALO_HALF
    uint4 raw = *reinterpret_cast<const uint4*>(p);
    unsigned int words[4] = {raw.x, raw.y, raw.z, raw.w};
#pragma unroll
    for (int k = 0; k < 4; ++k) {
        store_t lo, hi;
        lo.bits = (unsigned short)(words[k] & 0xffffu);
        hi.bits = (unsigned short)(words[k] >> 16);
        v[2 * k] = ld(lo);
        v[2 * k + 1] = ld(hi);
    }
#else
    float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
    v[0] = a.x, v[1] = a.y, v[2] = a.z, v[3] = a.w, v[4] = b.x, v[5] = b.y, v[6] = b.z, v[7] = b.w;
#endif
}

// exact (erf) GELU, as LITv2's nn.GELU
__device__ __forceinline__ float gelu_erf(float x) {
    return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
}

// tanh GELU (Flax nn.gelu default, QnA-ViT) as x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): no
// cancellation of 1 + tanh(u) in the far negative tail (expf overflows to inf there and x / inf = -0)
__device__ __forceinline__ float gelu_tanh(float x) {
    float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return x / (1.0f + expf(-2.0f * u));
}

// flat index of a channels-last (B, H, W, C) element -> its coordinates
struct Nhwc {
    long long img;
    int y, x, c;
};

__device__ __forceinline__ Nhwc nhwc_index(long long i, int height, int width, int chans) {
    Nhwc at;
    at.c = (int)(i % chans);
    long long p = i / chans;
    at.x = (int)(p % width);
    p /= width;
    at.y = (int)(p % height);
    at.img = p / height;
    return at;
}

// grid-stride loop over n elements
#define FOR_EACH_ELEMENT(i, n) \
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// The column of a grid-stride loop's element in rows of `cols`: a 32-bit counter advanced by the grid's stride, so
// the loop pays two 32-bit modulos a thread instead of a 64-bit one an element (bias_gelu on sm_90: 82 instructions
// an element, not 135). Grids have under 2^32 threads.
struct Column {
    unsigned int at, step, cols;
    __device__ __forceinline__ explicit Column(int n_cols)
        : at((unsigned int)((blockIdx.x * (long long)blockDim.x + threadIdx.x) % n_cols)),
          step((unsigned int)((long long)gridDim.x * blockDim.x % n_cols)), cols((unsigned int)n_cols) {}
    __device__ __forceinline__ void advance() {
        at += step;
        if (at >= cols) at -= cols;
    }
};

// sum over the 32 lanes of a warp, all taking part; the butterfly gives every lane the same total
__device__ __forceinline__ double warp_sum(double v) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}
