"""bias_act.cu's wrappers: bias + exact GELU (kernels/gelu.py) and bias + tanh GELU (kernels/gelu_tanh.py)."""
import numpy as np

from .runtime import BLOCK, check, grid, kernel, same, storage

SOURCE, DEFINES = "bias_act", ()


def _bias_act(function, y, bias):
    dt = storage("y", y)
    check("y", y, 2, dt)
    same("bias", check("bias", bias, 1, dt), (y.shape[1],))
    kernel(SOURCE, DEFINES, function, dt)(grid(y.size), (BLOCK,), (y, bias, np.int64(y.size), np.int32(y.shape[1])))
    return y


def bias_gelu(y, bias):
    """y <- gelu(y + bias) in place (exact erf GELU); y (N, C)."""
    return _bias_act("bias_gelu", y, bias)


def bias_gelu_tanh(y, bias):
    """y <- gelu_tanh(y + bias) in place; y (N, C)."""
    return _bias_act("bias_gelu_tanh", y, bias)


OPS = {"bias_gelu": bias_gelu, "bias_gelu_tanh": bias_gelu_tanh}
