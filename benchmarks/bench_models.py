"""A whole model at 224 (LITv2-S unless QNALO_BENCH_MODEL names another, e.g. qna_vit_tiny): qnalo vs PyTorch
eager vs ONNX Runtime vs OpenVINO, all on the same weights and 2 threads.

Run (see benchmarks/README.md):  python -m pytest benchmarks/bench_models.py
                                 QNALO_BENCH_MODEL=qna_vit_tiny python -m pytest benchmarks/bench_models.py
A final table (ratios qnalo / competitor) is printed and written under benchmarks/results/.
"""
import os
import statistics
import tempfile

import pytest

import harness
from harness import CASES, ENGINES, RESULTS

ORDER = [(case, engine) for case in CASES for engine in ENGINES]


@pytest.fixture(scope="session")
def torch_logits(artifacts):
    """Eager PyTorch logits per case: the parity reference for every engine."""
    if harness.missing("torch") or not artifacts.pth:
        return {}
    run = harness.make_engine("torch", artifacts, 1)
    return {case: run(harness.make_input(batch)) for case, batch in CASES.items()}


def _skip(key, why):
    RESULTS["skipped"][key] = why
    pytest.skip(why)


@pytest.mark.parametrize("case,engine", ORDER, ids=[f"{c}-{e}" for c, e in ORDER])
def bench_inference(benchmark, artifacts, torch_logits, case, engine):
    import numpy as np

    batch = CASES[case]
    why = harness.engine_unavailable(engine, artifacts)
    if why:
        _skip((case, engine), why)
    try:
        run = harness.make_engine(engine, artifacts, batch)
    except Exception as exc:
        _skip((case, engine), f"could not build: {type(exc).__name__}: {str(exc)[:200]}")
    x = harness.make_input(batch)
    try:
        y = run(x)
    except Exception as exc:
        _skip((case, engine), f"inference failed: {type(exc).__name__}: {str(exc)[:200]}")
    ref = torch_logits.get(case)
    same_weights = engine != "qnalo" or artifacts.qnalo is not None
    if ref is not None and same_weights:
        diff = float(np.abs(np.asarray(y, np.float64) - ref).max())
        RESULTS["parity"][(case, engine)] = diff
        bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
        if diff > bound:
            RESULTS["notes"].append(f"PARITY: {engine} {case} max abs diff {diff:.3g} > {bound:.3g}")
        benchmark.extra_info["max_abs_diff_vs_torch"] = diff
    benchmark.group = f"{harness.VARIANT}-{harness.IMG}-{case}"
    benchmark.extra_info.update(engine=engine, batch=batch, threads=harness.THREADS)
    benchmark.pedantic(run, args=(x,), rounds=harness.ROUNDS[batch], warmup_rounds=harness.WARMUP, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        harness.record_timing(case, engine, benchmark.stats.stats, batch)


def _probe_or_skip(engine, artifacts, key, **kw):
    why = harness.engine_unavailable(engine, artifacts)
    if why:
        pytest.skip(why)
    try:
        return harness.run_probe(engine, artifacts, **kw)
    except Exception as exc:
        RESULTS["notes"].append(f"{key}: probe failed: {str(exc)[-300:]}")
        pytest.skip(f"probe failed: {exc}")


@pytest.mark.parametrize("engine", ENGINES)
def bench_peak_rss(artifacts, engine):
    """Fresh process: import, load the weights file, 5 batch-1 calls; peak RSS (VmHWM, see probe.py)."""
    r = _probe_or_skip(engine, artifacts, f"rss {engine}", calls=5)
    RESULTS["rss"][engine] = r


COLD = ["qnalo (warm kernel cache)", "qnalo (cold kernel cache)", "torch", "onnxruntime", "openvino"]


@pytest.mark.parametrize("label", COLD)
def bench_cold_start(artifacts, label):
    """Fresh process: import + load the file + first batch-1 call. One untimed run first (page cache, and for
    qnalo the on-disk Numba kernel cache), then the median of COLD_RUNS runs. The cold-kernel-cache row points
    NUMBA_CACHE_DIR at an empty folder: one run, compile time included."""
    engine = label.split()[0]
    if label == "qnalo (cold kernel cache)":
        with tempfile.TemporaryDirectory(prefix="qnalo-numba-cache-") as cache:
            r = _probe_or_skip(engine, artifacts, label, calls=1, extra_env={"NUMBA_CACHE_DIR": cache})
        RESULTS["cold"][label] = r
        return
    _probe_or_skip(engine, artifacts, label, calls=1)          # warm-up, untimed
    runs = [_probe_or_skip(engine, artifacts, label, calls=1) for _ in range(harness.COLD_RUNS)]
    keys = ("import_s", "load_s", "first_call_s", "to_first_logits_s", "process_wall_s")
    RESULTS["cold"][label] = {k: statistics.median(r[k] for r in runs) for k in keys}


if os.environ.get("QNALO_BENCH_SKIP_PROBES"):
    bench_peak_rss = pytest.mark.skip(reason="QNALO_BENCH_SKIP_PROBES set")(bench_peak_rss)
    bench_cold_start = pytest.mark.skip(reason="QNALO_BENCH_SKIP_PROBES set")(bench_cold_start)
