"""window_msa.cu's wrapper: QnA-ViT's window MSA with relative position bias (kernels/window_msa.py's
reference)."""
import numpy as np

from ..window_msa import _check as check_layout
from .runtime import MAX_GRID_YZ, check, kernel, same, storage

MAX_HEAD_DIM = 128     # the attention kernels keep a query and an output row in registers (attention.cuh)
WINDOW_QUERIES = 256   # most threads (queries at once) per block: 128 registers each fit
SOURCE, DEFINES = "window_msa", (("MAX_HEAD_DIM", MAX_HEAD_DIM),)


def attention_kernel(name, head_dim):
    """The attention kernel for a head size: its _hd32 build (head_dim compiled in) or the generic one."""
    return name + "_hd32" if head_dim == 32 else name


def checked_head_dim(head_dim):
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim}: the CUDA attention kernels take 1..{MAX_HEAD_DIM}")
    return head_dim


def window_msa(qkv, rel_bias, window, heads, out):
    """As kernels/window_msa.py window_msa_ref: qkv (B, H, W, 3C), rel_bias (heads, w*w, w*w); writes out
    (B, H, W, C)."""
    dt = storage("qkv", qkv)
    b, h, w, n_cols = check("qkv", qkv, 4, dt).shape
    d = checked_head_dim(check_layout(qkv, check("rel_bias", rel_bias, 3, dt), window, heads))
    same("out", check("out", out, 4, dt), (b, h, w, heads * d))
    if b > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"batch {b}, {heads} heads: the CUDA window MSA takes up to {MAX_GRID_YZ} of each")
    threads = min(WINDOW_QUERIES, -(-window * window // 32) * 32)   # a thread per query, in rounds if need be
    kernel(SOURCE, DEFINES, attention_kernel("window_msa", d), dt)(
        ((h // window) * (w // window), heads, b), (threads,), (
            qkv, rel_bias, out, np.int32(h), np.int32(w), np.int32(heads), np.int32(d), np.int32(window),
            np.float32(1.0 / np.sqrt(d))))
    return out


OPS = {"window_msa": window_msa}
