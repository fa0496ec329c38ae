"""bfloat16 on the CPU: qnalo dtype="bfloat16" beside qnalo float32 and OpenVINO in its default precision (bf16
on CPUs with AVX512_BF16 / AMX) and with the f32 hint, the same weights, 2 threads, LITv2-S at 224 (or
QNALO_BENCH_MODEL), batch 1 and 8; and each engine's relative logit error against qnalo float32, and the peak
RSS of a process that loads the model and runs a batch of 8.

Run:  python -m pytest benchmarks/bench_bf16.py       (writes benchmarks/results/bf16_<model>_<cpu>.md)
      QNALO_BENCH_MODEL=qna_vit_tiny python -m pytest benchmarks/bench_bf16.py
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from qnalo.kernels import simd  # noqa: E402

ENGINES = ("qnalo-fp32", "qnalo-bf16", "openvino-default", "openvino-f32")
ROUNDS = {1: 20, 8: 6}
TIMES = {}    # (batch, engine) -> seconds per call
ERRORS = {}   # (batch, engine) -> max|dlogit| / max|logit| against qnalo float32
RSS = {}      # engine -> peak RSS MiB

pytestmark = pytest.mark.skipif(not simd.HAS_AVX512_BF16, reason="this CPU has no AVX512_BF16")


def _engine(engine, art, batch):
    if engine.startswith("qnalo"):
        import qnalo
        return qnalo.load(art.qnalo, dtype="bfloat16" if engine.endswith("bf16") else "float32")
    import openvino as ov
    config = dict(harness.OPENVINO_F32)
    if engine == "openvino-default":
        del config["INFERENCE_PRECISION_HINT"]
    compiled = ov.Core().compile_model(art.onnx[batch], "CPU", config)
    request = compiled.create_infer_request()

    def run(x):
        request.infer({0: x})
        return request.get_output_tensor(0).data.copy()
    run.precision = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    return run


@pytest.mark.parametrize("batch", [1, 8])
def bench_bf16(benchmark, artifacts, batch):
    """Every engine on the same input, one call of each in turn per round (the machine's drift spread over all)."""
    if not artifacts.qnalo or harness.missing("openvino") or batch not in artifacts.onnx:
        pytest.skip("needs the converted qnalo file, OpenVINO and the ONNX export")
    x = harness.make_input(batch)
    runs = {e: _engine(e, artifacts, batch) for e in ENGINES}
    outputs = {e: run(x) for e, run in runs.items()}
    reference = outputs["qnalo-fp32"]
    for e, y in outputs.items():
        ERRORS[(batch, e)] = float(np.abs(np.asarray(y, np.float64) - reference).max() / np.abs(reference).max())
    samples = {e: [] for e in ENGINES}
    for _ in range(ROUNDS[batch]):
        for e, run in runs.items():
            start = time.perf_counter()
            run(x)
            samples[e].append(time.perf_counter() - start)
            time.sleep(0.05)
    for e in ENGINES:
        TIMES[(batch, e)] = statistics.median(samples[e])
    TIMES[("precision", "openvino-default")] = getattr(runs["openvino-default"], "precision", "?")
    benchmark.group = f"bf16-b{batch}"
    benchmark.pedantic(runs["qnalo-bf16"], args=(x,), rounds=3, iterations=1)


RSS_PROBE = r"""
import sys, numpy as np
engine, path, onnx = sys.argv[1], sys.argv[2], sys.argv[3]
x = np.random.default_rng(0).standard_normal((8, 3, 224, 224)).astype(np.float32)
if engine.startswith("qnalo"):
    import qnalo
    model = qnalo.load(path, dtype="bfloat16" if engine.endswith("bf16") else "float32")
    model(x)
else:
    import openvino as ov
    config = {"INFERENCE_NUM_THREADS": 2, "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if engine == "openvino-f32":
        config["INFERENCE_PRECISION_HINT"] = "f32"
    request = ov.Core().compile_model(onnx, "CPU", config).create_infer_request()
    request.infer({0: x})
with open("/proc/self/status") as f:
    print([int(l.split()[1]) // 1024 for l in f if l.startswith("VmHWM")][0])
"""


def bench_bf16_peak_rss(artifacts):
    if not artifacts.qnalo or harness.missing("openvino") or 8 not in artifacts.onnx:
        pytest.skip("needs the converted qnalo file, OpenVINO and the ONNX export")
    for engine in ENGINES:
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, engine, artifacts.qnalo, artifacts.onnx[8]],
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        RSS[engine] = int(out.stdout.strip().splitlines()[-1])


def teardown_module(module):
    if not TIMES:
        return
    lines = [f"# bfloat16: {harness.VARIANT} at {harness.IMG}, {harness.THREADS} threads", "",
             f"CPU: {harness.cpu_description()}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')}. Command: `python -m pytest benchmarks/bench_bf16.py`. "
             f"OpenVINO's default precision here: {TIMES.get(('precision', 'openvino-default'))}. Medians of "
             f"{ROUNDS[1]} (b1) and {ROUNDS[8]} (b8) rounds, one call of each engine per round.", "",
             "| batch | " + " | ".join(f"{e} ms" for e in ENGINES) + " | qnalo-bf16 / openvino-default | "
             "qnalo-fp32 / qnalo-bf16 (speed-up) |", "|---|" + "---:|" * (len(ENGINES) + 2)]
    for batch in (1, 8):
        if (batch, "qnalo-bf16") not in TIMES:
            continue
        t = {e: TIMES[(batch, e)] for e in ENGINES}
        lines.append(f"| {batch} | " + " | ".join(f"{t[e] * 1e3:.1f}" for e in ENGINES)
                     + f" | {t['qnalo-bf16'] / t['openvino-default']:.2f}x | {t['qnalo-fp32'] / t['qnalo-bf16']:.2f}x |")
    lines += ["", "Relative logit error against qnalo float32, max|dlogit| / max|logit|:", "",
              "| batch | " + " | ".join(ENGINES) + " |", "|---|" + "---:|" * len(ENGINES)]
    for batch in (1, 8):
        if (batch, "qnalo-bf16") in ERRORS:
            lines.append(f"| {batch} | " + " | ".join(f"{ERRORS[(batch, e)]:.2g}" for e in ENGINES) + " |")
    if RSS:
        lines += ["", "Peak RSS of a process that loads the model and runs a batch of 8, MiB: "
                  + ", ".join(f"{e} {v}" for e, v in RSS.items())
                  + (f"; qnalo bf16 / fp32 {RSS['qnalo-bf16'] / RSS['qnalo-fp32']:.2f}" if "qnalo-bf16" in RSS else "")]
    text = "\n".join(lines) + "\n"
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    for name in (f"bf16_{harness.VARIANT}_{harness.cpu_tag()}.md", f"bf16_{harness.VARIANT}_latest.md"):
        with open(os.path.join(harness.RESULTS_DIR, name), "w") as f:
            f.write(text)
    print("\n" + text)
