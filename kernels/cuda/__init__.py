"""The hot ops on an NVIDIA GPU: the CUDA C of each op in kernels/cuda/<op>.cu and, beside it, its wrapper
<op>.py (same signature and in-place conventions as the Numba op; the NumPy reference beside that is what the GPU
tests compare against). CuPy compiles each source (NVRTC) on first use; importing this package does not import
CuPy, and the first op called without it is a RuntimeError saying how to install it. Wrappers check dtype,
contiguity and shapes, and pass scalars as np.int32 / np.float32 / np.int64 explicitly."""
from types import SimpleNamespace

from . import bias_act, deform_conv, dwconv_gelu, hilo, layernorm, qna, window_msa
from .runtime import SOURCE_DIR, cupy, module, nvrtc_options, storage  # noqa: F401  (the package's API)

WRAPPERS = (layernorm, bias_act, dwconv_gelu, qna, window_msa, hilo, deform_conv)
SOURCES = {w.SOURCE: w.DEFINES for w in WRAPPERS}    # source name -> the -D defines it is compiled with
# every op by name (qnalo.models.ops builds device="cuda"'s op set from it when the set is made)
ops = SimpleNamespace(**{name: op for w in WRAPPERS for name, op in w.OPS.items()})
