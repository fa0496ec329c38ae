"""A stand-in for CuPy that runs qnalo's CUDA C kernels on the CPU, so that kernels/cuda/*.cu,
qnalo.kernels.cuda and the models' device="cuda" path are executed and checked where no GPU is.

`module()` is a "cupy" module object: arrays live in NumPy memory behind a CuPy-like `ndarray` that refuses
implicit conversion to NumPy, as CuPy does; RawModule compiles a .cu source with g++ against cuda_on_cpu.h (every
CUDA thread a fiber, barriers and warp shuffles emulated), and its kernels are called like CuPy's,
`kernel(grid, block, args)`. Stricter than CuPy where CuPy would let a bug through silently:
- each argument must match the kernel's parameter: a C-contiguous device array of the element type for a
  pointer (store_t is float32, or float16 under -DQNALO_HALF), and np.int32 / np.int64 / np.float32 for int /
  long long / float (CuPy passes a Python int as 64 bits and a NumPy array as garbage);
- every array has 1 KiB of guard bytes each side, checked after each launch: a write out of bounds fails the
  launch; the guards and `empty` arrays hold NaN (0xFF bytes), so a read out of bounds or of memory the kernel
  never wrote shows up as NaN in the parity tests;
- a barrier that cannot complete (threads left the kernel or wait elsewhere) fails the launch, where a GPU hangs;
- a launch over an sm_90 GPU's limits is refused as the GPU refuses it: more than 1024 threads a block, a grid's
  y or z over 65535, and, where nvcc is installed, more registers than a block may hold (ptxas's count per
  thread for sm_90, allocated per warp in units of 256, against 65536: "too many resources requested").
Threads run in one of two orders (module(schedule=...)): "lockstep", every thread to its next barrier in turn,
or "warps-ahead", one warp at a time, the last first, each as far as it can go, which exposes a missing
__syncthreads() between one warp's write and another's read.
What it cannot show: speed, races that neither order exposes, and the GPU's own rounding of
expf/erff (g++'s libm here); cuBLAS's GEMM is NumPy's (float16 inputs: float32 products, rounded once)."""
import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import types

import numpy as np

HEADER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_on_cpu.h")
GUARD_BYTES = 1024
FILL = 0xFF           # NaN in float32 and float16, in every byte position
SCALAR_TYPES = {"int": np.int32, "unsigned": np.uint32, "unsigned int": np.uint32, "long long": np.int64,
                "float": np.float32, "double": np.float64}
POINTER_TYPES = {"float": np.float32, "double": np.float64, "int": np.int32}
# the PTX instructions the kernels use, as the functions cuda_on_cpu.h defines for them
PTX = {"cvt.f32.f16 %0, %1;": "qnalo_ptx_cvt_f32_f16", "cvt.rn.f16.f32 %0, %1;": "qnalo_ptx_cvt_rn_f16_f32"}
ASM = re.compile(r'asm\s*\(\s*"([^"]*)"\s*:\s*"=\w"\s*\(([^)]*)\)\s*:\s*"\w"\s*\(([^)]*)\)\s*\)\s*;')
KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)')
IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy array "
            "explicitly.")   # CuPy's own message

# an sm_90 GPU's launch limits (CUDA C Programming Guide, compute capability 9.0)
MAX_BLOCK_DIMS, MAX_BLOCK_THREADS = (1024, 1024, 64), 1024
MAX_GRID_DIMS = (2**31 - 1, 65535, 65535)
REGISTERS_PER_BLOCK, REGISTER_UNIT = 65536, 256    # registers are allocated to each warp in units of 256
RESOURCE_ARCH = "sm_90"
PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)'(?:(?!Compiling entry).)*?Used (\d+) registers", re.S)

_launch_lock = threading.Lock()   # the emulator's scheduler state is global to each compiled module


class EmulationError(RuntimeError):
    """A kernel launch the emulator refused or that failed (out-of-bounds write, barrier that cannot complete)."""


class CUDARuntimeError(RuntimeError):
    pass


# -- memory ---------------------------------------------------------------------------------------------------

class _GuardedBuffer(np.ndarray):
    """The raw bytes of one device allocation: GUARD_BYTES of FILL, the array's bytes, GUARD_BYTES of FILL."""


