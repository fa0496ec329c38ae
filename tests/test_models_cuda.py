"""Whole models on an NVIDIA GPU (marked `gpu`, skipped without CuPy and a GPU): every registered variant with
device="cuda" against the CPU engine on the same weights, float32 to the CPU's parity bar, and float16 storage to
the bound tests/tolerances.py states; the embedded demo models keep their predictions in both."""
import warnings

import numpy as np
import pytest

import qnalo
from qnalo import demo
from test_kernels_cuda import GPU_SKIP
from tolerances import MODEL_FLOAT16, assert_logits_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")]


def _pair(name, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # seeded random weights, the same in both
        return qnalo.create_model(name), qnalo.create_model(name, device="cuda", dtype=dtype)


@pytest.mark.parametrize("name", qnalo.list_models())
def test_every_variant_on_cuda_matches_the_cpu_engine(name):
    cpu, gpu = _pair(name, "float32")
    side = cpu.config.img_size
    x = np.random.default_rng(0).standard_normal((2, 3, side, side)).astype(np.float32)
    assert_logits_close(gpu(x), cpu(x), what=f"{name} on CUDA")
    for got, want in zip(gpu.forward_features(x), cpu.forward_features(x)):
        assert_logits_close(got, want, op="features", what=f"{name} features on CUDA")


@pytest.mark.parametrize("name", qnalo.list_models())
def test_every_variant_in_float16_stays_within_its_bound(name):
    cpu, gpu = _pair(name, "float16")
    side = cpu.config.img_size
    x = np.random.default_rng(1).standard_normal((2, 3, side, side)).astype(np.float32)
    want, got = cpu(x), gpu(x)
    error = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{name}: float16 on CUDA, max |dlogit| / max |logit| {error:.2e}")
    assert error <= MODEL_FLOAT16["rel_max"], error


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", demo.DEMO_MODELS)
def test_demo_models_keep_their_predictions_on_cuda(name, dtype):
    import cupy
    path = demo.demo_path(name)
    cpu, gpu = qnalo.load(path), qnalo.load(path, device="cuda", dtype=dtype)
    x = demo.preprocess_digits(cpu.architecture, demo.heldout()["images"])
    want, got = cpu(x), gpu(x)
    on_device = gpu(cupy.asarray(x))
    assert isinstance(on_device, cupy.ndarray) and on_device.dtype == np.dtype(dtype)
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    if dtype == "float32":
        assert_logits_close(got, want, what=f"{name} on CUDA")
    else:
        assert agreement >= MODEL_FLOAT16["top1_agreement"]
        assert float(np.abs(got - want).max() / np.abs(want).max()) <= MODEL_FLOAT16["rel_max"]
