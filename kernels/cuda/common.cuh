// Helpers shared by qnalo's CUDA kernels (compiled by CuPy's NVRTC at run time, by nvcc --ptx in CI).
// No host headers: NVRTC has none; erff, expf, sqrt are device built-ins.
#pragma once

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

// sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total
__device__ __forceinline__ double block_sum(double v, double* scratch /* [32] shared */) {
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_down_sync(0xffffffffu, v, offset);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();                       // scratch may still be read from a previous call
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int warps = blockDim.x >> 5;
    v = lane < warps ? scratch[lane] : 0.0;
    for (int offset = 16; offset > 0; offset >>= 1)
        v += __shfl_down_sync(0xffffffffu, v, offset);
    return __shfl_sync(0xffffffffu, v, 0);
}
