"""The two models' feed-forward blocks in bfloat16 (dtype="bfloat16" on the CPU), fused where AMX runs the GEMMs:
the float32 hidden layer between fc1 and fc2 (4C wide, the largest activation of a block) is never written and
read back in float32; what fc2 reads is rounded into its bfloat16 pairs as it is computed.

* mlp_gelu_tanh (QnA-ViT): fc1 -> + bias -> tanh GELU -> fc2. fc1's 32x32 output blocks get their bias and GELU
  while in L1 and are rounded into fc2's pairs (gemm_bf16.gemm_amx_blocks' epilogue).
* conv_ffn (LITv2): fc1 -> depthwise 3x3 conv (+ fc1's bias) -> exact GELU -> fc2. The conv needs fc1's float32
  output around each pixel, so that one stays; the conv rounds its output into fc2's pairs
  (dwconv_gelu.dwconv3x3_gelu with pairs).

Both compute, bit for bit, the op set's three ops run one after the other (the same GELU code, the same
rounding); elsewhere (no AMX) they are run that way. fc2's bias is left out, as the models add it with the
residual. The references run the NumPy reference ops in turn."""
import numpy as np

from . import amx
from .dwconv_gelu import dwconv3x3_gelu, dwconv3x3_gelu_ref
from .gelu_tanh import bias_gelu_tanh, bias_gelu_tanh_ref
from .gemm import NR, check_input, output_array
from .gemm_bf16 import (PackedWeightBF16, amx_gemm, amx_gemm_pairs, matmul_bf16, matmul_bf16_ref, pairs_buffers,
                        pairs_rows)


def _check_layers(name, fc1, fc2):
    if fc1.shape[1] != fc2.shape[0]:
        raise ValueError(f"{name}: fc1 gives {fc1.shape[1]} features but fc2 takes {fc2.shape[0]}")


def _hidden_pairs(m, fc2):
    """The calling thread's buffer for fc2's input pairs: pairs_rows(m) rows, fc2's padded K / 2 wide."""
    return pairs_buffers(1, pairs_rows(m), fc2.panels.shape[1], use="hidden")[0]


def mlp_gelu_tanh_bf16(x, fc1: PackedWeightBF16, bias1, fc2: PackedWeightBF16, out=None):
    """fc2(gelu_tanh(fc1(x) + bias1)), x (M, C) -> (M, N2) float32, fc2's bias left out."""
    _check_layers("mlp_gelu_tanh_bf16", fc1, fc2)
    if not amx.HAS_AMX_BF16 or x.shape[0] == 0 or x.shape[1] == 0:
        return matmul_bf16(bias_gelu_tanh(matmul_bf16(x, fc1), bias1), fc2, out)
    check_input("mlp_gelu_tanh_bf16", x, fc1.shape)
    m = x.shape[0]
    out = output_array("mlp_gelu_tanh_bf16", m, fc2.shape[1], out)
    bias = np.zeros(fc1.panels.shape[0] * NR, np.float32)   # zero over the padded columns: GELU(0) = 0 there
    bias[:fc1.shape[1]] = bias1
    hidden = _hidden_pairs(m, fc2)
    amx_gemm(x, fc1.panels, out, bias, hidden)
    return amx_gemm_pairs(hidden, m, fc2.panels, out)


def mlp_gelu_tanh_bf16_ref(x, w1, bias1, w2, out=None):
    return matmul_bf16_ref(bias_gelu_tanh_ref(matmul_bf16_ref(x, w1), bias1), w2, out)


def conv_ffn_bf16(x, b, h, w, fc1: PackedWeightBF16, bias1, dw_weight, dw_bias, fc2: PackedWeightBF16, out=None):
    """fc2(gelu(dwconv3x3(fc1(x) + bias1) + dw_bias)), x (B*H*W, C) tokens of B (H, W) maps -> (B*H*W, N2)
    float32, fc2's bias left out."""
    _check_layers("conv_ffn_bf16", fc1, fc2)
    hidden = matmul_bf16(x, fc1).reshape(b, h, w, -1)
    if not amx.HAS_AMX_BF16 or x.shape[0] == 0:
        return matmul_bf16(dwconv3x3_gelu(hidden, bias1, dw_weight, dw_bias).reshape(x.shape[0], -1), fc2, out)
    m = x.shape[0]
    out = output_array("conv_ffn_bf16", m, fc2.shape[1], out)
    pairs = _hidden_pairs(m, fc2)
    pairs[m:] = 0.0
    dwconv3x3_gelu(hidden, bias1, dw_weight, dw_bias, pairs)
    return amx_gemm_pairs(pairs, m, fc2.panels, out)


def conv_ffn_bf16_ref(x, b, h, w, w1, bias1, dw_weight, dw_bias, w2, out=None):
    hidden = matmul_bf16_ref(x, w1).reshape(b, h, w, -1)
    return matmul_bf16_ref(dwconv3x3_gelu_ref(hidden, bias1, dw_weight, dw_bias).reshape(x.shape[0], -1), w2, out)


# op name -> (NumPy reference, Numba kernel) of the bfloat16 op set, beside gemm_bf16's
OPS = {"mlp_gelu_tanh": (mlp_gelu_tanh_bf16_ref, mlp_gelu_tanh_bf16),
       "conv_ffn": (conv_ffn_bf16_ref, conv_ffn_bf16)}
