"""qna.cu's wrapper: the QnA layer's windows (kernels/qna.py's qna_windows_ref)."""
import numpy as np

from ..qna import _layout, qna_output_size
from .runtime import BLOCK, check, grid, kernel, same, storage

FEATURE_CHUNK = 8   # features per thread (the kernel's FEATURE_CHUNK)
SOURCE, DEFINES = "qna", (("FEATURE_CHUNK", FEATURE_CHUNK),)


def qna_windows(lv, rpe, attn_scale, heads, stride, out):
    """As kernels/qna.py qna_windows_ref: lv (B, H, W, nq*h + F), rpe and attn_scale (k*k, nq*h); writes
    out (B, Ho, Wo, F)."""
    dt = storage("lv", lv)
    b, h, w, n_cols = check("lv", lv, 4, dt).shape
    ksize, nq, f = _layout(n_cols, check("rpe", rpe, 2, dt), check("attn_scale", attn_scale, 2, dt), heads, stride)
    same("out", check("out", out, 4, dt), (b, qna_output_size(h, ksize, stride), qna_output_size(w, ksize, stride), f))
    chunks = -(-(f // heads) // FEATURE_CHUNK)
    kernel(SOURCE, DEFINES, "qna_windows", dt)(grid(out.size // (f // heads) * chunks), (BLOCK,), (
        lv, rpe, attn_scale, out, np.int32(b), np.int32(h), np.int32(w), np.int32(heads), np.int32(nq),
        np.int32(ksize), np.int32(stride), np.int32(out.shape[1]), np.int32(out.shape[2]), np.int32(f)))
    return out


OPS = {"qna_windows": qna_windows}
