"""Shared pieces of the whole-model benchmarks: thread pinning, artifacts, engine adapters, the report.

The model is QNALO_BENCH_MODEL (default litv2_s; also any qna_vit_* name), at 224.

Import this module before numpy (benchmarks/conftest.py does): it pins every thread pool to
QNALO_BENCH_THREADS (default 2) through the environment.
"""
import os
import sys

THREADS = int(os.environ.get("QNALO_BENCH_THREADS", "2"))
_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
NUMPY_WAS_LOADED_EARLY = "numpy" in sys.modules
for _var in _THREAD_VARS:
    os.environ[_var] = str(THREADS)

import dataclasses  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TESTS = os.path.join(ROOT, "tests")
RESULTS_DIR = os.path.join(HERE, "results")
PROBE = os.path.join(HERE, "probe.py")

VARIANT = os.environ.get("QNALO_BENCH_MODEL", "litv2_s")
IMG = 224
SEED = 0
CASES = {"latency_b1": 1, "throughput_b8": 8}
ENGINES = ("qnalo", "torch", "onnxruntime", "openvino")
ROUNDS = {1: int(os.environ.get("QNALO_BENCH_ROUNDS_B1", "30")), 8: int(os.environ.get("QNALO_BENCH_ROUNDS_B8", "10"))}
WARMUP = int(os.environ.get("QNALO_BENCH_WARMUP", "3"))
COLD_RUNS = int(os.environ.get("QNALO_BENCH_COLD_RUNS", "3"))


def missing(module):
    """None if `module` can be imported, else a skip reason."""
    return None if importlib.util.find_spec(module) is not None else f"{module} is not installed"


def make_input(batch, seed=SEED):
    import numpy as np
    return np.random.default_rng(seed + batch).standard_normal((batch, 3, IMG, IMG)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Artifacts: a randomised reference LITv2-S, its .pth, the qnalo file, static-batch ONNX files
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Artifacts:
    folder: str
    pth: str = None                  # torch.save({'model': state_dict})
    qnalo: str = None                # converted qnalo weights file
    qnalo_note: str = ""             # how the qnalo file was made / why it is missing
    onnx: dict = dataclasses.field(default_factory=dict)   # batch -> path
    onnx_note: str = ""
    export_s: dict = dataclasses.field(default_factory=dict)


def reference_model(name=None):
    """(untrained reference model of `name`, its randomize_) from tests/reference, in eval mode."""
    name = name or VARIANT
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    if name.startswith("qna_vit"):
        from reference import qna_vit_torch
        return qna_vit_torch.qna_vit_reference(name), qna_vit_torch.randomize_
    from reference import litv2_torch
    return litv2_torch.litv2_reference(name), litv2_torch.randomize_


def converted_reference(name, folder):
    """(reference model of `name` with seeded random weights, in eval mode; the path of the same weights
    converted by `qnalo convert` into `folder`), as every engine of a benchmark gets them."""
    import torch
    from qnalo.weights_converter.convert import convert
    reference, randomize_ = reference_model(name)
    reference = randomize_(reference, seed=SEED).eval()
    pth, converted = os.path.join(folder, f"{name}.pth"), os.path.join(folder, f"{name}.safetensors")
    torch.save({"model": reference.state_dict()}, pth)
    convert(pth, converted)
    return reference, converted


def build_artifacts(folder, log=print):
    """Everything the engines load. Needs torch; the qnalo file also needs qnalo's converter."""
    art = Artifacts(folder)
    if missing("torch"):
        art.qnalo_note = art.onnx_note = missing("torch")
        return art
    import torch
    torch.set_num_threads(THREADS)
    model, randomize_ = reference_model()
    model = randomize_(model, seed=SEED)
    art.pth = os.path.join(folder, f"{VARIANT}.pth")
    torch.save({"model": model.state_dict()}, art.pth)

    # qnalo weights file through the official-checkpoint converter
    art.qnalo = os.path.join(folder, f"{VARIANT}.safetensors")
    try:
        from qnalo.weights_converter.convert import convert
        convert(art.pth, art.qnalo, force=True)
        art.qnalo_note = "converted from the reference .pth (same weights as every competitor)"
    except Exception as exc:  # the converter may not exist yet
        art.qnalo = None
        art.qnalo_note = f"converter unavailable ({type(exc).__name__}: {exc})"
        log(f"[bench] qnalo weights file not made: {art.qnalo_note}")

    # ONNX: TorchScript exporter, opset 17, one static-batch file per case
    if missing("onnx"):
        art.onnx_note = missing("onnx")
    else:
        for batch in sorted(set(CASES.values())):
            path = os.path.join(folder, f"{VARIANT}_{IMG}_b{batch}.onnx")
            t0 = time.perf_counter()
            try:
                export_onnx(model, batch, path)
            except Exception as exc:
                art.onnx_note = f"ONNX export failed: {type(exc).__name__}: {exc}"
                log(f"[bench] {art.onnx_note}")
                break
            art.export_s[batch] = time.perf_counter() - t0
            art.onnx[batch] = path
        if art.onnx:
            art.onnx_note = "torch.onnx.export(dynamo=False, opset 17), static batch"
    return art


def export_onnx(model, batch, path):
    """`model` (a PyTorch reference) as a static-batch ONNX file: TorchScript exporter, opset 17."""
    import warnings

    import torch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.from_numpy(make_input(batch)),), path, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["logits"], do_constant_folding=True)


