"""The op sets a model can run on: the Numba kernels and their plain-NumPy references (same signatures) on the
CPU, and the CUDA kernels on CuPy arrays (device="cuda"). Each also names its array module (xp) and how
arrays come to it (to_device) and back (to_host), for the glue between the ops.

backend="numpy" runs the whole network on the references: slow, simple, and what the kernels are tested
against; it is the middle link of the parity chain PyTorch <-> NumPy reference <-> Numba kernels."""
from types import SimpleNamespace

import numpy as np

from qnalo.errors import InputError
from qnalo.kernels import deform_conv, dwconv_gelu, gelu, gelu_tanh, gemm, hilo, layernorm, qna, window_msa

NUMBA = SimpleNamespace(
    xp=np, to_device=np.asarray, to_host=np.asarray,
    pack_weight=gemm.PackedWeight,
    matmul=gemm.matmul,
    layernorm=layernorm.layernorm,
    residual_add=layernorm.residual_add,
    residual_add_layernorm=layernorm.residual_add_layernorm,
    bias_gelu=gelu.bias_gelu,
    dwconv3x3_gelu=dwconv_gelu.dwconv3x3_gelu,
    deform_sample=deform_conv.deform_sample,
    window_avgpool=hilo.window_avgpool,
    hifi_attention=hilo.hifi_attention,
    lofi_attention=hilo.lofi_attention,
    bias_gelu_tanh=gelu_tanh.bias_gelu_tanh,
    qna_windows=qna.qna_windows,
    qna_attention=qna.qna_attention,
    window_msa=window_msa.window_msa,
)

NUMPY = SimpleNamespace(
    xp=np, to_device=np.asarray, to_host=np.asarray,
    pack_weight=lambda w: w,
    matmul=gemm.matmul_ref,
    layernorm=layernorm.layernorm_ref,
    residual_add=layernorm.residual_add_ref,
    residual_add_layernorm=layernorm.residual_add_layernorm_ref,
    bias_gelu=gelu.bias_gelu_ref,
    dwconv3x3_gelu=dwconv_gelu.dwconv3x3_gelu_ref,
    deform_sample=deform_conv.deform_sample_ref,
    window_avgpool=hilo.window_avgpool_ref,
    hifi_attention=hilo.hifi_attention_ref,
    lofi_attention=hilo.lofi_attention_ref,
    bias_gelu_tanh=gelu_tanh.bias_gelu_tanh_ref,
    qna_windows=qna.qna_windows_ref,
    qna_attention=qna.qna_attention_ref,
    window_msa=window_msa.window_msa_ref,
)

BACKENDS = {"numba": NUMBA, "numpy": NUMPY}


def get_ops(backend):
    try:
        return BACKENDS[backend]
    except KeyError:
        raise InputError(f"unknown backend {backend!r}; choose one of {sorted(BACKENDS)}") from None


def _cuda():
    """The op set of device="cuda": kernels/cuda through qnalo.kernels.cuda_ops, GEMMs on CuPy's cuBLAS."""
    from qnalo.kernels import cuda_ops
    try:
        cp = cuda_ops.cupy()
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

    def matmul(x, w, out=None):
        y = cp.matmul(x, w)
        if out is None:
            return y
        out[...] = y
        return out

    return SimpleNamespace(
        xp=cp, to_device=cp.asarray, to_host=cp.asnumpy,
        pack_weight=cp.asarray,
        matmul=matmul,
        **{name: getattr(cuda_ops, name) for name in (
            "layernorm", "residual_add", "residual_add_layernorm", "bias_gelu", "dwconv3x3_gelu", "deform_sample",
            "window_avgpool", "hifi_attention", "lofi_attention", "bias_gelu_tanh", "qna_windows", "window_msa")},
    )


DEVICES = {"cuda": _cuda}


def device_ops(device):
    """The op set of a device other than the CPU (built on first use, once)."""
    if device not in DEVICES:
        raise InputError(f"unknown device {device!r}; choose 'cpu' or one of {sorted(DEVICES)}")
    made = _DEVICE_OPS.get(device)
    if made is None:
        made = _DEVICE_OPS[device] = DEVICES[device]()
    return made


_DEVICE_OPS = {}
