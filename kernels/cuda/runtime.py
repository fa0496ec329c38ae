"""What every CUDA wrapper shares: CuPy (optional: imported on first use), each .cu compiled once per device,
storage type and set of -D defines, and the checks and launch shapes of the wrappers.

Arrays are float32, or all float16 in one call (a model's dtype="float16"): the source is then compiled a
second time with -DQNALO_HALF, which stores in half precision and computes in float32 (common.cuh). Constants
that a wrapper and its kernels both use are the wrapper's DEFINES, passed to the compiler as -DNAME=value, so
the two cannot drift apart."""
import functools
import os

import numpy as np

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
BLOCK = 256
MAX_BLOCKS = 1 << 16          # grid-stride loops cover any size
MAX_GRID_YZ = 65535           # CUDA's limit on the grid's y and z, which carry heads and batch
DTYPES = (np.dtype(np.float32), np.dtype(np.float16))   # storage types; arithmetic is float32 in both


def cupy():
    """The cupy module, or a RuntimeError that says how to get it."""
    try:
        import cupy as cp
    except ImportError:
        raise RuntimeError("qnalo's CUDA ops need CuPy and an NVIDIA GPU: pip install 'qnalo[cuda]' "
                           "(CuPy for CUDA 12; see https://docs.cupy.dev/en/stable/install.html for others)") from None
    return cp


def nvrtc_options(half, defines=()):
    """The compiler options of a source with these (name, value) defines (CuPy adds the device's -arch)."""
    return (("-I" + SOURCE_DIR, "--std=c++14") + tuple(f"-D{name}={value}" for name, value in defines)
            + (("-DQNALO_HALF",) if half else ()))


@functools.lru_cache(maxsize=None)
def module(source, defines, device_id, half):
    """kernels/cuda/<source>.cu as a RawModule for one device, storage type and defines (compiled at its first
    get_function)."""
    cp = cupy()
    with open(os.path.join(SOURCE_DIR, source + ".cu")) as f:
        code = f.read()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=code, options=nvrtc_options(half, defines))


def kernel(source, defines, function, dtype):
    return module(source, defines, cupy().cuda.Device().id, np.dtype(dtype) == np.float16).get_function(function)


def storage(name, arr):
    """The storage type of a call, from its first array."""
    dtype = getattr(arr, "dtype", None)
    if dtype not in DTYPES:
        raise TypeError(f"{name}: expected float32 or float16, got {dtype}")
    return dtype


def check(name, arr, ndim, dtype):
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


def same(name, arr, shape):
    if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(arr.shape)}")


def grid(n):
    return (max(1, min(MAX_BLOCKS, -(-n // BLOCK))),)


def row_grid(rows):
    """Blocks for the one-warp-per-row kernels (BLOCK / 32 rows each)."""
    return (max(1, -(-rows // (BLOCK // 32))),)
