"""Whole models with device="cuda", run through the `cuda_cupy` fixture (conftest.py): on the CPU by the CUDA
emulator (the .cu kernels compiled with g++), and on a GPU with CuPy (marked `gpu`, skipped without one). Every
registered variant against the CPU engine on the same weights, float32 to the CPU's parity bar and float16
storage to the bound tests/tolerances.py states; the embedded demo models keep their predictions in both.
The emulator runs LITv2 at 64x64 (the GPU at the configured size); QnA-ViT's windows need 224, which makes those
cases slow on the emulator."""
import warnings

import numpy as np
import pytest

import qnalo
from qnalo import demo
from tolerances import MODEL_FLOAT16, assert_logits_close

VARIANTS = [pytest.param(name, marks=pytest.mark.slow) if name.startswith("qna") else name
            for name in qnalo.list_models()]


def _pair(name, dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # seeded random weights, the same in both
        return qnalo.create_model(name), qnalo.create_model(name, device="cuda", dtype=dtype)


def _batch(cp, cpu, seed):
    emulated = getattr(cp, "emulated", False)
    side = 64 if emulated and cpu.architecture == "litv2" else cpu.config.img_size
    return np.random.default_rng(seed).standard_normal((1 if emulated else 2, 3, side, side)).astype(np.float32)


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_on_cuda_matches_the_cpu_engine(cuda_cupy, name):
    cpu, gpu = _pair(name, "float32")
    x = _batch(cuda_cupy, cpu, 0)
    assert_logits_close(gpu(x), cpu(x), what=f"{name} on CUDA")
    for got, want in zip(gpu.forward_features(x), cpu.forward_features(x)):
        assert_logits_close(got, want, op="features", what=f"{name} features on CUDA")


@pytest.mark.parametrize("name", VARIANTS)
def test_every_variant_in_float16_stays_within_its_bound(cuda_cupy, name):
    cpu, gpu = _pair(name, "float16")
    x = _batch(cuda_cupy, cpu, 1)
    want, got = cpu(x), gpu(x)
    error = float(np.abs(got - want).max() / np.abs(want).max())
    print(f"{name}: float16 on CUDA, max |dlogit| / max |logit| {error:.2e}")
    assert error <= MODEL_FLOAT16["rel_max"], error


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", demo.DEMO_MODELS)
def test_demo_models_keep_their_predictions_on_cuda(cuda_cupy, name, dtype):
    path = demo.demo_path(name)
    cpu, gpu = qnalo.load(path), qnalo.load(path, device="cuda", dtype=dtype)
    images = demo.heldout()["images"]
    x = demo.preprocess_digits(cpu.architecture, images[:32] if getattr(cuda_cupy, "emulated", False) else images)
    want, got = cpu(x), gpu(x)
    on_device = gpu(cuda_cupy.asarray(x))
    assert isinstance(on_device, cuda_cupy.ndarray) and on_device.dtype == np.dtype(dtype)
    agreement = float((got.argmax(1) == want.argmax(1)).mean())
    print(f"{name} {dtype} on CUDA: max |dlogit| / max |logit| {np.abs(got - want).max() / np.abs(want).max():.2e}, "
          f"top-1 agreement {agreement:.2%}")
    if dtype == "float32":
        assert_logits_close(got, want, what=f"{name} on CUDA")
    else:
        assert agreement >= MODEL_FLOAT16["top1_agreement"]
        assert float(np.abs(got - want).max() / np.abs(want).max()) <= MODEL_FLOAT16["rel_max"]
