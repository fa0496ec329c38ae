"""The compile and launch settings every qnalo kernel shares."""
import functools
import os
import threading

import numba as nb

# Threading layer: Numba's own work queue unless the user chose one (NUMBA_THREADING_LAYER). The OpenMP layer
# shares the process's OpenMP runtime: with PyTorch loaded in the same process it made a forward pass 6x slower
# (580 vs 95 ms, LITv2-S); the work queue's workers sleep between kernels and leave the cores to BLAS.
if not os.environ.get("NUMBA_THREADING_LAYER") and nb.config.THREADING_LAYER == "default":
    nb.config.THREADING_LAYER = "workqueue"

# The work queue aborts the process if two threads launch parallel kernels at once, so qnalo runs one
# forward pass at a time per process; other threads wait (each pass already uses every core).
launch_lock = threading.RLock()

# Fast-math flags that let LLVM vectorise and reassociate, but keep NaN/Inf semantics (no nnan/ninf):
# a NaN input propagates to the output instead of being silently turned into a number.
FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}

# error_model="numpy": float division by zero gives inf/nan instead of a Python exception; the exception
# check inside a loop stops LLVM from vectorising it (erf-GELU went 4x slower with it).
# cache=True: compiled machine code is kept next to the source (or in NUMBA_CACHE_DIR), so only the
# first run on a machine compiles.
kernel = functools.partial(nb.njit, cache=True, fastmath=FASTMATH, error_model="numpy")
parallel_kernel = functools.partial(kernel, parallel=True)
inline_kernel = functools.partial(kernel, inline="always")
