"""qnalo on an NVIDIA GPU (device="cuda") vs PyTorch CUDA eager on the same GPU in the same run: LITv2-S and
QnA-ViT-Tiny at 224, batch 64 throughput and batch 1 latency, float32 (qnalo's float16 storage beside it), and the
QnA layer alone at QnA-ViT-Tiny's first stage (56x56x64, 8 heads, 2 queries), batch 64, k = 3 and 7, and
LITv2-S's HiLo layer (layers.2, 14x14x384), batch 64, both through qnalo.layers. Inputs stay
on the GPU for both engines; each timed call ends with a device synchronize. Every qnalo case is first checked
against PyTorch on the same weights.

Run:  python -m pytest benchmarks/bench_cuda.py      (writes benchmarks/results/cuda_latest.md)
Skipped without CuPy, a GPU and a CUDA build of torch. QNALO_BENCH_CUDA_DRY_RUN=1 runs every case through the
CUDA emulator of the tests (tests/emulated_cupy) and PyTorch on the CPU at batch 2, to check this file's code
paths on a machine without a GPU; its times mean nothing.
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import datetime  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DRY_RUN = os.environ.get("QNALO_BENCH_CUDA_DRY_RUN") == "1"
MODELS = ("litv2_s", "qna_vit_tiny")
BATCHES = {"latency_b1": 1, "throughput_b64": 2 if DRY_RUN else 64}
ROUNDS = {1: 1, 2: 1} if DRY_RUN else {1: 50, 64: 20}
QNA_K = (3, 7)
SIZE, CHANNELS, HEADS, QUERIES = 56, 64, 8, 2
TIMES = {}    # (case, engine) -> (median s, min s, batch)
PARITY = {}   # (case, engine) -> max |qnalo - torch| / max(1, max |torch|)


def _unavailable():
    if DRY_RUN:
        return harness.missing("torch")
    for module in ("cupy", "torch"):
        if harness.missing(module):
            return harness.missing(module)
    import cupy
    import torch
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return "CuPy sees no GPU"
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"CuPy sees no GPU ({exc})"
    return None if torch.cuda.is_available() else "this torch build has no CUDA"


UNAVAILABLE = _unavailable()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=UNAVAILABLE or "")


@pytest.fixture(scope="module")
def gpu():
    """(cupy module, torch device name, synchronize())."""
    import torch
    sys.path.insert(0, harness.TESTS)        # the PyTorch references (and the emulator)
    if DRY_RUN:
        import emulated_cupy
        sys.modules["cupy"] = emulated_cupy.module()
        return sys.modules["cupy"], "cpu", lambda: None
    import cupy

    def synchronize():
        cupy.cuda.Device().synchronize()
        torch.cuda.synchronize()
    return cupy, "cuda", synchronize


def _time(benchmark, case, engine, batch, run, synchronize):
    def call():
        out = run()
        synchronize()
        return out
    benchmark.group = case
    benchmark.extra_info.update(engine=engine, batch=batch)
    benchmark.pedantic(call, rounds=ROUNDS[batch], warmup_rounds=0 if DRY_RUN else 5, iterations=1)
    if benchmark.stats is not None:
        TIMES[(case, engine)] = (benchmark.stats.stats.median, benchmark.stats.stats.min, batch)


def _relative(got, want):
    return float(np.abs(got - want).max() / max(1.0, float(np.abs(want).max())))


@pytest.fixture(scope="module")
def models(gpu, tmp_path_factory):
    """name -> (torch model on the device, {dtype: qnalo model on the device}), on the same random weights
    (the reference's state dict through qnalo convert, as the CPU benchmarks do)."""
    import qnalo
    _, device, _ = gpu
    folder = str(tmp_path_factory.mktemp("cuda_bench"))
    made = {}
    for name in MODELS:
        reference, converted = harness.converted_reference(name, folder)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = {dtype: qnalo.load(converted, device="cuda", dtype=dtype) for dtype in ("float32", "float16")}
        made[name] = (reference.to(device), engine)
    return made


CASES = [(name, case, engine) for name in MODELS for case in BATCHES
         for engine in ("torch", "qnalo-float32", "qnalo-float16")]


@pytest.mark.parametrize("name,case,engine", CASES, ids=[f"{n}-{c}-{e}" for n, c, e in CASES])
def bench_model(benchmark, gpu, models, name, case, engine):
    import torch
    cp, device, synchronize = gpu
    reference, engine_models = models[name]
    batch = BATCHES[case]
    x = harness.make_input(batch)
    if engine == "torch":
        xt = torch.from_numpy(x).to(device)

        def run():
            with torch.inference_mode():
                return reference(xt)
    else:
        model, xc = engine_models[engine.split("-")[1]], cp.asarray(x)
        with torch.inference_mode():
            want = reference(torch.from_numpy(x).to(device)).cpu().numpy()
        PARITY[(f"{name}-{case}", engine)] = _relative(cp.asnumpy(model(xc)).astype(np.float32), want)

        def run():
            return model(xc)
    _time(benchmark, f"{name}-{case}", engine, batch, run, synchronize)


@pytest.mark.parametrize("engine", ["torch", "qnalo-float32"])
@pytest.mark.parametrize("k", QNA_K)
def bench_qna_layer(benchmark, gpu, k, engine):
    import torch
    from reference.qna_torch import FusedKQnA, randomize_
    from qnalo.layers import QnA
    cp, device, synchronize = gpu
    batch = BATCHES["throughput_b64"]
    x = np.random.default_rng(0).standard_normal((batch, SIZE, SIZE, CHANNELS)).astype(np.float32)
    layer = randomize_(FusedKQnA(CHANNELS, CHANNELS, HEADS, k, 1, QUERIES), seed=0).eval().to(device)
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(device)
    case = f"qna_layer-k{k}-b{batch}"
    if engine == "torch":
        def run():
            with torch.inference_mode():
                return layer(xt)
    else:
        qna_layer = QnA.from_state_dict(layer.state_dict(), HEADS, k, 1, QUERIES, device="cuda")
        xc = cp.asarray(x)

        def run():   # the layer as the model runs it (qnalo.layers): GEMM, fused windows, GEMM; CuPy in and out
            return qna_layer(xc)
        with torch.inference_mode():
            want = layer(xt).permute(0, 2, 3, 1).cpu().numpy().reshape(-1, CHANNELS)
        PARITY[(case, engine)] = _relative(cp.asnumpy(run()).reshape(-1, CHANNELS), want)
    _time(benchmark, case, engine, batch, run, synchronize)


HILO_SHAPE = (14, 384, 12, 2)   # LITv2-S layers.2: side, dim, heads, window (alpha 0.9)


@pytest.mark.parametrize("engine", ["torch", "qnalo-float32"])
def bench_hilo_layer(benchmark, gpu, engine):
    """LITv2-S's HiLo (layers.2) alone, batch 64: qnalo.layers.HiLo on the GPU against the official-layout
    PyTorch HiLo on the same weights."""
    import torch
    from reference.litv2_torch import HiLo as TorchHiLo
    from qnalo.layers import HiLo
    cp, device, synchronize = gpu
    batch = BATCHES["throughput_b64"]
    side, dim, heads, ws = HILO_SHAPE
    sd = HiLo.random_state_dict(dim, heads, ws, 0.9, seed=0)
    layer = TorchHiLo(dim, heads, window_size=ws, alpha=0.9).eval()
    layer.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()})
    layer = layer.to(device)
    x = np.random.default_rng(0).standard_normal((batch, side * side, dim)).astype(np.float32)
    xt = torch.from_numpy(x).to(device)
    case = f"hilo_layer-litv2_s-layers.2-b{batch}"
    if engine == "torch":
        def run():
            with torch.inference_mode():
                return layer(xt, side, side)
    else:
        hilo = HiLo.from_state_dict(sd, dim, heads, ws, 0.9, device="cuda")
        xc = cp.asarray(x)

        def run():   # CuPy in and out
            return hilo(xc, side, side)
        with torch.inference_mode():
            want = layer(xt, side, side).cpu().numpy()
        PARITY[(case, engine)] = _relative(cp.asnumpy(run()), want)
    _time(benchmark, case, engine, batch, run, synchronize)


