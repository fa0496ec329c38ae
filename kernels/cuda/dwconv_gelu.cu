// ConvFFN middle (kernels/dwconv_gelu.py): depthwise 3x3 conv, zero padding 1, with fc1's bias folded in
// (pre_bias, added to in-image samples only) and the conv bias, then exact GELU. Channels-last:
// h, out (B, H, W, C); weight (3, 3, C). One thread per output element, channels fastest (coalesced).
#include "common.cuh"

extern "C" __global__ void dwconv3x3_gelu(const store_t* __restrict__ h, const store_t* __restrict__ pre_bias,
                                          const store_t* __restrict__ weight, const store_t* __restrict__ bias,
                                          store_t* __restrict__ out, int batch, int height, int width, int chans) {
    FOR_EACH_ELEMENT(i, (long long)batch * height * width * chans) {
        Nhwc at = nhwc_index(i, height, width, chans);
        int c = at.c, x = at.x, y = at.y;
        long long img = at.img;
        float acc = ld(bias[c]), pre = ld(pre_bias[c]);
        for (int dy = 0; dy < 3; ++dy) {
            int yy = y + dy - 1;
            if (yy < 0 || yy >= height) continue;
            for (int dx = 0; dx < 3; ++dx) {
                int xx = x + dx - 1;
                if (xx < 0 || xx >= width) continue;
                acc += (ld(h[((img * height + yy) * width + xx) * chans + c]) + pre) *
                       ld(weight[(dy * 3 + dx) * chans + c]);
            }
        }
        out[i] = st(gelu_erf(acc));
    }
}
