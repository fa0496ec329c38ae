"""`qnalo predict` on Ray Data against plain `qnalo classify`, images/s over generated JPEGs:

* classify   classify_files in one process with 2 kernel threads (what `qnalo classify --threads 2` runs)
* predict-1  qnalo.distributed.predict with one actor of 1 thread
* predict-2  the same with two actors of 1 thread each (2 threads in all, as classify)

for the demo model qna_vit_digits (32x32; NDEMO 64x64 images) and LITv2-S at 224 (random weights saved as a
qnalo file; NLITV2 256x256 images). A local Ray is started once for the session; its start-up is timed apart
and reported as Ray's fixed cost, and each predict time includes its actors' start (a process each, importing
qnalo and loading the model and its compiled kernels). Each configuration runs twice, in alternation.

Run:  python -m pytest benchmarks/bench_predict.py     (writes benchmarks/results/predict_<cpu>.md)
"""
import harness  # noqa: F401  (first: pins the thread variables before numpy loads)

import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ray = pytest.importorskip("ray")

CASES = {"qna_vit_digits": (int(os.environ.get("QNALO_BENCH_NDEMO", "12000")), 64, 2000),
         "litv2_s": (int(os.environ.get("QNALO_BENCH_NLITV2", "480")), 256, 40)}   # images, side, rows per file
ENGINES = ("classify", "predict-1", "predict-2")
RESULTS = {}   # (model, engine) -> [images/s per round]
WORKING = {}   # (model, engine) -> [images/s from the first shard's start to the last one's end, per round]
RAY_START = {}


@pytest.fixture(scope="module")
def ray_session():
    start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="warning")
    RAY_START["s"] = time.perf_counter() - start
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """model -> (folder of generated JPEGs, weights file or None for a demo model)."""
    from PIL import Image
    from qnalo.weights import save_weights
    made = {}
    rng = np.random.default_rng(0)
    for model, (count, side, _) in CASES.items():
        folder = tmp_path_factory.mktemp(model)
        for i in range(count):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:06d}.jpg")
        weights = None
        if model == "litv2_s":
            from qnalo.models import MODEL_REGISTRY
            cls, _, config = MODEL_REGISTRY[model]
            weights = str(folder.parent / "litv2_s_random.safetensors")
            save_weights(weights, cls.random_tensors(config), cls.architecture, config.to_dict(),
                         source={"variant": model}, force=True)
        made[model] = (str(folder), weights)
    return made


def _classify_run(folder, model, weights):
    """() -> images: classify_files over the folder, the model loaded beforehand (2 kernel threads)."""
    import qnalo
    from qnalo.classify import classify_files, expand_paths
    from qnalo.distributed import load_model
    qnalo.set_num_threads(2)
    net = load_model(model if weights is None else None, weights)
    files, _ = expand_paths([folder])
    return lambda: sum(1 for _ in classify_files(net, files, top=5, batch=8))


def _predict_run(folder, model, weights, workers, rows_per_file, out):
    """() -> images: predict into a new folder `out`, with `workers` actors of 1 thread."""
    from qnalo.distributed import predict

    def run():
        shutil.rmtree(out, ignore_errors=True)
        summary = predict([folder], out, model=model if weights is None else None, weights=weights, top=5,
                          rows_per_file=rows_per_file, workers=workers, threads_per_worker=1, batch=8,
                          report=lambda line: None)
        WORKING.setdefault((model, f"predict-{workers}"), []).append(summary["working_images_per_s"])
        return summary["images"]
    return run


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("round_", [1, 2])
@pytest.mark.parametrize("model", list(CASES))
def bench_predict(benchmark, ray_session, corpora, tmp_path, model, round_, engine):
    """One run of one configuration; the configurations alternate (classify, predict-1, predict-2, then again)."""
    folder, weights = corpora[model]
    if engine == "classify":
        run = _classify_run(folder, model, weights)
    else:
        run = _predict_run(folder, model, weights, int(engine[-1]), CASES[model][2], str(tmp_path / "out"))
    benchmark.group = f"predict-{model}"
    count = benchmark.pedantic(run, rounds=1, iterations=1)
    assert count == CASES[model][0]
    if benchmark.stats is not None:
        RESULTS.setdefault((model, engine), []).append(count / benchmark.stats.stats.data[0])


def teardown_module(module):
    if not RESULTS:
        return
    lines = ["# qnalo predict (Ray Data) against qnalo classify, images/s", "",
             f"CPU: {harness.cpu_description()}", "",
             f"Measured {time.strftime('%Y-%m-%d %H:%M')}. Command: `python -m pytest benchmarks/bench_predict.py`. "
             f"Ray {ray.__version__}. A local Ray started once: {RAY_START.get('s', float('nan')):.1f} s (not in "
             "the figures below); each predict figure includes its actors' start. Two rounds per configuration, "
             "alternating; classify: one process, 2 kernel threads; predict-N: N actors of 1 thread.", "",
             "| model | images | classify img/s | predict-1 img/s | predict-2 img/s | predict-2 / predict-1 | "
             "predict-2 / classify |", "|---|---:|---:|---:|---:|---:|---:|"]
    for model, (count, side, _) in CASES.items():
        best = {e: max(RESULTS.get((model, e), [float("nan")])) for e in ENGINES}
        lines.append(f"| {model} | {count} at {side}x{side} | " + " | ".join(
            " / ".join(f"{v:.1f}" for v in RESULTS.get((model, e), [])) for e in ENGINES)
            + f" | {best['predict-2'] / best['predict-1']:.2f}x | {best['predict-2'] / best['classify']:.2f}x |")
    lines += ["", "The same predict runs from the first shard's start to the last one's end (the actors' start-up "
              "left out; Ray Data's scheduling, the Parquet writes and Ray's own processes on the same 2 CPUs "
              "left in):", "",
              "| model | predict-1 img/s | predict-2 img/s | predict-2 / predict-1 | predict-2 / classify |",
              "|---|---:|---:|---:|---:|"]
    for model in CASES:
        one, two = (WORKING.get((model, e), [float("nan")]) for e in ("predict-1", "predict-2"))
        classify = max(RESULTS.get((model, "classify"), [float("nan")]))
        lines.append(f"| {model} | {' / '.join(f'{v:.1f}' for v in one)} | {' / '.join(f'{v:.1f}' for v in two)} "
                     f"| {max(two) / max(one):.2f}x | {max(two) / classify:.2f}x |")
    text = "\n".join(lines) + "\n"
    os.makedirs(harness.RESULTS_DIR, exist_ok=True)
    for name in (f"predict_{harness.cpu_tag()}.md", "predict_latest.md"):
        with open(os.path.join(harness.RESULTS_DIR, name), "w") as f:
            f.write(text)
    print("\n" + text)
