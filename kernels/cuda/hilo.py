"""hilo.cu's wrappers: HiLo's window pooling, Hi-Fi and Lo-Fi attention (kernels/hilo.py's references)."""
import numpy as np

from .runtime import BLOCK, MAX_GRID_YZ, check, cupy, grid, kernel, same, storage
from .window_msa import MAX_HEAD_DIM, attention_kernel, checked_head_dim

LOFI_QUERIES = 128   # queries (threads) per block of the Lo-Fi kernel, which share its key tiles
SOURCE, DEFINES = "hilo", (("MAX_HEAD_DIM", MAX_HEAD_DIM),)


def window_avgpool(x, ws):
    """x (B, H, W, C) -> (B, ceil(H/ws), ceil(W/ws), C): mean over ws x ws blocks of the zero-padded map."""
    dt = storage("x", x)
    b, h, w, c = check("x", x, 4, dt).shape
    gh, gw = -(-h // ws), -(-w // ws)
    pooled = cupy().empty((b, gh, gw, c), dt)
    kernel(SOURCE, DEFINES, "window_avgpool", dt)(grid(pooled.size), (BLOCK,), (
        x, pooled, np.int32(b), np.int32(h), np.int32(w), np.int32(c), np.int32(ws)))
    return pooled


def hifi_attention(qkv, qkv_bias, ws, heads, head_dim, scale, out):
    """As kernels/hilo.py hifi_attention_ref; writes out[..., :heads*head_dim]."""
    dt = storage("qkv", qkv)
    b, h, w, qkv_cols = check("qkv", qkv, 4, dt).shape
    dim = heads * checked_head_dim(head_dim)
    if qkv_cols < 3 * dim or check("qkv_bias", qkv_bias, 1, dt).shape[0] < 3 * dim:
        raise ValueError(f"qkv {qkv.shape} / qkv_bias {qkv_bias.shape}: need at least {3 * dim} columns")
    if check("out", out, 4, dt).shape[:3] != (b, h, w) or out.shape[3] < dim:
        raise ValueError(f"out {out.shape}: need (B, H, W) = {(b, h, w)} and at least {dim} columns")
    kernel(SOURCE, DEFINES, attention_kernel("hifi_attention", head_dim), dt)(grid(b * h * w * heads), (BLOCK,), (
        qkv, qkv_bias, out, np.int32(b), np.int32(h), np.int32(w), np.int32(qkv_cols), np.int32(out.shape[3]),
        np.int32(heads), np.int32(head_dim), np.int32(ws), np.float32(scale)))
    return out


def lofi_attention(qkv, q_col, q_bias, kv, kv_bias, heads, head_dim, scale, out, out_col):
    """As kernels/hilo.py lofi_attention_ref; writes out[..., out_col:out_col + heads*head_dim]."""
    dt = storage("qkv", qkv)
    b, h, w, qkv_cols = check("qkv", qkv, 4, dt).shape
    dim = heads * checked_head_dim(head_dim)
    _, keys, kv_cols = check("kv", kv, 3, dt).shape
    if kv.shape[0] != b or kv_cols != 2 * dim or q_col + dim > qkv_cols:
        raise ValueError(f"qkv {qkv.shape} (queries at column {q_col}), kv {kv.shape}: do not fit {heads} x "
                         f"{head_dim}")
    same("q_bias", check("q_bias", q_bias, 1, dt), (dim,))
    same("kv_bias", check("kv_bias", kv_bias, 1, dt), (2 * dim,))
    if check("out", out, 4, dt).shape[:3] != (b, h, w) or out_col + dim > out.shape[3]:
        raise ValueError(f"out {out.shape}: need (B, H, W) = {(b, h, w)} and columns up to {out_col + dim}")
    if b > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"batch {b}, {heads} heads: the CUDA Lo-Fi attention takes up to {MAX_GRID_YZ} of each")
    kernel(SOURCE, DEFINES, attention_kernel("lofi_attention", head_dim), dt)(
        (max(1, -(-h * w // LOFI_QUERIES)), heads, b), (LOFI_QUERIES,), (
            qkv, q_bias, kv, kv_bias, out, np.int32(h * w), np.int32(qkv_cols), np.int32(q_col), np.int32(keys),
            np.int32(out.shape[3]), np.int32(out_col), np.int32(heads), np.int32(head_dim), np.float32(scale)))
    return out


OPS = {"window_avgpool": window_avgpool, "hifi_attention": hifi_attention, "lofi_attention": lofi_attention}
