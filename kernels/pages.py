"""Handing back the memory of the JIT compiler once the kernels are loaded."""
import ctypes
import os
import sys


MADV_PAGEOUT = 21   # Linux >= 5.4: reclaim these pages now; clean file pages are dropped, nothing is lost


def release_compiler_pages():
    """Hands back the resident pages of LLVM's shared library (llvmlite), which importing Numba and loading
    compiled kernels touch (~40 + ~50 MiB) and running them never does. They are clean file pages: if Numba
    compiles or loads another kernel later, they are read back in. Returns the bytes advised; 0 where this is
    not Linux, madvise refuses, or QNALO_KEEP_COMPILER_PAGES=1."""
    if not sys.platform.startswith("linux") or os.environ.get("QNALO_KEEP_COMPILER_PAGES") == "1":
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
        madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as f:
            spans = [line.split()[0] for line in f if "libllvmlite" in line]
    except (OSError, AttributeError):
        return 0
    advised = 0
    for span in spans:
        start, end = (int(v, 16) for v in span.split("-"))
        if madvise(start, end - start, MADV_PAGEOUT) == 0:
            advised += end - start
    return advised
