"""dwconv_gelu.cu's wrapper: the ConvFFN's depthwise 3x3 conv + GELU (kernels/dwconv_gelu.py's reference)."""
import numpy as np

from .runtime import BLOCK, check, cupy, grid, kernel, same, storage

RUN = 8   # output pixels along a row per thread (the kernel's RUN)
SOURCE, DEFINES = "dwconv_gelu", (("RUN", RUN),)


def dwconv3x3_gelu(h, pre_bias, weight, bias):
    """h (B, H, W, C) without fc1's bias; pre_bias (C,); weight (3, 3, C); bias (C,) -> (B, H, W, C)."""
    dt = storage("h", h)
    b, height, width, c = check("h", h, 4, dt).shape
    same("weight", check("weight", weight, 3, dt), (3, 3, c))
    for name, vec in (("pre_bias", pre_bias), ("bias", bias)):
        same(name, check(name, vec, 1, dt), (c,))
    out = cupy().empty_like(h)
    runs = b * height * -(-width // RUN) * c
    kernel(SOURCE, DEFINES, "dwconv3x3_gelu", dt)(grid(runs), (BLOCK,), (h, pre_bias, weight, bias, out, np.int32(b),
                                                                        np.int32(height), np.int32(width), np.int32(c)))
    return out


OPS = {"dwconv3x3_gelu": dwconv3x3_gelu}