# ------------------------------------------------------------------------------------------------
# Engines: make(art, batch) -> run(x) -> logits (numpy). Building is not timed.
# ------------------------------------------------------------------------------------------------
def engine_unavailable(engine, art):
    if engine == "qnalo":
        return missing("numba") or missing("qnalo")
    if engine == "torch":
        return missing("torch")
    if engine == "onnxruntime":
        return missing("onnxruntime") or (None if art.onnx else art.onnx_note or "no ONNX file")
    if engine == "openvino":
        return missing("openvino") or (None if art.onnx else art.onnx_note or "no ONNX file")
    raise ValueError(engine)


# OpenVINO as every benchmark runs it: the f32 hint, one stream, the pinned threads
OPENVINO_F32 = {"INFERENCE_NUM_THREADS": THREADS, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32",
                "NUM_STREAMS": 1}


def make_engine(engine, art, batch):
    if engine == "qnalo":
        import warnings

        import qnalo
        if art.qnalo:
            model = qnalo.load(art.qnalo)
        else:  # no converter yet: time the engine on its own random weights (no parity check possible)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = qnalo.create_model(VARIANT)
        return model
    if engine == "torch":
        import torch
        torch.set_num_threads(THREADS)
        model, _ = reference_model()
        model.load_state_dict(torch.load(art.pth, weights_only=True)["model"])

        def run(x):
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()
        return run
    if engine == "onnxruntime":
        import onnxruntime as ort
        so = ort.SessionOptions()
        so.intra_op_num_threads = THREADS
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(art.onnx[batch], so, providers=["CPUExecutionProvider"])
        name = sess.get_inputs()[0].name
        return lambda x: sess.run(None, {name: x})[0]
    if engine == "openvino":
        import openvino as ov
        core = ov.Core()
        compiled = core.compile_model(art.onnx[batch], "CPU", OPENVINO_F32)
        req = compiled.create_infer_request()

        def run(x):
            req.infer({0: x})
            return req.get_output_tensor(0).data.copy()
        return run
    raise ValueError(engine)


def versions():
    out = {"python": platform.python_version()}
    for mod in ("numpy", "numba", "torch", "onnx", "onnxruntime", "openvino", "qnalo"):
        if not missing(mod):
            try:
                out[mod] = __import__(mod).__version__
            except Exception as exc:  # pragma: no cover
                out[mod] = f"? ({type(exc).__name__})"
    return out


