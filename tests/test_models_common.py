"""qnalo/models/warmup.py and classifier.py: the warm-up that loads a model's kernels before its weights (on a machine's first run,
compiling them in parallel processes: kernels/_precompile.py), and read-only tensors."""
import json
import os
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest

import qnalo
from model_helpers import check_threads_get_single_thread_outputs

# Run in a fresh interpreter: in this test process earlier tests have loaded every kernel already, so a kernel
# the warm-up missed would go unnoticed here.
PROBE = r"""
import importlib, json, pkgutil, sys, warnings
import numpy as np
from numba.core.registry import CPUDispatcher
import qnalo, qnalo.kernels

def overloads():
    found = {}
    for info in pkgutil.iter_modules(qnalo.kernels.__path__):
        module = importlib.import_module("qnalo.kernels." + info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, CPUDispatcher):
                found[info.name + "." + name] = [str(sig) for sig in obj.overloads]
    return found

warnings.simplefilter("ignore")
name, size, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
model = qnalo.load(name) if name.endswith(".safetensors") else qnalo.create_model(name, img_size=size)
before = overloads()
x = np.random.default_rng(0).standard_normal((batch, 3, size, size)).astype(np.float32)
if model.config.num_classes:
    model(x)
model.forward_features(x)
after = overloads()
print(json.dumps({k: sorted(set(v) - set(before.get(k, []))) for k, v in after.items() if set(v) - set(before.get(k, []))}))
"""


