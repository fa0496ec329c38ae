"""Pieces every engine model shares: linear layers on the backend's GEMM, LayerNorm parameters, the input
checks of an NCHW float32 image batch, and the LayerNorm -> mean -> Linear classification head."""
import dataclasses
import os
import warnings

import numpy as np

from ..errors import CheckpointError, InputError, key_mismatches
from ..kernels import _jit, _precompile
from ..weights import release_pages
from .ops import check_dtype, device_ops, get_ops

_WARMED = set()   # (model class, miniature config) already run in this process


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


def check_image_batch(x, model_name, min_size, factor, xp=np):
    """The checks of a model input: a float32 NCHW array of the model's device (xp: numpy or cupy) (B, 3, H, W)
    with H, W >= min_size (the model downsamples by `factor`). Returns it as it is (Classifier._input makes it
    C-contiguous once the memory check has passed)."""
    if not isinstance(x, (np.ndarray, xp.ndarray)):
        where = "a numpy" if xp is np else f"a {xp.__name__} (or numpy)"
        hint = "; move it with cupy.asnumpy(x), or the model with model.to('cuda')" if xp is np and \
            type(x).__module__.startswith("cupy") else ""
        raise InputError(f"expected {where} array of shape (B, 3, H, W), got {type(x).__name__}{hint}")
    if x.ndim != 4:
        raise InputError(f"expected a 4-D NCHW array (B, 3, H, W), got shape {x.shape}"
                         + ("; add a batch axis with x[None]" if x.ndim == 3 else ""))
    if x.shape[1] != 3:
        hint = "; the input looks channels-last (NHWC): pass x.transpose(0, 3, 1, 2)" if x.shape[-1] == 3 else ""
        raise InputError(f"expected 3 channels in axis 1 (NCHW), got shape {x.shape}{hint}")
    if x.dtype != np.float32:
        raise InputError(f"expected float32 input, got {x.dtype}; convert with x.astype(np.float32)")
    if min(x.shape[2:]) < min_size:
        raise InputError(f"image {x.shape[2]}x{x.shape[3]} is too small: {model_name} needs at least "
                         f"{min_size}x{min_size} pixels (it downsamples by {factor})")
    return x


class Classifier:
    """forward_head and __call__ of a model whose head is LayerNorm -> mean over tokens -> Linear. Subclasses
    have config (num_classes), _ops, norm, head, LN_EPS, NO_HEAD (the error without a head), _check_input(x)
    and _stages(x, keep_early) yielding (tokens (B*h*w, C), h, w) per stage, the last being the output."""

    def _setup(self, cfg, tensors, backend, source, check_tensors):
        """Checks the tensors against cfg, sets config, source, backend, _ops and (numba backend) warms the
        kernels up; returns the tensors as read-only float32 C-contiguous arrays (views of the given ones
        where they already are)."""
        check_tensors(tensors, cfg)
        self.config = cfg
        self.source = source or {}
        self.backend = backend
        self._ops = get_ops(backend)
        if backend == "numba" and not _jit.nb.config.DISABLE_JIT:   # without the JIT there is nothing to load
            warm_up(type(self), cfg)
        return engine_arrays(tensors)

    def warm_up_side(self):
        """The image side warm_up runs this model at: its resolution (any side runs)."""
        return self.config.img_size

    device = "cpu"

    dtype = "float32"   # what the model stores its weights and activations in (float16: device="cuda" only)

    def to(self, device, dtype="float32"):
        """Moves the model to `device` ("cpu", or "cuda": the CUDA kernels on CuPy arrays) and returns it. Its
        weights are copied there (and re-packed for the CPU's GEMM on the way back). dtype="float16" (CUDA)
        stores weights and activations in half precision; every kernel still computes in float32."""
        dtype = check_dtype(device, dtype)
        if device == self.device and dtype == self.dtype:
            return self
        ops = get_ops(self.backend) if device == "cpu" else device_ops(device, dtype)
        _move(self, self._ops, ops, set())
        self._ops, self.device, self.dtype = ops, device, dtype
        return self

    def _input(self, x):
        """(x checked, C-contiguous, on the model's device in its dtype; a function that brings an output back to
        x's kind): NumPy input to a CUDA model is copied to the GPU and its outputs back; CuPy input keeps them
        there."""
        x = self._check_input(x)            # a float32 NumPy array, or one of the model's device
        if self.device == "cpu":
            self._check_memory(x.shape)     # before the contiguous copy, which may itself be too large
            return np.ascontiguousarray(x), _same
        if not isinstance(x, self._ops.xp.ndarray):
            return self._ops.xp.ascontiguousarray(self._ops.to_device(x)), self._ops.to_host
        return self._ops.xp.ascontiguousarray(x.astype(self._ops.dtype, copy=False)), _same

    # Peak working memory of a forward pass, per input pixel and per embed_dim channel: measured with
    # tracemalloc (every buffer is a NumPy array) at 224-896 px; the subclasses set it. Batch 1 is the worst
    # case per pixel (a batch of 4 at 224 needs 0.3-0.8x as much per image), so it bounds every batch.
    ACTIVATION_BYTES_PER_PIXEL_CHANNEL = None

    def forward_bytes(self, b, h, w):
        """An upper estimate of the memory a forward pass of a (b, 3, h, w) batch needs beyond the weights."""
        return int(1.1 * self.ACTIVATION_BYTES_PER_PIXEL_CHANNEL * self.config.embed_dim * b * h * w)

    def _check_memory(self, shape):
        """Refuses, with the estimate, a batch that could not fit in the memory left to this process, rather
        than letting the OS kill it halfway."""
        b, _, h, w = shape
        need = self.forward_bytes(b, h, w)
        if need <= MEMORY_CHECK_FROM:   # reading the free memory costs ~45 us, 7% of a small model's call
            return
        free = available_memory()
        if free is not None and need > free:
            raise InputError(f"a batch of {b} image(s) of {h}x{w} would need about {_gib(need)} for the forward "
                             f"pass, and {_gib(free)} of memory is available; use a smaller batch or resolution "
                             "(QNALO_MEMORY_LIMIT=BYTES sets the limit qnalo checks against)")

    def forward_head(self, tokens, b):
        """Final tokens (B*N, C) -> logits (B, num_classes): LayerNorm -> mean over tokens -> Linear."""
        normed = self._ops.layernorm(tokens, self.norm.weight, self.norm.bias, self.LN_EPS,
                                     self._ops.xp.empty_like(tokens))
        pooled = normed.reshape(b, -1, normed.shape[1]).mean(axis=1, dtype=np.float64).astype(self._ops.dtype)
        return self.head.matmul(pooled) + self.head.bias

    def __call__(self, x):
        """x (B, 3, H, W) float32 -> logits (B, num_classes) float32."""
        if not self.config.num_classes:
            raise InputError(self.NO_HEAD)
        x, to_caller = self._input(x)
        if x.shape[0] == 0:
            return to_caller(self._ops.xp.zeros((0, self.config.num_classes), self._ops.dtype))
        for tokens, _, _ in self._stages(x, keep_early=False):
            pass
        return to_caller(self.forward_head(tokens, x.shape[0]))