def _allocate(shape, dtype):
    dtype = np.dtype(dtype)
    shape = tuple(int(s) for s in (shape if isinstance(shape, (tuple, list)) else (shape,)))
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = _GuardedBuffer(nbytes + 2 * GUARD_BYTES, np.uint8)   # owns its memory
    raw.fill(FILL)
    return np.asarray(raw[GUARD_BYTES:GUARD_BYTES + nbytes]).view(dtype).reshape(shape)


def _owner(a):
    """The _GuardedBuffer that holds `a`'s memory, or None."""
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a if isinstance(a, _GuardedBuffer) else None


def _check_guards(kernel, name, a):
    raw = _owner(a)
    for side, guard in (("before the start", raw[:GUARD_BYTES]), ("past the end", raw[-GUARD_BYTES:])):
        hit = np.flatnonzero(np.asarray(guard) != FILL)
        if hit.size:
            raise EmulationError(f"{kernel}: the kernel wrote {side} of argument {name} ({hit.size} guard byte(s) "
                                 "changed)")


class ndarray(np.lib.mixins.NDArrayOperatorsMixin):
    """A device array: NumPy memory in a guarded allocation. NumPy functions and operators work on it and
    return device arrays, as with CuPy; mixing it with NumPy arrays, or converting it implicitly, is a TypeError."""
    __module__ = "cupy"

    def __init__(self, data):
        self._data = data if _owner(data) is not None else _copy_to_device(data)

    shape = property(lambda self: self._data.shape)
    dtype = property(lambda self: self._data.dtype)
    ndim = property(lambda self: self._data.ndim)
    size = property(lambda self: self._data.size)
    strides = property(lambda self: self._data.strides)
    flags = property(lambda self: self._data.flags)

    def __array__(self, *args, **kwargs):
        raise TypeError(IMPLICIT)

    def __repr__(self):
        return f"emulated cupy array({self._data!r})"

    def get(self):
        return self._data.copy()

    def __getitem__(self, key):
        return _wrap(self._data[_host(key)])

    def __setitem__(self, key, value):
        self._data[_host(key)] = _host(value)

    def reshape(self, *shape, **kwargs):
        return _wrap(self._data.reshape(*shape, **kwargs))

    def transpose(self, *axes):
        return _wrap(self._data.transpose(*axes))

    def astype(self, dtype, copy=True):
        out = self._data.astype(dtype, copy=copy)
        return self if out is self._data else ndarray(out)

    def mean(self, *args, **kwargs):
        return _wrap(self._data.mean(*args, **kwargs))

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = tuple(_host(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*(_host(i) for i in inputs), **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        return _wrap(func(*_host(args), **_host(kwargs)))


def _host(value):
    """The NumPy view inside device arrays (recursively in tuples, lists, dicts); a NumPy array is refused."""
    if isinstance(value, ndarray):
        return value._data
    if isinstance(value, np.ndarray) and value.ndim:
        raise TypeError(f"Unsupported type {type(value)}: a NumPy array where CuPy needs a device array "
                        "(cupy.asarray it first)")
    if isinstance(value, (tuple, list)):
        return type(value)(_host(v) for v in value)
    if isinstance(value, dict):
        return {k: _host(v) for k, v in value.items()}
    return value


def _copy_to_device(a):
    out = _allocate(a.shape, a.dtype)
    out[...] = a
    return out


def _wrap(result):
    if isinstance(result, np.ndarray):
        return ndarray(result)
    if isinstance(result, (tuple, list)):
        return type(result)(_wrap(r) for r in result)
    return result


# -- the cupy functions qnalo uses ------------------------------------------------------------------------------

def asarray(a, dtype=None):
    if isinstance(a, ndarray):
        return a if dtype is None else a.astype(dtype, copy=False)
    return ndarray(_copy_to_device(np.asarray(a, dtype=dtype)))


def asnumpy(a):
    return a.get() if isinstance(a, ndarray) else np.asarray(a)


def ascontiguousarray(a, dtype=None):
    a = asarray(a, dtype)
    return a if a.flags.c_contiguous else ndarray(_copy_to_device(np.ascontiguousarray(a._data)))


def empty(shape, dtype=np.float64):
    return ndarray(_allocate(shape, dtype))


def empty_like(prototype, dtype=None):
    return empty(prototype.shape, prototype.dtype if dtype is None else dtype)


def zeros(shape, dtype=np.float64):
    out = empty(shape, dtype)
    out._data[...] = 0
    return out


def pad(a, pad_width, mode="constant", **kwargs):
    return _wrap(np.pad(_host(a), pad_width, mode=mode, **kwargs))


def concatenate(arrays, axis=0):
    return _wrap(np.concatenate(_host(list(arrays)), axis=axis))


def matmul(a, b, out=None):
    """cuBLAS's GEMM as CuPy calls it: float16 inputs multiply and accumulate in float32, rounded once."""
    x, w = _host(a), _host(b)
    if x.dtype != w.dtype:
        raise TypeError(f"matmul of {x.dtype} and {w.dtype}: qnalo's GEMMs take one dtype")
    y = np.matmul(x.astype(np.float32), w.astype(np.float32)).astype(x.dtype)
    if out is None:
        return ndarray(_copy_to_device(y))
    out._data[...] = y
    return out


# -- kernels ----------------------------------------------------------------------------------------------------

def _inline(path, include_dirs, seen):
    """The file at `path` expanded as _expand does (each file once, as under #pragma once)."""
    if path in seen:
        return ""
    seen.add(path)
    with open(path) as f:
        return f'#line 1 "{path}"\n' + _expand(f.read(), os.path.dirname(path), include_dirs, seen, path)


def _expand(text, here, include_dirs, seen, name):
    """`text` with its quoted #includes inlined and its asm statements rewritten as calls of cuda_on_cpu.h."""
    def include(match):
        for folder in (here, *include_dirs):
            candidate = os.path.abspath(os.path.join(folder, match.group(1)))
            if os.path.exists(candidate):
                resume = text.count("\n", 0, match.start()) + 2     # the line after the #include
                return _inline(candidate, include_dirs, seen) + f'\n#line {resume} "{name}"'
        raise EmulationError(f'{name}: #include "{match.group(1)}" is not in {[here, *include_dirs]}')

    def rewrite(match):
        instruction, out, arg = match.groups()
        if instruction not in PTX:
            raise EmulationError(f"{name}: the emulator has no CPU version of PTX `{instruction}`; add one to "
                                 "tests/emulated_cupy (PTX and cuda_on_cpu.h)")
        return f"{out} = {PTX[instruction]}({arg});"

    text = re.sub(r'^[ \t]*#[ \t]*include[ \t]+"([^"]+)"', include, text, flags=re.M)
    return ASM.sub(rewrite, text)


def _parameters(params):
    """[(name, kind, C type, NumPy dtype or 'store_t')] of a kernel's parameter list."""
    out = []
    for param in params.split(","):
        words = param.replace("__restrict__", " ").replace("*", " * ").split()
        name, ctype = words[-1], " ".join(words[:-1])
        base = " ".join(w for w in words[:-1] if w not in ("const", "*"))
        if "*" in words:
            dtype = "store_t" if base == "store_t" else POINTER_TYPES.get(base)
            kind = "pointer"
        else:
            dtype, kind = SCALAR_TYPES.get(base), "scalar"
        if dtype is None:
            raise EmulationError(f"kernel parameter {param.strip()!r}: type {base!r} is not emulated")
        out.append((name, kind, ctype, dtype))
    return out


def _made_once(folder, inputs, suffix, build):
    """The file in `folder` made from `inputs` (strings; their hash names it): build(work_dir) makes it in a
    fresh work folder the first time, and it is moved into place whole."""
    path = os.path.join(folder, hashlib.sha256("\0".join(inputs).encode()).hexdigest()[:24] + suffix)
    if not os.path.exists(path):
        with tempfile.TemporaryDirectory(dir=folder) as work:
            os.replace(build(work), path)
    return path


SCHEDULES = ("lockstep", "warps-ahead")   # cuda_on_cpu.h's enum Schedule, in order


class RawModule:
    """cupy.RawModule(code=..., options=...): compiled with g++ at the first get_function, cached on disk;
    its kernels run in the thread order `schedule` names (SCHEDULES)."""

    def __init__(self, code, options=(), schedule="lockstep"):
        if not isinstance(options, tuple):   # CuPy's RawModule types it `tuple options` (Cython)
            raise TypeError(f"Argument 'options' has incorrect type (expected tuple, got {type(options).__name__})")
        self.schedule = SCHEDULES.index(schedule)
        include_dirs, defines = [], []
        for option in options:
            if option.startswith("-I"):
                include_dirs.append(option[2:])
            elif option.startswith("-D"):
                defines.append(option)
            elif not option.startswith("--std="):
                raise EmulationError(f"NVRTC option {option!r} is not emulated")
        self.code, self.include_dirs = code, include_dirs
        self.source = _expand(code, include_dirs[0] if include_dirs else os.getcwd(), include_dirs, set(), "code")
        self.half = "-DQNALO_HALF" in defines
        self.defines = defines
        self.kernels = {name: _parameters(params) for name, params in KERNEL.findall(self.source)}
        self._library = None
        self._register_counts = None

    def _compile(self):
        launchers = []
        for name, params in self.kernels.items():
            call = ", ".join(f"*({ctype}*)args[{i}]" for i, (_, _, ctype, _) in enumerate(params))
            launchers.append(
                f'extern "C" int qnalo_launch_{name}(const unsigned* grid, const unsigned* block, void** args) {{\n'
                f"    auto run = [](void* a) {{ void** args = (void**)a; {name}({call}); }};\n"
                f"    return qnalo_emu::launch(grid, block, run, args);\n}}\n")
        with open(HEADER) as f:
            header = f.read()
        unit = f'#include "{HEADER}"\n#line 1 "kernel source"\n{self.source}\n' + "".join(launchers)
        compiler = shutil.which("g++")
        if compiler is None:
            raise EmulationError("the CUDA emulator needs g++")
        flags = ["-O2", "-std=c++17", "-shared", "-fPIC", "-U_FORTIFY_SOURCE", "-w", *self.defines]
        folder = os.path.join(tempfile.gettempdir(), f"qnalo-emulated-cuda-{os.getuid()}")
        os.makedirs(folder, exist_ok=True)

        def build(work):
            cpp, built = os.path.join(work, "unit.cpp"), os.path.join(work, "unit.so")
            with open(cpp, "w") as f:
                f.write(unit)
            done = subprocess.run([compiler, *flags, "-o", built, cpp], capture_output=True, text=True)
            if done.returncode:
                raise EmulationError(f"g++ could not compile the kernels:\n{done.stderr}")
            return built
        self._library = ctypes.CDLL(_made_once(folder, [header, unit, *flags], ".so", build))
        self._library.qnalo_emu_error.restype = ctypes.c_char_p
        self._register_counts = self._registers(folder)

    @property
    def registers(self):
        """{kernel: registers per thread on sm_90} where nvcc is installed, else None; compiles on first use."""
        if self._library is None:
            self._compile()
        return self._register_counts

    def _registers(self, folder):
        """ptxas's registers per thread of each kernel for RESOURCE_ARCH (cached beside the libraries), or None
        without nvcc."""
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            return None
        flags = ["-cubin", f"-arch={RESOURCE_ARCH}", "--resource-usage", *self.defines,
                 *(f"-I{d}" for d in self.include_dirs)]

        def build(work):
            source, written = os.path.join(work, "unit.cu"), os.path.join(work, "registers.json")
            with open(source, "w") as f:
                f.write(self.code)
            done = subprocess.run([nvcc, *flags, "-o", os.path.join(work, "unit.cubin"), source],
                                  capture_output=True, text=True)
            if done.returncode:
                raise EmulationError(f"nvcc could not compile the kernels for {RESOURCE_ARCH}:\n{done.stderr}")
            with open(written, "w") as f:
                json.dump({name: int(n) for name, n in PTXAS_ENTRY.findall(done.stdout + done.stderr)}, f)
            return written
        with open(_made_once(folder, [self.code, *flags], ".registers.json", build)) as f:
            return json.load(f)

    def get_function(self, name):
        if name not in self.kernels:
            raise EmulationError(f"no extern \"C\" __global__ kernel {name!r} in this module "
                                 f"(it has {sorted(self.kernels)})")
        if self._library is None:
            self._compile()
        return RawKernel(self, name)


class RawKernel:
    def __init__(self, module, name):
        self.module, self.name = module, name
        self.params = module.kernels[name]
        self._launch = getattr(module._library, "qnalo_launch_" + name)
        self._launch.restype = ctypes.c_int

    def _dims(self, what, dims, limits):
        dims = tuple(dims) + (1,) * (3 - len(tuple(dims)))
        if len(dims) != 3 or not all(isinstance(d, (int, np.integer)) and d >= 1 for d in dims):
            raise EmulationError(f"{self.name}: {what} must be 1 to 3 positive ints, got {dims}")
        if any(d > limit for d, limit in zip(dims, limits)):
            raise EmulationError(f"{self.name}: {what} {dims} is over an {RESOURCE_ARCH} GPU's limits {limits} "
                                 "(cudaErrorInvalidValue)")
        return dims

    def _check_resources(self, block):
        threads = int(np.prod(block))
        if threads > MAX_BLOCK_THREADS:
            raise EmulationError(f"{self.name}: block {block} has {threads} threads, over the {MAX_BLOCK_THREADS} "
                                 "a GPU takes (cudaErrorInvalidValue)")
        registers = self.module.registers
        if registers is not None and self.name in registers:
            per_warp = -(-registers[self.name] * 32 // REGISTER_UNIT) * REGISTER_UNIT
            needed = -(-threads // 32) * per_warp
            if needed > REGISTERS_PER_BLOCK:
                raise EmulationError(
                    f"{self.name}: too many resources requested for launch: {threads} threads of "
                    f"{registers[self.name]} registers ({RESOURCE_ARCH}) need {needed} registers, a block has "
                    f"{REGISTERS_PER_BLOCK} (cudaErrorLaunchOutOfResources)")

    def __call__(self, grid, block, args, *, shared_mem=0):
        if shared_mem:
            raise EmulationError(f"{self.name}: dynamic shared memory is not emulated")
        grid, block = self._dims("grid", grid, MAX_GRID_DIMS), self._dims("block", block, MAX_BLOCK_DIMS)
        self._check_resources(block)
        if len(args) != len(self.params):
            raise EmulationError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        slots, arrays = [], []
        for (name, kind, ctype, dtype), arg in zip(self.params, args):
            what = f"{self.name}: {name}"
            if kind == "pointer":
                want = (np.float16 if self.module.half else np.float32) if dtype == "store_t" else dtype
                if not isinstance(arg, ndarray):
                    raise EmulationError(f"{what} ({ctype}) needs a device array, got {type(arg).__name__}")
                if arg.dtype != want:
                    raise EmulationError(f"{what} ({ctype}) needs {np.dtype(want)}, got {arg.dtype}")
                if not arg.flags.c_contiguous:
                    raise EmulationError(f"{what}: the kernel indexes it as C-contiguous, got strides {arg.strides}")
                slots.append(ctypes.c_void_p(arg._data.ctypes.data))
                arrays.append((name, arg._data))
            else:
                if type(arg) is not dtype:
                    raise EmulationError(f"{what} is {ctype}: pass np.{np.dtype(dtype).name}(...), got "
                                         f"{type(arg).__name__} {arg!r}")
                slots.append(np.ctypeslib.as_ctypes_type(dtype)(arg.item()))
        pointers = (ctypes.c_void_p * len(slots))(*[ctypes.addressof(s) for s in slots])
        with _launch_lock:
            self.module._library.qnalo_emu_set_schedule(self.module.schedule)
            failed = self._launch((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), pointers)
        if failed:
            raise EmulationError(f"{self.name}: {self.module._library.qnalo_emu_error().decode()}")
        for name, data in arrays:
            _check_guards(self.name, name, data)


# -- the module -------------------------------------------------------------------------------------------------

class Device:
    def __init__(self, device_id=0):
        if device_id != 0:
            raise CUDARuntimeError(f"cudaErrorInvalidDevice: the emulator has device 0 only, not {device_id}")
        self.id = device_id

    def synchronize(self):
        """Kernels run to the end inside each launch here: nothing to wait for."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def module(schedule="lockstep"):
    """A fresh "cupy" module backed by the emulator (put it in sys.modules["cupy"]), its kernels run in the
    thread order `schedule` names (SCHEDULES)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule {schedule!r}: choose one of {SCHEDULES}")
    cp = types.ModuleType("cupy", __doc__)
    cp.emulated = True
    runtime = types.SimpleNamespace(getDeviceCount=lambda: 1, CUDARuntimeError=CUDARuntimeError)
    cp.cuda = types.SimpleNamespace(Device=Device, runtime=runtime)
    for name in ("ndarray", "asarray", "asnumpy", "ascontiguousarray", "empty", "empty_like", "zeros", "pad",
                 "concatenate", "matmul"):
        setattr(cp, name, globals()[name])
    cp.RawModule = lambda code, options=(), schedule=schedule: RawModule(code, options, schedule)
    cp.float16, cp.float32 = np.float16, np.float32
    return cp