def _gpu_name():
    if DRY_RUN:
        return "none (dry run on the CUDA emulator: times mean nothing)"
    import cupy
    return cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"].decode()


def teardown_module():
    if not TIMES:
        return
    lines = [f"# qnalo on CUDA vs PyTorch CUDA eager, {datetime.date.today()}, GPU: {_gpu_name()}", "",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in harness.versions().items()), "",
             "Median of the timed rounds, each ending with a device synchronize; ratio = qnalo time / torch time "
             "(< 1: qnalo faster). Parity: max |qnalo - torch| / max(1, max |torch|).", "",
             "| case | engine | median ms | min ms | img/s | qnalo / torch (median) | parity |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for (case, engine), (median, best, batch) in TIMES.items():
        torch_time = TIMES.get((case, "torch"), (None,))[0]
        ratio = f"{median / torch_time:.2f}" if torch_time and engine != "torch" else ""
        parity = PARITY.get((case, engine))
        lines.append(f"| {case} | {engine} | {1e3 * median:.2f} | {1e3 * best:.2f} | {batch / median:.1f} | {ratio} | "
                     f"{'' if parity is None else f'{parity:.1e}'} |")
    text = "\n".join(lines) + "\n"
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    name = "cuda_dry_run_latest.md" if DRY_RUN else "cuda_latest.md"
    with open(os.path.join(harness.RESULTS_DIR, name), "w") as f:
        f.write(text)
    print("\n" + text)
