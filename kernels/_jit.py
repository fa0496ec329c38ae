"""The compile settings every qnalo kernel shares."""
import functools

import numba as nb

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
