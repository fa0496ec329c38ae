"""The README's plots (docs/*.png), measured on this machine at batch 1 and QNALO_BENCH_THREADS (default 2):

1. docs/qna_vs_local_attention.png: one attention layer at QnA-ViT-Tiny's first stage (56x56x64, 8 heads), time
   and peak extra memory against the window size k, for QnA (qnalo's kernel; PyTorch eager in the official
   grouped-convolution form), overlapping local self-attention (SASA: keys and values unfolded over every
   k x k neighbourhood) and non-overlapping k x k window attention (PyTorch eager). The QnA paper's claim: QnA's
   cost barely grows with k, SASA's grows as k^2.
2. docs/hilo_vs_msa.png: one attention layer at LITv2-S's third stage (384 channels, 12 heads) against the image
   resolution (the stage map is 1/16 of it), for HiLo (2x2 windows, 10 of 12 heads Lo-Fi), plain global MSA and
   7x7 window attention, each in qnalo and in PyTorch eager (the reference module with those settings). The
   HiLo paper's claim: HiLo runs faster on a CPU than MSA and than local windows, increasingly so with resolution.
3. docs/models.png: whole models at 224, batch 1 and 8, qnalo against PyTorch eager, ONNX Runtime and OpenVINO:
   read from the reports that benchmarks/bench_models.py writes (benchmarks/results/<model>_224_latest.md).

Run:  python benchmarks/plots.py          (needs the bench and test extras: matplotlib, torch)
Every point is the median of CALLS calls; memory is the peak RSS of one call above the RSS before it, in a fresh
process (benchmarks/bench_layers.py's probe).
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

import bench_layers  # noqa: E402

sys.path.insert(0, harness.TESTS)   # the PyTorch reference modules

DOCS = os.path.join(harness.ROOT, "docs")
CALLS = 10
QNA_K = (3, 5, 7, 9, 11, 13, 15)
QNA_ENGINES = {"qnalo": "QnA, qnalo", "torch": "QnA, PyTorch", "sasa": "overlapping local SA (SASA), PyTorch",
               "window": "k x k window attention, PyTorch"}
HILO_IMAGE_SIDES = (224, 448, 672, 896)          # stage-3 maps 14 .. 56, whole 2x2 and 7x7 windows
HILO_KINDS = {"hilo": (2, 10), "msa": (1, 12), "window": (7, 0)}   # (window size, Lo-Fi heads) of 12
HILO_LABELS = {"hilo": "HiLo", "msa": "global MSA", "window": "7x7 window attention"}
MODELS = ("litv2_s", "qna_vit_tiny")
MODEL_ENGINES = ("qnalo", "torch", "onnxruntime", "openvino")

LAYER_PROBE = """
{setup}
def _kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
import time
run(prepare(x[:, :8, :8]))
full = prepare(x)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = _kib("VmRSS")
run(full)
peak = _kib("VmHWM") - before
times = []
for _ in range({calls}):
    t = time.perf_counter()
    run(full)
    times.append(time.perf_counter() - t)
