"""Busy-waiting on a counter another thread advances, for the thread hand-off of threads.split_rows.

A woken thread on these virtual machines takes 50-100 us to run again; a split kernel call paid that twice
(measured 67-90 us per split call against 2.3 us unsplit, 73 split calls in a LITv2-S pass). Spinning for a
bounded time, without the GIL, hands work over in a few microseconds; past the bound the caller blocks."""
import platform

import numba as nb
import numpy as np

from ._jit import ahead_kernel, array

if nb.config.DISABLE_JIT:
    def load_acquire(arr, idx):
        return arr[idx]

    def store_release(arr, idx, value):
        arr[idx] = value

    def cpu_relax():
        pass

else:
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def load_acquire(typingctx, arr, idx):
        """arr.flat[idx] of an int64 array, read from memory every time (an atomic acquire load): a plain
        load would be hoisted out of the waiting loop."""
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            return builder.load_atomic(builder.gep(data, [args[1]]), "acquire", 8)
        return types.int64(arr, idx), codegen

    @intrinsic
    def store_release(typingctx, arr, idx, value):
        """arr.flat[idx] = value for an int64 array, as an atomic release store (earlier writes are seen
        first)."""
        def codegen(context, builder, sig, args):
            data = context.make_array(sig.args[0])(context, builder, args[0]).data
            builder.store_atomic(args[2], builder.gep(data, [args[1]]), "release", 8)
            return context.get_dummy_value()
        return types.none(arr, idx, value), codegen

    X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

    @intrinsic
    def cpu_relax(typingctx):
        """The x86 `pause` hint inside a spin loop (frees the core's resources for the other thread); nothing
        elsewhere."""
        def codegen(context, builder, sig, args):
            if X86:
                pause = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                       "llvm.x86.sse2.pause")
                builder.call(pause, [])
            return context.get_dummy_value()
        return types.none(), codegen


@ahead_kernel(array(2, dtype=nb.int64), nb.int64, nb.int64, nb.int64, nb.int64, nb.int64)
def wait_until(counter, idx, value, spins, settle, alarm):
    """Spin until counter.flat[idx] >= value, at most `spins` pauses, then `settle` pauses more. Returns 1 if
    it got there, 0 if not, 2 as soon as counter.flat[alarm] is non-zero (alarm < 0: none)."""
    for _ in range(spins):
        if load_acquire(counter, idx) >= value:
            for _ in range(settle):
                cpu_relax()
            return 1
        if alarm >= 0 and load_acquire(counter, alarm) != 0:
            return 2
        cpu_relax()
    if load_acquire(counter, idx) >= value:
        return 1
    return 2 if alarm >= 0 and load_acquire(counter, alarm) != 0 else 0


@ahead_kernel(array(2, dtype=nb.int64), nb.int64, nb.int64, nb.int64, nb.int64, nb.int64, nb.int64, nb.int64)
def signal_and_wait(counter, signal, value, idx, target, spins, settle, alarm):
    """counter.flat[signal] = value, stored once the GIL is released, so that a thread waiting for it finds
    the GIL free; then wait_until(counter, idx, target, spins, settle, alarm)."""
    store_release(counter, signal, value)
    return wait_until(counter, idx, target, spins, settle, alarm)


def counters(rows):
    """A zeroed (rows, 8) int64 array: one 64-byte cache line per waiting thread, so that threads spinning on
    their own counters do not share a line."""
    return np.zeros((rows, 8), np.int64)
