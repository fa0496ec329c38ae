// LayerNorm over the last axis of rows (N, C), C-contiguous (store_t: see common.cuh); statistics in double, two passes,
// as kernels/layernorm.py. One warp per row (the models' C is 48 to 1024, where a block per row would leave most
// of its threads idle and pay block-wide barriers): lane l takes columns l, l + 32, ...; a block of blockDim.x
// threads does blockDim.x / 32 consecutive rows.
#include "common.cuh"

// x is not __restrict__: residual_add_layernorm_rows has just written it, and a restrict-qualified const
// pointer may be read through the non-coherent read-only cache
__device__ __forceinline__ void normalise_row(const store_t* x, const store_t* __restrict__ weight,
                                              const store_t* __restrict__ bias, float eps, store_t* __restrict__ out,
                                              int cols, int lane) {
    double s = 0.0;
    for (int j = lane; j < cols; j += 32) s += ld(x[j]);
    double mean = warp_sum(s) / cols;
    double ss = 0.0;
    for (int j = lane; j < cols; j += 32) {
        double d = ld(x[j]) - mean;
        ss += d * d;
    }
    double var = warp_sum(ss) / cols;
    double inv = 1.0 / sqrt(var + (double)eps);
    // centred in double, as the CPU kernel: a float mean loses digits when |mean| >> std (a row of two close values)
    for (int j = lane; j < cols; j += 32)
        out[j] = st((float)((ld(x[j]) - mean) * inv) * ld(weight[j]) + ld(bias[j]));
}

// the row of the calling warp, or -1 past the last (the whole warp leaves together)
__device__ __forceinline__ long long warp_row(int rows) {
    long long r = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    return r < rows ? r : -1;
}

// out[r] = LayerNorm(x[r]) * weight + bias
extern "C" __global__ void layernorm_rows(const store_t* __restrict__ x, const store_t* __restrict__ weight,
                                          const store_t* __restrict__ bias, float eps, store_t* __restrict__ out,
                                          int rows, int cols) {
    long long r = warp_row(rows);
    if (r < 0) return;
    normalise_row(x + r * cols, weight, bias, eps, out + r * cols, cols, threadIdx.x & 31);
}

// x[r] += y[r] + add_bias (in place), then out[r] = LayerNorm(x[r]); each lane reads back only what it wrote
extern "C" __global__ void residual_add_layernorm_rows(store_t* __restrict__ x, const store_t* __restrict__ y,
                                                       const store_t* __restrict__ add_bias,
                                                       const store_t* __restrict__ weight,
                                                       const store_t* __restrict__ bias, float eps,
                                                       store_t* __restrict__ out, int rows, int cols) {
    long long r = warp_row(rows);
    if (r < 0) return;
    int lane = threadIdx.x & 31;
    store_t* xr = x + r * cols;
    const store_t* yr = y + r * cols;
    for (int j = lane; j < cols; j += 32) xr[j] = st(ld(xr[j]) + ld(yr[j]) + ld(add_bias[j]));
    normalise_row(xr, weight, bias, eps, out + r * cols, cols, lane);
}

// x += y + bias (bias broadcast over rows), elementwise
extern "C" __global__ void residual_add(store_t* __restrict__ x, const store_t* __restrict__ y,
                                        const store_t* __restrict__ bias, long long n, int cols) {
    Column col(cols);
    FOR_EACH_ELEMENT(i, n) {
        x[i] = st(ld(x[i]) + ld(y[i]) + ld(bias[col.at]));
        col.advance();
    }
}
