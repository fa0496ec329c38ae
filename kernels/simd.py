"""Eight-lane float32 vectors for Numba kernels: a `vec8` type held in one AVX register, and the handful of
operations the GEMM micro-kernel and the QnA window kernel need (load, store, broadcast, fused multiply-add,
add, multiply). Sixteen-lane `vec16` (one AVX-512 register) with the same operations, named w*, for the GEMM on
CPUs that have AVX-512 (HAS_AVX512); elsewhere LLVM splits them into pairs of AVX registers (correct, slower).

LLVM does not turn a register-blocked GEMM written with scalars into vector code (a scalar 6x16 micro-kernel
ran at 3.6 GFLOPS); written with these, the loop compiles to broadcast + vfmadd231ps on accumulators that
stay in registers (80 GFLOPS on one core here, the machine's FMA peak).

Indices are flat element offsets from the array's data pointer, unchecked (no bounds check, no negative-index
wraparound: the wraparound select alone cost a third of the speed). Callers compute them from the strides.
Under NUMBA_DISABLE_JIT the same names are plain NumPy functions, so the kernels still run as Python."""
import numba as nb
import numpy as np

LANES, WIDE_LANES = 8, 16


def _host_has_avx512():
    """Whether the code Numba generates here may use AVX-512 (NUMBA_CPU_FEATURES, when set, decides)."""
    if nb.config.CPU_FEATURES:
        return "+avx512f" in nb.config.CPU_FEATURES.split(",")
    import llvmlite.binding as llvm
    return bool(llvm.get_host_cpu_features().get("avx512f"))


HAS_AVX512 = _host_has_avx512()


def _host_has_avx512_bf16():
    """Whether the code Numba generates here may use vdpbf16ps (AVX512_BF16; NUMBA_CPU_FEATURES, when set,
    decides)."""
    if nb.config.CPU_FEATURES:
        return "+avx512bf16" in nb.config.CPU_FEATURES.split(",")
    import llvmlite.binding as llvm
    return bool(llvm.get_host_cpu_features().get("avx512bf16"))


HAS_AVX512_BF16 = _host_has_avx512_bf16()

# Cephes expf (softmax.exp_inplace, wexp): exp(x) = 2^n * e^r with n = round(x / ln 2), |r| <= ln2 / 2, e^r by a
# degree-7 polynomial. Relative error < 3e-7 on [-87, 88] (measured on a 1e6-point grid against float64 exp).
EXP_MIN = np.float32(-87.0)   # below it the result underflows to (almost) 0 anyway
LOG2E = np.float32(1.4426950408889634)
LN2_HI = np.float32(0.693359375)
LN2_LO = np.float32(-2.12194440e-4)
P0, P1, P2, P3, P4, P5 = (np.float32(v) for v in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3,
                                                    4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))

