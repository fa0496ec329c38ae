import importlib.util
import os
import shutil
import sys

import pytest

# Tests import helpers (tolerances, the PyTorch reference) from this folder.
sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

settings.register_profile(
    "ci", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=10, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("QNALO_HYPOTHESIS_PROFILE", "ci"))


def _gpu_reason():
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed"
    import cupy
    try:
        return None if cupy.cuda.runtime.getDeviceCount() > 0 else "no CUDA device"
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        return f"no CUDA device ({exc})"


GPU_SKIP = _gpu_reason()   # None where CuPy sees a GPU


GPU = pytest.param("gpu", marks=[pytest.mark.gpu, pytest.mark.skipif(GPU_SKIP is not None, reason=GPU_SKIP or "")])


def _use_cupy(kind, monkeypatch):
    """Yields the cupy module that device="cuda" and qnalo.kernels.cuda get until the test ends: the CUDA
    emulator
    (tests/emulated_cupy: the same .cu kernels compiled with g++ and run on the CPU, its threads in the order
    `kind` names after "emulated-"), or the real CuPy on a GPU (kind "gpu")."""
    from qnalo.kernels import cuda
    from qnalo.models import ops
    if kind.startswith("emulated"):
        if shutil.which("g++") is None:
            pytest.skip("the CUDA emulator needs g++")
        import emulated_cupy
        module = emulated_cupy.module(schedule=kind[len("emulated-"):])
        monkeypatch.setitem(sys.modules, "cupy", module)
    else:
        import cupy as module
    monkeypatch.setattr(ops, "_DEVICE_OPS", {})   # op sets and compiled modules belong to one cupy
    cuda.module.cache_clear()
    yield module
    cuda.module.cache_clear()            # before monkeypatch puts the previous cupy back


@pytest.fixture(params=["emulated-lockstep", "emulated-warps-ahead", GPU])
def cp(request, monkeypatch):
    """cupy for the kernel tests: the emulator in both thread orders, and a GPU where there is one."""
    yield from _use_cupy(request.param, monkeypatch)


@pytest.fixture(params=["emulated-warps-ahead", GPU])
def cuda_cupy(request, monkeypatch):
    """cupy for whole-model tests: the emulator (in its stricter thread order) and a GPU where there is one."""
    yield from _use_cupy(request.param, monkeypatch)


def pytest_configure(config):
    os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def torch():
    return pytest.importorskip("torch")

