"""The classifier base both families share: set-up from checked tensors, device moves, input preparation, the
LayerNorm -> mean -> Linear head and __call__."""
import numpy as np

from ..errors import InputError
from ..kernels import _jit
from .inputs import MEMORY_CHECK_FROM, available_memory, gib
from .ops import get_ops
from .parts import engine_arrays, move_to
from .warmup import warm_up


class Classifier:
    """forward_head and __call__ of a model whose head is LayerNorm -> mean over tokens -> Linear. Subclasses
    have config (num_classes), _ops, norm, head, LN_EPS, NO_HEAD (the error without a head), _check_input(x)
    and _stages(x, keep_early) yielding (tokens (B*h*w, C), h, w) per stage, the last being the output, and
    _parts(): the parts the model owns, each with to(mover) (parts.Mover)."""

    def _setup(self, cfg, tensors, backend, source, check_tensors, dtype="float32"):
        """Checks the tensors against cfg, sets config, source, backend, dtype (float32, or bfloat16: the GEMMs
        on bfloat16 inputs), _ops and (numba backend) warms the kernels up; returns the tensors as read-only
        float32 C-contiguous arrays (views of the given ones where they already are)."""
        check_tensors(tensors, cfg)
        self.config = cfg
        self.source = source or {}
        self.backend = backend
        self.dtype = dtype
        self._ops = get_ops(backend, dtype)
        if backend == "numba" and not _jit.nb.config.DISABLE_JIT:   # without the JIT there is nothing to load
            warm_up(type(self), cfg, dtype)
        return engine_arrays(tensors)

    def warm_up_side(self):
        """The image side warm_up runs this model at: its resolution (any side runs)."""
        return self.config.img_size

    device = "cpu"

    dtype = "float32"   # float16 (device="cuda"): weights and activations stored so; bfloat16 (CPU): GEMM inputs

    def to(self, device, dtype="float32"):
        """Moves the model to `device` ("cpu", or "cuda": the CUDA kernels on CuPy arrays) and returns it. Its
        weights are copied there (and re-packed for the CPU's GEMM on the way back). dtype="float16" (CUDA)
        stores weights and activations in half precision; every kernel still computes in float32.
        dtype="bfloat16" (CPU) packs the weights as bfloat16 and rounds the GEMMs' inputs to it, accumulating in
        float32; a bfloat16 model is not converted back (its weights are rounded): load it again instead."""
        return move_to(self, device, dtype)

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
            raise InputError(f"a batch of {b} image(s) of {h}x{w} would need about {gib(need)} for the forward "
                             f"pass, and {gib(free)} of memory is available; use a smaller batch or resolution "
                             "(QNALO_MEMORY_LIMIT=BYTES sets the limit qnalo checks against)")

    def pool(self, tokens, b):
        """Final tokens (B*N, C) -> the pooled embedding (B, C): LayerNorm -> mean over tokens."""
        normed = self._ops.layernorm(tokens, self.norm.weight, self.norm.bias, self.LN_EPS,
                                     self._ops.xp.empty_like(tokens))
        return normed.reshape(b, -1, normed.shape[1]).mean(axis=1, dtype=np.float64).astype(self._ops.dtype)

    def forward_head(self, tokens, b):
        """Final tokens (B*N, C) -> logits (B, num_classes): LayerNorm -> mean over tokens -> Linear."""
        return self.head.matmul(self.pool(tokens, b)) + self.head.bias

    def __call__(self, x):
        """x (B, 3, H, W) float32 -> logits (B, num_classes) float32."""
        return self.forward_pooled(x)[1]

    def forward_pooled(self, x):
        """x (B, 3, H, W) float32 -> (the pooled embedding (B, C) the head reads, logits (B, num_classes))."""
        if not self.config.num_classes:
            raise InputError(self.NO_HEAD)
        x, to_caller = self._input(x)
        b = x.shape[0]
        if b == 0:
            xp = self._ops.xp
            return (to_caller(xp.zeros((0, self.config.stage_dim(3)), self._ops.dtype)),
                    to_caller(xp.zeros((0, self.config.num_classes), self._ops.dtype)))
        for tokens, _, _ in self._stages(x, keep_early=False):
            pass
        pooled = self.pool(tokens, b)
        return to_caller(pooled), to_caller(self.head.matmul(pooled) + self.head.bias)


def _same(a):
    return a
