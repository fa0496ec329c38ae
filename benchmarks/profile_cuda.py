"""Where the GPU time goes, for the next round of CUDA tuning: one forward pass of LITv2-S and QnA-ViT-Tiny at 224,
batch 64, float32, on seeded random weights. qnalo (device="cuda") op by op: every CUDA kernel and every
cuBLAS GEMM bracketed by CUDA events, summed per op (GEMMs per shape), the rest of the pass's GPU time (CuPy's
own elementwise ops, copies) and the host time beside it; PyTorch CUDA eager's profile of the same model on the
same weights (torch.profiler, GPU time per op) under it.

Run:  python benchmarks/profile_cuda.py [--out FOLDER]   (writes cuda_profile_latest.md; on a machine with an
NVIDIA GPU, CuPy and a CUDA build of torch; benchmarks/run_on_gpu.sh runs it). QNALO_BENCH_CUDA_DRY_RUN=1 runs it
on the tests' CUDA emulator and PyTorch on the CPU at batch 2, host clocks for events: a check of this file's code
paths, whose times mean nothing.
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import datetime  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

DRY_RUN = os.environ.get("QNALO_BENCH_CUDA_DRY_RUN") == "1"
MODELS = ("litv2_s", "qna_vit_tiny")
BATCH = 2 if DRY_RUN else 64
WARMUP = 0 if DRY_RUN else 3
TOP_TORCH_OPS = 20


class Clock:
    """Marks on the GPU's timeline (CUDA events: no synchronization until read), or on the host's in a dry run."""

    def __init__(self, cp):
        self.cp = cp

    def mark(self):
        if DRY_RUN:
            return time.perf_counter()
        event = self.cp.cuda.Event()
        event.record()
        return event

    def ms(self, start, end):
        if DRY_RUN:
            return 1e3 * (end - start)
        return self.cp.cuda.get_elapsed_time(start, end)

    def synchronize(self):
        if not DRY_RUN:
            self.cp.cuda.Device().synchronize()


@contextlib.contextmanager
def timed_ops(cp, clock):
    """Within it, every CUDA kernel wrapper and cupy.matmul leave (name, start, end) in the yielded list;
    models must be built inside it (their op sets take the wrappers when they are made)."""
    from qnalo.kernels import cuda
    from qnalo.models import ops
    spans = []

    def wrap(name, function):
        def timed(*args, **kwargs):
            start = clock.mark()
            result = function(*args, **kwargs)
            label = name if name != "matmul" else "matmul {}x{} @ {}x{}".format(*args[0].shape, *args[1].shape)
            spans.append((label, start, clock.mark()))
            return result
        return timed

    names = list(vars(cuda.ops))
    saved = {n: getattr(cuda.ops, n) for n in names}
    saved_matmul, saved_ops = cp.matmul, dict(ops._DEVICE_OPS)
    try:
        for n in names:
            setattr(cuda.ops, n, wrap(n, saved[n]))
        cp.matmul = wrap("matmul", saved_matmul)
        ops._DEVICE_OPS.clear()
        yield spans
    finally:
        for n in names:
            setattr(cuda.ops, n, saved[n])
        cp.matmul = saved_matmul
        ops._DEVICE_OPS.clear()
        ops._DEVICE_OPS.update(saved_ops)


def profile_qnalo(cp, clock, converted, x):
    """Markdown lines: qnalo's GPU time per op over one forward pass."""
    import qnalo
    with timed_ops(cp, clock) as spans:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = qnalo.load(converted, device="cuda")
        xc = cp.asarray(x)
        for _ in range(WARMUP):
            model(xc)
        clock.synchronize()
        spans.clear()
        host_start, start = time.perf_counter(), clock.mark()
        model(xc)
        end = clock.mark()
        host_end = time.perf_counter()
        clock.synchronize()
        total = clock.ms(start, end)
        per_op = collections.defaultdict(lambda: [0.0, 0])
        for label, a, b in spans:
            per_op[label][0] += clock.ms(a, b)
            per_op[label][1] += 1
    counted = sum(ms for ms, _ in per_op.values())
    lines = [f"GPU time of the pass {total:.2f} ms (host time to issue it {1e3 * (host_end - host_start):.2f} ms); "
             f"{len(spans)} timed calls.", "", "| op | calls | GPU ms | share |", "|---|---:|---:|---:|"]
    for label, (ms, calls) in sorted(per_op.items(), key=lambda item: -item[1][0]):
        lines.append(f"| {label} | {calls} | {ms:.3f} | {ms / total:.1%} |")
    rest = total - counted
    lines.append(f"| the rest (CuPy's elementwise ops, copies) | | {rest:.3f} | {rest / total:.1%} |")
    return lines


def profile_torch(reference, x, device):
    """Markdown lines: PyTorch eager's own profile of one forward pass."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    xt = torch.from_numpy(x).to(device)
    with torch.inference_mode():
        for _ in range(WARMUP):
            reference(xt)
        if device == "cuda":
            torch.cuda.synchronize()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            reference(xt)
            if device == "cuda":
                torch.cuda.synchronize()
    key = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    return ["```", prof.key_averages().table(sort_by=key, row_limit=TOP_TORCH_OPS), "```"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=harness.RESULTS_DIR, help="folder for the report (default: %(default)s)")
    args = parser.parse_args(argv)
    unavailable = harness.missing("torch") or (None if DRY_RUN else harness.missing("cupy"))
    if unavailable:
        sys.exit(f"profile_cuda: {unavailable}")
    sys.path.insert(0, harness.TESTS)
    if DRY_RUN:
        import emulated_cupy
        sys.modules["cupy"] = emulated_cupy.module()
    import cupy as cp
    device = "cpu" if DRY_RUN else "cuda"
    clock = Clock(cp)
    gpu = "none (dry run on the CUDA emulator: times mean nothing)" if DRY_RUN else \
        cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    lines = [f"# Where the GPU time goes: one forward pass, batch {BATCH}, float32, {datetime.date.today()}, "
             f"GPU: {gpu}", "", "Versions: " + ", ".join(f"{k} {v}" for k, v in harness.versions().items())]
    with tempfile.TemporaryDirectory() as folder:
        for name in MODELS:
            reference, converted = harness.converted_reference(name, folder)
            x = harness.make_input(BATCH)
            lines += ["", f"## {name}: qnalo", ""] + profile_qnalo(cp, clock, converted, x)
            lines += ["", f"## {name}: PyTorch eager", ""] + profile_torch(reference.to(device), x, device)
    text = "\n".join(lines) + "\n"
    path = os.path.join(args.out, "cuda_profile_dry_run_latest.md" if DRY_RUN else "cuda_profile_latest.md")
    harness.write_text(path, text)
    print(text + f"\nwritten to {path}")


if __name__ == "__main__":
    main()
