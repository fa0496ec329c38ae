// LayerNorm over the last axis of rows (N, C), float32, C-contiguous; statistics in double, two passes,
// as kernels/layernorm.py. One block per row.
#include "common.cuh"

// x is not __restrict__: residual_add_layernorm_rows has just written it, and a restrict-qualified const
// pointer may be read through the non-coherent read-only cache
__device__ __forceinline__ void normalise_row(const float* x, const float* __restrict__ weight,
                                              const float* __restrict__ bias, float eps, float* __restrict__ out,
                                              int cols, double* scratch) {
    double s = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += x[j];
    double mean = block_sum(s, scratch) / cols;
    double ss = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        double d = x[j] - mean;
        ss += d * d;
    }
    double var = block_sum(ss, scratch) / cols;
    float inv = (float)(1.0 / sqrt(var + (double)eps));
    float m = (float)mean;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) out[j] = (x[j] - m) * inv * weight[j] + bias[j];
}

// out[r] = LayerNorm(x[r]) * weight + bias
extern "C" __global__ void layernorm_rows(const float* __restrict__ x, const float* __restrict__ weight,
                                          const float* __restrict__ bias, float eps, float* __restrict__ out,
                                          int rows, int cols) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    normalise_row(x + (long long)r * cols, weight, bias, eps, out + (long long)r * cols, cols, scratch);
}

// x[r] += y[r] + add_bias (in place), then out[r] = LayerNorm(x[r]); each thread reads back only what it wrote
extern "C" __global__ void residual_add_layernorm_rows(float* __restrict__ x, const float* __restrict__ y,
                                                       const float* __restrict__ add_bias,
                                                       const float* __restrict__ weight,
                                                       const float* __restrict__ bias, float eps,
                                                       float* __restrict__ out, int rows, int cols) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    float* xr = x + (long long)r * cols;
    const float* yr = y + (long long)r * cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) xr[j] += yr[j] + add_bias[j];
    normalise_row(xr, weight, bias, eps, out + (long long)r * cols, cols, scratch);
}

// x += y + bias (bias broadcast over rows), elementwise
extern "C" __global__ void residual_add(float* __restrict__ x, const float* __restrict__ y,
                                        const float* __restrict__ bias, long long n, int cols) {
    FOR_EACH_ELEMENT(i, n)
        x[i] += y[i] + bias[i % cols];
}
