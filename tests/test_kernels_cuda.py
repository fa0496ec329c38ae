"""kernels/cuda/*.cu and their wrappers beside them: every CUDA source compiles for sm_80 and sm_90 (nvcc --ptx, no GPU
needed), the ops refuse clearly without CuPy, and each op matches its NumPy reference, run twice through the `cp`
fixture (conftest.py): on the CPU by the CUDA emulator (tests/emulated_cupy: the same .cu compiled with g++, every
CUDA thread a fiber), and on a GPU with CuPy (marked `gpu`, skipped without one)."""
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from qnalo.kernels import cuda, deform_conv, dwconv_gelu, gelu, gelu_tanh, hilo, layernorm, qna, window_msa
from tolerances import assert_close

SOURCES = sorted(glob.glob(os.path.join(cuda.SOURCE_DIR, "*.cu")))
cuda_ops = cuda.ops


def defines(source):
    """The -D options a source's wrapper compiles it with."""
    return [f"-D{name}={value}" for name, value in cuda.SOURCES[os.path.basename(source)[:-3]]]


def test_every_cuda_source_is_loaded_by_the_ops():
    assert sorted(os.path.basename(p)[:-3] for p in SOURCES) == sorted(cuda.SOURCES)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(p) for p in SOURCES])
def test_cuda_source_compiles(source, arch, storage, tmp_path):
    # -Werror all-warnings: an unused variable or a narrowing conversion fails here, not on a user's GPU; store_t
    # is a struct in both builds, so an array access that skips ld()/st() is a compile error too
    half = ["-DQNALO_HALF"] if storage == "float16" else []
    out = subprocess.run(["nvcc", "--ptx", f"-arch={arch}", "-I", cuda.SOURCE_DIR, "-Werror", "all-warnings",
                          *half, *defines(source), "-o", str(tmp_path / "out.ptx"), source], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr


def _nvrtc():
    """libnvrtc from the nvidia-cuda-nvrtc wheel (the test extra), or None."""
    try:
        import nvidia
    except ImportError:
        return None
    found = sorted(glob.glob(os.path.join(list(nvidia.__path__)[0], "cu*", "lib", "libnvrtc.so*")))
    if not found:
        return None
    lib = ctypes.CDLL(found[0])
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    return lib


NVRTC = _nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="NVRTC is not installed (the nvidia-cuda-nvrtc wheel of the test extra)")
@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("arch", ["compute_80", "compute_90"])
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(p) for p in SOURCES])
def test_cuda_source_compiles_under_nvrtc(source, arch, storage):
    """The compiler CuPy runs on the user's machine, with the wrappers' own options: unlike nvcc it has no host
    headers and no host compiler, so what builds under nvcc may still fail here."""
    program = ctypes.c_void_p()
    with open(source, "rb") as f:
        code = f.read()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(program), code, os.path.basename(source).encode(), 0, None,
                                    None) == 0
    try:
        options = [o.encode() for o in (*cuda.nvrtc_options(storage == "float16",
                                                             cuda.SOURCES[os.path.basename(source)[:-3]]),
                                         "-arch=" + arch)]
        status = NVRTC.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options))
        size = ctypes.c_size_t()
        NVRTC.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        NVRTC.nvrtcGetProgramLog(program, log)
        assert status == 0, f"{NVRTC.nvrtcGetErrorString(status).decode()}:\n{log.value.decode()}"
    finally:
        NVRTC.nvrtcDestroyProgram(ctypes.byref(program))


GENERIC_ATTENTION = {"hifi_attention", "lofi_attention", "window_msa"}   # head_dim at run time: rows in local memory
RESOURCES = re.compile(r"Function properties for (\w+)\s+(\d+) bytes stack frame, (\d+) bytes spill stores, "
                       r"(\d+) bytes spill loads")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("storage", ["float32", "float16"])
@pytest.mark.parametrize("source", SOURCES, ids=[os.path.basename(p) for p in SOURCES])
def test_kernels_keep_their_working_sets_in_registers(source, storage, tmp_path):
    """ptxas's resource report for sm_90: no kernel spills registers, and none but the generic attention kernels
    (head_dim at run time) has a stack frame, i.e. arrays in local memory: what the _hd32 builds are for."""
    half = ["-DQNALO_HALF"] if storage == "float16" else []
    out = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "--resource-usage", "-I", cuda.SOURCE_DIR, *half,
                          *defines(source), "-o",
                          str(tmp_path / "out.cubin"), source], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = RESOURCES.findall(out.stdout + out.stderr)
    assert report, out.stdout + out.stderr
    print("\n".join(" ".join(r) for r in report))
    for kernel, stack, spill_stores, spill_loads in report:
        assert spill_stores == spill_loads == "0", f"{kernel} spills registers"
        assert stack == "0" or kernel in GENERIC_ATTENTION, f"{kernel} keeps {stack} bytes in local memory"


