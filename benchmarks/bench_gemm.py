"""qnalo's packed-weight GEMM vs NumPy's BLAS (OpenBLAS) on the GEMM shapes of LITv2-S at 224, batch 1.

Run:  python -m pytest benchmarks/bench_gemm.py    (2 threads each, pinned by benchmarks/harness.py)
Each shape is one pytest-benchmark group; compare the two rows of a group. The weights are hot in cache
here (each call reuses one weight), unlike in a whole-model pass, where every weight is read once from memory.
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qnalo.kernels import gemm  # noqa: E402

# (tokens, in, out) of LITv2-S's linear layers at 224x224, batch 1
SHAPES = [(3136, 96, 384), (3136, 384, 96), (784, 192, 768), (784, 768, 192), (196, 384, 1536),
          (196, 1536, 384), (196, 384, 320), (196, 384, 192), (49, 768, 3072), (49, 3072, 768), (49, 768, 768)]


@pytest.mark.parametrize("engine", ["qnalo", "numpy"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def bench_matmul(benchmark, shape, engine):
    m, k, n = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    out = np.empty((m, n), np.float32)
    if engine == "qnalo":
        packed = gemm.PackedWeight(w)
        run = lambda: gemm.matmul(x, packed, out)  # noqa: E731
    else:
        run = lambda: np.matmul(x, w, out=out)  # noqa: E731
    benchmark.group = "x".join(map(str, shape))
    benchmark.extra_info["gflops"] = None
    benchmark.pedantic(run, rounds=30, warmup_rounds=3, iterations=5)
    if benchmark.stats is not None:
        benchmark.extra_info["gflops"] = 2 * m * k * n / benchmark.stats.stats.median / 1e9
    np.testing.assert_allclose(out, x @ w, rtol=1e-4, atol=1e-3 * np.sqrt(k))
