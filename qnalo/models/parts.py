"""The building blocks every model part is made of: linear layers on the op set's GEMM, LayerNorm parameters,
the read-only float32 view of a part's weights, and moving a part's arrays between devices: every part has
to(mover), which moves the arrays it holds and calls to() on the parts it owns (each part has one owner)."""
import numpy as np

from ..errors import InputError
from ..weights import release_pages
from .ops import check_dtype, device_ops, get_ops


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

    def to(self, mover):
        """The weight goes through the GEMM layouts (unpacked, then packed for the new op set), the matmul is
        rebound, the bias moved."""
        old = mover.old
        host = self.weight.unpack() if hasattr(self.weight, "unpack") else old.to_host(self.weight)
        self.weight, self._matmul = mover.new.pack_weight(np.ascontiguousarray(host)), mover.new.matmul
        self.bias = mover.array(self.bias)


class Norm:
    def __init__(self, t, prefix):
        self.weight = t[prefix + ".weight"]
        self.bias = t[prefix + ".bias"]

    def to(self, mover):
        self.weight, self.bias = mover.array(self.weight), mover.array(self.bias)


def move_to(holder, device, dtype):
    """holder.to(device, dtype) of a model or a qnalo.layers layer (holder has backend, _ops, device, dtype and
    _parts()): its parts' arrays copied to the device's op set, which it then runs on. Returns holder."""
    dtype = check_dtype(device, dtype)
    if (device, dtype) != (holder.device, holder.dtype):
        if holder.dtype == "bfloat16":
            raise InputError("this model holds its weights rounded to bfloat16; load it again with the dtype "
                             f"wanted (dtype={dtype!r}) rather than converting the rounded weights")
        ops = get_ops(holder.backend, dtype) if device == "cpu" else device_ops(device, dtype)
        Mover(holder._ops, ops).parts(*holder._parts())
        holder._ops, holder.device, holder.dtype = ops, device, dtype
    return holder


class Mover:
    """Moves arrays from one op set's device to another's (model.to, qnalo.layers' to)."""

    def __init__(self, old, new):
        self.old, self.new = old, new

    def array(self, a):
        return None if a is None else self.new.to_device(self.old.to_host(a))

    def parts(self, *parts):
        """to(self) on each part given (None: a part the model does not have)."""
        for part in parts:
            if part is not None:
                part.to(self)


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