def threads_in_effect():
    out = [f"{v}={os.environ.get(v)}" for v in _THREAD_VARS]
    if not missing("numba"):
        import numba
        out.append(f"numba.get_num_threads()={numba.get_num_threads()}")
    if not missing("torch"):
        import torch
        out.append(f"torch.get_num_threads()={torch.get_num_threads()}")
    if not missing("threadpoolctl"):
        from threadpoolctl import threadpool_info
        out += [f"{p.get('internal_api')}:{p.get('num_threads')}" for p in threadpool_info()]
    return ", ".join(out)


def cpu_name():
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


# The instruction-set extensions that decide which kernels and precisions an engine can use.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")


def cpu_description():
    """The CPU a report was measured on: vendor, family, model, name and the ISA extensions that matter here,
    e.g. "GenuineIntel family 6 model 143 (Intel(R) Xeon(R) ...): avx2 fma avx512f ... amx_tile"."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    have = " ".join(flag for flag in ISA_FLAGS if flag in flags) or "none of " + " ".join(ISA_FLAGS)
    return (f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} model {info.get('model', '?')} "
            f"({cpu_name()}): {have}")


def cpu_tag():
    """A file-name tag of the CPU kind, vendor, product line, family and model: "intel-xeon-f6m167",
    "amd-epyc-f25m17". Reports keep one file per tag, so a result on one CPU kind never replaces another's."""
    info = _cpuinfo()
    vendor = {"GenuineIntel": "intel", "AuthenticAMD": "amd"}.get(info.get("vendor_id"), "cpu")
    line = next((word.lower() for word in cpu_name().replace("(R)", " ").split()
                 if word.lower() in ("xeon", "epyc", "core", "ryzen", "threadripper")), None)
    return "-".join(filter(None, (vendor, line, f"f{info.get('cpu family', 'x')}m{info.get('model', 'x')}")))


def _cpuinfo():
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


# ------------------------------------------------------------------------------------------------
# Fresh-process probes (peak RSS, cold start)
# ------------------------------------------------------------------------------------------------
def probe_args(engine, art, batch=1):
    if engine == "qnalo":
        return [engine, VARIANT, art.qnalo or "", str(batch)]
    if engine == "torch":
        return [engine, VARIANT, art.pth, str(batch)]
    return [engine, VARIANT, art.onnx[batch], str(batch)]


