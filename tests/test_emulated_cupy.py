"""tests/emulated_cupy, the CUDA emulator the kernel and model tests run on where no GPU is: its threads, barriers
and shuffles behave as CUDA's, and it refuses, with a message, what would be a silent bug on a GPU."""
import shutil

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import emulated_cupy
from emulated_cupy import EmulationError

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="the CUDA emulator needs g++")

cp = emulated_cupy.module()

SOURCE = r"""
// out[block] = sum over the block of (x[global thread] * 2): a tree in shared memory, then warp shuffles
extern "C" __global__ void block_sums(const float* x, float* out, int n) {
    __shared__ float partial[1024];
    int t = threadIdx.x, i = blockIdx.x * blockDim.x + t;
    partial[t] = i < n ? 2.0f * x[i] : 0.0f;
    __syncthreads();
    for (int half = blockDim.x / 2; half >= 32; half /= 2) {
        if (t < half) partial[t] += partial[t + half];
        __syncthreads();
    }
    if (t < 32) {
        float v = partial[t];
        for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
        v = __shfl_sync(0xffffffffu, v, 0);   // every lane of warp 0 holds the total
        if (t == 31) out[blockIdx.x] = v;
    }
}

// out[i] = the sum of x over the warp of thread i, by a butterfly of xor shuffles
extern "C" __global__ void warp_totals(const double* x, double* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    double v = x[i];
    for (int mask = 16; mask > 0; mask >>= 1) v += __shfl_xor_sync(0xffffffffu, v, mask);
    out[i] = v;
}

extern "C" __global__ void thread_ids(int* out) {
    int t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    int b = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    out[b * blockDim.x * blockDim.y * blockDim.z + t] = b * 10000 + t;
}

extern "C" __global__ void write_one_past(float* y, int n) {
    if (threadIdx.x == 0) y[n] = 1.0f;
}

extern "C" __global__ void divergent_barrier(float* y) {
    if (threadIdx.x < 16) __syncthreads();
    y[threadIdx.x] = 1.0f;
}

extern "C" __global__ void scale(float* y, long long n, float by) {
    for (long long i = threadIdx.x; i < n; i += blockDim.x) y[i] *= by;
}

// a working set of 96 floats in registers: more than a 1024-thread block can hold (64 registers each)
extern "C" __global__ void register_hungry(const float* x, float* y) {
    float v[96];
#pragma unroll
    for (int j = 0; j < 96; ++j) v[j] = x[j * blockDim.x + threadIdx.x];
    float total = 0.0f;
#pragma unroll
    for (int j = 0; j < 96; ++j) total += v[j] * v[95 - j];
    y[threadIdx.x] = total;
}

extern "C" __global__ void skip_odd(float* y, int n) {
    if (threadIdx.x % 2 == 0 && (int)threadIdx.x < n) y[threadIdx.x] = 0.0f;
}
"""


@pytest.fixture(scope="module")
def module():
    return cp.RawModule(code=SOURCE)


@settings(deadline=None, max_examples=20)
@given(seed=st.integers(0, 2**32 - 1), block=st.sampled_from([32, 64, 256, 1024]), blocks=st.integers(1, 4),
       short=st.integers(0, 40))
def test_shared_memory_barriers_and_shuffles_reduce_like_a_gpu(module, seed, block, blocks, short):
    n = max(1, block * blocks - short)
    x = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    out = cp.zeros(blocks, np.float32)
    module.get_function("block_sums")((blocks,), (block,), (cp.asarray(x), out, np.int32(n)))
    want = [2.0 * x[b * block:(b + 1) * block].astype(np.float64).sum() for b in range(blocks)]
    np.testing.assert_allclose(cp.asnumpy(out), want, rtol=1e-5, atol=1e-4)


def test_xor_shuffles_give_every_lane_its_warps_total(module):
    x = np.random.default_rng(0).standard_normal(3 * 128)
    out = cp.empty(x.size, np.float64)
    module.get_function("warp_totals")((3,), (128,), (cp.asarray(x), out))
    np.testing.assert_allclose(cp.asnumpy(out), np.repeat(x.reshape(-1, 32).sum(1), 32), rtol=1e-12)


