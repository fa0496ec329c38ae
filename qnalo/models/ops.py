"""The op sets a model can run on: the Numba kernels and their plain-NumPy references (same signatures) on the
CPU, and the CUDA kernels on CuPy arrays (device="cuda"). Each also names its array module (xp) and how
arrays come to it (to_device) and back (to_host), for the glue between the ops.

backend="numpy" runs the whole network on the references: slow, simple, and what the kernels are tested
against; it is the middle link of the parity chain PyTorch <-> NumPy reference <-> Numba kernels."""
from types import SimpleNamespace

import numpy as np

from qnalo.errors import InputError
from qnalo.kernels import (deform_conv, dwconv_gelu, ffn_bf16, gelu, gelu_tanh, gemm, gemm_bf16, hilo, layernorm,
                           qna, simd, window_msa)

# Each kernel module declares its ops: name -> (NumPy reference, Numba kernel), one signature for both.
KERNEL_MODULES = (gemm, layernorm, gelu, gelu_tanh, dwconv_gelu, deform_conv, hilo, qna, window_msa)


def _declared(which):
    """name -> the reference (0) or kernel (1) of every op the kernel modules declare."""
    ops = {}
    for module in KERNEL_MODULES:
        for name, pair in module.OPS.items():
            if name in ops:
                raise RuntimeError(f"op {name!r} is declared twice (again in {module.__name__})")
            ops[name] = pair[which]
    return ops


# tokens_per_group: how many stage-0 tokens LITv2 runs through its first two stages at a time (a few images, so
# that their hidden buffers stay in a CPU's cache; None: the whole batch at once, as a GPU wants)
NUMBA = SimpleNamespace(xp=np, dtype=np.float32, to_device=np.asarray, to_host=np.asarray, tokens_per_group=4096,
                        **_declared(1))
NUMPY = SimpleNamespace(xp=np, dtype=np.float32, to_device=np.asarray, to_host=np.asarray, tokens_per_group=4096,
                        **_declared(0))


def add_composed_ffns(ops):
    """The two models' feed-forward blocks, fc2's bias left out, from the op set's own GEMM, GELU and depthwise
    conv (looked up per call): QnA-ViT's mlp_gelu_tanh(x, fc1, bias1, fc2) and LITv2's conv_ffn(x, b, h, w,
    fc1, bias1, dw_weight, dw_bias, fc2). The bfloat16 CPU op set fuses them instead (kernels/ffn_bf16.py)."""
    def mlp_gelu_tanh(x, fc1, bias1, fc2, out=None):
        return ops.matmul(ops.bias_gelu_tanh(ops.matmul(x, fc1), bias1), fc2, out)

    def conv_ffn(x, b, h, w, fc1, bias1, dw_weight, dw_bias, fc2, out=None):
        hidden = ops.matmul(x, fc1).reshape(b, h, w, -1)
        return ops.matmul(ops.dwconv3x3_gelu(hidden, bias1, dw_weight, dw_bias).reshape(x.shape[0], -1), fc2, out)

    for fn in (mlp_gelu_tanh, conv_ffn):
        fn.composed = True    # profilers time its parts instead
        setattr(ops, fn.__name__, fn)
    return ops


add_composed_ffns(NUMBA)
add_composed_ffns(NUMPY)
BACKENDS = {"numba": NUMBA, "numpy": NUMPY}

# dtype="bfloat16" on the CPU: the same op sets with the bfloat16 GEMM (kernels/gemm_bf16.py: weights packed as
# bfloat16 once, GEMM inputs rounded to bfloat16, float32 accumulation); every other op stays float32.
BF16_OPS = {**gemm_bf16.OPS, **ffn_bf16.OPS}
BF16_BACKENDS = {
    "numba": SimpleNamespace(**{**vars(NUMBA), **{op: kernel for op, (_, kernel) in BF16_OPS.items()}}),
    "numpy": SimpleNamespace(**{**vars(NUMPY), **{op: reference for op, (reference, _) in BF16_OPS.items()}}),
}


def get_ops(backend, dtype="float32"):
    """The CPU op set of `backend` ("numba" or "numpy") computing its GEMMs in `dtype` (float32 or bfloat16)."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}")
    if dtype == "bfloat16":
        if backend == "numba" and not simd.HAS_AVX512_BF16:
            raise InputError("dtype='bfloat16' on the CPU needs the AVX512_BF16 instructions (vdpbf16ps: Intel "
                             "Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later), which this CPU does not "
                             "have; use dtype='float32' (or backend='numpy' for the bfloat16 reference)")
        return BF16_BACKENDS[backend]
    return BACKENDS[backend]


def _cuda(dtype):
    """The op set of device="cuda" storing `dtype` (float32 or float16; arithmetic in float32 either way):
    kernels/cuda (each op's wrapper beside its .cu), GEMMs on CuPy's cuBLAS (float16 inputs accumulate in float32:
    CuPy calls cublasGemmEx with CUBLAS_COMPUTE_32F)."""
    from qnalo.kernels import cuda
    try:
        cp = cuda.cupy()
    except RuntimeError as exc:
        raise InputError(f"device='cuda': {exc}") from None
    try:
        devices = cp.cuda.runtime.getDeviceCount()
    except cp.cuda.runtime.CUDARuntimeError as exc:
        devices, why = 0, f" ({exc})"
    else:
        why = ""
    if not devices:
        raise InputError(f"device='cuda': CuPy is installed but finds no NVIDIA GPU{why}; use device='cpu'")

    made = SimpleNamespace(
        xp=cp, dtype=dtype, tokens_per_group=None, to_device=lambda a: cp.asarray(a, dtype=dtype),
        to_host=lambda a: cp.asnumpy(a).astype(np.float32, copy=False),
        pack_weight=lambda w: cp.asarray(w, dtype=dtype),
        empty=lambda shape: cp.empty(shape, dtype),
        matmul=lambda x, w, out=None: cp.matmul(x, w, out=out),   # cuBLAS writes into out: no copy
        **vars(cuda.ops),
    )
    return add_composed_ffns(made)


DEVICES = {"cuda": _cuda}   # device name -> factory(dtype) of its op set
DTYPES = {"float32": np.float32, "float16": np.float16}


def device_ops(device, dtype="float32"):
    """The op set of a device other than the CPU storing `dtype` (built on first use, once per pair)."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose 'cpu' or one of {sorted(DEVICES)}")
    key = (device, check_dtype(device, dtype))
    made = _DEVICE_OPS.get(key)
    if made is None:
        made = _DEVICE_OPS[key] = DEVICES[device](DTYPES[key[1]])
    return made


def check_dtype(device, dtype):
    """dtype's name, if `device` can store it; an InputError that says what can, otherwise."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name == "bfloat16":
        if device != "cpu":
            raise InputError("dtype='bfloat16' runs on device='cpu' only: CuPy has no bfloat16 arrays; use "
                             "dtype='float16' on CUDA (the same float32 arithmetic, half the memory traffic)")
        return name
    if name not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose 'float32', 'bfloat16' (CPU) or 'float16' (CUDA)")
    if name == "float16" and device == "cpu":
        raise InputError("dtype='float16' runs on device='cuda' only; on the CPU choose 'float32' or 'bfloat16'")
    return name


_DEVICE_OPS = {}
