"""DTM sampling: the im2col step of DCNv1 with a 2x2 kernel, stride 2, no padding, channels-last.

For output pixel (ho, wo) and tap k = 2i + j the sample point is y = 2ho + i + off[2k], x = 2wo + j + off[2k+1]
(float32, as the official CUDA kernel computes it). A sample is 0 unless -1 < y < H and -1 < x < W; inside that
band it is bilinear over the 4 integer neighbours, a neighbour outside the image contributing 0 (weights are not
renormalised). The result, cols (B, Ho, Wo, 4, C), multiplied by the (4C, 2C) weight is the deformable conv."""
import numba as nb
import numpy as np

from ._jit import ahead_kernel, array
from .threads import split_rows


def space_to_depth2_ref(x):
    """x (B, H, W, C) -> (B, H//2, W//2, 4, C): the 2x2 stride-2 patches (odd last row/column dropped)."""
    b, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    return x[:, :2 * ho, :2 * wo].reshape(b, ho, 2, wo, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, ho, wo, 4, c)


def deform_sample_ref(x, offsets):
    """x (B, H, W, C); offsets (B, Ho, Wo, 8) -> cols (B, Ho, Wo, 4, C) in x's dtype."""
    b, h, w, c = x.shape
    _, ho, wo, _ = offsets.shape
    dt = x.dtype.type
    base_y = (2 * np.arange(ho))[:, None, None] + np.array([0, 0, 1, 1])[None, None, :]   # (Ho, 1, 4)
    base_x = (2 * np.arange(wo))[None, :, None] + np.array([0, 1, 0, 1])[None, None, :]   # (1, Wo, 4)
    py = base_y.astype(dt) + offsets[..., 0::2]                      # (B, Ho, Wo, 4)
    px = base_x.astype(dt) + offsets[..., 1::2]
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    py = np.where(inside, py, 0)   # a NaN position is outside, as in the CUDA kernel's band test
    px = np.where(inside, px, 0)
    y0 = np.floor(py)
    x0 = np.floor(px)
    ly = py - y0
    lx = px - x0
    y0 = y0.astype(np.int64)
    x0 = x0.astype(np.int64)
    cols = np.zeros((b, ho, wo, 4, c), dtype=np.float64)
    bidx = np.arange(b)[:, None, None, None]
    for yy, xx, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                        (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
        valid = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        vals = x[bidx, np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64)   # (B, Ho, Wo, 4, C)
        cols += np.where(valid[..., None], wgt[..., None] * vals, 0)
    return cols.astype(x.dtype)


def deform_sample(x, offsets):
    b, _, _, c = x.shape
    _, ho, wo, _ = offsets.shape
    cols = np.zeros((b, ho, wo, 4, c), dtype=x.dtype)
    split_rows(_deform_sample_rows, b * ho, 16 * wo * c, x, offsets, cols)
    return cols


@ahead_kernel(array(4), array(4), array(5), nb.int64, nb.int64)
def _deform_sample_rows(x, offsets, cols, start, stop):
    b, h, w, c = x.shape
    _, ho, wo, _ = offsets.shape
    one = np.float32(1.0)
    for row in range(start, stop):
        n = row // ho
        oy = row % ho
        for ox in range(wo):
            for k in range(4):
                py = np.float32(2 * oy + k // 2) + offsets[n, oy, ox, 2 * k]
                px = np.float32(2 * ox + k % 2) + offsets[n, oy, ox, 2 * k + 1]
                if not (py > -1 and py < h and px > -1 and px < w):
                    continue
                fy = np.floor(py)
                fx = np.floor(px)
                ly = py - fy
                lx = px - fx
                y0 = int(fy)
                x0 = int(fx)
                dst = cols[n, oy, ox, k]
                for dy in range(2):
                    yy = y0 + dy
                    if yy < 0 or yy >= h:
                        continue
                    wy = ly if dy else one - ly
                    for dx in range(2):
                        xx = x0 + dx
                        if xx < 0 or xx >= w:
                            continue
                        wgt = wy * (lx if dx else one - lx)
                        src = x[n, yy, xx]
                        for j in range(c):
                            dst[j] += wgt * src[j]


# op name -> (NumPy reference, Numba kernel), for qnalo.models.ops
OPS = {"deform_sample": (deform_sample_ref, deform_sample)}
