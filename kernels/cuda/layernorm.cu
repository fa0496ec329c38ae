// LayerNorm over the last axis of rows (N, C), C-contiguous (store_t: see common.cuh); statistics in double, two passes,
// as kernels/layernorm.py. One block per row.
#include "common.cuh"

// x is not __restrict__: residual_add_layernorm_rows has just written it, and a restrict-qualified const
// pointer may be read through the non-coherent read-only cache
__device__ __forceinline__ void normalise_row(const store_t* x, const store_t* __restrict__ weight,
                                              const store_t* __restrict__ bias, float eps, store_t* __restrict__ out,
                                              int cols, double* scratch) {
    double s = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) s += ld(x[j]);
    double mean = block_sum(s, scratch) / cols;
    double ss = 0.0;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) {
        double d = ld(x[j]) - mean;
        ss += d * d;
    }
    double var = block_sum(ss, scratch) / cols;
    float inv = (float)(1.0 / sqrt(var + (double)eps));
    float m = (float)mean;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) out[j] = st((ld(x[j]) - m) * inv * ld(weight[j]) + ld(bias[j]));
}

// out[r] = LayerNorm(x[r]) * weight + bias
extern "C" __global__ void layernorm_rows(const store_t* __restrict__ x, const store_t* __restrict__ weight,
                                          const store_t* __restrict__ bias, float eps, store_t* __restrict__ out,
                                          int rows, int cols) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    normalise_row(x + (long long)r * cols, weight, bias, eps, out + (long long)r * cols, cols, scratch);
}

// x[r] += y[r] + add_bias (in place), then out[r] = LayerNorm(x[r]); each thread reads back only what it wrote
extern "C" __global__ void residual_add_layernorm_rows(store_t* __restrict__ x, const store_t* __restrict__ y,
                                                       const store_t* __restrict__ add_bias,
                                                       const store_t* __restrict__ weight,
                                                       const store_t* __restrict__ bias, float eps,
                                                       store_t* __restrict__ out, int rows, int cols) {
    __shared__ double scratch[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    store_t* xr = x + (long long)r * cols;
    const store_t* yr = y + (long long)r * cols;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) xr[j] = st(ld(xr[j]) + ld(yr[j]) + ld(add_bias[j]));
    normalise_row(xr, weight, bias, eps, out + (long long)r * cols, cols, scratch);
}

// x += y + bias (bias broadcast over rows), elementwise
extern "C" __global__ void residual_add(store_t* __restrict__ x, const store_t* __restrict__ y,
                                        const store_t* __restrict__ bias, long long n, int cols) {
    FOR_EACH_ELEMENT(i, n)
        x[i] = st(ld(x[i]) + ld(y[i]) + ld(bias[i % cols]));
}
