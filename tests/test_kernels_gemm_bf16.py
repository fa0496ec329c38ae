"""The bfloat16 GEMM (kernels/gemm_bf16.py): the rounding against PyTorch's bfloat16 conversion, the kernel
against the NumPy reference (same rounding, float32 accumulation only), and whole models in bfloat16 against
float32 (the issue's bound on the relative logit error)."""
import threading
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import qnalo
from qnalo.errors import InputError
from qnalo.kernels import amx, gemm_bf16 as k, simd, threads
from tolerances import assert_close, tolerance

NEEDS_BF16 = pytest.mark.skipif(not simd.HAS_AVX512_BF16, reason="this CPU has no AVX512_BF16 (vdpbf16ps)")
# the GEMM's two kernels: AMX tiles where the CPU has them, else (and forced, on an AMX CPU) vdpbf16ps
KERNELS = [pytest.param(True, id="amx", marks=pytest.mark.skipif(not amx.HAS_AMX_BF16, reason="no AMX-BF16")),
           pytest.param(False, id="avx512-bf16")]


@pytest.fixture(params=KERNELS)
def with_amx(request, monkeypatch):
    monkeypatch.setattr(amx, "HAS_AMX_BF16", request.param)
    return request.param


def _operands(seed, m, kk, n):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, kk)).astype(np.float32)
    w = (rng.standard_normal((kk, n)) / np.sqrt(max(kk, 1))).astype(np.float32)
    return x, w


@pytest.mark.torch
@given(seed=st.integers(0, 2**32 - 1), scale=st.sampled_from([1e-40, 1e-30, 1e-3, 1.0, 3e4, 3e38]))
def test_rounding_matches_torch_bfloat16(seed, scale):
    import torch
    with np.errstate(over="ignore"):   # the largest scale draws values past float32's range: inf, on purpose
        values = (np.random.default_rng(seed).standard_normal(4096) * scale).astype(np.float32)
    values[:6] = [np.inf, -np.inf, np.nan, 0.0, -0.0, np.float32(3.3895314e38)]   # the last rounds up to inf
    mine = k.to_bfloat16_bits(values)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(values)
    assert np.array_equal(mine[~nan], theirs[~nan])
    assert np.isnan(k.round_to_bfloat16(values)[nan]).all()


def test_packed_weight_keeps_the_rounded_values_and_half_the_bytes():
    x, w = _operands(0, 3, 37, 41)
    packed = k.PackedWeightBF16(w)
    assert np.array_equal(packed.unpack(), k.round_to_bfloat16(w))
    # ceil(37 / 2) = 19 pairs padded to 32 (AMX steps of 16), 3 panels of 16 columns padded to 4, 4 bytes a pair
    assert packed.panels.nbytes == 32 * 64 * 4
    big = k.PackedWeightBF16(_operands(0, 1, 768, 3072)[1])
    assert big.panels.nbytes == 768 * 3072 * 2       # no padding: half the float32 weight
    assert k.matmul_bf16_ref(x, w).dtype == np.float32


def test_reference_equals_exact_products_of_rounded_inputs():
    x, w = _operands(1, 5, 64, 9)
    exact = k.round_to_bfloat16(x).astype(np.float64) @ k.round_to_bfloat16(w).astype(np.float64)
    assert np.array_equal(k.matmul_bf16_ref(x, w), exact.astype(np.float32))
    assert np.abs(exact - x.astype(np.float64) @ w).max() > 1e-4    # the rounding does change the product


@NEEDS_BF16
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                               HealthCheck.data_too_large])   # with_amx holds for every example
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 70), kk=st.integers(1, 400), n=st.integers(1, 80),
       x_pad=st.integers(0, 5), out_pad=st.integers(0, 5))
@example(seed=0, m=196, kk=384, n=1536, x_pad=0, out_pad=0)    # LITv2-S layers.2 fc1
@example(seed=1, m=49, kk=3072, n=768, x_pad=0, out_pad=0)     # layers.3 fc2
@example(seed=2, m=3136, kk=96, n=384, x_pad=0, out_pad=0)     # layers.0 fc1: row split
@example(seed=3, m=196, kk=64, n=64, x_pad=320, out_pad=320)   # h_proj on a column slice, into one
@example(seed=4, m=1, kk=768, n=1000, x_pad=0, out_pad=0)      # the head, batch 1
@example(seed=5, m=1, kk=1, n=1, x_pad=0, out_pad=0)
@example(seed=6, m=7, kk=3, n=33, x_pad=0, out_pad=0)          # odd K (a half pair), a single last panel
@example(seed=7, m=64, kk=64, n=64, x_pad=0, out_pad=0)        # whole AMX blocks only
def test_matmul_bf16(with_amx, seed, m, kk, n, x_pad, out_pad):
    x, w = _operands(seed, m, kk + x_pad, n)
    x = x[:, x_pad:]
    w = np.ascontiguousarray(w[x_pad:])
    out = np.full((m, n + out_pad), 7.0, np.float32)
    k.matmul_bf16(x, k.PackedWeightBF16(w), out[:, out_pad:])
    assert_close(out[:, out_pad:], k.matmul_bf16_ref(x, w), "gemm", "bfloat16")
    assert (out[:, :out_pad] == 7.0).all(), "wrote outside the output slice"