def _kernels_loaded_by_the_forward(name, size, batch):
    out = subprocess.run([sys.executable, "-c", PROBE, name, str(size), str(batch)], capture_output=True,
                         text=True, timeout=900, env={**os.environ, "NUMBA_NUM_THREADS": "2"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no kernels to load without the JIT")
@pytest.mark.parametrize("name,size,batch", [("litv2_s", 224, 1), ("qna_vit_tiny", 224, 2),
                                             ("qna_vit_tiny_7x7", 224, 1), ("litv2_m", 97, 1)])
def test_the_warm_up_loads_every_kernel_the_forward_pass_runs(name, size, batch):
    assert _kernels_loaded_by_the_forward(name, size, batch) == {}


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no kernels to load without the JIT")
def test_a_loaded_file_warms_up_the_same_kernels(tmp_path):
    # a weights file's tensors are read-only mmap views, a distinct Numba argument type from writable arrays
    path = str(tmp_path / "tiny.safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qnalo.create_model("qna_vit_tiny")
    qnalo.weights.save_weights(path, type(model).random_tensors(model.config), "qna_vit", model.config.to_dict())
    assert _kernels_loaded_by_the_forward(path, 224, 1) == {}


DECLARED_PROBE = PROBE[:PROBE.index("warnings.simplefilter")] + r"""
from qnalo import demo
from qnalo.kernels import _precompile
from qnalo.models import warmup
warnings.simplefilter("ignore")
for unit in _precompile.UNITS:
    for name in unit:
        kernel = _precompile.kernel(name)
        kernel.compile(kernel.ahead_types)
before = overloads()
for cls, _, cfg in qnalo.MODEL_REGISTRY.values():
    warmup.warm_up(cls, cfg)
for name in demo.DEMO_MODELS:
    qnalo.load(demo.demo_path(name))
""" + PROBE[PROBE.index("after = overloads()"):]


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="no kernels to load without the JIT")
def test_the_kernels_compiled_ahead_are_all_the_warm_ups_run_with_the_types_they_pass():
    """A machine's first run compiles the ahead kernels' declared types in parallel (kernels/_precompile.py);
    warming every model up after that must need no other kernel and no other specialization."""
    import importlib
    import pkgutil
    from numba.core.registry import CPUDispatcher
    from qnalo.kernels import _precompile
    modules = {info.name: importlib.import_module("qnalo.kernels." + info.name)
               for info in pkgutil.iter_modules(qnalo.kernels.__path__)}
    declared = {f"{module}.{name}" for module, loaded in modules.items() for name, obj in vars(loaded).items()
                if isinstance(obj, CPUDispatcher) and hasattr(obj, "ahead_types")
                and obj.py_func.__module__ == loaded.__name__}
    in_units = [name for unit in _precompile.UNITS for name in unit]
    assert sorted(in_units) == sorted(declared)
    out = subprocess.run([sys.executable, "-c", DECLARED_PROBE], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


COLD_START = r"""
import json
from numba.core import event
import qnalo
from qnalo import demo
with event.install_recorder("numba:compile") as recorder:
    for name in demo.DEMO_MODELS:
        model = qnalo.load(demo.demo_path(name))
        x = demo.preprocess_digits(model.architecture, demo.heldout()["images"][:20])
        assert (model(x).argmax(1) == demo.heldout()["torch_" + name][:20]).all()
depth, compiled = 0, []
for _, ev in recorder.buffer:   # the kernels this process compiled, not those a kernel compiled for itself
    depth += 1 if ev.is_start else -1
    if ev.is_start and depth == 1:
        function = ev.data["dispatcher"].py_func
        compiled.append(function.__module__.rsplit(".", 1)[1] + "." + function.__name__)
print(json.dumps(compiled))
"""


def _processes_naming(text):
    """The ids of the processes whose command line contains `text` (Linux /proc)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if text.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1" or not sys.platform.startswith("linux"),
                    reason="compiling with the JIT; /proc")
def test_a_cold_start_compiles_in_two_processes_and_leaves_a_complete_cache(tmp_path):
    from qnalo.kernels import _precompile
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "TMPDIR": str(tmp_path / "tmp"),
           "QNALO_NUM_THREADS": "2"}
    cold = subprocess.run([sys.executable, "-c", COLD_START], capture_output=True, text=True, timeout=900, env=env)
    assert cold.returncode == 0, cold.stderr[-2000:]
    ahead = {name for unit in _precompile.UNITS for name in unit}
    here = set(json.loads(cold.stdout.strip().splitlines()[-1]))
    assert here & ahead and ahead - here, "both processes compile a share of the kernels"
    assert list((tmp_path / "tmp").iterdir()) == []                     # the claims folder is removed ...
    assert _processes_naming(str(tmp_path / "tmp")) == []               # ... and no helper is left running
    warm = subprocess.run([sys.executable, "-c", COLD_START], capture_output=True, text=True, timeout=900, env=env)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert json.loads(warm.stdout.strip().splitlines()[-1]) == []        # everything loads from the cache


# a helper that claims every unit it can and dies without compiling one
HELPER_DIES = r"""
import subprocess, sys
from qnalo.kernels import _precompile
CLAIM_ALL_AND_DIE = "import os, sys; [os.close(os.open(os.path.join(sys.argv[1], u), os.O_CREAT | os.O_EXCL)) " \
    "for u in sys.argv[2:] if not os.path.exists(os.path.join(sys.argv[1], u))]; sys.exit(1)"
_precompile._start_helper = lambda claims, units: subprocess.Popen(
    [sys.executable, "-c", CLAIM_ALL_AND_DIE, claims, *map(str, units)])
""" + COLD_START


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="compiling with the JIT")
def test_a_helper_that_dies_leaves_its_kernels_to_the_warm_up(tmp_path):
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "cache"), "QNALO_NUM_THREADS": "2"}
    cold = subprocess.run([sys.executable, "-c", HELPER_DIES], capture_output=True, text=True, timeout=900, env=env)
    assert cold.returncode == 0, cold.stderr[-2000:]
    warm = subprocess.run([sys.executable, "-c", COLD_START], capture_output=True, text=True, timeout=900, env=env)
    assert warm.returncode == 0, warm.stderr[-2000:]
    assert json.loads(warm.stdout.strip().splitlines()[-1]) == []


def test_model_tensors_are_read_only_views_the_callers_arrays_stay_writable():
    cfg = qnalo.models.MODEL_REGISTRY["qna_vit_tiny"][2].miniature()
    cls = qnalo.models.MODEL_REGISTRY["qna_vit_tiny"][0]
    tensors = cls.random_tensors(cfg)
    model = cls(cfg, tensors, backend="numpy")
    assert all(a.flags.writeable for a in tensors.values())
    assert not model.norm.weight.flags.writeable
    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert model(x).shape == (1, cfg.num_classes)


@pytest.mark.parametrize("name", qnalo.list_models())
def test_the_miniature_keeps_the_code_paths_and_shrinks_the_cost(name):
    cfg = qnalo.models.MODEL_REGISTRY[name][2]
    mini = cfg.miniature()
    assert mini.miniature() == mini                         # the warm-up's recursion guard relies on this
    assert mini.img_size == cfg.img_size and mini.num_classes == cfg.num_classes
    assert mini.embed_dim < cfg.embed_dim
    depths = ("depths",) if name.startswith("litv2") else ("qna_depths", "msa_depths")
    for field in depths:
        assert all(min(d, 2) == m for d, m in zip(getattr(cfg, field), getattr(mini, field)))
    if name.startswith("litv2"):
        assert (mini.num_heads, mini.lo_heads, mini.window_sizes) == (cfg.num_heads, cfg.lo_heads, cfg.window_sizes)
    else:
        assert (mini.qna_heads, mini.msa_heads, mini.msa_windows, mini.qna_kernel_sizes, mini.n_queries) == \
            (cfg.qna_heads, cfg.msa_heads, cfg.msa_windows, cfg.qna_kernel_sizes, cfg.n_queries)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["litv2_s", "qna_vit_tiny"])
def test_eight_threads_sharing_a_full_size_model_get_the_single_thread_logits(name):
    # full size, so that kernels split across the worker threads while other callers find them busy and run
    # theirs unsplit: both must give the same bits
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qnalo.create_model(name)
    images = [np.random.default_rng(i).standard_normal((1, 3, 224, 224)).astype(np.float32) for i in range(8)]
    check_threads_get_single_thread_outputs(model, images, 3)


# -- device plumbing -----------------------------------------------------------------------------------------
class DeviceArray(np.ndarray):
    """Stands for a GPU array: a model moved to the fake device must hand its ops nothing else."""


def _fake_device(dtype):
    """The op set of a stand-in device storing `dtype`: NumPy's reference ops behind checks that every array
    they get lives on the device, is C-contiguous (the CUDA wrappers' rules) and has the device's dtype, with an
    xp whose constructors make device arrays. A glue line still calling numpy, passing a strided view or making
    a float32 buffer on a float16 device fails here. For float16 the references run on float32 copies whose
    results are rounded back into the float16 arrays (outputs written in place included): half-precision
    storage with float32 arithmetic, as the CUDA kernels compiled with -DQNALO_HALF do."""
    from types import SimpleNamespace

    from qnalo.models import ops as ops_module

    def dev(a):
        return np.asarray(a).view(DeviceArray)

    def checked(name, fn, contiguous=True):
        def run(*args, **kwargs):
            arrays = [a for a in list(args) + list(kwargs.values()) if isinstance(a, np.ndarray)]
            for a in arrays:
                assert type(a) is DeviceArray, f"{name} got a host array {a.shape}"
                assert a.flags.c_contiguous or not contiguous, f"{name} got a strided array {a.strides}"
                assert a.dtype == dtype, f"{name} got a {a.dtype} array on a {np.dtype(dtype)} device"
            wide = {id(a): np.asarray(a, np.float32) for a in arrays}
            out = fn(*[wide.get(id(a), a) for a in args], **{k: wide.get(id(v), v) for k, v in kwargs.items()})
            for a in arrays:
                a[...] = wide[id(a)]            # what an in-place kernel wrote, rounded to the storage type
            if isinstance(out, np.ndarray):
                same = next((a for a in arrays if wide[id(a)] is out), None)
                return same if same is not None else dev(out.astype(dtype))
            return out
        return run

    def matmul(x, w, out=None):
        y = np.matmul(np.asarray(x, np.float32), np.asarray(w, np.float32)).astype(dtype)   # float32 accumulation
        if out is None:
            return dev(y)
        out[...] = y
        return out

    xp = SimpleNamespace(
        __name__="fakedevice", ndarray=DeviceArray, float32=np.float32,
        empty=lambda *a, **k: dev(np.empty(*a, **k)), empty_like=lambda a, **k: dev(np.empty_like(a, **k)),
        zeros=lambda *a, **k: dev(np.zeros(*a, **k)), ascontiguousarray=lambda a: dev(np.ascontiguousarray(a)),
        concatenate=lambda arrays, **k: dev(np.concatenate(arrays, **k)), pad=lambda a, w: dev(np.pad(a, w)))
    kernels = {name: checked(name, fn) for name, fn in vars(ops_module.NUMPY).items()
               if name not in ("xp", "dtype", "tokens_per_group", "to_device", "to_host", "pack_weight", "empty",
                                "matmul")}
    return SimpleNamespace(xp=xp, dtype=dtype, tokens_per_group=None, to_device=lambda a: dev(np.array(a, dtype)),
                           to_host=lambda a: np.array(a, np.float32), pack_weight=lambda w: dev(np.array(w, dtype)),
                           empty=lambda shape: dev(np.empty(shape, dtype)), matmul=checked("matmul", matmul, False),
                           **kernels)


@pytest.fixture
def fake_device(monkeypatch):
    from qnalo.models import ops as ops_module
    monkeypatch.setitem(ops_module.DEVICES, "fake", _fake_device)
    monkeypatch.setattr(ops_module, "_DEVICE_OPS", {})
    return "fake"


@pytest.mark.parametrize("name,size", [("litv2_s", 97), ("qna_vit_tiny", 224)])
def test_a_model_on_another_device_runs_its_whole_forward_there(fake_device, name, size):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moved = qnalo.create_model(name, device=fake_device)
        host = qnalo.create_model(name, backend="numpy")           # the same seeded random weights
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    logits = moved(x)                                             # NumPy in: copied there, NumPy out
    assert type(logits) is np.ndarray
    np.testing.assert_array_equal(logits, host(x))
    on_device = moved(x.view(DeviceArray))                        # device array in: stays there
    assert type(on_device) is DeviceArray
    for got, want in zip(moved.forward_features(x), host.forward_features(x)):
        assert type(got) is np.ndarray
        np.testing.assert_array_equal(got, want)
    assert moved(x[:0]).shape == (0, 1000)


def test_to_cpu_brings_a_model_back_to_the_numba_kernels(fake_device):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qnalo.create_model("qna_vit_tiny", device=fake_device)
        cpu = qnalo.create_model("qna_vit_tiny")
    x = np.random.default_rng(1).standard_normal((1, 3, 224, 224)).astype(np.float32)
    assert model.to("cpu") is model and model.device == "cpu" and model.backend == "numba"
    np.testing.assert_array_equal(model(x), cpu(x))                # the weights re-packed for the CPU GEMM
    assert model.to("cpu") is model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = qnalo.create_model("qna_vit_tiny", backend="numpy")
    np.testing.assert_array_equal(model.to(fake_device)(x), reference(x))  # and there again (NumPy's ops)


def _cupy_without_a_gpu():
    """A "cupy" module as the real one behaves on a machine without a driver (checked with CuPy 14.2 here)."""
    class CUDARuntimeError(RuntimeError):
        pass

    def device_count():
        raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient for CUDA runtime "
                               "version")

    module = types.ModuleType("cupy")
    module.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=device_count,
                                                                      CUDARuntimeError=CUDARuntimeError))
    return module


def test_asking_for_cuda_without_cupy_or_a_gpu_is_one_clear_error(monkeypatch):
    from qnalo.models import ops
    monkeypatch.setattr(ops, "_DEVICE_OPS", {})
    monkeypatch.setitem(sys.modules, "cupy", None)               # as if CuPy were not installed
    with pytest.raises(qnalo.InputError, match=r"device='cuda'.*pip install 'qnalo\[cuda\]'"):
        qnalo.create_model("litv2_s", device="cuda")
    monkeypatch.setitem(sys.modules, "cupy", _cupy_without_a_gpu())
    with pytest.raises(qnalo.InputError, match=r"device='cuda': CuPy is installed but finds no NVIDIA GPU "
                                               r"\(cudaErrorInsufficientDriver.*\); use device='cpu'"):
        qnalo.create_model("litv2_s", device="cuda")
    with pytest.raises(qnalo.InputError, match="unknown device 'tpu'"):
        qnalo.load("whatever.safetensors", device="tpu")


def test_cuda_with_the_real_cupy_and_no_gpu_is_the_same_clear_error(monkeypatch):
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed")
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("this machine has a GPU")
    except cupy.cuda.runtime.CUDARuntimeError:
        pass
    from qnalo.models import ops
    monkeypatch.setattr(ops, "_DEVICE_OPS", {})
    with pytest.raises(qnalo.InputError, match="device='cuda': CuPy is installed but finds no NVIDIA GPU"):
        qnalo.create_model("litv2_s", device="cuda")


@pytest.mark.parametrize("name", ["litv2_digits", "qna_vit_digits"])
def test_float16_storage_keeps_the_demo_models_predictions(fake_device, name):
    """dtype="float16" (half-precision storage, float32 arithmetic) on the stand-in device, which rounds every
    stored array as the CUDA kernels built with -DQNALO_HALF do: the trained demo models' predictions on the 360
    held-out digits, against float32 on the CPU."""
    from qnalo import demo
    from tolerances import MODEL_FLOAT16
    path = demo.demo_path(name)
    cpu, half = qnalo.load(path), qnalo.load(path, device=fake_device, dtype="float16")
    assert half.dtype == "float16" and half.device == fake_device
    x = demo.preprocess_digits(cpu.architecture, demo.heldout()["images"])
    want, got = cpu(x), half(x)
    assert got.dtype == np.float32                                   # NumPy out, as float32
    error = float(np.abs(got - want).max() / np.abs(want).max())
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    print(f"{name}: float16 storage, max |dlogit| / max |logit| {error:.2e}, top-1 agreement {agreement:.2%}")
    assert error <= MODEL_FLOAT16["rel_max"] and agreement >= MODEL_FLOAT16["top1_agreement"], (error, agreement)


@pytest.mark.parametrize("name,size", [("litv2_s", 97), ("qna_vit_tiny", 224)])
def test_float16_models_keep_every_array_in_float16(fake_device, name, size):
    """The whole forward and forward_features of full-size models with float16 storage: every op gets float16
    device arrays (the stand-in asserts it), and the outputs come back as float32 NumPy arrays."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = qnalo.create_model(name, device=fake_device, dtype="float16")
    x = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    logits = half(x)
    assert type(logits) is np.ndarray and logits.dtype == np.float32 and np.isfinite(logits).all()
    on_device = half(x.view(DeviceArray))                        # a device array in: float16, left there
    assert type(on_device) is DeviceArray and on_device.dtype == np.float16
    assert all(f.dtype == np.float32 for f in half.forward_features(x))


def test_dtype_choices_are_checked():
    with pytest.raises(qnalo.InputError, match="runs on device='cuda' only"):
        qnalo.load("x.safetensors", dtype="float16")
    with pytest.raises(qnalo.InputError, match="CuPy has no bfloat16"):
        qnalo.create_model("litv2_s", device="cuda", dtype="bfloat16")
    with pytest.raises(qnalo.InputError, match="unknown dtype"):
        qnalo.create_model("litv2_s", dtype="float64")


@pytest.mark.parametrize("name", ["litv2_digits", "qna_vit_digits"])
def test_create_model_takes_an_embedded_demo_name_as_the_cli_does(name):
    from qnalo import demo
    model, loaded = qnalo.create_model(name), qnalo.load(demo.demo_path(name))
    x = np.random.default_rng(0).standard_normal((2, 3, demo.IMG_SIZE, demo.IMG_SIZE)).astype(np.float32)
    np.testing.assert_array_equal(model(x), loaded(x))
    assert qnalo.create_model(name, weights=demo.demo_path(name)).config == loaded.config
    other = next(n for n in demo.DEMO_MODELS if n != name)
    with pytest.raises(qnalo.VariantMismatchError, match=f"holds a .* model, not {name}"):
        qnalo.create_model(name, weights=demo.demo_path(other))
    with pytest.raises(qnalo.InputError, match="apply to random weights only"):
        qnalo.create_model(name, num_classes=3)
    with pytest.raises(qnalo.InputError, match=r"unknown model 'digits'.*qnalo\.demo\.demo_path"):
        qnalo.create_model("digits")
