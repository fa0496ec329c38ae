"""The compile and launch settings every qnalo kernel shares.

Kernels are serial Numba functions that release the GIL; the few with enough work are split by rows across a
small pool of Python threads (`split_rows`). qnalo uses no Numba threading layer: the OpenMP layer shares the
process's OpenMP runtime and made a LITv2-S forward pass 6x slower with PyTorch imported in the same process
(580 vs 95 ms), and the work-queue layer cost ~160 us per launch and aborts on concurrent launches."""
import ctypes
import functools
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numba as nb

# Fast-math flags that let LLVM vectorise and reassociate, but keep NaN/Inf semantics (no nnan/ninf):
# a NaN input propagates to the output instead of being silently turned into a number.
FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}

# error_model="numpy": float division by zero gives inf/nan instead of a Python exception; the exception
# check inside a loop stops LLVM from vectorising it (erf-GELU went 4x slower with it).
# cache=True: compiled machine code is kept next to the source (or in NUMBA_CACHE_DIR), so only the
# first run on a machine compiles. nogil=True: kernels run in parallel from several threads.
kernel = functools.partial(nb.njit, cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
inline_kernel = functools.partial(kernel, inline="always")


def _default_threads():
    for name in ("QNALO_NUM_THREADS", "NUMBA_NUM_THREADS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


NUM_THREADS = _default_threads()
# Below this many element-operations per thread a kernel stays on the calling thread. On 2 cores the split
# measured neutral in a whole LITv2-S pass (min of 6x8 runs: 70.6 ms split vs 67.3 ms serial, medians 81 vs 82:
# OpenBLAS's idle workers hold the other core) while a lone stage-0 dwconv ran 1.6x faster split; so only
# kernels this large are split, for machines with more cores.
MIN_WORK_PER_THREAD = 1_000_000

_pool_lock = threading.Lock()
_pool_state = {"pid": None, "pool": None}


def _pool():
    # one pool per process: threads do not survive fork, so a forked child makes its own
    with _pool_lock:
        if _pool_state["pid"] != os.getpid():
            _pool_state["pool"] = ThreadPoolExecutor(max_workers=max(1, NUM_THREADS - 1),
                                                     thread_name_prefix="qnalo")
            _pool_state["pid"] = os.getpid()
        return _pool_state["pool"]


def split_rows(fn, n_rows, work_per_row, *args):
    """Run fn(*args, start, stop) over rows [0, n_rows), split across threads when there is enough work.
    The calling thread takes the first share itself."""
    parts = min(NUM_THREADS, n_rows, max(1, n_rows * work_per_row // MIN_WORK_PER_THREAD))
    if parts <= 1:
        fn(*args, 0, n_rows)
        return
    bounds = [n_rows * k // parts for k in range(parts + 1)]
    futures = [_pool().submit(fn, *args, bounds[k], bounds[k + 1]) for k in range(1, parts)]
    fn(*args, bounds[0], bounds[1])
    for future in futures:
        future.result()


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
