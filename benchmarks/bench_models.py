"""A whole model at 224 (LITv2-S unless QNALO_BENCH_MODEL names another, e.g. qna_vit_tiny): qnalo vs PyTorch
eager vs ONNX Runtime vs OpenVINO, all on the same weights and 2 threads.

Run (see benchmarks/README.md):  python -m pytest benchmarks/bench_models.py
                                 QNALO_BENCH_MODEL=qna_vit_tiny python -m pytest benchmarks/bench_models.py
A final table (ratios qnalo / competitor) is printed and written under benchmarks/results/.
"""
import os
import statistics
import tempfile
import time

import pytest

import harness
from harness import CASES, ENGINES, RESULTS

# Between two engines' calls: ONNX Runtime's threads keep spinning > 10 ms after a call returns, so without a
# pause the next engine would be timed on a busy CPU.
PAUSE_S = 0.05


@pytest.fixture(scope="session")
def torch_logits(artifacts):
    """Eager PyTorch logits per case: the parity reference for every engine."""
    if harness.missing("torch") or not artifacts.pth:
        return {}
    run = harness.make_engine("torch", artifacts, 1)
    return {case: run(harness.make_input(batch)) for case, batch in CASES.items()}


def _ready_engine(engine, artifacts, case, x, torch_logits):
    """The engine's run function for this case after one checked call (its parity recorded), or None with the
    reason recorded as skipped."""
    import numpy as np

    why = harness.engine_unavailable(engine, artifacts)
    if why:
        RESULTS["skipped"][(case, engine)] = why
        return None
    try:
        run = harness.make_engine(engine, artifacts, CASES[case])
        y = run(x)
    except Exception as exc:
        RESULTS["skipped"][(case, engine)] = f"could not run: {type(exc).__name__}: {str(exc)[:200]}"
        return None
    ref = torch_logits.get(case)
    if ref is not None and (engine != "qnalo" or artifacts.qnalo is not None):
        diff = float(np.abs(np.asarray(y, np.float64) - ref).max())
        RESULTS["parity"][(case, engine)] = diff
        bound = 1e-4 * max(1.0, float(np.abs(ref).max()))
        if diff > bound:
            RESULTS["notes"].append(f"PARITY: {engine} {case} max abs diff {diff:.3g} > {bound:.3g}")
    return run


@pytest.mark.parametrize("case", list(CASES))
def bench_inference(benchmark, artifacts, torch_logits, case):
    """Every engine on the same input, interleaved: before each of qnalo's timed rounds (pytest-benchmark's),
    the setup times one call of each other engine, PAUSE_S apart, so all of them see the same machine state
    (frequency, other load) within a round."""
    batch = CASES[case]
    x = harness.make_input(batch)
    runs = {engine: _ready_engine(engine, artifacts, case, x, torch_logits) for engine in ENGINES}
    if runs["qnalo"] is None:
        pytest.skip(RESULTS["skipped"][(case, "qnalo")])
    others = [engine for engine in ENGINES if engine != "qnalo" and runs[engine] is not None]
    times = {engine: [] for engine in others}
    rounds_seen = [0]

    def others_once():
        timed = rounds_seen[0] >= harness.WARMUP      # pedantic's warm-up rounds call setup too
        rounds_seen[0] += 1
        for engine in others:
            time.sleep(PAUSE_S)
            start = time.perf_counter()
            runs[engine](x)
            if timed:
                times[engine].append(time.perf_counter() - start)
        time.sleep(PAUSE_S)
        return (x,), {}

    benchmark.group = f"{harness.VARIANT}-{harness.IMG}-{case}"
    benchmark.extra_info.update(batch=batch, threads=harness.THREADS, cpu=harness.cpu_description(),
                                interleaved_with=others)
    benchmark.pedantic(runs["qnalo"], setup=others_once, rounds=harness.ROUNDS[batch],
                       warmup_rounds=harness.WARMUP, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        harness.record_timing(case, "qnalo", benchmark.stats.stats, batch)
        for engine in others:
            harness.record_timing(case, engine, harness.Stats.of(times[engine]), batch)
        benchmark.extra_info.update({f"{engine}_median_s": RESULTS["timing"][(case, engine)]["median"]
                                     for engine in others})


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
