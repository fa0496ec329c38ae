"""layernorm.cu's wrappers: LayerNorm, the residual add, and the two fused (kernels/layernorm.py's references)."""
import numpy as np

from .runtime import BLOCK, check, grid, kernel, row_grid, same, storage

SOURCE, DEFINES = "layernorm", ()


def layernorm(x, weight, bias, eps, out):
    """out = LayerNorm(x) * weight + bias over the last axis; x, out (N, C)."""
    dt = storage("x", x)
    rows, cols = check("x", x, 2, dt).shape
    for name, vec in (("weight", weight), ("bias", bias)):
        same(name, check(name, vec, 1, dt), (cols,))
    same("out", check("out", out, 2, dt), x.shape)
    kernel(SOURCE, DEFINES, "layernorm_rows", dt)(row_grid(rows), (BLOCK,),
                                                  (x, weight, bias, np.float32(eps), out, np.int32(rows), np.int32(cols)))
    return out


def residual_add(x, y, bias):
    """x <- x + y + bias in place; x, y (N, C), bias (C,)."""
    dt = storage("x", x)
    same("y", check("y", y, 2, dt), check("x", x, 2, dt).shape)
    same("bias", check("bias", bias, 1, dt), (x.shape[1],))
    kernel(SOURCE, DEFINES, "residual_add", dt)(grid(x.size), (BLOCK,),
                                                (x, y, bias, np.int64(x.size), np.int32(x.shape[1])))
    return x


def residual_add_layernorm(x, y, bias, weight, ln_bias, eps, out):
    """x <- x + y + bias in place, then out = LayerNorm(x)."""
    dt = storage("x", x)
    rows, cols = check("x", x, 2, dt).shape
    same("y", check("y", y, 2, dt), x.shape)
    same("out", check("out", out, 2, dt), x.shape)
    for name, vec in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        same(name, check(name, vec, 1, dt), (cols,))
    kernel(SOURCE, DEFINES, "residual_add_layernorm_rows", dt)(
        row_grid(rows), (BLOCK,), (x, y, bias, weight, ln_bias, np.float32(eps), out, np.int32(rows), np.int32(cols)))
    return out


OPS = {"layernorm": layernorm, "residual_add": residual_add, "residual_add_layernorm": residual_add_layernorm}
