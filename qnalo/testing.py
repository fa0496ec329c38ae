"""A kit for testing an implementation of HiLo, QnA or the whole backbones against qnalo, and qnalo against
itself: the project's tolerance table, assert_parity (which says where the largest error is), and hypothesis
strategies for valid layer configurations and inputs (hypothesis is needed only for those:
`pip install 'qnalo[testing]'`).

    from hypothesis import given
    from qnalo.testing import assert_parity, hilo_configs

    @given(hilo_configs())
    def test_my_hilo(case):
        mine = MyHiLo(case.dim, case.num_heads, case.window_size, case.alpha)   # the port under test
        mine.load_state_dict(case.state_dict())                                 # official names and layouts
        x = case.input()
        assert_parity(mine(x, case.height, case.width), case.layer()(x, case.height, case.width), op="layer")

A check passes where |actual - expected| <= atol + rtol * |expected| element-wise, (atol, rtol) from
TOLERANCES[(op, dtype)]; every loosening there says how it was measured."""
import dataclasses

import numpy as np

TOLERANCES = {
    # (op, dtype): (atol, rtol)
    # Kernel vs NumPy reference on the same float32 inputs: only summation order differs. Also the kernel vs
    # torch layer_norm in float64 on the same float32 rows of variance 0.01-100x eps (test_ops_vs_torch):
    # max |err| 0.0077 of this bound over 298 random cases
    ("layernorm", "float32"): (1e-5, 1e-5),
    ("gelu", "float32"): (2e-6, 2e-6),           # rational erf: |err| < 5e-7 of erf itself (grid over [-6, 6])
    # x * sigmoid(2u) on the vectorised exp: grid over [-12, 12] max |err| 5.2e-7 (at x = 4.67), relative
    # <= 1.2e-7 where |gelu| > 1; random rows at scales 0.1-1e4 within 1.2e-11 + 2e-6 |ref|
    ("gelu_tanh", "float32"): (1e-6, 1e-6),
    # window MSA kernel vs float64; atol is multiplied by logit_scale^3 * max(1, hd / 8) in the tests. Measured
    # over 800 random cases of the test ranges: the smallest atol passing at rtol 1e-4 was 1.0e-7 at
    # logit_scale 1 and 2.4e-7 at 4 (per unit of that factor); QnA-ViT-tiny stage 2/3 shapes max |err| 9e-7
    ("window_msa", "float32"): (1e-6, 1e-4),
    ("dwconv_gelu", "float32"): (1e-5, 1e-5),
    ("deform_conv", "float32"): (1e-5, 1e-4),
    # HiLo kernels vs their float64 reference; atol is multiplied by hilo_scale(logit_scale) = logit_scale^2 in
    # tests/test_kernels_hilo.py (q, k, v entries ~ N(0, logit_scale^2): a score's float32 rounding grows as
    # logit_scale^2). Measured over 1600 random cases of that test's ranges (800 at each logit_scale): the
    # smallest atol passing at rtol 1e-4 was 5.7e-7 at logit_scale 1 and 3.5e-5 at 6, i.e. 5.7e-7 and 9.8e-7 per
    # unit of logit_scale^2 but 5.7e-7 and 5.9e-6 per unit of logit_scale (a linear rule would need 10x more at
    # 6); the LITv2-S/B layer examples (hd 32, logit_scale 1) <= 4.9e-7
    ("hilo", "float32"): (1e-5, 1e-4),
    ("attention", "float32"): (1e-5, 1e-4),
    ("gemm", "float32"): (1e-5, 1e-5),            # vs float64, outputs O(1): K=3072 measured max 2.5e-6
    # bfloat16 GEMM vs matmul_bf16_ref (same bfloat16 rounding of x and w, exact products; only the float32
    # accumulation differs), outputs O(1): K=3072 measured max 3.0e-6
    ("gemm", "bfloat16"): (1e-5, 1e-5),
    # QnA layer, float32 GEMMs + window kernel vs the float64 reference; atol is multiplied by max(1, std of the
    # logits) in the tests. Measured over 1500 random layers of the test ranges: the smallest atol passing at
    # rtol 1e-4 was 5.3e-7 at logit std 1 and 2.05e-5 at std 50 (4.1e-7 per unit); QnA-ViT-tiny layers <= 8.2e-7
    ("qna", "float32"): (5e-6, 1e-4),
    # NumPy/Numba engine vs the PyTorch reference, end to end in float32: the bar.
    ("logits", "float32"): (1e-4, 0.0),          # scaled by max(1, max|logit|) in assert_logits_close
    # a bfloat16 model against the same model in float32 (the bar, max|dlogit| / max|logit|); measured
    # on random official-init weights, batch 2 at 224: LITv2-S 6.7e-3, QnA-ViT-Tiny 3.9e-3
    ("logits", "bfloat16"): (2e-2, 0.0),
    # a bfloat16 model on the kernels vs on the NumPy reference ops, max|dlogit| / max|logit|: a float32 value one
    # ulp apart can round to the neighbouring bfloat16 (2^-8 apart), so the two drift by more than the float32
    # summation order; the demo models measured 4.6e-4 (litv2_digits) on 24 held-out digits
    ("logits-reference", "bfloat16"): (5e-3, 0.0),
    # the fused bfloat16 feed-forward blocks (kernels/ffn_bf16.py) vs their NumPy references, max|d| / max(1,
    # max|ref|): their float32 GELU and the reference's float64 one round a hidden value to neighbouring bfloat16
    # now and then; measured 5.2e-4 (3000 x 64 -> 256 -> 64), 8.2e-6 (49 x 512 -> 2048 -> 512)
    ("mlp-reference", "bfloat16"): (5e-3, 0.0),
    # (QnA-ViT at 224, randomize_() reference weights, numba: max |dlogit| / max(1, max|logit|) 4.2e-7 tiny,
    # 3.8e-7 tiny_7x7, 4.4e-7 small, 4.9e-7 base; numpy backend, tiny 209x437 batch 2: 4.3e-7)
    ("features", "float32"): (1e-4, 0.0),        # same relative bound, scaled by max(1, max|feature|)
    # A whole layer of qnalo.layers (float32) against the official module in float64, scaled by max(1, max|ref|):
    # the bar qnalo.layers promises. (tests/test_layers.py, 2026-12-05: the largest error seen over its hypothesis
    # cases was ~1e-6 of that scale, at the LITv2-B and QnA-ViT layer shapes.)
    ("layer", "float32"): (1e-4, 0.0),
    # float64 NumPy reference vs float64 PyTorch: only the order of additions differs.
    ("any", "float64"): (1e-10, 1e-9),
    # CUDA kernels storing float16 (-DQNALO_HALF) vs the float32 NumPy reference on the same float16-rounded
    # inputs: the kernels compute in float32 and round once when they store, 2^-11 relative; residual_add_layernorm
    # also normalises its own rounded sum. A bound with 4x room; passes on the CUDA emulator (hypothesis: 15
    # cases and a 14x14 example of test_float16_storage_matches_numpy per thread order) and on a GPU (NVIDIA
    # H200, CuPy 14.2: test_float16_storage_matches_numpy and test_qna_windows_in_float16_match_numpy passed,
    # with all 30 GPU tests; benchmarks/results/cuda_gpu_tests_latest.log).
    ("any", "float16"): (2e-3, 2e-3),
    # ("qna", "float64") falls back to "any": NumPy reference vs the PyTorch one over 600 random layers of the
    # test ranges, max |err| 5.3e-15 at logit std 1 and 1.2e-13 at std 50 (outputs up to ~30)
}


