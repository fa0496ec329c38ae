"""The hot ops on an NVIDIA GPU: CUDA C in kernels/cuda/*.cu, compiled by CuPy (NVRTC) on first use, once per
device and source file (CuPy also keeps the binaries on disk), called on CuPy arrays. Same signatures and
in-place conventions as the Numba ops (qnalo/models/ops.py); the NumPy references beside those are what the
GPU tests compare against.

CuPy is optional: importing this module does not import it; the first op called without it is a RuntimeError
saying how to install it. Wrappers check dtype, contiguity and shapes, and pass scalars as np.int32 /
np.float32 / np.int64 explicitly. Arrays are float32, or all float16 in one call (a model's dtype="float16"):
each source is then compiled a second time with -DQNALO_HALF, which stores in half precision and computes in
float32 (kernels/cuda/common.cuh)."""
import functools
import os

import numpy as np

SOURCE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")
SOURCES = ("layernorm", "bias_act", "dwconv_gelu", "qna", "window_msa", "hilo", "deform_conv")   # kernels/cuda/<name>.cu
MAX_HEAD_DIM = 128          # the attention kernels keep a query and an output row in registers
QNA_FEATURE_CHUNK = 8       # features per thread in qna.cu (its FEATURE_CHUNK)
DWCONV_RUN = 8              # output pixels along a row per thread in dwconv_gelu.cu (its RUN)
LOFI_QUERIES = 128          # queries (threads) per block of the Lo-Fi kernel, which share its key tiles
WINDOW_QUERIES = 256        # most threads (queries at once) per block of window_msa: 128 registers each fit
MAX_GRID_YZ = 65535         # CUDA's limit on the grid's y and z, which carry heads and batch
BLOCK = 256
MAX_BLOCKS = 1 << 16          # grid-stride loops cover any size


def cupy():
    """The cupy module, or a RuntimeError that says how to get it."""
    try:
        import cupy as cp
    except ImportError:
        raise RuntimeError("qnalo's CUDA ops need CuPy and an NVIDIA GPU: pip install 'qnalo[cuda]' "
                           "(CuPy for CUDA 12; see https://docs.cupy.dev/en/stable/install.html for others)") from None
    return cp


DTYPES = (np.dtype(np.float32), np.dtype(np.float16))   # storage types; arithmetic is float32 in both


@functools.lru_cache(maxsize=None)
def _module(name, device_id, half):
    """kernels/cuda/<name>.cu as a RawModule for one device and storage type (compiled at its first
    get_function)."""
    cp = cupy()
    with open(os.path.join(SOURCE_DIR, name + ".cu")) as f:
        code = f.read()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=code, options=nvrtc_options(half))


def nvrtc_options(half):
    """The NVRTC options every source is compiled with (CuPy adds the device's -arch)."""
    return ("-I" + SOURCE_DIR, "--std=c++14") + (("-DQNALO_HALF",) if half else ())


def _kernel(source, function, dtype):
    return _module(source, cupy().cuda.Device().id, np.dtype(dtype) == np.float16).get_function(function)


def _dtype(name, arr):
    """The storage type of a call, from its first array."""
    dtype = getattr(arr, "dtype", None)
    if dtype not in DTYPES:
        raise TypeError(f"{name}: expected float32 or float16, got {dtype}")
    return dtype


