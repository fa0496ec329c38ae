// The bias + activation epilogues of the MLPs' first GEMM, in place on y (N, C): y = act(y + bias).
#include "common.cuh"

// y = act(y + bias), the bias's column from a Column counter
template <float (*act)(float)>
__device__ __forceinline__ void bias_act(store_t* __restrict__ y, const store_t* __restrict__ bias, long long n,
                                         int cols) {
    Column col(cols);
    FOR_EACH_ELEMENT(i, n) {
        y[i] = st(act(ld(y[i]) + ld(bias[col.at])));
        col.advance();
    }
}

extern "C" __global__ void bias_gelu(store_t* __restrict__ y, const store_t* __restrict__ bias, long long n,
                                     int cols) {
    bias_act<gelu_erf>(y, bias, n, cols);
}

extern "C" __global__ void bias_gelu_tanh(store_t* __restrict__ y, const store_t* __restrict__ bias, long long n,
                                          int cols) {
    bias_act<gelu_tanh>(y, bias, n, cols);
}