def tolerance(op, dtype="float32"):
    """(atol, rtol) of `op` at `dtype` (the "any" row of that dtype where the op has none of its own)."""
    dtype = dtype if isinstance(dtype, str) else np.dtype(dtype).name   # "bfloat16": NumPy itself has no such dtype
    return TOLERANCES.get((op, dtype)) or TOLERANCES[("any", dtype)]


def _as_float64(a):
    if hasattr(a, "detach"):                       # a PyTorch tensor
        a = a.detach().cpu().double().numpy()
    elif type(a).__module__.startswith("cupy"):
        a = a.get()
    return np.asarray(a, dtype=np.float64)


# ops whose bound is relative to the output's size: atol is multiplied by max(1, max|expected|)
SCALED_BY_MAX = ("logits", "features", "layer", "mlp-reference")


def assert_parity(actual, expected, op="any", dtype="float32", scale=None, what=""):
    """Element-wise |actual - expected| <= atol + rtol * |expected| with (atol, rtol) = tolerance(op, dtype);
    `scale` multiplies atol (by default max(1, max|expected|) for the ops of SCALED_BY_MAX: "layer" is
    qnalo.layers' bar, "logits" and "features" the models'). Arrays may be NumPy, CuPy or PyTorch. On failure
    an AssertionError gives the count beyond the bound, the largest error, where it is, and the first few
    failing pairs. NaN where the other is not NaN counts as a failure."""
    actual, ref = _as_float64(actual), _as_float64(expected)
    if actual.shape != ref.shape:
        raise AssertionError(f"{what or op}: shape {actual.shape} != expected {ref.shape}")
    atol, rtol = tolerance(op, dtype or "float32")
    if scale is None and op in SCALED_BY_MAX:
        scale = max(1.0, float(np.nanmax(np.abs(ref), initial=0.0)))
    if scale is not None:
        atol = atol * scale
    both_nan = np.isnan(actual) & np.isnan(ref)
    err = np.where(both_nan, 0.0, np.abs(actual - ref))
    bad = ~(err <= atol + rtol * np.abs(ref))      # NaN counts as bad
    if bad.any():
        worst = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
        idx = np.argwhere(bad)[:5]
        pairs = ", ".join(f"{tuple(int(v) for v in i)}: {actual[tuple(i)]:.8g} vs {ref[tuple(i)]:.8g}" for i in idx)
        raise AssertionError(
            f"{what or op}: {int(bad.sum())}/{bad.size} elements beyond atol={atol:.3g} rtol={rtol:.3g}; "
            f"max |err| {err[worst]:.3g} at {tuple(int(v) for v in worst)} "
            f"({actual[worst]:.8g} vs {ref[worst]:.8g}); first bad: {pairs}")


