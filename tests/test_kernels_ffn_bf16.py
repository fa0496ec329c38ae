"""The fused bfloat16 feed-forward blocks (kernels/ffn_bf16.py): bit for bit the op set's three ops run one
after the other, on both GEMM kernels and split across threads, and within bfloat16 rounding flips of the NumPy
reference ops."""
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from qnalo.kernels import amx, dwconv_gelu, ffn_bf16 as f, gelu_tanh, gemm_bf16, simd, threads
from tolerances import assert_parity

NEEDS_BF16 = pytest.mark.skipif(not simd.HAS_AVX512_BF16, reason="this CPU has no AVX512_BF16 (vdpbf16ps)")
KERNELS = [pytest.param(True, id="amx", marks=pytest.mark.skipif(not amx.HAS_AMX_BF16, reason="no AMX-BF16")),
           pytest.param(False, id="avx512-bf16")]
HYPOTHESIS = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                             HealthCheck.data_too_large], deadline=None)


@pytest.fixture(params=KERNELS)
def with_amx(request, monkeypatch):
    monkeypatch.setattr(amx, "HAS_AMX_BF16", request.param)
    return request.param


def _weights(rng, k, n):
    return (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)


def _mlp_case(seed, m, c, hidden, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, c)).astype(np.float32)
    w1, w2 = _weights(rng, c, hidden), _weights(rng, hidden, n)
    return x, w1, rng.standard_normal(hidden).astype(np.float32), w2


def _conv_ffn_case(seed, b, h, w, c, hidden, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b * h * w, c)).astype(np.float32)
    w1, w2 = _weights(rng, c, hidden), _weights(rng, hidden, n)
    dw_weight = (rng.standard_normal((3, 3, hidden)) / 3).astype(np.float32)
    bias1, dw_bias = (rng.standard_normal(hidden).astype(np.float32) for _ in range(2))
    return x, (b, h, w), w1, bias1, dw_weight, dw_bias, w2


def _mlp_in_three_ops(x, fc1, bias1, fc2):
    return gemm_bf16.matmul_bf16(gelu_tanh.bias_gelu_tanh(gemm_bf16.matmul_bf16(x, fc1), bias1), fc2)


def _conv_ffn_in_three_ops(x, bhw, fc1, bias1, dw_weight, dw_bias, fc2):
    hidden = gemm_bf16.matmul_bf16(x, fc1).reshape(*bhw, -1)
    act = dwconv_gelu.dwconv3x3_gelu(hidden, bias1, dw_weight, dw_bias)
    return gemm_bf16.matmul_bf16(act.reshape(x.shape[0], -1), fc2)


@NEEDS_BF16
@HYPOTHESIS
@given(seed=st.integers(0, 2**31), m=st.integers(1, 130), c=st.integers(1, 70), hidden=st.integers(1, 200),
       n=st.integers(1, 70))
@example(seed=0, m=196, c=128, hidden=512, n=128)      # QnA-ViT-Tiny stage 2 at batch 4: the rows split
@example(seed=1, m=49, c=512, hidden=2048, n=512)      # stage 3 at batch 1: the panels split
@example(seed=2, m=1, c=1, hidden=1, n=1)
def test_mlp_gelu_tanh_is_its_three_ops(with_amx, seed, m, c, hidden, n):
    x, w1, bias1, w2 = _mlp_case(seed, m, c, hidden, n)
    fc1, fc2 = gemm_bf16.PackedWeightBF16(w1), gemm_bf16.PackedWeightBF16(w2)
    fused = f.mlp_gelu_tanh_bf16(x, fc1, bias1, fc2)
    np.testing.assert_array_equal(fused, _mlp_in_three_ops(x, fc1, bias1, fc2))
    assert_parity(fused, f.mlp_gelu_tanh_bf16_ref(x, w1, bias1, w2), "mlp-reference", "bfloat16")


@NEEDS_BF16
@HYPOTHESIS
@given(seed=st.integers(0, 2**31), b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9),
       c=st.integers(1, 40), hidden=st.integers(1, 150), n=st.integers(1, 40))