@NEEDS_BF16
@pytest.mark.parametrize("n_threads", [2, 3, 5])
def test_matmul_bf16_split_equals_one_thread(with_amx, monkeypatch, n_threads):
    """Split by rows (many row blocks) and by panels (few rows, each thread rounding x itself), bit for bit the
    one-thread result: every element is the same sum in the same order whoever computes it."""
    shapes = [(49, 300, 200), (196, 96, 250), (7, 33, 530), (300, 64, 40)]
    operands = [(x, k.PackedWeightBF16(w)) for x, w in (_operands(i, *shape) for i, shape in enumerate(shapes))]
    single = [k.matmul_bf16(x, w) for x, w in operands]
    monkeypatch.setattr(threads, "NUM_THREADS", n_threads)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    for (x, w), one, shape in zip(operands, single, shapes):
        np.testing.assert_array_equal(k.matmul_bf16(x, w), one, err_msg=str(shape))


def test_pairs_buffers_are_kept_per_thread_up_to_a_bound(monkeypatch):
    first = k.pairs_buffers(2, 40, 16)
    assert first.shape == (2, 40, 16) and np.shares_memory(first, k.pairs_buffers(1, 30, 16))
    assert not np.shares_memory(first, k.pairs_buffers(1, 30, 16, use="hidden"))
    monkeypatch.setattr(k, "KEEP_AT_MOST", 100)
    assert not np.shares_memory(k.pairs_buffers(1, 10, 16), k.pairs_buffers(1, 10, 16))   # too big to keep
    other = {}
    worker = threading.Thread(target=lambda: other.setdefault("buf", k.pairs_buffers(1, 4, 16)))
    worker.start()
    worker.join()
    assert not np.shares_memory(other["buf"], k.pairs_buffers(1, 4, 16))


@NEEDS_BF16
def test_matmul_bf16_keeps_nan_and_inf(with_amx):
    x, w = _operands(7, 4, 10, 20)
    x[1, 3], x[2, 0] = np.nan, np.inf
    y = k.matmul_bf16(x, k.PackedWeightBF16(w))
    with np.errstate(invalid="ignore"):   # inf * 0-free weights give inf and -inf sums, NaN where they meet
        ref = k.matmul_bf16_ref(x, w)
    assert np.array_equal(np.isnan(y), np.isnan(ref)) and np.isnan(y[1]).all()
    assert np.array_equal(y[[0, 3]], y[[0, 3]]) and np.isfinite(y[[0, 3]]).all()


def test_bfloat16_on_a_cpu_without_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(simd, "HAS_AVX512_BF16", False)
    with pytest.raises(InputError, match="needs the AVX512_BF16 instructions .* use dtype='float32'"):
        qnalo.create_model("litv2_digits", dtype="bfloat16")
    with pytest.raises(InputError, match="device='cpu' only"):
        qnalo.create_model("litv2_digits", device="cuda", dtype="bfloat16")


def _models(name, backend="numba"):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # random weights
        return (qnalo.create_model(name, backend=backend),
                qnalo.create_model(name, backend=backend, dtype="bfloat16"))


def _relative_logit_error(a, b):
    return float(np.abs(a - b).max() / np.abs(a).max())


@pytest.mark.parametrize("name", ["litv2_digits", "qna_vit_digits"])
def test_bfloat16_numpy_reference_of_the_demo_models_agrees_with_float32(name):
    from qnalo import demo
    fp32, bf16 = _models(name, backend="numpy")
    assert bf16.dtype == "bfloat16"
    x = demo.preprocess_digits(fp32.architecture, demo.heldout()["images"][:40])
    a, b = fp32(x), bf16(x)
    assert _relative_logit_error(a, b) <= tolerance("logits", "bfloat16")[0]
    assert (a.argmax(1) == b.argmax(1)).mean() >= 0.95
    with pytest.raises(InputError, match="rounded to bfloat16; load it again"):
        bf16.to("cpu", "float32")


@NEEDS_BF16
@pytest.mark.parametrize("name", ["litv2_digits", "qna_vit_digits"])
def test_bfloat16_kernels_match_the_bfloat16_reference(name):
    from qnalo import demo
    kernels = _models(name)[1]
    reference = _models(name, backend="numpy")[1]
    x = demo.preprocess_digits(kernels.architecture, demo.heldout()["images"][:24])
    got, want = kernels(x), reference(x)
    assert _relative_logit_error(want, got) <= tolerance("logits-reference", "bfloat16")[0]
    assert (got.argmax(1) == want.argmax(1)).all()


@NEEDS_BF16
@pytest.mark.slow
@pytest.mark.parametrize("name", qnalo.list_models())
def test_every_variant_in_bfloat16_stays_within_the_bound(name):
    fp32, bf16 = _models(name)
    side = fp32.config.img_size
    x = np.random.default_rng(0).standard_normal((2, 3, side, side)).astype(np.float32)
    error = _relative_logit_error(fp32(x), bf16(x))
    assert error <= tolerance("logits", "bfloat16")[0], f"{name}: relative logit error {error:.3g}"


@NEEDS_BF16
@given(seed=st.integers(0, 2**32 - 1), m=st.integers(1, 9), kk=st.integers(1, 100))
@example(seed=0, m=3, kk=64)   # whole vectors of 32 only
def test_x_pairs_are_the_rounded_bits_in_order(seed, m, kk):
    x = (np.random.default_rng(seed).standard_normal((m, kk)) * 100).astype(np.float32)
    x[-1, -1] = -np.inf
    x[0, 0] = np.nan            # (the same element when m = kk = 1)
    out = np.full((m + 2, -(-kk // 2) + 3), 5.0, np.float32)
    k._x_pairs(x, 0, m + 2, out)
    words = out.view(np.uint16).reshape(m + 2, -1)
    want = np.zeros_like(words)
    want[:m, :kk] = k.to_bfloat16_bits(x)
    nan = np.zeros(words.shape, bool)
    nan[0, 0] = True
    assert np.array_equal(words[~nan], want[~nan])
    assert (words[0, 0] & 0x7F80) == 0x7F80 and (words[0, 0] & 0x7F) != 0      # still a NaN