def test_a_forgotten_conversion_does_not_compile(tmp_path):
    """The guard the compile test relies on: reading a store_t array as a number is an error in both builds."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    bad = tmp_path / "bad.cu"
    bad.write_text('#include "common.cuh"\nextern "C" __global__ void k(const store_t* x, float* y) { y[0] = x[0]; }\n')
    for half in ([], ["-DQNALO_HALF"]):
        out = subprocess.run(["nvcc", "--ptx", "-arch=sm_80", "-I", cuda.SOURCE_DIR, *half, "-o",
                              str(tmp_path / "bad.ptx"), str(bad)], capture_output=True, text=True, timeout=300)
        assert out.returncode != 0 and "store_t" in out.stderr


def test_ops_without_cupy_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)               # as if CuPy were not installed
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(RuntimeError, match=r"pip install 'qnalo\[cuda\]'"):
        cuda_ops.layernorm(x, x[0], x[0], 1e-5, x)


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


rows_cols = dict(seed=st.integers(0, 2**32 - 1), rows=st.integers(1, 70), cols=st.integers(1, 1100))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**rows_cols)
@example(seed=0, rows=3136, cols=64)      # QnA-ViT-tiny stage 0 tokens
@example(seed=1, rows=49, cols=768)       # LITv2-S stage 3
@example(seed=19068, rows=24, cols=2)      # row 23: two close values, |mean| >> std (found by hypothesis in CI)
def test_layernorm_and_fused_residual_match_numpy(cp, seed, rows, cols):
    rng = np.random.default_rng(seed)
    x, y = _rand(rng, rows, cols, scale=3.0), _rand(rng, rows, cols)
    w, b, add = _rand(rng, cols), _rand(rng, cols), _rand(rng, cols)
    out = cp.empty(x.shape, np.float32)   # NaN on the emulator: an element the kernel skips shows
    got = cuda_ops.layernorm(cp.asarray(x), cp.asarray(w), cp.asarray(b), 1e-6, out)
    assert_close(cp.asnumpy(got), layernorm.layernorm_ref(x, w, b, 1e-6),
                 "layernorm")
    gx = cp.asarray(x)
    cuda_ops.residual_add_layernorm(gx, cp.asarray(y), cp.asarray(add), cp.asarray(w), cp.asarray(b), 1e-5, out)
    ref_x = x.copy()
    assert_close(cp.asnumpy(out), layernorm.residual_add_layernorm_ref(ref_x, y, add, w, b, 1e-5, np.empty_like(x)),
                 "layernorm")
    assert_close(cp.asnumpy(gx), ref_x, "layernorm", what="the residual stream, updated in place")
    gx = cp.asarray(x)
    assert_close(cp.asnumpy(cuda_ops.residual_add(gx, cp.asarray(y), cp.asarray(add))),
                 layernorm.residual_add_ref(x.copy(), y, add),
                 "layernorm")


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**rows_cols)
@example(seed=0, rows=196, cols=1536)     # LITv2-S stage 2 fc1
def test_bias_activations_match_numpy(cp, seed, rows, cols):
    rng = np.random.default_rng(seed)
    y, bias = _rand(rng, rows, cols, scale=4.0), _rand(rng, cols)
    assert_close(cp.asnumpy(cuda_ops.bias_gelu(cp.asarray(y), cp.asarray(bias))), gelu.bias_gelu_ref(y.copy(), bias),
                 "gelu")
    assert_close(cp.asnumpy(cuda_ops.bias_gelu_tanh(cp.asarray(y), cp.asarray(bias))),
                 gelu_tanh.bias_gelu_tanh_ref(y.copy(), bias),
                 "gelu_tanh")


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(1, 17), w=st.integers(1, 17),
       c=st.integers(1, 70))
@example(seed=0, b=1, h=56, w=56, c=384)   # LITv2-S stage 0 hidden
@example(seed=1, b=2, h=3, w=17, c=5)      # runs of cuda.dwconv_gelu.RUN (8) pixels: two full, then one of 1
@example(seed=2, b=1, h=2, w=16, c=3)      # two full runs, the last ending at the row's end
@example(seed=3, b=2, h=1, w=3, c=33)      # H = 1 (no row above or below), W shorter than a run
@example(seed=4, b=3, h=4, w=1, c=1)       # W = 1, C = 1: a run of one pixel, runs of one channel
@example(seed=5, b=1, h=7, w=7, c=64)      # LITv2-S stage 3's 7x7: one run of 7 a row
def test_dwconv_gelu_matches_numpy(cp, seed, b, h, w, c):
    rng = np.random.default_rng(seed)
    x, pre, weight, bias = _rand(rng, b, h, w, c), _rand(rng, c), _rand(rng, 3, 3, c, scale=0.3), _rand(rng, c)
    got = cuda_ops.dwconv3x3_gelu(cp.asarray(x), cp.asarray(pre), cp.asarray(weight), cp.asarray(bias))
    assert_close(cp.asnumpy(got), dwconv_gelu.dwconv3x3_gelu_ref(x, pre, weight, bias), "dwconv_gelu")


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(1, 11), w=st.integers(1, 11),
       heads=st.integers(1, 4), hd=st.integers(1, 20), nq=st.integers(1, 3), k=st.sampled_from([1, 3, 5, 7]),
       stride=st.sampled_from([1, 2]), logit_scale=st.sampled_from([1.0, 50.0]))
@example(seed=0, b=1, h=56, w=56, heads=8, hd=8, nq=2, k=3, stride=1, logit_scale=1.0)   # QnA-ViT-tiny stage 0
@example(seed=1, b=1, h=56, w=56, heads=16, hd=8, nq=2, k=7, stride=2, logit_scale=1.0)
@example(seed=2, b=2, h=5, w=6, heads=3, hd=19, nq=2, k=3, stride=1, logit_scale=1.0)   # 3 chunks, the last of 3
@example(seed=3, b=1, h=9, w=7, heads=4, hd=16, nq=3, k=5, stride=2, logit_scale=50.0)  # vector loads, 2 query chunks
def test_qna_windows_match_numpy(cp, seed, b, h, w, heads, hd, nq, k, stride, logit_scale):
    rng = np.random.default_rng(seed)
    nc, f = nq * heads, heads * hd
    lv = _rand(rng, b, h, w, nc + f)
    lv[..., :nc] *= logit_scale
    rpe, scale = _rand(rng, k * k, nc), _rand(rng, k * k, nc)
    shape = (b, qna.qna_output_size(h, k, stride), qna.qna_output_size(w, k, stride), f)
    got = cuda_ops.qna_windows(cp.asarray(lv), cp.asarray(rpe), cp.asarray(scale), heads, stride,
                               cp.empty(shape, np.float32))
    ref = qna.qna_windows_ref(lv, rpe, scale, heads, stride, np.empty(shape, np.float32))
    assert_close(cp.asnumpy(got), ref, "qna", scale=max(1.0, logit_scale))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), grid=st.integers(1, 3), window=st.integers(1, 7),
       heads=st.integers(1, 4), d=st.integers(1, 40), logit_scale=st.sampled_from([1.0, 30.0]))
@example(seed=0, b=1, grid=2, window=7, heads=8, d=32, logit_scale=1.0)    # QnA-ViT-tiny stage 2 (14x14)
@example(seed=1, b=2, grid=1, window=23, heads=2, d=32, logit_scale=1.0)   # 529 queries: more than one block's
def test_window_msa_matches_numpy(cp, seed, b, grid, window, heads, d, logit_scale):
    rng = np.random.default_rng(seed)
    side = grid * window
    qkv = _rand(rng, b, side, side, 3 * heads * d, scale=logit_scale ** 0.5)
    rel_bias = _rand(rng, heads, window ** 2, window ** 2)
    shape = (b, side, side, heads * d)
    got = cuda_ops.window_msa(cp.asarray(qkv), cp.asarray(rel_bias), window, heads, cp.empty(shape, np.float32))
    ref = window_msa.window_msa_ref(qkv, rel_bias, window, heads, np.empty(shape, np.float32))
    # entries ~ N(0, logit_scale): the table's factor (entry std)^3 * max(1, hd / 8), as test_kernels_window_msa
    assert_close(cp.asnumpy(got), ref, "window_msa", scale=logit_scale ** 1.5 * max(1.0, d / 8))


hilo_cases = dict(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(1, 13), w=st.integers(1, 13),
                  ws=st.integers(1, 4), heads=st.integers(1, 3), hd=st.integers(1, 33))


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**hilo_cases)
@example(seed=0, b=1, h=7, w=7, ws=2, heads=1, hd=32)        # LITv2-S stage 2 at 224 (14 -> padded), one Hi-Fi head
def test_hilo_branches_match_numpy(cp, seed, b, h, w, ws, heads, hd):
    rng = np.random.default_rng(seed)
    dim, extra = heads * hd, 5                                  # extra columns past the branch, as in the engine
    qkv = _rand(rng, b, h, w, 3 * dim + dim + extra)
    qkv_bias = _rand(rng, 3 * dim + 2)
    scale = hd ** -0.5
    shape = (b, h, w, dim + dim + extra)
    ref = hilo.hifi_attention_ref(qkv, qkv_bias, ws, heads, hd, scale, np.zeros(shape, np.float32))
    got = cuda_ops.hifi_attention(cp.asarray(qkv), cp.asarray(qkv_bias), ws, heads, hd, scale,
                                  cp.zeros(shape, np.float32))
    assert_close(cp.asnumpy(got), ref, "hilo", what="Hi-Fi")
    pooled = hilo.window_avgpool_ref(qkv[..., :dim], ws)
    assert_close(cp.asnumpy(cuda_ops.window_avgpool(cp.asarray(np.ascontiguousarray(qkv[..., :dim])), ws)), pooled,
                 "hilo", what="window average pool")
    kv = _rand(rng, b, pooled.shape[1] * pooled.shape[2], 2 * dim)
    q_bias, kv_bias = _rand(rng, dim), _rand(rng, 2 * dim)
    ref = hilo.lofi_attention_ref(qkv, 3 * dim, q_bias, kv, kv_bias, heads, hd, scale, np.zeros(shape, np.float32),
                                  dim)
    got = cuda_ops.lofi_attention(cp.asarray(qkv), 3 * dim, cp.asarray(q_bias), cp.asarray(kv), cp.asarray(kv_bias),
                                  heads, hd, scale, cp.zeros(shape, np.float32), dim)
    assert_close(cp.asnumpy(got), ref, "hilo", what="Lo-Fi")


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(2, 15), w=st.integers(2, 15),
       c=st.integers(1, 20), offset_std=st.sampled_from([0.5, 3.0]))
@example(seed=0, b=1, h=56, w=56, c=96, offset_std=1.0)      # LITv2-S first DTM
def test_deform_sample_matches_numpy(cp, seed, b, h, w, c, offset_std):
    rng = np.random.default_rng(seed)
    x = _rand(rng, b, h, w, c)
    offsets = _rand(rng, b, h // 2, w // 2, 8, scale=offset_std)     # large enough to cross the border
    got = cuda_ops.deform_sample(cp.asarray(x), cp.asarray(offsets))
    assert_close(cp.asnumpy(got), deform_conv.deform_sample_ref(x, offsets), "deform_conv")


# -- float16 storage (dtype="float16"): every op against the float32 reference on the same rounded inputs --------

def _half(rng, *shape, scale=1.0):
    """Random values exactly representable in float16, as float32 (the reference's input)."""
    return _rand(rng, *shape, scale=scale).astype(np.float16).astype(np.float32)




@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 2), h=st.integers(2, 12), w=st.integers(2, 12),
       hd=st.sampled_from([12, 32]))      # the attention kernels' generic and _hd32 builds
