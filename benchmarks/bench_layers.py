"""The two attention layers alone, through the public API (qnalo.layers), against PyTorch eager on the same
weights, 2 threads each:

* QnA (qnalo.layers.QnA.from_state_dict) vs a PyTorch implementation of the official grouped-convolution
  formulation (tests/reference/qna_torch.py), at QnA-ViT-Tiny's first stage (56x56x64, 8 heads, 2 queries,
  stride 1, batch 1), k = 3 and 7; and the peak extra memory of one call for k = 3, 7, 11, 15 beside
  overlapping local self-attention (SASA: keys and values unfolded over each k x k neighbourhood, k^2 growth).
* HiLo (qnalo.layers.HiLo.from_state_dict) vs the official-layout PyTorch HiLo (tests/reference/litv2_torch.py)
  at LITv2-S's HiLo stage, layers.2 (14x14x384, 12 heads, ws 2, alpha 0.9), and at layers.3 (7x7x768, ws 1:
  global attention), batch 1.

Run:  python -m pytest benchmarks/bench_layers.py      (writes benchmarks/results/layers_<cpu>.md and
                                                         layers_latest.md)
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

SIZE, CHANNELS, HEADS, QUERIES = 56, 64, 8, 2
TIMED_K = (3, 7)
MEMORY_K = (3, 7, 11, 15)
SAMPLES = {}   # (engine, k) -> seconds of every timed call, both blocks

# Builds one engine's layer for window size K and defines run(); shared by the timing and memory runs.
SETUP = f"""
import sys, numpy as np, torch
sys.path.insert(0, {harness.TESTS!r})
torch.set_num_threads({harness.THREADS})
from reference.qna_torch import FusedKQnA, randomize_
from qnalo.layers import QnA
S, C, H, NQ = {SIZE}, {CHANNELS}, {HEADS}, {QUERIES}
x = np.random.default_rng(0).standard_normal((1, S, S, C)).astype(np.float32)
layer = randomize_(FusedKQnA(C, C, H, K, 1, NQ), seed=0).eval()
# prepare(x NHWC numpy) -> the engine's input; run(prepared) -> the layer's output
if ENGINE == "qnalo":
    run = QnA.from_state_dict(layer.state_dict(), H, K, 1, NQ)
    prepare = lambda a: a  # noqa: E731
elif ENGINE == "torch":
    prepare = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    def run(a):
        with torch.inference_mode():
            return layer(a)