MEMORY_CHECK_FROM = 64 * 2**20   # smaller forward passes are not checked (LITv2-S at 224 needs 14 MiB)


def available_memory():
    """Bytes this process may still allocate: QNALO_MEMORY_LIMIT if set, else the smaller of the system's
    MemAvailable and what the cgroup (container) limit leaves; None where neither can be read."""
    if os.environ.get("QNALO_MEMORY_LIMIT", "").isdigit():
        return int(os.environ["QNALO_MEMORY_LIMIT"])
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap.isdigit():
            with open("/sys/fs/cgroup/memory.current") as f:
                limits.append(int(cap) - int(f.read()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def _gib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


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


def warm_up(model_cls, cfg):
    """Loads every kernel a forward pass of cfg runs (from Numba's on-disk cache, or compiling them: on a
    machine's first run, in parallel processes, see kernels/_precompile.py) by running a miniature model of the
    same code paths once, starts the worker threads, then hands LLVM's pages back (_jit.release_compiler_pages):
    loading kernels touches ~50 MiB of LLVM code that inference never runs. Done before the real weights are
    packed, so that peak memory holds the weights or LLVM, never both. Once per configuration and process."""
    mini = cfg.miniature()
    if (model_cls, mini) in _WARMED:
        return
    _WARMED.add((model_cls, mini))      # first: the miniature's own construction comes back here
    if _jit.CACHE_NOTICE and not _NOTICES:   # a read-only install: said once, when kernels are first loaded
        _NOTICES.append(_jit.CACHE_NOTICE)
        warnings.warn(_jit.CACHE_NOTICE, RuntimeWarning, stacklevel=4)
    _precompile.compile_ahead()
    model = model_cls(mini, model_cls.random_tensors(mini), backend="numba")
    side = model.warm_up_side()
    if side is None:                    # no input size runs this config: the real forward will say why
        return
    x = np.random.default_rng(0).standard_normal((1, 3, side, side)).astype(np.float32)
    if cfg.num_classes:
        model(x)
    model.forward_features(x)
    _jit.start_workers()
    _jit.release_compiler_pages()


_NOTICES = []


def _same(a):
    return a


def _move(obj, old, new, seen):
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
        _move(value, old, new, seen)   # a model part (configs are dataclasses and hold no arrays)
    return value


def head_shapes(features, num_classes):
    """The classifier's tensors (final LayerNorm and Linear) in engine layout; none for a backbone."""
    if not num_classes:
        return {}
    return {"norm.weight": (features,), "norm.bias": (features,),
            "head.weight": (features, num_classes), "head.bias": (num_classes,)}


def check_tensor_shapes(tensors, expected, model_name, where="weights"):
    """Missing, unexpected or mis-shaped tensors are one error that names them."""
    problems = key_mismatches({k: tuple(v.shape) for k, v in tensors.items()}, expected)
    if problems:
        raise CheckpointError(f"{where} do not fit this {model_name} config: " + "; ".join(problems))


def draw_tensors(shapes, draw, seed):
    """name -> float32 array for every name -> shape, in order, from draw(rng, name, leaf, shape) with one
    seeded generator (leaf = the name's last dotted part)."""
    rng = np.random.default_rng(seed)
    return {name: np.asarray(draw(rng, name, name.rsplit(".", 1)[1], shape)).astype(np.float32)
            for name, shape in shapes.items()}


class ConfigDict:
    """to_dict / from_dict of a model config dataclass (tuples as JSON lists); NAME names it in errors."""

    NAME = "model"

    def to_dict(self):
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, d):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown {cls.NAME} config fields {sorted(unknown)}")
        return cls(**d)

    @classmethod
    def from_file(cls, path, d):
        """from_dict of the config a weights file carries: anything wrong with it is a CheckpointError."""
        try:
            return cls.from_dict(d)
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: damaged {cls.NAME} config ({' '.join(str(exc).split())}); "
                                  "re-convert the checkpoint") from None
