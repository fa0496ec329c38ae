// DTM sampling (kernels/deform_conv.py, deform_sample_ref): DCNv1's im2col with a 2x2 kernel, stride 2, no
// padding, channels-last. Tap k = 2i + j of output pixel (ho, wo) samples y = 2ho + i + off[2k],
// x = 2wo + j + off[2k+1]: 0 unless -1 < y < H and -1 < x < W (a NaN position is outside), else bilinear over
// the 4 neighbours, those outside the image contributing 0. x (B, H, W, C), offsets (B, Ho, Wo, 8),
// cols (B, Ho, Wo, 4, C). One thread per (output pixel, tap, channel), channels fastest.
#include "common.cuh"

extern "C" __global__ void deform_sample(const store_t* __restrict__ x, const store_t* __restrict__ offsets,
                                         store_t* __restrict__ cols, int batch, int height, int width, int chans,
                                         int out_h, int out_w) {
    FOR_EACH_ELEMENT(e, (long long)batch * out_h * out_w * 4 * chans) {
        int c = (int)(e % chans);
        long long p = e / chans;
        int tap = (int)(p % 4);
        long long pix = p / 4;                           // (img * out_h + ho) * out_w + wo
        int wo = (int)(pix % out_w), ho = (int)(pix / out_w % out_h);
        long long img = pix / ((long long)out_w * out_h);
        float py = (float)(2 * ho + tap / 2) + ld(offsets[pix * 8 + 2 * tap]);
        float px = (float)(2 * wo + tap % 2) + ld(offsets[pix * 8 + 2 * tap + 1]);
        float v = 0.0f;
        if (py > -1.0f && py < (float)height && px > -1.0f && px < (float)width) {
            float fy = floorf(py), fx = floorf(px), ly = py - fy, lx = px - fx;
            int y0 = (int)fy, x0 = (int)fx;
            const store_t* base = x + img * height * (long long)width * chans + c;
            float w00 = (1.0f - ly) * (1.0f - lx), w01 = (1.0f - ly) * lx, w10 = ly * (1.0f - lx), w11 = ly * lx;
            if (y0 >= 0 && x0 >= 0) v += w00 * ld(base[((long long)y0 * width + x0) * chans]);
            if (y0 >= 0 && x0 + 1 < width) v += w01 * ld(base[((long long)y0 * width + x0 + 1) * chans]);
            if (y0 + 1 < height && x0 >= 0) v += w10 * ld(base[((long long)(y0 + 1) * width + x0) * chans]);
            if (y0 + 1 < height && x0 + 1 < width) v += w11 * ld(base[((long long)(y0 + 1) * width + x0 + 1) * chans]);
        }
        cols[e] = st(v);
    }
}