elif ENGINE == "window":   # non-overlapping K x K window attention (Swin style; map zero-padded to whole windows)
    prepare = lambda a: torch.from_numpy(a.copy())  # noqa: E731
    wq, wk, wv = (torch.randn(C, C) / C ** 0.5 for _ in range(3))
    def run(a):
        b, s1, s2, _ = a.shape
        g1, g2 = -(-s1 // K), -(-s2 // K)
        with torch.inference_mode():
            t = torch.nn.functional.pad(a, (0, 0, 0, g2 * K - s2, 0, g1 * K - s1))
            windows = lambda z: z.reshape(  # noqa: E731   (windows, H, K*K, d)
                b, g1, K, g2, K, H, C // H).permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, H, K * K, C // H)
            q, k, v = (windows(t @ m) for m in (wq, wk, wv))
            return torch.softmax(q @ k.transpose(-2, -1) / (C // H) ** 0.5, -1) @ v
else:   # SASA, the overlapping local self-attention QnA replaces
    prepare = lambda a: torch.from_numpy(a.transpose(0, 3, 1, 2).copy())  # noqa: E731
    wq, wk, wv = (torch.randn(C, C) / C ** 0.5 for _ in range(3))
    def run(a):
        b, _, s1, s2 = a.shape
        with torch.inference_mode():
            flat = a.flatten(2).transpose(1, 2)                                    # (1, s1*s2, C)
            q, k, v = (flat @ m for m in (wq, wk, wv))
            unfold = lambda t: torch.nn.functional.unfold(                         # (1, C*K*K, s1*s2)
                t.transpose(1, 2).reshape(b, C, s1, s2), K, padding=(K - 1) // 2)
            keys = unfold(k).reshape(b, H, C // H, K * K, s1 * s2)
            vals = unfold(v).reshape(b, H, C // H, K * K, s1 * s2)
            logits = (q.transpose(1, 2).reshape(b, H, C // H, 1, s1 * s2) * keys).sum(2)
            return (logits.softmax(2).unsqueeze(2) * vals).sum(3)
"""


def _engine(engine, k):
    scope = {"ENGINE": engine, "K": k}
    exec(SETUP, scope)
    return scope


@pytest.mark.parametrize("engine", ["qnalo", "torch"])
@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("k", TIMED_K)
def bench_qna_layer(benchmark, engine, block, k):
    """Runs in the order qnalo, torch, qnalo, torch per k, and the report pools both blocks of each engine:
    this shared machine's speed drifts by tens of percent between minutes, and the alternation spreads that
    drift over both engines. (Alternating single calls is no fairer: each engine's call then starts with the
    other's data in the caches and measured 1.5-3x slower for both.)"""
    scope = _engine(engine, k)
    run, x = scope["run"], scope["prepare"](scope["x"])
    if engine == "qnalo":   # same weights: the engine matches the reference before it is timed
        import torch
        xt = torch.from_numpy(scope["x"].transpose(0, 3, 1, 2).copy())
        with torch.no_grad():
            ref = scope["layer"](xt).numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(run(x), ref, atol=1e-4 * max(1.0, float(np.abs(ref).max())))
    benchmark.group = f"qna-layer-{SIZE}x{SIZE}x{CHANNELS}-k{k}"
    benchmark.pedantic(run, args=(x,), rounds=30, warmup_rounds=3, iterations=1)
    if benchmark.stats is not None:
        SAMPLES.setdefault((engine, k), []).extend(benchmark.stats.stats.data)


HILO_SHAPES = {"layers.2": (14, 384, 12, 2), "layers.3": (7, 768, 24, 1)}   # side, dim, heads, ws (alpha 0.9)
HILO_SAMPLES = {}   # (engine, stage) -> seconds of every timed call


def _hilo_engine(engine, stage):
    """(run, prepared input) of one engine's LITv2-S HiLo at `stage`, both on the same seeded weights; qnalo's
    output is checked against the reference's before it is timed."""
    import torch
    from reference.litv2_torch import HiLo as TorchHiLo
    from qnalo.layers import HiLo
    torch.set_num_threads(harness.THREADS)
    side, dim, heads, ws = HILO_SHAPES[stage]
    sd = HiLo.random_state_dict(dim, heads, ws, 0.9, seed=0)
    ref = TorchHiLo(dim, heads, window_size=ws, alpha=0.9).eval()
    ref.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    x = np.random.default_rng(0).standard_normal((1, side * side, dim)).astype(np.float32)
    if engine == "torch":
        def run(a):
            with torch.inference_mode():
                return ref(a, side, side)
        return run, torch.from_numpy(x)
    layer = HiLo.from_state_dict(sd, dim, heads, ws, 0.9)
    with torch.inference_mode():
        want = ref(torch.from_numpy(x), side, side).numpy()
    np.testing.assert_allclose(layer(x, side, side), want, atol=1e-4 * max(1.0, float(np.abs(want).max())))
    return (lambda a: layer(a, side, side)), x


@pytest.mark.parametrize("engine", ["qnalo", "torch"])
@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("stage", list(HILO_SHAPES))
def bench_hilo_layer(benchmark, engine, block, stage):
    """Alternating blocks of 50 calls, as bench_qna_layer."""
    run, x = _hilo_engine(engine, stage)
    benchmark.group = f"hilo-litv2-s-{stage}"
    benchmark.pedantic(run, args=(x,), rounds=50, warmup_rounds=5, iterations=1)
    if benchmark.stats is not None:
        HILO_SAMPLES.setdefault((engine, stage), []).extend(benchmark.stats.stats.data)


PROBE = """
import os
def _kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))
{setup}
run(prepare(x[:, :8, :8]))                 # load the kernels on a small map, so the full call's buffers are new
full = prepare(x)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")                           # reset the peak RSS to the current RSS
before = _kib("VmRSS")
run(full)
print(_kib("VmHWM") - before)
"""


def _peak_extra_kib(engine, k):
    code = f"ENGINE, K = {engine!r}, {k}\n" + PROBE.format(setup=SETUP)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "PYTHONPATH": harness.ROOT})
    if out.returncode:
        raise RuntimeError(out.stderr[-500:])
    return int(out.stdout.split()[-1])


def bench_peak_memory_and_report():
    """Fresh process per engine and k: peak RSS of one full-size call above the RSS before it (kernels loaded
    on a small map first); then the report."""
    memory = {(e, k): _peak_extra_kib(e, k) for e in ("qnalo", "torch", "sasa") for k in MEMORY_K}
    lines = [f"# The attention layers alone, qnalo.layers vs PyTorch eager, {harness.THREADS} threads, batch 1",
             "", f"CPU: {harness.cpu_description()}", "", f"Measured {time.strftime('%Y-%m-%d %H:%M')}. Command: "
             "`python -m pytest benchmarks/bench_layers.py`. Two blocks per engine, in the order qnalo, torch, "
             "qnalo, torch; medians over both. Same weights in both; qnalo's output is checked against the "
             "reference's before it is timed.", "",
             f"## QnA, {SIZE}x{SIZE}x{CHANNELS}, {HEADS} heads, {QUERIES} queries, stride 1", "",
             "| k | qnalo median ms | PyTorch (official grouped-conv form) median ms | PyTorch / qnalo |",
             "|---:|---:|---:|---:|"]
    for k in TIMED_K:
        if ("qnalo", k) in SAMPLES and ("torch", k) in SAMPLES:
            q, t = (float(np.median(SAMPLES[(e, k)])) for e in ("qnalo", "torch"))
            lines.append(f"| {k} | {q * 1e3:.2f} | {t * 1e3:.2f} | {t / q:.1f}x |")
    lines += ["", "Peak extra memory of one call (VmHWM after it minus VmRSS before it, fresh process, first "
              "full-size call), MiB:", "",
              "| k | qnalo | PyTorch QnA (grouped conv) | PyTorch SASA (unfold) |", "|---:|---:|---:|---:|"]
    for k in MEMORY_K:
        lines.append(f"| {k} | " + " | ".join(f"{memory[(e, k)] / 1024:.1f}" for e in ("qnalo", "torch", "sasa"))
                     + " |")
    lines += ["", "## HiLo, LITv2-S (alpha 0.9)", "",
              "| layer | map | qnalo median ms | PyTorch (official HiLo) median ms | PyTorch / qnalo |",
              "|---|---|---:|---:|---:|"]
    for stage, (side, dim, heads, ws) in HILO_SHAPES.items():
        if ("qnalo", stage) in HILO_SAMPLES and ("torch", stage) in HILO_SAMPLES:
            q, t = (float(np.median(HILO_SAMPLES[(e, stage)])) for e in ("qnalo", "torch"))
            lines.append(f"| {stage} (ws {ws}, {heads} heads) | {side}x{side}x{dim} | {q * 1e3:.3f} | "
                         f"{t * 1e3:.3f} | {t / q:.1f}x |")
    text = "\n".join(lines) + "\n"
    cpu = harness.cpu_tag()
    for name in (f"layers_{cpu}.md", "layers_latest.md"):
        harness.write_text(os.path.join(harness.RESULTS_DIR, name), text)
    print("\n" + text)
    print(json.dumps({f"{e}-k{k}": v for (e, k), v in memory.items()}))
