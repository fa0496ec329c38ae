"""Where the CPU time goes: qnalo op by op beside OpenVINO's own per-layer counters (PERF_COUNT), one forward
pass of LITv2-S and QnA-ViT-Tiny at 224, float32 (or --dtype bfloat16: qnalo's bfloat16 beside OpenVINO's
default precision, bfloat16 on a CPU with AVX512_BF16), on the same seeded random weights, at the pinned thread
count.

qnalo: every op of the Numba op set (qnalo.models.ops.NUMBA) is wrapped in a wall-clock timer before the model is
built, so each call is timed where it runs (the kernels return when their work is done); GEMMs are kept apart by
shape (M x K x N), and what no op covers (NumPy's reshapes, copies and pooling between the kernels, the Python
of the forward) is "glue". OpenVINO: the f32-hint model of bench_models.py with PERF_COUNT on, its
`get_profiling_info()` summed per layer type and kernel (exec_type). Both sides are then put in the same
categories (GEMM, attention, LayerNorm, ...), so each gap between the engines has a name. Every figure is the
median over PASSES passes after WARMUP, per op summed within a pass.

Run:  python benchmarks/profile_cpu.py [--batch 1 8] [--models litv2_s qna_vit_tiny] [--dtype bfloat16]
      [--out FOLDER] (writes results/cpu_profile_<cpu>.md and cpu_profile_latest.md, or cpu_profile_bf16_*.md;
      needs the test and bench extras; run it on an idle machine, as bench_models.py)
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

MODELS = ("litv2_s", "qna_vit_tiny")
WARMUP = 5
PASSES = 25

# qnalo op -> category; OpenVINO layer type -> category (anything unlisted: "layout and other")
QNALO_CATEGORY = {
    # the fused bfloat16 feed-forward blocks: their GEMMs with the GELU (and LITv2's depthwise conv) between
    "matmul": "GEMM (linear layers)", "mlp_gelu_tanh": "GEMM (linear layers)", "conv_ffn": "GEMM (linear layers)",
    "layernorm": "LayerNorm, residual add", "residual_add": "LayerNorm, residual add",
    "residual_add_layernorm": "LayerNorm, residual add",
    "bias_gelu": "bias + GELU", "bias_gelu_tanh": "bias + GELU",
    "dwconv3x3_gelu": "depthwise conv (+ GELU)",
    "deform_sample": "deformable sampling",
    "hifi_attention": "attention", "lofi_attention": "attention", "window_avgpool": "attention",
    "qna_windows": "attention", "window_msa": "attention",
}
OPENVINO_CATEGORY = {
    "FullyConnected": "GEMM (linear layers)", "Convolution": "GEMM (linear layers)",
    "MatMul": "attention", "Softmax": "attention", "ScaledDotProductAttention": "attention",
    "MVN": "LayerNorm, residual add",
    "GroupConvolution": "depthwise conv (+ GELU)",
    "DeformableConvolution": "deformable sampling", "GridSample": "deformable sampling",
    "Eltwise": "elementwise (GELU, adds, scales)", "Subgraph": "elementwise (GELU, adds, scales)",
}
CATEGORIES = ("GEMM (linear layers)", "attention", "LayerNorm, residual add", "bias + GELU",
              "depthwise conv (+ GELU)", "deformable sampling", "elementwise (GELU, adds, scales)",
              "layout and other")


@contextlib.contextmanager
def timed_numba_ops(dtype):
    """Every op of the Numba op set of `dtype` timed per call while the context is open: yields the list the
    (label, seconds) pairs go to. Models must be built inside it (a Linear keeps the matmul it was built with)."""
    from qnalo.models import ops
    op_set = ops.get_ops("numba", dtype)
    spans = []
    saved = dict(vars(op_set))

    def timed(name, fn):
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            label = name
            if name == "matmul":
                x, w = args[0], args[1]
                label = f"matmul {x.shape[0]}x{w.shape[0]}x{w.shape[1]}"
            spans.append((label, time.perf_counter() - start))
            return out
        return run

    for name in QNALO_CATEGORY:
        if name in saved and not getattr(saved[name], "composed", False):
            setattr(op_set, name, timed(name, saved[name]))
    try:
        yield spans
    finally:
        for name, fn in saved.items():
            setattr(op_set, name, fn)


def profile_qnalo(converted, x, dtype):
    """(per-label median seconds in a pass, calls per pass, median pass seconds with timers, without them)."""
    import qnalo
    with timed_numba_ops(dtype) as spans:
        model = qnalo.load(converted, dtype=dtype)
        for _ in range(WARMUP):
            model(x)
        per_label, passes = collections.defaultdict(list), []
        calls = collections.Counter()
        for _ in range(PASSES):
            spans.clear()
            start = time.perf_counter()
            model(x)
            passes.append(time.perf_counter() - start)
            summed = collections.defaultdict(float)
            for label, seconds in spans:
                summed[label] += seconds
            calls = collections.Counter(label for label, _ in spans)
            for label in calls:
                per_label[label].append(summed[label])
    bare = qnalo.load(converted, dtype=dtype)
    for _ in range(WARMUP):
        bare(x)
    untimed = []
    for _ in range(PASSES):
        start = time.perf_counter()
        bare(x)
        untimed.append(time.perf_counter() - start)
    medians = {label: statistics.median(times) for label, times in per_label.items()}
    return medians, calls, statistics.median(passes), statistics.median(untimed)


def openvino_config(dtype):
    """bench_models.py's OpenVINO configuration; for bfloat16 without the f32 hint (OpenVINO's default)."""
    config = {**harness.OPENVINO_F32, "PERF_COUNT": True}
    if dtype == "bfloat16":
        del config["INFERENCE_PRECISION_HINT"]
    return config


def profile_openvino(onnx_path, x, dtype):
    """(seconds per (layer type, exec_type) summed over a pass, median; layers per key; median pass seconds)."""
    import openvino as ov
    compiled = ov.Core().compile_model(onnx_path, "CPU", openvino_config(dtype))
    req = compiled.create_infer_request()
    for _ in range(WARMUP):
        req.infer({0: x})
    per_key, passes, layers = collections.defaultdict(list), [], collections.Counter()
    for _ in range(PASSES):
        start = time.perf_counter()
        req.infer({0: x})
        passes.append(time.perf_counter() - start)
        summed = collections.defaultdict(float)
        layers = collections.Counter()
        for info in req.get_profiling_info():
            if info.status != ov.ProfilingInfo.Status.EXECUTED:
                continue
            key = (info.node_type, info.exec_type)
            summed[key] += info.real_time.total_seconds()
            layers[key] += 1
        for key, seconds in summed.items():
            per_key[key].append(seconds)
    return {key: statistics.median(t) for key, t in per_key.items()}, layers, statistics.median(passes)


def _ms(seconds):
    return f"{1e3 * seconds:.2f}"


def report_model(name, batch, converted, onnx_path, dtype):
    import numpy as np
    x = harness.make_input(batch)
    q_ops, q_calls, q_pass, q_bare = profile_qnalo(converted, x, dtype)
    o_ops, o_layers, o_pass = profile_openvino(onnx_path, np.ascontiguousarray(x), dtype)
    engine = "OpenVINO f32" if dtype == "float32" else "OpenVINO default (bf16)"

    q_glue = max(0.0, q_pass - sum(q_ops.values()))
    q_cat, o_cat = collections.defaultdict(float), collections.defaultdict(float)
    for label, seconds in q_ops.items():
        q_cat[QNALO_CATEGORY[label.split()[0]]] += seconds
    q_cat["layout and other"] += q_glue
    o_counted = sum(o_ops.values())
    for (node_type, _), seconds in o_ops.items():
        o_cat[OPENVINO_CATEGORY.get(node_type, "layout and other")] += seconds

    lines = [f"## {name}, batch {batch}", "",
             f"qnalo {dtype} {_ms(q_bare)} ms a pass ({_ms(q_pass)} ms with its op timers); {engine} {_ms(o_pass)} ms a "
             f"pass ({_ms(o_counted)} ms in its counters); qnalo / OpenVINO {q_bare / o_pass:.2f}.", "",
             "| category | qnalo ms | OpenVINO ms | qnalo - OpenVINO, ms |", "|---|---:|---:|---:|"]
    for cat in CATEGORIES:
        if q_cat[cat] or o_cat[cat]:
            lines.append(f"| {cat} | {_ms(q_cat[cat])} | {_ms(o_cat[cat])} | {1e3 * (q_cat[cat] - o_cat[cat]):+.2f} |")
    lines.append(f"| total | {_ms(q_pass)} | {_ms(o_counted)} | {1e3 * (q_pass - o_counted):+.2f} |")

    lines += ["", "qnalo, per op (GEMMs per M x K x N shape):", "",
              "| op | calls | ms | GFLOP/s | share |", "|---|---:|---:|---:|---:|"]
    for label, seconds in sorted(q_ops.items(), key=lambda item: -item[1]):
        rate = ""
        shape = re.fullmatch(r"matmul (\d+)x(\d+)x(\d+)", label)
        if shape:
            m, k, n = map(int, shape.groups())
            rate = f"{2 * m * k * n * q_calls[label] / seconds / 1e9:.0f}"
        lines.append(f"| {label} | {q_calls[label]} | {_ms(seconds)} | {rate} | {seconds / q_pass:.1%} |")
    lines.append(f"| glue (NumPy between the kernels) | | {_ms(q_glue)} | | {q_glue / q_pass:.1%} |")

    lines += ["", "OpenVINO, per layer type and kernel (PERF_COUNT):", "",
              "| layer type | kernel | layers | ms | share |", "|---|---|---:|---:|---:|"]
    for (node_type, exec_type), seconds in sorted(o_ops.items(), key=lambda item: -item[1]):
        lines.append(f"| {node_type} | {exec_type} | {o_layers[(node_type, exec_type)]} | {_ms(seconds)} | "
                     f"{seconds / o_counted:.1%} |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes (default: 1 8)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="default: %(default)s")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="qnalo's dtype; bfloat16 is profiled beside OpenVINO's default precision")
    parser.add_argument("--out", default=harness.RESULTS_DIR, help="folder for the report (default: %(default)s)")
    args = parser.parse_args(argv)
    unavailable = harness.missing("torch") or harness.missing("openvino") or harness.missing("onnx")
    if unavailable:
        sys.exit(f"profile_cpu: {unavailable}")
    beside = "OpenVINO f32" if args.dtype == "float32" else "OpenVINO's default precision, in bfloat16"
    lines = [f"# Where the CPU time goes: qnalo {args.dtype} beside {beside}, {datetime.date.today()}", "",
             f"CPU: {harness.cpu_description()}; {harness.THREADS} threads.", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in harness.versions().items()), "",
             f"Command: `python benchmarks/profile_cpu.py --batch {' '.join(map(str, args.batch))} "
             f"--models {' '.join(args.models)} --dtype {args.dtype}`; medians of {PASSES} passes after {WARMUP}.", "",
             "OpenVINO's counters leave out its own scheduling between layers, so its categories add up to a little "
             "less than its pass; qnalo's op timers add ~1 us a call. OpenVINO rewrites the graph: its layer types "
             "map to the categories only roughly (QnA's windows become Reorders, Transposes and convolutions, "
             "listed under layout; GELU and residual adds are fused into its Subgraphs)."]
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in args.models:
            reference, converted = harness.converted_reference(name, folder)
            for batch in args.batch:
                onnx_path = os.path.join(folder, f"{name}_b{batch}.onnx")
                harness.export_onnx(reference, batch, onnx_path)
                lines += [""] + report_model(name, batch, converted, onnx_path, args.dtype)
                print(f"profile_cpu: {name} batch {batch} done", flush=True)
    text = "\n".join(lines) + "\n"
    prefix = "cpu_profile" if args.dtype == "float32" else "cpu_profile_bf16"
    for path in (os.path.join(args.out, f"{prefix}_{harness.cpu_tag()}.md"),
                 os.path.join(args.out, f"{prefix}_latest.md")):
        harness.write_text(path, text)
    print(text + f"\nwritten to {path}")


if __name__ == "__main__":
    main()