if nb.config.DISABLE_JIT:
    from numpy.lib.stride_tricks import as_strided

    def _lanes(arr, idx, lanes=LANES):   # a writable view of `lanes` elements at flat offset idx from arr's first
        return as_strided(arr, (idx + lanes,), (arr.itemsize,))[idx:]

    def vzero():
        return np.zeros(LANES, np.float32)

    def vload(arr, idx):
        return _lanes(arr, idx).copy()

    def vstore(arr, idx, v):
        _lanes(arr, idx, len(v))[:] = v

    def vbroadcast(arr, idx):
        return np.full(LANES, _lanes(arr, idx)[0], np.float32)

    def vfma(a, b, c):
        return (a * b + c).astype(np.float32)

    def vadd(a, b):
        return a + b

    def vmul(a, b):
        return a * b

    def wzero():
        return np.zeros(WIDE_LANES, np.float32)

    def wload(arr, idx):
        return _lanes(arr, idx, WIDE_LANES).copy()

    def wbroadcast(arr, idx):
        return np.full(WIDE_LANES, _lanes(arr, idx)[0], np.float32)

    wstore, wfma, wadd = vstore, vfma, vadd

    def prefetch(arr, idx):
        pass

    def wmax(a, b):
        return np.maximum(a, b)

    def wmin(a, b):
        return np.minimum(a, b)

    def wdiv(a, b):
        return a / b

    def wmul(a, b):
        return a * b

    def wsub(a, b):
        return a - b

    def wexp(a):
        v = np.where(a < EXP_MIN, EXP_MIN, a).astype(np.float32)
        n = np.floor(v * LOG2E + np.float32(0.5))
        r = v - n * LN2_HI - n * LN2_LO
        p = ((((P0 * r + P1) * r + P2) * r + P3) * r + P4) * r + P5
        with np.errstate(invalid="ignore"):
            scale = ((n.astype(np.int32) + np.int32(127)) << np.int32(23)).view(np.float32)
        return ((p * r * r + r + np.float32(1.0)) * scale).astype(np.float32)

    def wsplat(x):
        return np.full(WIDE_LANES, x, np.float32)

    def wbf16_pairs(lo, hi):
        from .gemm_bf16 import to_bfloat16_bits   # the reference rounding (gemm_bf16 imports this module)
        return to_bfloat16_bits(np.concatenate([lo, hi])).view(np.float32)

    def wdpbf16(acc, a, b):
        pairs_a, pairs_b = (np.asarray(v, np.float32).view(np.uint32) for v in (a, b))
        for half in (16, 0):   # the odd (high) products first, as vdpbf16ps adds them
            hi_a = ((pairs_a >> half) << 16).astype(np.uint32).view(np.float32)
            hi_b = ((pairs_b >> half) << 16).astype(np.uint32).view(np.float32)
            acc = (acc + hi_a * hi_b).astype(np.float32)
        return acc

    def wsum_lanes(a):
        while len(a) > 1:
            a = a[:len(a) // 2] + a[len(a) // 2:]
        return np.float32(a[0])

    def wmax_lanes(a):
        return np.float32(a.max())

    def transpose8(src, src_at, src_step, dst, dst_at, dst_step):
        block = np.stack([_lanes(src, src_at + r * src_step)[:LANES] for r in range(LANES)])
        for r in range(LANES):
            _lanes(dst, dst_at + r * dst_step)[:LANES] = block[:, r]

else:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic, models, register_model

    _F32 = ir.FloatType()
    _V8 = ir.VectorType(_F32, LANES)
    _I32 = ir.IntType(32)

    class Vec8Type(types.Type):
        def __init__(self):
            super().__init__(name="vec8f32")

    vec8 = Vec8Type()

    @register_model(Vec8Type)
    class _Vec8Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, _V8)

    _V16 = ir.VectorType(_F32, WIDE_LANES)

    class Vec16Type(types.Type):
        def __init__(self):
            super().__init__(name="vec16f32")

    vec16 = Vec16Type()

    @register_model(Vec16Type)
    class _Vec16Model(models.PrimitiveModel):
        def __init__(self, dmm, fe_type):
            super().__init__(dmm, fe_type, _V16)

    def _element_ptr(context, builder, arrty, arr, idx):
        return builder.gep(context.make_array(arrty)(context, builder, arr).data, [idx])

    def _splat(builder, x, vt=_V8):
        v = builder.insert_element(ir.Constant(vt, ir.Undefined), x, ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, ir.Constant(vt, ir.Undefined), ir.Constant(ir.VectorType(_I32, vt.count),
                                                                                    [0] * vt.count))

    # the code of each operation, for either vector type
    def _zero(vt):
        return lambda context, builder, sig, args: ir.Constant(vt, [0.0] * vt.count)

    def _load(vt):
        def codegen(context, builder, sig, args):
            ptr = _element_ptr(context, builder, sig.args[0], *args)
            return builder.load(builder.bitcast(ptr, vt.as_pointer()), align=4)
        return codegen

    def _store(context, builder, sig, args):
        ptr = _element_ptr(context, builder, sig.args[0], args[0], args[1])
        builder.store(args[2], builder.bitcast(ptr, args[2].type.as_pointer()), align=4)
        return context.get_dummy_value()

    def _broadcast(vt):
        def codegen(context, builder, sig, args):
            return _splat(builder, builder.load(_element_ptr(context, builder, sig.args[0], *args), align=4), vt)
        return codegen

    def _fma(vt):
        def codegen(context, builder, sig, args):
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vt, [vt] * 3),
                                                 f"llvm.fma.v{vt.count}f32")
            return builder.call(fma, args)
        return codegen

    def _add(context, builder, sig, args):
        return builder.fadd(*args)

    @intrinsic
    def vzero(typingctx):
        return vec8(), _zero(_V8)

    @intrinsic
    def vload(typingctx, arr, idx):
        """arr.flat[idx : idx + 8] (unaligned)."""
        return vec8(arr, idx), _load(_V8)

    @intrinsic
    def vstore(typingctx, arr, idx, v):
        """arr.flat[idx : idx + 8] = v (unaligned)."""
        return types.none(arr, idx, v), _store

    @intrinsic
    def vbroadcast(typingctx, arr, idx):
        """arr.flat[idx] in all eight lanes."""
        return vec8(arr, idx), _broadcast(_V8)

    @intrinsic
    def vfma(typingctx, a, b, c):
        """a * b + c, fused (one rounding)."""
        return vec8(a, b, c), _fma(_V8)

    @intrinsic
    def vadd(typingctx, a, b):
        return vec8(a, b), _add

    @intrinsic
    def wzero(typingctx):
        return vec16(), _zero(_V16)

    @intrinsic
    def wload(typingctx, arr, idx):
        """arr.flat[idx : idx + 16] (unaligned)."""
        return vec16(arr, idx), _load(_V16)

    @intrinsic
    def wstore(typingctx, arr, idx, v):
        """arr.flat[idx : idx + 16] = v (unaligned)."""
        return types.none(arr, idx, v), _store

    @intrinsic
    def wbroadcast(typingctx, arr, idx):
        """arr.flat[idx] in all sixteen lanes."""
        return vec16(arr, idx), _broadcast(_V16)

    @intrinsic
    def wfma(typingctx, a, b, c):
        """a * b + c, fused (one rounding)."""
        return vec16(a, b, c), _fma(_V16)

    @intrinsic
    def wadd(typingctx, a, b):
        return vec16(a, b), _add

    def _lanewise(llvm_name):
        """Codegen of the two-vector LLVM intrinsic `llvm_name`."""
        def codegen(context, builder, sig, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16] * 2), llvm_name)
            return builder.call(fn, args)
        return codegen

    @intrinsic
    def wmax(typingctx, a, b):
        """The lane-wise maximum (vmaxps; for inputs that are not NaN)."""
        return vec16(a, b), _lanewise("llvm.maxnum.v16f32")

    @intrinsic
    def wmin(typingctx, a, b):
        """The lane-wise minimum (vminps; for inputs that are not NaN)."""
        return vec16(a, b), _lanewise("llvm.minnum.v16f32")

    @intrinsic
    def wmax_lanes(typingctx, a):
        """The largest of the sixteen lanes (for lanes that are not NaN)."""
        def codegen(context, builder, sig, args):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F32, [_V16]),
                                                "llvm.vector.reduce.fmax.v16f32")
            return builder.call(fn, args)
        return types.float32(a), codegen

    @intrinsic
    def prefetch(typingctx, arr, idx):
        """A hint to bring the cache line of arr.flat[idx] into L1 ahead of its use (prefetcht0); it changes no
        value, and an address past the array is harmless (a prefetch never faults)."""
        def codegen(context, builder, sig, args):
            ptr = builder.bitcast(_element_ptr(context, builder, sig.args[0], *args), ir.IntType(8).as_pointer())
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [
                ptr.type, _I32, _I32, _I32]), "llvm.prefetch.p0")
            builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            return context.get_dummy_value()
        return types.none(arr, idx), codegen

    @intrinsic
    def wmul(typingctx, a, b):
        return vec16(a, b), lambda context, builder, sig, args: builder.fmul(*args)

    @intrinsic
    def wdiv(typingctx, a, b):
        return vec16(a, b), lambda context, builder, sig, args: builder.fdiv(*args)

    @intrinsic
    def wsub(typingctx, a, b):
        return vec16(a, b), lambda context, builder, sig, args: builder.fsub(*args)

    @intrinsic
    def wexp(typingctx, a):
        """exp of each lane for lanes <= 88 (Cephes expf, as softmax.exp_inplace computes it; a NaN stays NaN)."""
        def codegen(context, builder, sig, args):
            def const(value):
                return ir.Constant(_V16, [float(value)] * WIDE_LANES)

            def fma(a, b, c):
                return builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(
                    _V16, [_V16] * 3), "llvm.fma.v16f32"), [a, b, c])
            x = args[0]
            v = builder.select(builder.fcmp_ordered("<", x, const(EXP_MIN)), const(EXP_MIN), x)
            floor = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16, [_V16]), "llvm.floor.v16f32")
            n = builder.call(floor, [fma(v, const(LOG2E), const(0.5))])
            r = fma(n, const(-LN2_LO), fma(n, const(-LN2_HI), v))
            p = const(P0)
            for c in (P1, P2, P3, P4, P5):
                p = fma(p, r, const(c))
            y = builder.fadd(fma(builder.fmul(p, r), r, r), const(1.0))
            i32x16 = ir.VectorType(_I32, WIDE_LANES)
            exponent = builder.shl(builder.add(builder.fptosi(n, i32x16), ir.Constant(i32x16, [127] * WIDE_LANES)),
                                   ir.Constant(i32x16, [23] * WIDE_LANES))
            return builder.fmul(y, builder.bitcast(exponent, _V16))
        return vec16(a), codegen

    class _BFloatType(ir.types._BaseFloatType):   # llvmlite's IR has no bfloat type; LLVM's dpbf16ps takes it
        null = "0.0"
        intrinsic_name = "bf16"

        def __str__(self):
            return "bfloat"

    _BFloatType._create_instance()
    _BF16x32 = ir.VectorType(_BFloatType(), 2 * WIDE_LANES)

    @intrinsic
    def wdpbf16(typingctx, acc, a, b):
        """vdpbf16ps: each lane of acc plus the two products of the bfloat16 pairs in a's and b's lanes (the
        lanes hold the pairs' bits, the even element in the low half), each added with one rounding, the odd
        one first; bfloat16 subnormals count as 0 (AVX512_BF16 CPUs only)."""
        def codegen(context, builder, sig, args):
            fn = builder.module.declare_intrinsic("llvm.x86.avx512bf16.dpbf16ps.512",
                                                  fnty=ir.FunctionType(_V16, [_V16, _BF16x32, _BF16x32]))
            return builder.call(fn, [args[0], builder.bitcast(args[1], _BF16x32), builder.bitcast(args[2], _BF16x32)])
        return vec16(acc, a, b), codegen

    @intrinsic
    def wbf16_pairs(typingctx, lo, hi):
        """vcvtne2ps2bf16: the 32 floats lo then hi rounded to bfloat16 (nearest even), in that order, as the
        bits of 16 pairs (AVX512_BF16 CPUs only)."""
        def codegen(context, builder, sig, args):
            fn = builder.module.declare_intrinsic("llvm.x86.avx512bf16.cvtne2ps2bf16.512",
                                                  fnty=ir.FunctionType(_BF16x32, [_V16, _V16]))
            return builder.bitcast(builder.call(fn, [args[1], args[0]]), _V16)
        return vec16(lo, hi), codegen

    @intrinsic
    def wsplat(typingctx, x):
        """A float32 in all sixteen lanes."""
        return vec16(types.float32), lambda context, builder, sig, args: _splat(builder, args[0], _V16)

    @intrinsic
    def wsum_lanes(typingctx, a):
        """The sum of the sixteen lanes, halves added pairwise (lanes i and i + 8, then i and i + 4, ...)."""
        def codegen(context, builder, sig, args):
            v, n = args[0], WIDE_LANES
            while n > 1:
                n //= 2
                low = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n))))
                high = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, n), list(range(n, 2 * n))))
                v = builder.fadd(low, high)
            return builder.extract_element(v, ir.Constant(_I32, 0))
        return types.float32(a), codegen

    @intrinsic
    def vmul(typingctx, a, b):
        return vec8(a, b), lambda context, builder, sig, args: builder.fmul(*args)

    def _shuffle(builder, a, b, mask):
        return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, LANES), mask))

    @intrinsic
    def transpose8(typingctx, src, src_at, src_step, dst, dst_at, dst_step):
        """An 8x8 block: dst.flat[dst_at + r*dst_step + c] = src.flat[src_at + c*src_step + r], r, c < 8;
        eight loads, 24 shuffles (unpack, shuffle pairs, swap halves), eight stores."""
        def codegen(context, builder, sig, args):
            s_arr, s_at, s_step, d_arr, d_at, d_step = args

            def ptr(k, arr, at, step, r):
                base = _element_ptr(context, builder, sig.args[k], arr, builder.add(at, builder.mul(
                    step, ir.Constant(step.type, r))))
                return builder.bitcast(base, _V8.as_pointer())
            rows = [builder.load(ptr(0, s_arr, s_at, s_step, r), align=4) for r in range(LANES)]
            lo = [_shuffle(builder, rows[2 * i], rows[2 * i + 1], [0, 8, 1, 9, 4, 12, 5, 13]) for i in range(4)]
            hi = [_shuffle(builder, rows[2 * i], rows[2 * i + 1], [2, 10, 3, 11, 6, 14, 7, 15]) for i in range(4)]
            quads = []
            for pair in (lo, hi):
                for i in (0, 2):
                    quads.append(_shuffle(builder, pair[i], pair[i + 1], [0, 1, 8, 9, 4, 5, 12, 13]))
                    quads.append(_shuffle(builder, pair[i], pair[i + 1], [2, 3, 10, 11, 6, 7, 14, 15]))
            # quads: lo01a lo01b lo23a lo23b hi01a hi01b hi23a hi23b; columns 0..7 are:
            # 0: lo01a|lo23a low halves, 1: lo01b|lo23b, 2: hi01a|hi23a, 3: hi01b|hi23b, 4-7: their high halves
            order = [(0, 2), (1, 3), (4, 6), (5, 7)]
            cols = [_shuffle(builder, quads[a], quads[b], [0, 1, 2, 3, 8, 9, 10, 11]) for a, b in order]
            cols += [_shuffle(builder, quads[a], quads[b], [4, 5, 6, 7, 12, 13, 14, 15]) for a, b in order]
            for r in range(LANES):
                builder.store(cols[r], ptr(3, d_arr, d_at, d_step, r), align=4)
            return context.get_dummy_value()
        return types.none(src, src_at, src_step, dst, dst_at, dst_step), codegen
