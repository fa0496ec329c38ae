"""A machine's first run compiles the kernels in parallel.

Numba compiles one function at a time per process (a global compiler lock), and the kernels of both model
families take ~10 s of one core. On a cold cache, compile_ahead (called by the first model's warm-up) starts
helper processes, `python -m qnalo.kernels._precompile`, that compile kernels declared with ahead_kernel into
Numba's disk cache while this process compiles others; the warm-up then loads them all from the cache. Each unit
of work is claimed by creating a file in a private folder (O_EXCL), so no unit is compiled twice. Numba writes
each cache file to a temporary name and renames it, so a reader never sees half a file; a helper that fails or
is killed leaves its kernels to the warm-up, which compiles them as it always did."""
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from . import _jit, threads

# Units of work, largest first so that the processes finish close together (compile seconds on the project's
# 2-core Xeon). Kernels that call a shared kernel stay in one unit: two processes compiling one function at
# once could save two of its specializations under one cache file name.
UNITS = (
    ("gemm.gemm_tiles", "hilo._lofi_heads", "window_msa._window_heads"),   # 2.0 + 1.3 + 0.7 (the last two call
                                                                            # gemm_tiles, softmax_padded_rows)
    ("qna._qna_factored_rows",),                                            # 2.3
    ("dwconv_gelu._dwconv3x3_gelu_rows",),                                  # 0.7
    ("hilo._hifi_windows",),                                                # 0.6
    ("hilo.window_avgpool",),                                               # 0.4
    ("deform_conv._deform_sample_rows",),                                   # 0.3
    ("layernorm._residual_add_layernorm_rows",),                            # 0.3
    ("qna._logit_stats",),                                                  # 0.3
    ("gelu_tanh._bias_gelu_tanh_rows",),                                    # 0.3
    ("layernorm._residual_add_rows",),                                      # 0.2
    ("layernorm._layernorm_rows",),                                         # 0.2
    ("spin.wait_until", "spin.signal_and_wait"),                            # 0.2
    ("gelu.bias_gelu",),                                                    # 0.1
)
HELPER_TIMEOUT_S = 300   # a helper still compiling after this is stopped, and the warm-up compiles its share

_STARTED = []
_LOCK = threading.Lock()


def kernel(name):
    """The dispatcher of "module.function" in qnalo.kernels."""
    module, function = name.split(".")
    return getattr(importlib.import_module(f"{__package__}.{module}"), function)


def _in_disk_cache(dispatcher):
    """Whether Numba's disk cache holds dispatcher's ahead_types, looked up as Dispatcher.compile does."""
    cache = dispatcher._cache
    key = cache._index_key(dispatcher.ahead_types, dispatcher.targetctx.codegen())
    return key in cache._cache_file._load_index()


def _cold_units():
    try:
        return [i for i, unit in enumerate(UNITS) if not all(_in_disk_cache(kernel(name)) for name in unit)]
    except Exception:   # Numba's cache internals changed: leave the compiling to the warm-up
        return []


def compile_ahead():
    """Once per process: on a cold cache, compiles every unit across NUM_THREADS processes (this one included;
    by default as many as the CPUs it may use), and returns when they are in the cache or were given up. Does
    nothing on a warm cache, without a disk cache, or with one thread: the warm-up then compiles what it runs,
    as before."""
    with _LOCK:
        if _STARTED or not _jit.CACHE:
            return
        _STARTED.append(True)
        cold = _cold_units()
        if threads.NUM_THREADS >= 2 and len(cold) >= 2:
            _compile_in_processes(cold, min(threads.NUM_THREADS, len(cold)))


def _compile_in_processes(cold, processes):
    claims = tempfile.mkdtemp(prefix="qnalo-compile-")
    helpers = []
    try:
        for _ in range(processes - 1):
            helper = _start_helper(claims, cold)
            if helper is not None:
                helpers.append(helper)
        if not helpers:   # alone, this process would also compile kernels its models never run
            return
        if _compile_claimed(claims, cold) < len(cold):   # else the helpers have nothing to finish
            deadline = time.monotonic() + HELPER_TIMEOUT_S
            for helper in helpers:
                try:
                    helper.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
    finally:
        for helper in helpers:
            if helper.poll() is None:
                helper.kill()
                helper.wait()
        shutil.rmtree(claims, ignore_errors=True)


def _start_helper(claims, units):
    if not sys.executable or getattr(sys, "frozen", False):   # no interpreter to start (embedded, or a frozen app)
        return None
    env = dict(os.environ)
    if _jit.nb.config.CACHE_DIR:   # the folder this process chose (NUMBA_CACHE_DIR, or the user's fallback)
        env["NUMBA_CACHE_DIR"] = _jit.nb.config.CACHE_DIR
    try:
        return subprocess.Popen([sys.executable, "-m", __name__, claims, os.path.dirname(_jit.__file__),
                                 str(os.getpid()), *map(str, units)], env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except OSError:
        return None


def _claim(claims, unit):
    try:
        os.close(os.open(os.path.join(claims, str(unit)), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except OSError:   # claimed by another process, or the folder is gone (the run is over)
        return False


def _compile_claimed(claims, units, parent=None):
    """Compiles each of `units` this process claims first; returns how many it claimed."""
    claimed = 0
    for unit in units:
        if parent is not None and os.getppid() != parent:   # the parent is gone: nobody will load these
            break
        if _claim(claims, unit):
            claimed += 1
            for name in UNITS[unit]:
                dispatcher = kernel(name)
                dispatcher.compile(dispatcher.ahead_types)
    return claimed


def main(argv):
    """A helper: compiles the units it claims while its parent lives. Exits at once (2) if it imported another
    copy of the kernels, whose cache entries would not be the ones the parent looks up."""
    claims, kernels_dir, parent, *units = argv
    if os.path.dirname(_jit.__file__) != kernels_dir:
        return 2
    _compile_claimed(claims, [int(u) for u in units], int(parent))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