def assert_logits_close(actual, expected, what="logits", op="logits"):
    """The models' bar: max |delta| <= 1e-4 * max(1, max|expected|), and the same top-1 in every row."""
    ref = _as_float64(expected)
    assert_parity(actual, ref, op, "float32", scale=max(1.0, float(np.abs(ref).max(initial=0.0))), what=what)
    if op == "logits" and ref.ndim == 2 and ref.shape[1] > 1:
        top_a = np.argmax(_as_float64(actual), axis=1)
        top_r = np.argmax(ref, axis=1)
        if not (top_a == top_r).all():
            raise AssertionError(f"{what}: top-1 differs in rows {np.nonzero(top_a != top_r)[0].tolist()}")


# Whole models storing float16 (weights and activations; arithmetic in float32), against float32 on the CPU:
# max |dlogit| / max|logit| and the share of images whose top-1 class agrees. Measured on the stand-in device
# (tests/test_models_common.py, every stored array rounded to float16 as the -DQNALO_HALF kernels do), the 360
# held-out digits: 9.0e-4 (LITv2 digits) and 1.5e-3 (QnA-ViT digits), top-1 100 % for both; seeded random
# full-size weights at 224, batch 2: LITv2-S 9.4e-4, LITv2-B 9.4e-4, QnA-ViT-Tiny 7.5e-4, QnA-ViT-Base 6.8e-4.
# The bound leaves 3x. The CUDA kernels themselves, on the emulator (tests/emulated_cupy; test_models_cuda.py -s):
# demo models 7.9e-4 and 9.2e-4 (first 32 digits), top-1 100 %; QnA-ViT at 224, batch 1: 6.9e-4 (base 7.1e-4,
# small 7.9e-4, tiny_7x7 1.0e-3); LITv2 at 64x64, batch 1: S 1.5e-3, M 1.9e-3, B and B-384 2.4e-3, 2x inside
# the bound. On a GPU (NVIDIA H200, CuPy 14.2, the same tests with -m gpu; benchmarks/results/
# cuda_gpu_tests_latest.log, all 30 GPU tests passed): all eight variants at their configured sizes, batch 2,
# 6.9e-4 (QnA-ViT-Tiny) to 9.8e-4 (LITv2-M): QnA-ViT 6.9e-4 tiny, 8.6e-4 tiny_7x7, 9.3e-4 small, 7.6e-4 base;
# LITv2 9.2e-4 S, 9.8e-4 M, 9.4e-4 B and B-384; demo models 8.1e-4 (LITv2 digits) and 1.4e-3 (QnA-ViT digits)
# on all 360 held-out digits, top-1 100 % for both: 3.5x inside the bound.
MODEL_FLOAT16 = {"rel_max": 5e-3, "top1_agreement": 0.99}


# -- configurations and inputs -------------------------------------------------------------------------------

def _hypothesis():
    try:
        from hypothesis import strategies
    except ImportError:
        raise ImportError("qnalo.testing's strategies need hypothesis: pip install 'qnalo[testing]'") from None
    return strategies


