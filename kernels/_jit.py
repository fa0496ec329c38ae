"""How every qnalo kernel is compiled: the fast-math flags, the kernel cache (its folder, and a stamp of all the
kernel sources), and the decorators the kernel modules declare their kernels with. Kernels are serial Numba
functions that release the GIL; threads.py splits the large ones across threads, pages.py hands the compiler's
memory back once they are loaded."""
import functools
import hashlib
import os
import tempfile

import numba as nb
from numba.core import caching
from numba.core.compiler_lock import global_compiler_lock

# Fast-math flags that let LLVM vectorise and reassociate, but keep NaN/Inf semantics (no nnan/ninf):
# a NaN input propagates to the output instead of being silently turned into a number.
FASTMATH = {"contract", "reassoc", "arcp", "nsz", "afn"}



def _writable(folder):
    """Whether files can be created in `folder` (made if missing); tried for real, as root passes os.access."""
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
        return True
    except OSError:
        return False


def _user_cache_dir():
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "qnalo", "kernels")


def _choose_cache():
    """(cache compiled kernels?, a notice for the first model or None). Numba keeps its cache next to the
    sources; a read-only install falls back to the user's cache folder, and with none writable, to compiling
    in every process. Never a shared temporary folder: machine code loaded from there could be anyone's."""
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True, None                          # the user's choice, used as given
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "__pycache__")
    if _writable(here):
        return True, None
    fallback = _user_cache_dir()
    if _writable(fallback):
        nb.config.CACHE_DIR = fallback             # read when each kernel is declared, below and in the op modules
        return True, (f"qnalo: the kernel cache beside the installed package ({here}) is not writable; "
                      f"compiled kernels are cached in {fallback} instead")
    return False, (f"qnalo: no writable folder for the kernel cache ({here}, {fallback}); kernels are compiled "
                   "in every process (about 10 s each time); set NUMBA_CACHE_DIR to a writable folder")


CACHE, CACHE_NOTICE = _choose_cache()
KERNELS_DIR = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def kernel_sources_digest(folder=KERNELS_DIR):
    """sha256 of every kernel module's name and text in `folder`."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.digest()


def _whole_sources_locator(numba_locator):
    """Numba's cache locator `numba_locator`, for the kernel modules only, with their cached code stamped by all
    the kernel sources: Numba stamps it by its own file alone, but a kernel carries code inlined or linked from
    the other modules (gemm_tiles, the softmax), and a change there must not leave it running the old code."""
    class Locator(numba_locator):
        def get_source_stamp(self):
            return kernel_sources_digest()

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != KERNELS_DIR:
                return None
            return super().from_function(py_func, py_file)
    return Locator


caching.CacheImpl._locator_classes[:0] = [_whole_sources_locator(locator) for locator in (
    caching.UserProvidedCacheLocator, caching.InTreeCacheLocator, caching.UserWideCacheLocator)]

# error_model="numpy": float division by zero gives inf/nan instead of a Python exception; the exception
# check inside a loop stops LLVM from vectorising it (erf-GELU went 4x slower with it).
# cache: compiled machine code is kept next to the source (see _choose_cache), so only the first run on a
# machine compiles. nogil=True: kernels run in parallel from several threads.
kernel = functools.partial(nb.njit, cache=CACHE, fastmath=FASTMATH, error_model="numpy", nogil=True)
inline_kernel = functools.partial(kernel, inline="always")


def ahead_kernel(*arg_types):
    """A kernel declared with the argument types the models pass it (ahead_types): a machine's first run compiles
    it for them before the first model, in parallel with the other kernels (_precompile.py). Other argument types
    compile a specialization of their own when first used, as with `kernel`."""
    def declare(py_func):
        dispatcher = kernel()(py_func)
        dispatcher.ahead_types = arg_types
        return dispatcher
    return declare


def one_signature_kernel(*arg_types):
    """An ahead_kernel compiled for these argument types alone, when first used (called, or typed inside a kernel
    that calls it); other arguments are converted to them, e.g. a C-contiguous array to an 'A' one, a literal 0
    to an int64. Numba would compile one specialization per array layout and per literal in a calling kernel:
    the GEMM had five on a cold start, ~1.5 s each, and each calling kernel optimised its own again."""
    def declare(py_func):
        dispatcher = ahead_kernel(*arg_types)(py_func)
        if not isinstance(dispatcher, nb.core.dispatcher.Dispatcher):   # NUMBA_DISABLE_JIT: the Python function
            return dispatcher
        compile_any = dispatcher.compile

        def compile_declared(_requested):
            with global_compiler_lock:   # a thread that also found it uncompiled waits for this one
                if arg_types not in dispatcher.overloads:
                    compile_any(arg_types)
                    dispatcher.disable_compile()   # later arguments resolve to it by conversion
            return dispatcher.overloads[arg_types].entry_point
        dispatcher.compile = compile_declared
        return dispatcher
    return declare


def array(ndim, layout="C", readonly=False, dtype=nb.float32):
    """The Numba type of an array argument in an ahead_kernel's declaration ('A': any strides)."""
    return nb.types.Array(dtype, ndim, layout, readonly=readonly)
