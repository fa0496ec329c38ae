"""Intel AMX tiles for Numba kernels: the few instructions the bfloat16 GEMM needs (kernels/gemm_bf16.py), as
LLVM inline assembly on fixed tile registers, and the permission Linux wants before a process may use them.

Tile registers: tmm0-3 hold four 16x16 float32 accumulators (a 32x32 block of y), tmm4-5 two 16-row x
32-bfloat16 tiles of x pairs, tmm6-7 two 16-pair x 16-column tiles of the packed weight (its panels already
are AMX's pair-interleaved B layout). LLVM never allocates tile registers itself, so the registers named here
hold their values from one statement to the next. Every kernel that uses them loads the tile configuration on
its own thread first (tile_config) and releases the tiles when done.

HAS_AMX_BF16: the CPU has AMX-BF16 (per LLVM's host features, or NUMBA_CPU_FEATURES when set), the OS granted
this process the tile state (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16 and later), and LLVM can assemble
inline assembly here."""
import ctypes
import sys

import numba as nb
import numpy as np

TILE_ROWS, TILE_BYTES = 16, 64     # every tile used: 16 rows of 64 bytes
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158


def _cpu_has_amx_bf16():
    if nb.config.CPU_FEATURES:
        flags = nb.config.CPU_FEATURES.split(",")
        return "+amx-bf16" in flags and "+amx-tile" in flags
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    return bool(features.get("amx-bf16") and features.get("amx-tile"))


def _granted():
    """Asks Linux for the AMX tile state for this process (once; later calls are no-ops); True if granted."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _assembler_ready():
    """LLVM's assembler parser, which inline assembly needs (Numba initialises only the printer)."""
    try:
        import llvmlite.binding as llvm
        llvm.initialize_native_asmparser()
        return True
    except Exception:   # an llvmlite without it: no AMX, the vdpbf16ps kernel runs instead
        return False


HAS_AMX_BF16 = (not nb.config.DISABLE_JIT and _cpu_has_amx_bf16() and _assembler_ready() and _granted())


def tile_config_bytes():
    """The 64-byte tile configuration of palette 1 with tmm0-7 all 16 rows x 64 bytes."""
    cfg = np.zeros(64, np.uint8)
    cfg[0] = 1
    cfg[16:32].view(np.uint16)[:8] = TILE_BYTES
    cfg[48:56] = TILE_ROWS
    return cfg


if not nb.config.DISABLE_JIT:
    from llvmlite import ir
    from numba import types
    from numba.extending import intrinsic

    _I8P = ir.IntType(8).as_pointer()
    _I64 = ir.IntType(64)
    _VOID = ir.VoidType()

    def _address(context, builder, arrty, arr, idx):
        data = context.make_array(arrty)(context, builder, arr).data
        return builder.bitcast(builder.gep(data, [idx]), _I8P)

    def _statement(text):
        """An intrinsic of no arguments that emits `text`."""
        @intrinsic
        def emit(typingctx):
            def codegen(context, builder, sig, args):
                builder.asm(ir.FunctionType(_VOID, []), text, "", [], side_effect=True)
                return context.get_dummy_value()
            return types.none(), codegen
        return emit

    def _memory(text):
        """An intrinsic (array, flat element index, row stride in bytes) that emits `text` on that address."""
        @intrinsic
        def emit(typingctx, arr, idx, stride):
            def codegen(context, builder, sig, args):
                address = _address(context, builder, sig.args[0], args[0], args[1])
                builder.asm(ir.FunctionType(_VOID, [_I8P, _I64]), text, "r,r,~{memory}", [address, args[2]],
                            side_effect=True)
                return context.get_dummy_value()
            return types.none(arr, idx, stride), codegen
        return emit

    @intrinsic
    def tile_config(typingctx, cfg):
        """ldtilecfg from cfg (tile_config_bytes) on this thread."""
        def codegen(context, builder, sig, args):
            address = _address(context, builder, sig.args[0], args[0], ir.Constant(_I64, 0))
            builder.asm(ir.FunctionType(_VOID, [_I8P]), "ldtilecfg ($0)", "r,~{memory}", [address], side_effect=True)
            return context.get_dummy_value()
        return types.none(cfg), codegen

    tile_release = _statement("tilerelease")
    zero_y00, zero_y01 = _statement("tilezero %tmm0"), _statement("tilezero %tmm1")
    zero_y10, zero_y11 = _statement("tilezero %tmm2"), _statement("tilezero %tmm3")
    load_x0, load_x1 = _memory("tileloadd ($0,$1,1), %tmm4"), _memory("tileloadd ($0,$1,1), %tmm5")
    load_w0, load_w1 = _memory("tileloadd ($0,$1,1), %tmm6"), _memory("tileloadd ($0,$1,1), %tmm7")
    store_y00, store_y01 = _memory("tilestored %tmm0, ($0,$1,1)"), _memory("tilestored %tmm1, ($0,$1,1)")
    store_y10, store_y11 = _memory("tilestored %tmm2, ($0,$1,1)"), _memory("tilestored %tmm3, ($0,$1,1)")
    # y block (r, c) += x tile r @ w tile c; AT&T operand order: w tile, x tile, accumulator
    multiply_y00, multiply_y01 = _statement("tdpbf16ps %tmm6, %tmm4, %tmm0"), _statement("tdpbf16ps %tmm7, %tmm4, %tmm1")
    multiply_y10, multiply_y11 = _statement("tdpbf16ps %tmm6, %tmm5, %tmm2"), _statement("tdpbf16ps %tmm7, %tmm5, %tmm3")