def _normal(seed, shape, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class HiLoCase:
    """One HiLo layer and input: the official constructor's arguments, a batch of H x W maps, and a seed that
    fixes the weights and the input."""
    dim: int
    num_heads: int
    window_size: int
    alpha: float
    qkv_bias: bool
    batch: int
    height: int
    width: int
    seed: int = 0

    def state_dict(self):
        """Official-layout weights (h_qkv, h_proj, l_q, l_kv, l_proj) as float32 NumPy arrays: weights
        N(0, 1/fan_in) (truncated at 2 std), biases N(0, 1), so that the attention scores are O(1)."""
        from .layers import HiLo
        sd = HiLo.random_state_dict(self.dim, self.num_heads, self.window_size, self.alpha, self.qkv_bias, self.seed)
        return {k: (v / 0.02 * (v.shape[1] ** -0.5 if v.ndim == 2 else 1)).astype(np.float32) for k, v in sd.items()}

    def layer(self, **options):
        """qnalo.layers.HiLo with these weights (options: backend, device, dtype)."""
        from .layers import HiLo
        return HiLo.from_state_dict(self.state_dict(), self.dim, self.num_heads, self.window_size, self.alpha,
                                    self.qkv_bias, **options)

    def input(self):
        """x (batch, height * width, dim) float32, N(0, 1)."""
        return _normal(self.seed + 1, (self.batch, self.height * self.width, self.dim))


@dataclasses.dataclass(frozen=True)
class QnACase:
    """One QnA layer (the official Flax module's settings) and an NHWC input batch."""
    in_channels: int
    features: int
    num_heads: int
    window_size: int
    stride: int
    n_queries: int
    use_bias: bool
    batch: int
    height: int
    width: int
    seed: int = 0

    def flax_params(self):
        """The official Flax parameter subtree (Wk, query, rpe_bias, attn_scale_weights, to_v, to_out[, Wk_b])."""
        from .layers import QnA
        return QnA.random_flax(self.in_channels, self.features, self.num_heads, self.window_size, self.stride,
                               self.n_queries, self.use_bias, seed=self.seed)

    def layer(self, **options):
        from .layers import QnA
        return QnA.from_flax(self.flax_params(), self.num_heads, self.window_size, self.stride, self.n_queries,
                             **options)

    def input(self):
        """x (batch, height, width, in_channels) float32, N(0, 1)."""
        return _normal(self.seed + 1, (self.batch, self.height, self.width, self.in_channels))


def hilo_configs(max_heads=4, head_dims=(1, 2, 4, 8, 16, 32), max_window=4, max_side=12, max_batch=3):
    """A hypothesis strategy of HiLoCase: any head count and head dim, ws 1..max_window, alpha anywhere in
    0..1 (0 and 1 included: one branch only), with and without qkv biases, sides 1..max_side (odd sizes and
    maps smaller than a window: the dense copy's padding), batch 1..max_batch."""
    st = _hypothesis()

    @st.composite
    def cases(draw):
        heads = draw(st.integers(1, max_heads))
        return HiLoCase(dim=heads * draw(st.sampled_from(head_dims)), num_heads=heads,
                        window_size=draw(st.integers(1, max_window)),
                        alpha=draw(st.one_of(st.sampled_from([0.0, 0.5, 0.9, 1.0]), st.floats(0.0, 1.0))),
                        qkv_bias=draw(st.booleans()), batch=draw(st.integers(1, max_batch)),
                        height=draw(st.integers(1, max_side)), width=draw(st.integers(1, max_side)),
                        seed=draw(st.integers(0, 2**16)))
    return cases()


def qna_configs(max_heads=4, head_dims=(1, 2, 8, 16), windows=(1, 3, 5, 7), strides=(1, 2), max_queries=3,
                max_side=12, max_batch=3):
    """A hypothesis strategy of QnACase: odd windows (the released models use 3 and 7), stride 1 or 2, 1 to
    max_queries learned queries, with and without the use_bias parameters, any input width, odd sides and maps
    smaller than the window (border windows renormalise over the cells inside the map), batch 1..max_batch."""
    st = _hypothesis()

    @st.composite
    def cases(draw):
        heads = draw(st.integers(1, max_heads))
        return QnACase(in_channels=draw(st.integers(1, 24)), features=heads * draw(st.sampled_from(head_dims)),
                       num_heads=heads, window_size=draw(st.sampled_from(windows)),
                       stride=draw(st.sampled_from(strides)), n_queries=draw(st.integers(1, max_queries)),
                       use_bias=draw(st.booleans()), batch=draw(st.integers(1, max_batch)),
                       height=draw(st.integers(1, max_side)), width=draw(st.integers(1, max_side)),
                       seed=draw(st.integers(0, 2**16)))
    return cases()


def image_batches(min_side=32, max_side=96, max_batch=2):
    """A hypothesis strategy of NCHW float32 image batches (B, 3, H, W) with odd sides, N(0, 1) pixels."""
    st = _hypothesis()
    return st.builds(lambda b, h, w, seed: _normal(seed, (b, 3, h, w)), st.integers(1, max_batch),
                     st.integers(min_side, max_side), st.integers(min_side, max_side), st.integers(0, 2**16))