@example(seed=0, b=1, h=14, w=14, c=384, hidden=1536, n=384)   # LITv2-S stage 2 at batch 1: the panels split
@example(seed=1, b=2, h=28, w=28, c=48, hidden=192, n=48)      # the rows split
@example(seed=2, b=1, h=1, w=1, c=1, hidden=1, n=1)
def test_conv_ffn_is_its_three_ops(with_amx, seed, b, h, w, c, hidden, n):
    x, bhw, w1, bias1, dw_weight, dw_bias, w2 = _conv_ffn_case(seed, b, h, w, c, hidden, n)
    fc1, fc2 = gemm_bf16.PackedWeightBF16(w1), gemm_bf16.PackedWeightBF16(w2)
    fused = f.conv_ffn_bf16(x, *bhw, fc1, bias1, dw_weight, dw_bias, fc2)
    np.testing.assert_array_equal(fused, _conv_ffn_in_three_ops(x, bhw, fc1, bias1, dw_weight, dw_bias, fc2))
    assert_parity(fused, f.conv_ffn_bf16_ref(x, *bhw, w1, bias1, dw_weight, dw_bias, w2), "mlp-reference",
                  "bfloat16")


@NEEDS_BF16
@pytest.mark.parametrize("n_threads", [2, 3])
def test_split_equals_one_thread(with_amx, monkeypatch, n_threads):
    mlps = [_mlp_case(i, *shape) for i, shape in enumerate([(300, 64, 256, 64), (40, 96, 384, 96)])]
    mlps = [(x, gemm_bf16.PackedWeightBF16(w1), b1, gemm_bf16.PackedWeightBF16(w2)) for x, w1, b1, w2 in mlps]
    convs = [_conv_ffn_case(i, *shape) for i, shape in enumerate([(2, 12, 10, 32, 128, 32), (1, 7, 7, 96, 384, 96)])]
    convs = [(x, *bhw, gemm_bf16.PackedWeightBF16(w1), b1, dw, dwb, gemm_bf16.PackedWeightBF16(w2))
             for x, bhw, w1, b1, dw, dwb, w2 in convs]
    single = [f.mlp_gelu_tanh_bf16(*args) for args in mlps] + [f.conv_ffn_bf16(*args) for args in convs]
    monkeypatch.setattr(threads, "NUM_THREADS", n_threads)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    split = [f.mlp_gelu_tanh_bf16(*args) for args in mlps] + [f.conv_ffn_bf16(*args) for args in convs]
    for one, many in zip(single, split):
        np.testing.assert_array_equal(many, one)


@NEEDS_BF16
def test_dwconv_rounds_into_pairs_as_the_gemm_would():
    x, bhw, w1, bias1, dw_weight, dw_bias, _ = _conv_ffn_case(3, 2, 5, 6, 8, 45, 1)
    hidden = (x @ w1).reshape(*bhw, -1)
    act = dwconv_gelu.dwconv3x3_gelu(hidden, bias1, dw_weight, dw_bias).reshape(x.shape[0], -1)
    want = np.full((64, 32), 5.0, np.float32)
    gemm_bf16._x_pairs(act, 0, act.shape[0], want)
    got = np.full_like(want, 5.0)
    dwconv_gelu.dwconv3x3_gelu(hidden, bias1, dw_weight, dw_bias, got)
    assert np.array_equal(got[:act.shape[0]].view(np.uint32), want[:act.shape[0]].view(np.uint32))
    assert (got[act.shape[0]:] == 5.0).all(), "wrote past the map's rows"


@pytest.mark.parametrize("fused, args", [
    (f.mlp_gelu_tanh_bf16, lambda fc1, fc2: (np.ones((2, 4), np.float32), fc1, np.zeros(8, np.float32), fc2)),
    (f.conv_ffn_bf16, lambda fc1, fc2: (np.ones((2, 4), np.float32), 1, 1, 2, fc1, np.zeros(8, np.float32),
                                        np.zeros((3, 3, 8), np.float32), np.zeros(8, np.float32), fc2))])
def test_mismatched_layers_are_refused(fused, args):
    fc1 = gemm_bf16.PackedWeightBF16(np.ones((4, 8), np.float32))
    fc2 = gemm_bf16.PackedWeightBF16(np.ones((6, 3), np.float32))
    with pytest.raises(ValueError, match="fc1 gives 8 features but fc2 takes 6"):
        fused(*args(fc1, fc2))
