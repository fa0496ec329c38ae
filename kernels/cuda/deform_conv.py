"""deform_conv.cu's wrapper: the DTM's deformable sampling (kernels/deform_conv.py's reference)."""
import numpy as np

from .runtime import BLOCK, check, cupy, grid, kernel, storage

SOURCE, DEFINES = "deform_conv", ()


def deform_sample(x, offsets):
    """x (B, H, W, C); offsets (B, Ho, Wo, 8) -> cols (B, Ho, Wo, 4, C), as kernels/deform_conv.py."""
    dt = storage("x", x)
    b, h, w, c = check("x", x, 4, dt).shape
    _, ho, wo, eight = check("offsets", offsets, 4, dt).shape
    if offsets.shape[0] != b or eight != 8:
        raise ValueError(f"offsets {offsets.shape}: expected ({b}, Ho, Wo, 8)")
    cols = cupy().empty((b, ho, wo, 4, c), dt)
    kernel(SOURCE, DEFINES, "deform_sample", dt)(grid(cols.size), (BLOCK,), (
        x, offsets, cols, np.int32(b), np.int32(h), np.int32(w), np.int32(c), np.int32(ho), np.int32(wo)))
    return cols


OPS = {"deform_sample": deform_sample}
