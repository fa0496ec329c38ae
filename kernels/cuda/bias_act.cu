// The bias + activation epilogues of the MLPs' first GEMM, in place on y (N, C): y = act(y + bias).
#include "common.cuh"

extern "C" __global__ void bias_gelu(store_t* __restrict__ y, const store_t* __restrict__ bias, long long n,
                                     int cols) {
    FOR_EACH_ELEMENT(i, n)
        y[i] = st(gelu_erf(ld(y[i]) + ld(bias[i % cols])));
}

extern "C" __global__ void bias_gelu_tanh(store_t* __restrict__ y, const store_t* __restrict__ bias, long long n,
                                          int cols) {
    FOR_EACH_ELEMENT(i, n)
        y[i] = st(gelu_tanh(ld(y[i]) + ld(bias[i % cols])));
}
