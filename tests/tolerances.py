"""The one table of numerical tolerances, per op and dtype: a check passes where
|actual - ref| <= atol + rtol * |ref| element-wise. Every loosening says how it was measured."""
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
    # QnA layer, float32 GEMMs + window kernel vs the float64 reference; atol is multiplied by max(1, std of the
    # logits) in the tests. Measured over 1500 random layers of the test ranges: the smallest atol passing at
    # rtol 1e-4 was 5.3e-7 at logit std 1 and 2.05e-5 at std 50 (4.1e-7 per unit); QnA-ViT-tiny layers <= 8.2e-7
    ("qna", "float32"): (5e-6, 1e-4),
    # NumPy/Numba engine vs the PyTorch reference, end to end in float32: the bar.
    ("logits", "float32"): (1e-4, 0.0),          # scaled by max(1, max|logit|) in assert_logits_close
    # (QnA-ViT at 224, randomize_() reference weights, numba: max |dlogit| / max(1, max|logit|) 4.2e-7 tiny,
    # 3.8e-7 tiny_7x7, 4.4e-7 small, 4.9e-7 base; numpy backend, tiny 209x437 batch 2: 4.3e-7)
    ("features", "float32"): (1e-4, 0.0),        # same relative bound, scaled by max(1, max|feature|)
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


def tolerance(op, dtype):
    dtype = np.dtype(dtype).name
    return TOLERANCES.get((op, dtype)) or TOLERANCES[("any", dtype)]


def hilo_scale(logit_scale):
    """The factor on ("hilo", "float32")'s atol for q, k, v entries of std logit_scale (measured above)."""
    return logit_scale ** 2


def assert_close(actual, ref, op, dtype=None, scale=None, what=""):
    """Compare element-wise; on failure print the max error, where it is, and a few pairs.

    `scale`, when given, multiplies atol (used for the max(1, max|ref|) bound on logits/features)."""
    actual = np.asarray(actual, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert actual.shape == ref.shape, f"{what} shape {actual.shape} != reference {ref.shape}"
    atol, rtol = tolerance(op, dtype if dtype is not None else "float32")
    if scale is not None:
        atol = atol * scale
    err = np.abs(actual - ref)
    bound = atol + rtol * np.abs(ref)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        worst = np.unravel_index(np.nanargmax(np.where(np.isnan(err), np.inf, err)), err.shape)
        idx = np.argwhere(bad)[:5]
        pairs = ", ".join(f"{tuple(int(v) for v in i)}: {actual[tuple(i)]:.8g} vs {ref[tuple(i)]:.8g}" for i in idx)
        raise AssertionError(
            f"{what or op}: {int(bad.sum())}/{bad.size} elements beyond atol={atol:.3g} rtol={rtol:.3g}; "
            f"max |err| {err[worst]:.3g} at {tuple(int(v) for v in worst)} "
            f"({actual[worst]:.8g} vs {ref[worst]:.8g}); first bad: {pairs}")


def assert_logits_close(actual, ref, what="logits", op="logits"):
    """The issue's bar: max |Δ| <= 1e-4 * max(1, max|ref|), and identical top-1 per row."""
    ref = np.asarray(ref, dtype=np.float64)
    assert_close(actual, ref, op, "float32", scale=max(1.0, float(np.abs(ref).max(initial=0.0))), what=what)
    if op == "logits" and ref.ndim == 2 and ref.shape[1] > 1:
        top_a = np.argmax(actual, axis=1)
        top_r = np.argmax(ref, axis=1)
        assert (top_a == top_r).all(), f"{what}: top-1 differs in rows {np.nonzero(top_a != top_r)[0].tolist()}"

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