print(peak, sorted(times)[len(times) // 2])
"""


def qna_layer_point(engine, k, calls):
    """(peak extra KiB, median seconds) of one layer call, in a fresh process."""
    code = f"ENGINE, K = {engine!r}, {k}\n" + LAYER_PROBE.format(setup=bench_layers.SETUP, calls=calls)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900,
                         env={**os.environ, "PYTHONPATH": harness.ROOT})
    if out.returncode:
        raise RuntimeError(out.stderr[-800:])
    peak, median = out.stdout.split()[-2:]
    return int(peak), float(median)


def hilo_layers(kind):
    """qnalo's and the reference's layer of one attention kind (random weights: times do not depend on them):
    (run_qnalo(x (1, S, S, 384)), run_torch(prepared), prepare_torch(x))."""
    import torch
    from reference.litv2_torch import HiLo
    from qnalo.models.litv2 import HiLoAttention, random_tensors
    from qnalo.models.litv2_config import LITv2Config
    from qnalo.models.ops import NUMBA
    ws, lo = HILO_KINDS[kind]
    cfg = LITv2Config(embed_dim=96, depths=(1, 1, 1, 1), num_heads=(3, 6, 12, 24), window_sizes=(0, 0, ws, 1),
                      lo_heads=(0, 0, lo, 24))
    tensors = random_tensors(cfg, seed=0)
    prefix = "layers.2.blocks.0.attn."
    qnalo_attn = HiLoAttention(NUMBA, tensors, prefix, cfg.head_dim(2), cfg.hi_heads(2), cfg.lo_heads[2], ws)
    ref = HiLo(384, 12, window_size=ws, lo_heads=lo if ws > 1 else None).eval()

    def run_qnalo(x):
        b, s, _, c = x.shape
        return qnalo_attn(NUMBA, x.reshape(-1, c), b, s, s)

    def prepare_torch(x):   # (1, S, S, C) -> the reference's (tokens (1, S*S, C), S)
        return torch.from_numpy(x.reshape(x.shape[0], -1, x.shape[3]).copy()), x.shape[1]

    def run_torch(prepared):
        tokens, side = prepared
        with torch.inference_mode():
            return ref(tokens, side, side)

    return run_qnalo, run_torch, prepare_torch


def median_time(run, x, calls):
    run(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def measure_hilo(calls, log):
    """{(engine, kind): [median seconds per image side]}; engines measured kind by kind, side by side."""
    import torch
    torch.set_num_threads(harness.THREADS)
    results = {}
    for kind in HILO_KINDS:
        run_qnalo, run_torch, prepare_torch = hilo_layers(kind)
        for side in HILO_IMAGE_SIDES:
            s = side // 16
            x = np.random.default_rng(0).standard_normal((1, s, s, 384)).astype(np.float32)
            xt = prepare_torch(x)
            results.setdefault(("qnalo", kind), []).append(median_time(run_qnalo, x, calls))
            results.setdefault(("torch", kind), []).append(median_time(run_torch, xt, calls))
            log(f"{kind} at {side}: qnalo {results[('qnalo', kind)][-1] * 1e3:.1f} ms, "
                f"torch {results[('torch', kind)][-1] * 1e3:.1f} ms")
    return results


def model_table(model):
    """{(case, engine): median ms} from the model's latest benchmark report (None where it has none)."""
    path = os.path.join(harness.RESULTS_DIR, f"{model}_224_latest.md")
    if not os.path.exists(path):
        return None
    rows = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = re.match(r"\| (latency_b1|throughput_b8) \| (\w+) \| ([\d.]+) \|", line)
            if m:
                rows[(m.group(1), m.group(2))] = float(m.group(3))
    return rows


def plot_qna(points, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
    for engine, label in QNA_ENGINES.items():
        ks = [k for k in QNA_K if (engine, k) in points]
        ax_t.plot(ks, [points[(engine, k)][1] * 1e3 for k in ks], "o-", label=label)
        ax_m.plot(ks, [points[(engine, k)][0] / 1024 for k in ks], "o-", label=label)
    ax_t.set(xlabel="window size k", ylabel="ms per call (median)", yscale="log",
             title="time, 56x56x64, 8 heads, batch 1")
    ax_m.set(xlabel="window size k", ylabel="peak extra memory, MiB", yscale="log", title="memory of one call")
    for ax in (ax_t, ax_m):
        ax.set_xticks(QNA_K)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"QnA vs local self-attention ({harness.THREADS} threads, {harness.cpu_name()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_hilo(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for (engine, kind), times in results.items():
        style = "o-" if engine == "qnalo" else "s--"
        ax.plot(HILO_IMAGE_SIDES, [t * 1e3 for t in times], style,
                label=f"{HILO_LABELS[kind]}, {'qnalo' if engine == 'qnalo' else 'PyTorch'}")
    ax.set(xlabel="image side (stage-3 map = side / 16)", ylabel="ms per layer call (median)", yscale="log",
           title=f"one attention layer, 384 ch, 12 heads, batch 1, {harness.THREADS} threads")
    ax.set_xticks(HILO_IMAGE_SIDES)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_models(tables, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = (("latency_b1", 1, "batch 1"), ("throughput_b8", 8, "batch 8"))
    fig, axes = plt.subplots(1, len(tables), figsize=(5.5 * len(tables), 4.2), squeeze=False)
    for ax, (model, rows) in zip(axes[0], tables.items()):
        width = 0.8 / len(MODEL_ENGINES)
        for j, engine in enumerate(MODEL_ENGINES):
            values = [rows.get((case, engine), np.nan) / batch for case, batch, _ in cases]
            bars = ax.bar(np.arange(len(cases)) + (j - 1.5) * width, values, width, label=engine)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks(range(len(cases)), [label for _, _, label in cases])
        ax.set(ylabel="ms per image (median)", title=f"{model}, 224x224, {harness.THREADS} threads")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Measure and draw the README's plots into docs/.")
    parser.add_argument("--calls", type=int, default=CALLS, help=f"timed calls per point (default {CALLS})")
    parser.add_argument("--only", choices=("qna", "hilo", "models"), help="one plot only")
    args = parser.parse_args(argv)
    os.makedirs(DOCS, exist_ok=True)
    data = {}
    if args.only in (None, "qna"):
        points = {}
        for k in QNA_K:
            for engine in QNA_ENGINES:
                points[(engine, k)] = qna_layer_point(engine, k, args.calls)
                print(f"QnA sweep k={k} {engine}: {points[(engine, k)][0] / 1024:.1f} MiB, "
                      f"{points[(engine, k)][1] * 1e3:.2f} ms", flush=True)
        plot_qna(points, os.path.join(DOCS, "qna_vs_local_attention.png"))
        data["qna"] = {f"{e}-k{k}": {"peak_kib": p, "median_s": t} for (e, k), (p, t) in points.items()}
    if args.only in (None, "hilo"):
        results = measure_hilo(args.calls, log=lambda line: print(line, flush=True))
        plot_hilo(results, os.path.join(DOCS, "hilo_vs_msa.png"))
        data["hilo"] = {f"{e}-{k}": dict(zip(map(str, HILO_IMAGE_SIDES), t)) for (e, k), t in results.items()}
    if args.only in (None, "models"):
        tables = {m: t for m in MODELS if (t := model_table(m))}
        if tables:
            plot_models(tables, os.path.join(DOCS, "models.png"))
            data["models"] = {m: {f"{c}-{e}": v for (c, e), v in t.items()} for m, t in tables.items()}
    with open(os.path.join(harness.RESULTS_DIR, "plots_latest.json"), "w", encoding="utf-8") as f:
        json.dump({"threads": harness.THREADS, "cpu": harness.cpu_name(), "calls": args.calls, **data}, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