def test_every_thread_of_a_3d_grid_runs_once_with_its_own_indices(module):
    grid, block = (3, 2, 2), (4, 3, 2)
    n = int(np.prod(grid) * np.prod(block))
    out = cp.zeros(n, np.int32)
    module.get_function("thread_ids")(grid, block, (out,))
    per_block = int(np.prod(block))
    np.testing.assert_array_equal(cp.asnumpy(out), [i // per_block * 10000 + i % per_block for i in range(n)])


def test_a_write_out_of_bounds_fails_the_launch(module):
    y = cp.zeros(10, np.float32)
    with pytest.raises(EmulationError, match="wrote past the end of argument y"):
        module.get_function("write_one_past")((1,), (32,), (y, np.int32(10)))


def test_a_barrier_in_divergent_code_fails_instead_of_hanging(module):
    with pytest.raises(EmulationError, match=r"barrier cannot complete: 16 thread\(s\) wait at __syncthreads\(\)"):
        module.get_function("divergent_barrier")((1,), (32,), (cp.zeros(32, np.float32),))


def test_scalars_must_have_the_parameters_exact_types(module):
    y = cp.asarray(np.ones(8, np.float32))
    kernel = module.get_function("scale")
    with pytest.raises(EmulationError, match=r"n is long long: pass np.int64\(...\), got int"):
        kernel((1,), (32,), (y, 8, np.float32(2)))
    with pytest.raises(EmulationError, match=r"by is float: pass np.float32\(...\), got float64"):
        kernel((1,), (32,), (y, np.int64(8), np.float64(2)))
    kernel((1,), (32,), (y, np.int64(8), np.float32(2)))
    np.testing.assert_array_equal(cp.asnumpy(y), np.full(8, 2, np.float32))


def test_arrays_must_be_device_arrays_of_the_pointer_type_and_contiguous(module):
    kernel = module.get_function("scale")
    with pytest.raises(EmulationError, match="needs a device array, got ndarray"):
        kernel((1,), (32,), (np.ones(4, np.float32), np.int64(4), np.float32(1)))
    with pytest.raises(EmulationError, match="needs float32, got float16"):
        kernel((1,), (32,), (cp.zeros(4, np.float16), np.int64(4), np.float32(1)))
    with pytest.raises(EmulationError, match="C-contiguous"):
        kernel((1,), (32,), (cp.zeros((4, 4), np.float32)[:, 1], np.int64(4), np.float32(1)))
    with pytest.raises(EmulationError, match="takes 3 arguments, got 2"):
        kernel((1,), (32,), (cp.zeros(4, np.float32), np.int64(4)))


def test_empty_arrays_hold_nan_so_unwritten_outputs_show(module):
    y = cp.empty(8, np.float32)
    module.get_function("skip_odd")((1,), (32,), (y, np.int32(8)))
    got = cp.asnumpy(y)
    assert (got[::2] == 0).all() and np.isnan(got[1::2]).all()


def test_launch_configurations_cuda_refuses_are_refused(module):
    kernel = module.get_function("scale")
    args = (cp.zeros(4, np.float32), np.int64(4), np.float32(1))
    for grid, block, message in (((1,), (2048,), r"block \(2048, 1, 1\) is over"),
                                 ((1,), (64, 1, 65), r"block \(64, 1, 65\) is over"),
                                 ((1,), (64, 32), "block \\(64, 32, 1\\) has 2048 threads"),
                                 ((1, 65536), (32,), r"grid \(1, 65536, 1\) is over"),
                                 ((0,), (32,), "positive")):
        with pytest.raises(EmulationError, match=message):
            kernel(grid, block, args)
    with pytest.raises(EmulationError, match="no extern \"C\" __global__ kernel 'missing'"):
        module.get_function("missing")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="register counts come from nvcc's ptxas")
def test_a_block_that_needs_more_registers_than_a_gpu_has_is_refused(module):
    registers = module.registers["register_hungry"]
    assert registers > 64, registers          # else the kernel no longer tests what it says
    per_warp = -(-registers * 32 // 256) * 256
    fits = 65536 // per_warp * 32              # the most threads a block of it may have
    x, y = cp.zeros(96 * 1024, np.float32), cp.zeros(1024, np.float32)
    kernel = module.get_function("register_hungry")
    kernel((1,), (fits,), (x, y))
    with pytest.raises(EmulationError, match=f"too many resources requested for launch: {fits + 32} threads of "
                                             f"{registers} registers"):
        kernel((1,), (fits + 32,), (x, y))


def test_store_t_follows_the_half_define():
    source = '#include "common.cuh"\nextern "C" __global__ void copy(const store_t* x, store_t* y) ' \
             '{ y[threadIdx.x] = st(ld(x[threadIdx.x]) * 2.0f); }'
    from qnalo.kernels import cuda
    for dtype, options in ((np.float32, ()), (np.float16, ("-DQNALO_HALF",))):
        kernel = cp.RawModule(code=source, options=("-I" + cuda.SOURCE_DIR, *options)).get_function("copy")
        x = cp.asarray(np.arange(32, dtype=dtype))
        y = cp.empty(32, dtype)
        kernel((1,), (32,), (x, y))
        np.testing.assert_array_equal(cp.asnumpy(y), np.arange(32, dtype=dtype) * 2)
        with pytest.raises(EmulationError, match=f"needs {np.dtype(dtype)}"):
            kernel((1,), (32,), (cp.asarray(np.zeros(32, np.float64)), y))


def test_the_half_conversions_round_as_cvt_rn():
    """cvt.rn.f16.f32 and cvt.f32.f16 on the CPU: NumPy's float16 cast (round to nearest even, subnormals,
    overflow to inf, NaN) for every float16 and midpoints between them."""
    from qnalo.kernels import cuda
    source = '#include "common.cuh"\nextern "C" __global__ void round_trip(const float* x, float* y, int n) ' \
             '{ for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = ld(st(x[i])); }'
    kernel = cp.RawModule(code=source, options=("-I" + cuda.SOURCE_DIR, "-DQNALO_HALF")).get_function(
        "round_trip")
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    finite = np.sort(halves[np.isfinite(halves)])
    x = np.concatenate([halves, (finite[:-1] + finite[1:]) / 2, [1e6, -1e6, 65520.0, 65519.99]]).astype(np.float32)
    y = cp.empty(x.size, np.float32)
    kernel((1,), (1024,), (cp.asarray(x), y, np.int32(x.size)))
    np.testing.assert_array_equal(cp.asnumpy(y), x.astype(np.float16).astype(np.float32))


def test_unknown_ptx_is_refused_by_name():
    with pytest.raises(EmulationError, match="no CPU version of PTX `mov.b32 %0, %1;`"):
        cp.RawModule(code='extern "C" __global__ void k(float* y) { float f; asm("mov.b32 %0, %1;" : "=f"(f) '
                          ': "f"(y[0])); y[0] = f; }')


def test_device_arrays_do_not_mix_with_numpy_arrays_as_in_cupy():
    d = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(d)
    with pytest.raises(TypeError, match="a NumPy array where CuPy needs a device array"):
        d + np.ones(3, np.float32)
    total = d + d[0] * 2                          # device with device: a device array, in guarded memory
    assert isinstance(total, cp.ndarray)
    np.testing.assert_array_equal(cp.asnumpy(total), [[0, 3, 6], [3, 6, 9]])
    assert isinstance(d.reshape(3, 2).transpose(1, 0)[:, ::2], cp.ndarray)
    half = cp.matmul(cp.asarray(np.full((1, 4096), 1.0, np.float16)), cp.asarray(np.full((4096, 1), 1.0, np.float16)))
    assert half.dtype == np.float16 and float(cp.asnumpy(half)[0, 0]) == 4096.0   # accumulated in float32


RACY = r"""
// thread 0 sets a shared value that every thread then reads, with no __syncthreads() between (a bug)
extern "C" __global__ void racy_broadcast(float* out) {
    __shared__ float value;
    if (threadIdx.x == 0) value = 7.0f;
    out[threadIdx.x] = value;
    __syncthreads();
    if (threadIdx.x == 0) value = 0.0f;   // so that the next launch starts from 0 again
}
"""


def test_the_warps_ahead_order_shows_a_missing_barrier_that_lockstep_hides():
    got = {}
    for schedule in emulated_cupy.SCHEDULES:
        out = cp.zeros(64, np.float32)
        cp.RawModule(code=RACY, schedule=schedule).get_function("racy_broadcast")((1,), (64,), (out,))
        got[schedule] = cp.asnumpy(out)
    assert (got["lockstep"] == 7).all()                                            # thread 0 ran first
    assert got["warps-ahead"][0] == 7 and (got["warps-ahead"][1:] == 0).all()     # everyone else read first


def _real_cupy():
    """The installed CuPy (the emulator is put in its place only inside the `cp` fixtures), or a skip."""
    real = pytest.importorskip("cupy", reason="CuPy is not installed: nothing to compare the emulator with")
    assert not getattr(real, "emulated", False)
    return real


def test_the_emulator_offers_only_what_cupy_has():
    """Code that runs on the emulator calls nothing that real CuPy lacks: every function, class, ndarray member
    and keyword the emulator offers exists in the installed CuPy (checked against CuPy 14.2 without a GPU; runs
    wherever CuPy is installed, GPU or not)."""
    import inspect
    real = _real_cupy()
    fake = emulated_cupy.module()
    public = [n for n in vars(fake) if not n.startswith("_") and n not in ("emulated", "cuda")]
    assert [n for n in public if not hasattr(real, n)] == []
    for name in ("Device", "runtime"):
        assert hasattr(real.cuda, name)
    for name in ("getDeviceCount", "CUDARuntimeError"):
        assert hasattr(real.cuda.runtime, name)
    assert hasattr(real.cuda.Device, "synchronize") and hasattr(real.cuda.Device(0), "id")
    members = [n for n in vars(emulated_cupy.ndarray) if not n.startswith("_")] + ["flags", "strides", "dtype",
                                                                                   "shape", "ndim", "size"]
    assert [n for n in members if not hasattr(real.ndarray, n)] == []
    for name in ("asarray", "asnumpy", "ascontiguousarray", "empty", "empty_like", "zeros", "pad", "concatenate",
                 "matmul"):
        ours = inspect.signature(getattr(emulated_cupy, name)).parameters
        theirs = inspect.signature(getattr(real, name)).parameters
        # the first (the data) is passed by position; the keywords after it must be CuPy's
        extra = [p for p in list(ours)[1:] if p not in theirs and ours[p].kind is not inspect.Parameter.VAR_KEYWORD]
        assert extra == [] or any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in theirs.values()), (name, extra)
    # RawModule and RawKernel are Cython: their signatures are in their docstrings
    assert "tuple options=()" in real.RawModule.__doc__.splitlines()[0]
    assert "__call__(self, grid, block, args, \\*, shared_mem=0)" in real.RawKernel.__call__.__doc__
