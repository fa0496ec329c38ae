"""Loading a model's kernels before its weights: a miniature model of the same code paths runs once per
configuration and process."""
import warnings

import numpy as np

from ..kernels import _jit, _precompile, pages, threads

_WARMED = set()   # (model class, miniature config) already run in this process


def warm_up(model_cls, cfg, dtype="float32"):
    """Loads every kernel a forward pass of cfg runs (from Numba's on-disk cache, or compiling them: on a
    machine's first run, in parallel processes, see kernels/_precompile.py) by running a miniature model of the
    same code paths once, starts the worker threads, then hands LLVM's pages back (pages.release_compiler_pages):
    loading kernels touches ~50 MiB of LLVM code that inference never runs. Done before the real weights are
    packed, so that peak memory holds the weights or LLVM, never both. Once per configuration and process."""
    mini = cfg.miniature()
    if (model_cls, mini, dtype) in _WARMED:
        return
    _WARMED.add((model_cls, mini, dtype))   # first: the miniature's own construction comes back here
    if _jit.CACHE_NOTICE and not _NOTICES:   # a read-only install: said once, when kernels are first loaded
        _NOTICES.append(_jit.CACHE_NOTICE)
        warnings.warn(_jit.CACHE_NOTICE, RuntimeWarning, stacklevel=4)
    _precompile.compile_ahead()
    model = model_cls(mini, model_cls.random_tensors(mini), backend="numba", dtype=dtype)
    side = model.warm_up_side()
    if side is None:                    # no input size runs this config: the real forward will say why
        return
    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    if cfg.num_classes:
        model(x)
    model.forward_features(x)
    threads.start_workers()
    pages.release_compiler_pages()


_NOTICES = []
