"""The building blocks every model part is made of: linear layers on the op set's GEMM, LayerNorm parameters,
the read-only float32 view of a part's weights, and moving a part's arrays between devices."""
import dataclasses

import numpy as np

from ..weights import release_pages


class Linear:
    """y = x @ weight (+ bias, added by whichever kernel consumes y), on the backend's GEMM."""

    def __init__(self, ops, weight, bias):
        self.weight = ops.pack_weight(weight)   # (in, out) float32, in the backend's layout
        self.bias = bias                        # (out,)
        self._matmul = ops.matmul
        if self.weight is not weight:           # packed into a copy: the file's pages are no longer needed
            release_pages(weight)

    def matmul(self, x, out=None):
        return self._matmul(x, self.weight, out)


class Norm:
    def __init__(self, t, prefix):
        self.weight = t[prefix + ".weight"]
        self.bias = t[prefix + ".bias"]


def add_residual(ops, x, y, bias, next_norm, eps, xn):
    """The end of every block of both families: x += y + bias in place and, when a block follows, xn = its first
    LayerNorm of the new x in the same pass (next_norm None: the stage ends, xn is left as it is)."""
    if next_norm is None:
        ops.residual_add(x, y, bias)
    else:
        ops.residual_add_layernorm(x, y, bias, next_norm.weight, next_norm.bias, eps, xn)


def read_only(array):
    """A read-only view: a weights file's tensors are read-only (mmap), and Numba compiles a kernel apart for
    read-only and writable arguments, so every model hands its kernels the same kind whatever its source."""
    view = array.view()
    view.flags.writeable = False
    return view


def engine_arrays(tensors):
    """name -> read-only float32 C-contiguous array (a view of the given one where it already is one)."""
    return {k: read_only(v if v.dtype == np.float32 and v.flags.c_contiguous else np.ascontiguousarray(v, np.float32))
            for k, v in tensors.items()}


def move(obj, old, new, seen):
    """Every array held by obj and the model parts below it: from old's device to new's; a Linear's weight
    through the GEMM layouts (unpacked, then packed for new) and its matmul rebound."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, Linear):
        host = obj.weight.unpack() if hasattr(obj.weight, "unpack") else old.to_host(obj.weight)
        obj.weight, obj._matmul = new.pack_weight(np.ascontiguousarray(host)), new.matmul
    for name, value in vars(obj).items():
        if not (isinstance(obj, Linear) and name in ("weight", "_matmul")):
            setattr(obj, name, _moved(value, old, new, seen))


def _moved(value, old, new, seen):
    if isinstance(value, (list, tuple)):
        return type(value)(_moved(v, old, new, seen) for v in value)
    if isinstance(value, dict):
        return {k: _moved(v, old, new, seen) for k, v in value.items()}
    if isinstance(value, (np.ndarray, old.xp.ndarray)):
        return new.to_device(old.to_host(value))
    if type(value).__module__.startswith("qnalo.models") and not dataclasses.is_dataclass(value):
        move(value, old, new, seen)   # a model part (configs are dataclasses and hold no arrays)
    return value