def _check(name, arr, ndim, dtype):
    cp = cupy()
    if not isinstance(arr, cp.ndarray):
        raise TypeError(f"{name}: expected a CuPy array on the GPU, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise TypeError(f"{name}: expected {np.dtype(dtype)} (like the call's other arrays), got {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {arr.shape}")
    if not arr.flags.c_contiguous:
        raise ValueError(f"{name}: expected a C-contiguous array (cupy.ascontiguousarray), got strides {arr.strides}")
    return arr


def _same(name, arr, shape):
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")


def _grid(n):
    return (max(1, min(MAX_BLOCKS, -(-n // BLOCK))),)


def _row_grid(rows):
    """Blocks for the one-warp-per-row kernels (BLOCK / 32 rows each)."""
    return (max(1, -(-rows // (BLOCK // 32))),)


def layernorm(x, weight, bias, eps, out):
    """out = LayerNorm(x) * weight + bias over the last axis; x, out (N, C)."""
    dt = _dtype("x", x)
    rows, cols = _check("x", x, 2, dt).shape
    for name, vec in (("weight", weight), ("bias", bias)):
        _same(name, _check(name, vec, 1, dt), (cols,))
    _same("out", _check("out", out, 2, dt), x.shape)
    _kernel("layernorm", "layernorm_rows", dt)(_row_grid(rows), (BLOCK,),
                                           (x, weight, bias, np.float32(eps), out, np.int32(rows), np.int32(cols)))
    return out


def residual_add(x, y, bias):
    """x <- x + y + bias in place; x, y (N, C), bias (C,)."""
    dt = _dtype("x", x)
    _same("y", _check("y", y, 2, dt), _check("x", x, 2, dt).shape)
    _same("bias", _check("bias", bias, 1, dt), (x.shape[1],))
    _kernel("layernorm", "residual_add", dt)(_grid(x.size), (BLOCK,),
                                             (x, y, bias, np.int64(x.size), np.int32(x.shape[1])))
    return x


def residual_add_layernorm(x, y, bias, weight, ln_bias, eps, out):
    """x <- x + y + bias in place, then out = LayerNorm(x)."""
    dt = _dtype("x", x)
    rows, cols = _check("x", x, 2, dt).shape
    _same("y", _check("y", y, 2, dt), x.shape)
    _same("out", _check("out", out, 2, dt), x.shape)
    for name, vec in (("bias", bias), ("weight", weight), ("ln_bias", ln_bias)):
        _same(name, _check(name, vec, 1, dt), (cols,))
    _kernel("layernorm", "residual_add_layernorm_rows", dt)(
        _row_grid(rows), (BLOCK,), (x, y, bias, weight, ln_bias, np.float32(eps), out, np.int32(rows), np.int32(cols)))
    return out


def _bias_act(function, y, bias):
    dt = _dtype("y", y)
    _check("y", y, 2, dt)
    _same("bias", _check("bias", bias, 1, dt), (y.shape[1],))
    _kernel("bias_act", function, dt)(_grid(y.size), (BLOCK,), (y, bias, np.int64(y.size), np.int32(y.shape[1])))
    return y


def bias_gelu(y, bias):
    """y <- gelu(y + bias) in place (exact erf GELU); y (N, C)."""
    return _bias_act("bias_gelu", y, bias)


def bias_gelu_tanh(y, bias):
    """y <- gelu_tanh(y + bias) in place; y (N, C)."""
    return _bias_act("bias_gelu_tanh", y, bias)


def dwconv3x3_gelu(h, pre_bias, weight, bias):
    """h (B, H, W, C) without fc1's bias; pre_bias (C,); weight (3, 3, C); bias (C,) -> (B, H, W, C)."""
    dt = _dtype("h", h)
    b, height, width, c = _check("h", h, 4, dt).shape
    _same("weight", _check("weight", weight, 3, dt), (3, 3, c))
    for name, vec in (("pre_bias", pre_bias), ("bias", bias)):
        _same(name, _check(name, vec, 1, dt), (c,))
    out = cupy().empty_like(h)
    runs = b * height * -(-width // DWCONV_RUN) * c
    _kernel("dwconv_gelu", "dwconv3x3_gelu", dt)(_grid(runs), (BLOCK,), (h, pre_bias, weight, bias, out, np.int32(b),
                                                                    np.int32(height), np.int32(width), np.int32(c)))
    return out


def qna_windows(lv, rpe, attn_scale, heads, stride, out):
    """As kernels/qna.py qna_windows_ref: lv (B, H, W, nq*h + F), rpe and attn_scale (k*k, nq*h); writes
    out (B, Ho, Wo, F)."""
    dt = _dtype("lv", lv)
    from .qna import _layout, qna_output_size
    b, h, w, n_cols = _check("lv", lv, 4, dt).shape
    ksize, nq, f = _layout(n_cols, _check("rpe", rpe, 2, dt), _check("attn_scale", attn_scale, 2, dt), heads, stride)
    _same("out", _check("out", out, 4, dt),
          (b, qna_output_size(h, ksize, stride), qna_output_size(w, ksize, stride), f))
    chunks = -(-(f // heads) // QNA_FEATURE_CHUNK)
    _kernel("qna", "qna_windows", dt)(_grid(out.size // (f // heads) * chunks), (BLOCK,), (
        lv, rpe, attn_scale, out, np.int32(b), np.int32(h), np.int32(w), np.int32(heads), np.int32(nq),
        np.int32(ksize), np.int32(stride), np.int32(out.shape[1]), np.int32(out.shape[2]), np.int32(f)))
    return out


def _attention_kernel(name, head_dim):
    """The attention kernel for a head size: its _hd32 build (head_dim compiled in) or the generic one."""
    return name + "_hd32" if head_dim == 32 else name


def _head_dim(head_dim):
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim}: the CUDA attention kernels take 1..{MAX_HEAD_DIM}")
    return head_dim


def window_msa(qkv, rel_bias, window, heads, out):
    """As kernels/window_msa.py window_msa_ref: qkv (B, H, W, 3C), rel_bias (heads, w*w, w*w); writes out
    (B, H, W, C)."""
    dt = _dtype("qkv", qkv)
    from .window_msa import _check as check_layout
    b, h, w, n_cols = _check("qkv", qkv, 4, dt).shape
    d = _head_dim(check_layout(qkv, _check("rel_bias", rel_bias, 3, dt), window, heads))
    _same("out", _check("out", out, 4, dt), (b, h, w, heads * d))
    if b > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"batch {b}, {heads} heads: the CUDA window MSA takes up to {MAX_GRID_YZ} of each")
    threads = min(WINDOW_QUERIES, -(-window * window // 32) * 32)   # a thread per query, in rounds if need be
    _kernel("window_msa", _attention_kernel("window_msa", d), dt)(
        ((h // window) * (w // window), heads, b), (threads,), (
            qkv, rel_bias, out, np.int32(h), np.int32(w), np.int32(heads), np.int32(d), np.int32(window),
            np.float32(1.0 / np.sqrt(d))))
    return out


def window_avgpool(x, ws):
    """x (B, H, W, C) -> (B, ceil(H/ws), ceil(W/ws), C): mean over ws x ws blocks of the zero-padded map."""
    dt = _dtype("x", x)
    b, h, w, c = _check("x", x, 4, dt).shape
    gh, gw = -(-h // ws), -(-w // ws)
    pooled = cupy().empty((b, gh, gw, c), dt)
    _kernel("hilo", "window_avgpool", dt)(_grid(pooled.size), (BLOCK,), (
        x, pooled, np.int32(b), np.int32(h), np.int32(w), np.int32(c), np.int32(ws)))
    return pooled


def hifi_attention(qkv, qkv_bias, ws, heads, head_dim, scale, out):
    """As kernels/hilo.py hifi_attention_ref; writes out[..., :heads*head_dim]."""
    dt = _dtype("qkv", qkv)
    b, h, w, qkv_cols = _check("qkv", qkv, 4, dt).shape
    dim = heads * _head_dim(head_dim)
    if qkv_cols < 3 * dim or _check("qkv_bias", qkv_bias, 1, dt).shape[0] < 3 * dim:
        raise ValueError(f"qkv {qkv.shape} / qkv_bias {qkv_bias.shape}: need at least {3 * dim} columns")
    if _check("out", out, 4, dt).shape[:3] != (b, h, w) or out.shape[3] < dim:
        raise ValueError(f"out {out.shape}: need (B, H, W) = {(b, h, w)} and at least {dim} columns")
    _kernel("hilo", _attention_kernel("hifi_attention", head_dim), dt)(_grid(b * h * w * heads), (BLOCK,), (
        qkv, qkv_bias, out, np.int32(b), np.int32(h), np.int32(w), np.int32(qkv_cols), np.int32(out.shape[3]),
        np.int32(heads), np.int32(head_dim), np.int32(ws), np.float32(scale)))
    return out


def lofi_attention(qkv, q_col, q_bias, kv, kv_bias, heads, head_dim, scale, out, out_col):
    """As kernels/hilo.py lofi_attention_ref; writes out[..., out_col:out_col + heads*head_dim]."""
    dt = _dtype("qkv", qkv)
    b, h, w, qkv_cols = _check("qkv", qkv, 4, dt).shape
    dim = heads * _head_dim(head_dim)
    _, keys, kv_cols = _check("kv", kv, 3, dt).shape
    if kv.shape[0] != b or kv_cols != 2 * dim or q_col + dim > qkv_cols:
        raise ValueError(f"qkv {qkv.shape} (queries at column {q_col}), kv {kv.shape}: do not fit {heads} x "
                         f"{head_dim}")
    _same("q_bias", _check("q_bias", q_bias, 1, dt), (dim,))
    _same("kv_bias", _check("kv_bias", kv_bias, 1, dt), (2 * dim,))
    if _check("out", out, 4, dt).shape[:3] != (b, h, w) or out_col + dim > out.shape[3]:
        raise ValueError(f"out {out.shape}: need (B, H, W) = {(b, h, w)} and columns up to {out_col + dim}")
    if b > MAX_GRID_YZ or heads > MAX_GRID_YZ:
        raise ValueError(f"batch {b}, {heads} heads: the CUDA Lo-Fi attention takes up to {MAX_GRID_YZ} of each")
    _kernel("hilo", _attention_kernel("lofi_attention", head_dim), dt)(
        (max(1, -(-h * w // LOFI_QUERIES)), heads, b), (LOFI_QUERIES,), (
            qkv, q_bias, kv, kv_bias, out, np.int32(h * w), np.int32(qkv_cols), np.int32(q_col), np.int32(keys),
            np.int32(out.shape[3]), np.int32(out_col), np.int32(heads), np.int32(head_dim), np.float32(scale)))
    return out


def deform_sample(x, offsets):
    """x (B, H, W, C); offsets (B, Ho, Wo, 8) -> cols (B, Ho, Wo, 4, C), as kernels/deform_conv.py."""
    dt = _dtype("x", x)
    b, h, w, c = _check("x", x, 4, dt).shape
    _, ho, wo, eight = _check("offsets", offsets, 4, dt).shape
    if offsets.shape[0] != b or eight != 8:
        raise ValueError(f"offsets {offsets.shape}: expected ({b}, Ho, Wo, 8)")
    cols = cupy().empty((b, ho, wo, 4, c), dt)
    _kernel("deform_conv", "deform_sample", dt)(_grid(cols.size), (BLOCK,), (
        x, offsets, cols, np.int32(b), np.int32(h), np.int32(w), np.int32(c), np.int32(ho), np.int32(wo)))
    return cols