def run_probe(engine, art, calls, batch=1, extra_env=None, timeout=900):
    """Run benchmarks/probe.py in a fresh interpreter; returns its JSON plus the parent's wall clock."""
    env = dict(os.environ)
    env.update(extra_env or {})
    cmd = [sys.executable, PROBE] + probe_args(engine, art, batch) + [str(calls)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"probe {engine} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["process_wall_s"] = wall
    return data


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
RESULTS = {"timing": {}, "parity": {}, "rss": {}, "cold": {}, "skipped": {}, "notes": []}


@dataclasses.dataclass
class Stats:
    """The statistics record_timing reads, for times measured outside pytest-benchmark."""
    median: float
    min: float
    mean: float
    stddev: float
    rounds: int

    @classmethod
    def of(cls, times):
        import statistics
        return cls(statistics.median(times), min(times), statistics.mean(times),
                   statistics.stdev(times) if len(times) > 1 else 0.0, len(times))


def record_timing(case, engine, stats, batch):
    RESULTS["timing"][(case, engine)] = {"median": stats.median, "min": stats.min, "mean": stats.mean,
                                         "stddev": stats.stddev, "rounds": stats.rounds, "batch": batch}


def _fmt_ms(s):
    return f"{1e3 * s:.1f}"


def render_report():
    lines = []
    t = RESULTS["timing"]
    lines.append(f"# {VARIANT} at {IMG}x{IMG}, {THREADS} threads, {os.cpu_count()} logical CPUs")
    lines.append("")
    lines.append(f"CPU: {cpu_description()}")
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
    lines.append("")
    if t:
        lines.append("## Inference time (median of the timed rounds; ratio = qnalo time / engine time, "
                     "< 1 means qnalo is faster; on a busy machine trust the min column more)")
        lines.append("")
        lines.append("| case | engine | median ms | min ms | img/s (median) | qnalo / engine (median) | "
                     "qnalo / engine (min) | max abs diff vs torch eager |")
        lines.append("|---|---|---:|---:|---:|---:|---:|---:|")
        for case in CASES:
            q = t.get((case, "qnalo"))
            for engine in ENGINES:
                r = t.get((case, engine))
                if r is None:
                    why = RESULTS["skipped"].get((case, engine))
                    if why:
                        lines.append(f"| {case} | {engine} | skipped: {why} | | | | | |")
                    continue
                ratio = f"{q['median'] / r['median']:.2f}" if q else "n/a"
                ratio_min = f"{q['min'] / r['min']:.2f}" if q else "n/a"
                par = RESULTS["parity"].get((case, engine))
                par = "reference" if engine == "torch" else ("n/a" if par is None else f"{par:.2e}")
                lines.append(f"| {case} | {engine} | {_fmt_ms(r['median'])} | {_fmt_ms(r['min'])} | "
                             f"{r['batch'] / r['median']:.1f} | {ratio} | {ratio_min} | {par} |")
        lines.append("")
    if RESULTS["rss"]:
        lines.append("## Peak RSS of a fresh inference process (import, load, 5 batch-1 calls)")
        lines.append("")
        lines.append("Peak = VmHWM of the probe process (ru_maxrss on Linux inherits the spawning pytest "
                     "process's high-water mark across exec, so it is not used).")
        lines.append("")
        lines.append("| engine | RSS after imports MiB | peak RSS MiB | qnalo / engine |")
        lines.append("|---|---:|---:|---:|")
        q = RESULTS["rss"].get("qnalo")
        for engine, r in RESULTS["rss"].items():
            ratio = f"{q['peak_rss_kib'] / r['peak_rss_kib']:.2f}" if q else "n/a"
            lines.append(f"| {engine} | {r['rss_after_import_kib'] / 1024:.0f} | {r['peak_rss_kib'] / 1024:.0f} | "
                         f"{ratio} |")
        lines.append("")
    if RESULTS["cold"]:
        lines.append("## Cold start: fresh process, import + load weights file + first batch-1 call "
                     f"(median of {COLD_RUNS} runs)")
        lines.append("")
        lines.append("`in-process` starts at the probe's first line (interpreter start-up excluded); `process` is "
                     "the parent's wall clock from spawn to exit (interpreter start-up and teardown included).")
        lines.append("")
        lines.append("| engine | import s | load s | first call s | in-process s | process s | qnalo / engine "
                     "(in-process) |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        q = RESULTS["cold"].get("qnalo (warm kernel cache)")
        for engine, r in RESULTS["cold"].items():
            ratio = f"{q['to_first_logits_s'] / r['to_first_logits_s']:.2f}" if q else "n/a"
            lines.append(f"| {engine} | {r['import_s']:.2f} | {r['load_s']:.2f} | {r['first_call_s']:.2f} | "
                         f"{r['to_first_logits_s']:.2f} | {r['process_wall_s']:.2f} | {ratio} |")
        lines.append("")
    if RESULTS["notes"]:
        lines.append("## Notes")
        lines.append("")
        lines += [f"* {n}" for n in RESULTS["notes"]]
        lines.append("")
    return "\n".join(lines)


def write_text(path, text):
    """`text` into `path` (its folder made if missing) through a temporary file renamed over it: a reader or an
    interrupted run never leaves half a report."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".part", "w") as f:
        f.write(text)
    os.replace(path + ".part", path)


def write_report(text, name=None):
    name = name or f"{VARIANT}_{IMG}_{time.strftime('%Y%m%d-%H%M%S')}.md"
    path = os.path.join(RESULTS_DIR, name)
    write_text(path, text + "\n")
    write_text(os.path.join(RESULTS_DIR, f"{VARIANT}_{IMG}_{cpu_tag()}.md"), text + "\n")
    write_text(os.path.join(RESULTS_DIR, f"{VARIANT}_{IMG}_latest.md"), text + "\n")
    return path
