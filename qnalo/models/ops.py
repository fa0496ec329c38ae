"""The two op sets a model can run on: the Numba kernels and their plain-NumPy references (same signatures).

backend="numpy" runs the whole network on the references: slow, simple, and what the kernels are tested
against; it is the middle link of the parity chain PyTorch <-> NumPy reference <-> Numba kernels."""
from types import SimpleNamespace

from qnalo.errors import InputError
from qnalo.kernels import deform_conv, dwconv_gelu, gelu, gelu_tanh, gemm, hilo, layernorm, qna, window_msa

NUMBA = SimpleNamespace(
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
