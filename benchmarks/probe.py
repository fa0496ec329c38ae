"""One fresh inference process: import an engine, load a weights file, run batch-`B` inference `calls` times.

    python benchmarks/probe.py ENGINE MODEL FILE BATCH CALLS    ENGINE: qnalo | torch | onnxruntime | openvino
                                                                MODEL: a qnalo model name (litv2_s, qna_vit_tiny)

Prints one JSON line: import_s, load_s, first_call_s, to_first_logits_s (from this script's first line,
interpreter start-up excluded), later_calls_s, rss_after_import_kib, peak_rss_kib (VmHWM on Linux, else ru_maxrss), ru_maxrss_kib.
Thread counts come from the environment (QNALO_BENCH_THREADS, default 2), set here before numpy loads.
"""
import time

T0 = time.perf_counter()

import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402

THREADS = int(os.environ.get("QNALO_BENCH_THREADS", "2"))
for var in ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(THREADS)


def _status_kib(field):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_now_kib():
    return _status_kib("VmRSS") or 0


def ru_maxrss_kib():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r // 1024 if sys.platform == "darwin" else r   # bytes on macOS, KiB on Linux


def peak_rss_kib():
    """This process's own peak RSS. On Linux ru_maxrss keeps the high-water mark of the process that
    exec'd us (a big pytest parent shows through), so VmHWM of the new address space is used there."""
    hwm = _status_kib("VmHWM")
    return hwm if hwm is not None else ru_maxrss_kib()


def main(engine, name, path, batch, calls):
    import json

    import numpy as np
    x = np.random.default_rng(batch).standard_normal((batch, 3, 224, 224)).astype(np.float32)
    t_np = time.perf_counter()

    if engine == "qnalo":
        import qnalo
        t_import, rss_import = time.perf_counter(), rss_now_kib()
        if path:
            model = qnalo.load(path)
        else:
            import warnings
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = qnalo.create_model(name)
        run = model
    elif engine == "torch":
        import torch
        torch.set_num_threads(THREADS)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
        if name.startswith("qna_vit"):
            from reference.qna_vit_torch import qna_vit_reference as reference
        else:
            from reference.litv2_torch import litv2_reference as reference
        t_import, rss_import = time.perf_counter(), rss_now_kib()
        model = reference(name)
        model.load_state_dict(torch.load(path, weights_only=True)["model"])

        def run(a):
            with torch.inference_mode():
                return model(torch.from_numpy(a)).numpy()
    elif engine == "onnxruntime":
        import onnxruntime as ort
        t_import, rss_import = time.perf_counter(), rss_now_kib()
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name

        def run(a):
            return sess.run(None, {name: a})[0]
    elif engine == "openvino":
        import openvino as ov
        t_import, rss_import = time.perf_counter(), rss_now_kib()
        compiled = ov.Core().compile_model(path, "CPU", {
            "INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1})
        req = compiled.create_infer_request()

        def run(a):
            req.infer({0: a})
            return req.get_output_tensor(0).data.copy()
    else:
        raise SystemExit(f"unknown engine {engine!r}")
    t_load = time.perf_counter()
    y = run(x)
    t_first = time.perf_counter()
    later = []
    for _ in range(calls - 1):
        t = time.perf_counter()
        y = run(x)
        later.append(time.perf_counter() - t)
    assert np.isfinite(y).all() and y.shape == (batch, 1000), y.shape
    print(json.dumps({
        "engine": engine, "batch": batch, "calls": calls,
        "numpy_import_s": t_np - T0, "import_s": t_import - T0, "load_s": t_load - t_import,
        "first_call_s": t_first - t_load, "to_first_logits_s": t_first - T0,
        "later_calls_s": later, "rss_after_import_kib": rss_import, "rss_end_kib": rss_now_kib(),
        "peak_rss_kib": peak_rss_kib(), "ru_maxrss_kib": ru_maxrss_kib()}))


if __name__ == "__main__":
    if len(sys.argv) != 6:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