@example(seed=0, b=1, h=14, w=14, hd=32)
def test_float16_storage_matches_numpy(cp, seed, b, h, w, hd):
    rng = np.random.default_rng(seed)
    c, heads, ws = 24, 2, 2
    rows = b * h * w

    def _h(a):
        return cp.asarray(np.asarray(a, np.float16))

    def check(got, want, what):
        assert got.dtype == np.float16, what
        assert_close(cp.asnumpy(got).astype(np.float32), want, "any", "float16", what=what)

    x, y, wgt, bias, add = _half(rng, rows, c, scale=3), _half(rng, rows, c), _half(rng, c), _half(rng, c), \
        _half(rng, c)
    check(cuda_ops.layernorm(_h(x), _h(wgt), _h(bias), 1e-6, cp.empty(x.shape, np.float16)),
          layernorm.layernorm_ref(x, wgt, bias, 1e-6), "layernorm")
    check(cuda_ops.residual_add(_h(x), _h(y), _h(add)), layernorm.residual_add_ref(x.copy(), y, add), "residual_add")
    check(cuda_ops.bias_gelu(_h(y), _h(bias)), gelu.bias_gelu_ref(y.copy(), bias), "bias_gelu")
    check(cuda_ops.bias_gelu_tanh(_h(y), _h(bias)), gelu_tanh.bias_gelu_tanh_ref(y.copy(), bias), "bias_gelu_tanh")
    maps, pre, conv = _half(rng, b, h, w, c), _half(rng, c), _half(rng, 3, 3, c, scale=0.3)
    check(cuda_ops.dwconv3x3_gelu(_h(maps), _h(pre), _h(conv), _h(bias)),
          dwconv_gelu.dwconv3x3_gelu_ref(maps, pre, conv, bias), "dwconv3x3_gelu")
    check(cuda_ops.window_avgpool(_h(maps), ws), hilo.window_avgpool_ref(maps, ws), "window_avgpool")
    dim = heads * hd
    qkv, qkv_bias = _half(rng, b, h, w, 4 * dim), _half(rng, 3 * dim)
    out = np.zeros((b, h, w, 2 * dim), np.float32)
    check(cuda_ops.hifi_attention(_h(qkv), _h(qkv_bias), ws, heads, hd, hd ** -0.5, _h(out)),
          hilo.hifi_attention_ref(qkv, qkv_bias, ws, heads, hd, hd ** -0.5, out.copy()), "hifi_attention")
    keys = -(-h // ws) * -(-w // ws)
    kv, q_bias, kv_bias = _half(rng, b, keys, 2 * dim), _half(rng, dim), _half(rng, 2 * dim)
    check(cuda_ops.lofi_attention(_h(qkv), 3 * dim, _h(q_bias), _h(kv), _h(kv_bias), heads, hd, hd ** -0.5, _h(out),
                                  dim),
          hilo.lofi_attention_ref(qkv, 3 * dim, q_bias, kv, kv_bias, heads, hd, hd ** -0.5, out.copy(), dim),
          "lofi_attention")
    nq, k = 2, 3
    lv, rpe, scale = _half(rng, b, h, w, nq * heads + dim), _half(rng, k * k, nq * heads), _half(rng, k * k, nq * heads)
    windows = np.zeros((b, h, w, dim), np.float32)
    check(cuda_ops.qna_windows(_h(lv), _h(rpe), _h(scale), heads, 1, _h(windows)),
          qna.qna_windows_ref(lv, rpe, scale, heads, 1, windows.copy()), "qna_windows")
    side = ws * max(1, min(h, w) // ws)
    msa_qkv, rel_bias = _half(rng, b, side, side, 3 * dim), _half(rng, heads, ws * ws, ws * ws)
    msa_out = np.zeros((b, side, side, dim), np.float32)
    check(cuda_ops.window_msa(_h(msa_qkv), _h(rel_bias), ws, heads, _h(msa_out)),
          window_msa.window_msa_ref(msa_qkv, rel_bias, ws, heads, msa_out.copy()), "window_msa")
    offsets = _half(rng, b, h // 2, w // 2, 8)
    check(cuda_ops.deform_sample(_h(maps), _h(offsets)), deform_conv.deform_sample_ref(maps, offsets), "deform_sample")


@settings(deadline=None, max_examples=15, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1), h=st.integers(1, 9), w=st.integers(1, 9), heads=st.integers(1, 4),
       hd=st.sampled_from([8, 12, 16]), nq=st.integers(1, 3), k=st.sampled_from([3, 5]))
@example(seed=0, h=14, w=14, heads=8, hd=8, nq=2, k=3)    # QnA-ViT's layout: 16-byte rows, vector loads
def test_qna_windows_in_float16_match_numpy(cp, seed, h, w, heads, hd, nq, k):
    """The QnA windows' half-precision loads, vector (8 halves a load where rows are 16-byte aligned) and scalar."""
    rng = np.random.default_rng(seed)
    nc, f = nq * heads, heads * hd
    lv, rpe, scale = _half(rng, 2, h, w, nc + f), _half(rng, k * k, nc), _half(rng, k * k, nc)
    got = cuda_ops.qna_windows(*(cp.asarray(a.astype(np.float16)) for a in (lv, rpe, scale)), heads, 1,
                               cp.empty((2, h, w, f), np.float16))
    assert got.dtype == np.float16
    assert_close(cp.asnumpy(got).astype(np.float32),
                 qna.qna_windows_ref(lv, rpe, scale, heads, 1, np.empty((2, h, w, f), np.float32)), "any", "float16",
                 what="qna_windows")


def test_float16_and_float32_cannot_mix_in_one_call(cp):
    x = cp.zeros((2, 4), cp.float16)
    with pytest.raises(TypeError, match="expected float16"):
        cuda_ops.layernorm(x, cp.zeros(4, cp.float32), cp.zeros(4, cp.float16), 1e-5, x)
    with pytest.raises(TypeError, match="expected float32 or float16"):
        cuda.storage("x", np.zeros(3, np.float64))
