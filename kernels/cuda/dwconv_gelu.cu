// ConvFFN middle (kernels/dwconv_gelu.py): depthwise 3x3 conv, zero padding 1, with fc1's bias folded in
// (pre_bias, added to in-image samples only) and the conv bias, then exact GELU. Channels-last:
// h, out (B, H, W, C); weight (3, 3, C). A thread does a run of RUN consecutive pixels of one image row for one
// channel, channels fastest across threads (coalesced): it loads the channel's weights and biases once, and the
// run's 3 x (RUN + 2) inputs once each into registers, over which the 3x3 window slides.
#include "common.cuh"

// 8: a full run issues 77 instructions an output on sm_90, 95 with runs of 4, 389 with one output a thread: the index
// division, weights and edge tests serve more outputs, and 3.75 loads an output, not 4.5. 80 registers, no spills
#ifndef RUN   // passed by the wrapper, dwconv_gelu.py (its RUN), which sizes the grid by it
#error "compile with -DRUN=<pixels per thread>, as kernels/cuda/dwconv_gelu.py does"
#endif

// the runs, by the grid's stride: run (row = img * height + y, x0 / RUN, c), c fastest. Index: unsigned int where
// every index and in-image offset fits it (32-bit division and addressing), else unsigned long long; unsigned, so
// the offsets of samples outside the image may wrap, as they are never read
template <class Index>
__device__ __forceinline__ void dwconv_runs(const store_t* __restrict__ h, const store_t* __restrict__ pre_bias,
                                            const store_t* __restrict__ weight, const store_t* __restrict__ bias,
                                            store_t* __restrict__ out, Index items, int height, int width, int chans,
                                            int runs) {
    Index cs = chans, row_stride = (Index)width * cs;
    for (Index item = blockIdx.x * (Index)blockDim.x + threadIdx.x; item < items;
         item += (Index)gridDim.x * blockDim.x) {
        int c = (int)(item % cs);
        Index q = item / cs;
        int x0 = (int)(q % runs) * RUN, left = width - x0;   // left >= 1 pixels from x0 to the row's end
        Index row = q / runs;
        int y = (int)(row % height);
        Index at = (row * width + x0) * cs + c;   // (img, y, x0, c)
        float pre = ld(pre_bias[c]), acc0 = ld(bias[c]), wt[9], patch[3][RUN + 2];
#pragma unroll
        for (int t = 0; t < 9; ++t) wt[t] = ld(weight[t * cs + c]);
        // patch[dy][k]: the input at (y + dy - 1, x0 + k - 1) plus pre_bias; 0 outside, the reference's padding
#pragma unroll
        for (int dy = 0; dy < 3; ++dy) {
            bool row_in = y + dy - 1 >= 0 && y + dy - 1 < height;
            Index src = at + (dy - 1) * row_stride - cs;
#pragma unroll
            for (int k = 0; k < RUN + 2; ++k, src += cs)
                patch[dy][k] = row_in && (k > 0 || x0 > 0) && k - 1 < left ? ld(h[src]) + pre : 0.0f;
        }
#pragma unroll
        for (int j = 0; j < RUN && j < left; ++j, at += cs) {
            float acc = acc0;
#pragma unroll
            for (int t = 0; t < 9; ++t) acc += patch[t / 3][j + t % 3] * wt[t];   // taps dy-major, as the reference
            out[at] = st(gelu_erf(acc));
        }
    }
}

extern "C" __global__ void dwconv3x3_gelu(const store_t* __restrict__ h, const store_t* __restrict__ pre_bias,
                                          const store_t* __restrict__ weight, const store_t* __restrict__ bias,
                                          store_t* __restrict__ out, int batch, int height, int width, int chans) {
    int runs = (width - 1) / RUN + 1;
    long long items = (long long)batch * height * runs * chans;
    // 32 bits take every element offset, weight offset (9 * chans) and run index up to one stride past the last
    if ((long long)batch * height * width * chans + (long long)gridDim.x * blockDim.x <= 0xffffffffLL &&
        chans < (1 << 28))
        dwconv_runs<unsigned int>(h, pre_bias, weight, bias, out, (unsigned int)items, height, width, chans, runs);
    else
        dwconv_runs<unsigned long long>(h, pre_bias, weight, bias, out, (unsigned long long)items, height, width,
                                        chans, runs);
}
