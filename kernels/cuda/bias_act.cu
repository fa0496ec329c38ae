// The bias + activation epilogues of the MLPs' first GEMM, in place on y (N, C): y = act(y + bias).
#include "common.cuh"

extern "C" __global__ void bias_gelu(float* __restrict__ y, const float* __restrict__ bias, long long n, int cols) {
    FOR_EACH_ELEMENT(i, n)
        y[i] = gelu_erf(y[i] + bias[i % cols]);
}

extern "C" __global__ void bias_gelu_tanh(float* __restrict__ y, const float* __restrict__ bias, long long n,
                                          int cols) {
    FOR_EACH_ELEMENT(i, n)
        y[i] = gelu_tanh(y[i] + bias[i % cols]);
}
