// CUDA C kernels on the CPU, for tests: what kernels/cuda/*.cu use of CUDA, defined for g++. Every thread of a
// block is a fiber on one OS thread; __syncthreads() and the warp shuffles switch fibers until every thread they
// wait for has arrived, so shared memory, barriers and shuffles behave as on a GPU (one schedule of the many a
// GPU may choose: a race that needs another interleaving goes unseen). A barrier that cannot complete (some
// threads left the kernel, or wait at another barrier) fails the launch with a message instead of hanging.
// Included first by the translation unit that tests/emulated_cupy compiles from a .cu and its launchers.
#pragma once
#include <csetjmp>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <math.h>
#include <sys/mman.h>
#include <type_traits>
#include <ucontext.h>
#include <unistd.h>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __shared__ static   // one copy for the block: blocks run one after another

struct uint3 {
    unsigned int x, y, z;
};
struct dim3 {
    unsigned int x, y, z;
};
struct alignas(16) float4 {   // CUDA's vector types, as aligned as on a GPU
    float x, y, z, w;
};
struct alignas(16) uint4 {
    unsigned int x, y, z, w;
};

static uint3 threadIdx, blockIdx;   // set by the scheduler before it resumes a thread
static dim3 blockDim, gridDim;

template <class A, class B>
static inline typename std::common_type<A, B>::type min(A a, B b) { return a < b ? a : b; }
template <class A, class B>
static inline typename std::common_type<A, B>::type max(A a, B b) { return a < b ? b : a; }

static inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}

// the PTX instructions the sources use, which tests/emulated_cupy rewrites into calls of these
static inline float qnalo_ptx_cvt_f32_f16(unsigned short bits) {
    _Float16 h;
    memcpy(&h, &bits, sizeof h);
    return (float)h;
}
static inline unsigned short qnalo_ptx_cvt_rn_f16_f32(float f) {
    _Float16 h = (_Float16)f;   // round to nearest even, as cvt.rn
    unsigned short bits;
    memcpy(&bits, &h, sizeof bits);
    return bits;
}

namespace qnalo_emu {

enum State { READY, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
    jmp_buf resume_at;
    ucontext_t start;
    bool started;
    volatile State state;   // written by the fibers, read by the scheduler between jumps
    unsigned shuffles;      // how many this thread has taken part in, in this block
};

const size_t STACK_BYTES = 256 * 1024;   // kernels keep arrays of MAX_HEAD_DIM floats on the stack

static Fiber* fibers;
static int n_threads, current;
static jmp_buf scheduler;
static uint64_t* exchange;   // [2][n_threads]: the values threads offer to shuffles
static char error[1024];
static void (*body)(void*);  // one thread's run of the kernel on the current block
static void* body_arg;

static void fail(const char* message) {
    if (!error[0]) snprintf(error, sizeof error, "%s", message);
}

// not inlined, so that no caller keeps values in registers across the jump to another stack
__attribute__((noinline)) static void yield() {
    if (!_setjmp(fibers[current].resume_at)) _longjmp(scheduler, 1);
}

static void fiber_main() {
    for (;;) {              // one pass per block; parked in yield() between blocks and after the last
        body(body_arg);
        fibers[current].state = DONE;
        yield();
    }
}

__attribute__((noinline)) static void resume(int t) {
    current = t;
    threadIdx.x = t % blockDim.x;
    threadIdx.y = t / blockDim.x % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
    if (_setjmp(scheduler)) return;
    if (fibers[t].started) _longjmp(fibers[t].resume_at, 1);
    fibers[t].started = true;
    setcontext(&fibers[t].start);
}

static void describe(char* out, size_t size, State state, const char* what) {
    int first = -1, count = 0;
    for (int t = 0; t < n_threads; ++t)
        if (fibers[t].state == state) {
            if (first < 0) first = t;
            ++count;
        }
    snprintf(out, size, "%d thread(s) %s (first: thread %d)", count, what, first);
}

// warp w's lanes, all waiting at a shuffle, go on; false if some lane is not there yet
static bool release_warp(int w) {
    int lo = w * 32, hi = min(n_threads, lo + 32);
    for (int t = lo; t < hi; ++t)
        if (fibers[t].state != AT_WARP_BARRIER) return false;
    for (int t = lo; t < hi; ++t) fibers[t].state = READY;
    return true;
}

// The order threads run in between barriers: LOCKSTEP resumes them in order, each to its next barrier;
// WARPS_AHEAD runs one warp at a time, the last first (and its lanes last first), each as far as it can go before
// the others move, so a missing __syncthreads() between a write and another thread's read shows (a GPU may run
// warps, and since Volta the lanes of a warp, in any order).
enum Schedule { LOCKSTEP, WARPS_AHEAD };
static Schedule schedule = LOCKSTEP;

// runs every thread of the current block to the end; false (and error set) when a barrier cannot complete
static bool run_block() {
    for (int t = 0; t < n_threads; ++t) {
        fibers[t].state = READY;
        fibers[t].shuffles = 0;
    }
    int warps = (n_threads + 31) / 32;
    for (;;) {
        if (schedule == LOCKSTEP) {
            for (int t = 0; t < n_threads; ++t)
                if (fibers[t].state == READY) {
                    resume(t);
                    if (error[0]) return false;
                }
        } else {
            for (int w = warps - 1; w >= 0; --w) {
                do {
                    for (int t = min(n_threads, w * 32 + 32) - 1; t >= w * 32; --t)
                        if (fibers[t].state == READY) {
                            resume(t);
                            if (error[0]) return false;
                        }
                } while (release_warp(w));
            }
        }
        int done = 0, at_block = 0;
        for (int t = 0; t < n_threads; ++t) {
            done += fibers[t].state == DONE;
            at_block += fibers[t].state == AT_BLOCK_BARRIER;
        }
        if (done == n_threads) return true;
        if (at_block == n_threads) {
            for (int t = 0; t < n_threads; ++t) fibers[t].state = READY;
            continue;
        }
        bool released = false;
        for (int w = 0; w < warps; ++w) released |= release_warp(w);
        if (released) continue;
        char a[200], b[200], c[200];
        describe(a, sizeof a, AT_BLOCK_BARRIER, "wait at __syncthreads()");
        describe(b, sizeof b, AT_WARP_BARRIER, "wait at a warp shuffle");
        describe(c, sizeof c, DONE, "have left the kernel");
        char message[700];
        snprintf(message, sizeof message, "block (%u, %u, %u): a barrier cannot complete: %s, %s, %s",
                 blockIdx.x, blockIdx.y, blockIdx.z, a, b, c);
        fail(message);
        return false;
    }
}

// the value of `v` in lane `src` of the calling thread's warp; every lane of a full warp takes part
template <class T>
static T shuffle(unsigned mask, T v, int src) {
    static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 64 bits");
    int tid = current, base = tid / 32 * 32;
    if (mask != 0xffffffffu || base + 32 > n_threads) {
        fail("warp shuffle: the emulator runs full-warp shuffles only (mask 0xffffffff, 32 threads in the warp)");
        yield();
    }
    // two exchange slots per thread, used in turn: a lane can write its next value only after every lane of
    // the warp has reached that next shuffle, that is after each has read this one
    uint64_t* slots = exchange + (fibers[tid].shuffles++ & 1) * n_threads;
    uint64_t bits = 0;
    memcpy(&bits, &v, sizeof v);
    slots[tid] = bits;
    fibers[tid].state = AT_WARP_BARRIER;
    yield();                                  // every lane has written its value
    bits = slots[base + src];
    T out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

// runs `run(arg)` once per thread of every block of the grid; 0, or -1 with qnalo_emu_error() saying why
static int launch(const unsigned* grid, const unsigned* block, void (*run)(void*), void* arg) {
    error[0] = 0;
    unsigned threads = block[0] * block[1] * block[2];
    if (!grid[0] || !grid[1] || !grid[2] || !threads || threads > 1024 || block[2] > 64 || grid[1] > 65535 ||
        grid[2] > 65535 || grid[0] > 0x7fffffffu) {
        snprintf(error, sizeof error, "invalid launch configuration: grid (%u, %u, %u), block (%u, %u, %u)",
                 grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        return -1;
    }
    gridDim = {grid[0], grid[1], grid[2]};
    blockDim = {block[0], block[1], block[2]};
    n_threads = (int)threads;
    body = run;
    body_arg = arg;
    // one stack per thread, each above a guard page, so an overflow faults instead of corrupting its neighbour
    size_t page = (size_t)sysconf(_SC_PAGESIZE), slot = STACK_BYTES + page;
    char* stacks = (char*)mmap(nullptr, slot * threads, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    Fiber* made = new Fiber[threads];
    exchange = new uint64_t[2 * threads];
    fibers = made;
    for (unsigned t = 0; t < threads; ++t) {
        mprotect(stacks + t * slot, page, PROT_NONE);
        getcontext(&made[t].start);
        made[t].start.uc_stack.ss_sp = stacks + t * slot + page;
        made[t].start.uc_stack.ss_size = STACK_BYTES;
        made[t].start.uc_link = nullptr;
        makecontext(&made[t].start, fiber_main, 0);
        made[t].started = false;
    }
    bool ok = true;
    for (unsigned z = 0; ok && z < grid[2]; ++z)
        for (unsigned y = 0; ok && y < grid[1]; ++y)
            for (unsigned x = 0; ok && x < grid[0]; ++x) {
                blockIdx = {x, y, z};
                ok = run_block();
            }
    delete[] made;
    delete[] exchange;
    munmap(stacks, slot * threads);
    return ok ? 0 : -1;
}

}  // namespace qnalo_emu

static inline void __syncthreads() {
    qnalo_emu::fibers[qnalo_emu::current].state = qnalo_emu::AT_BLOCK_BARRIER;
    qnalo_emu::yield();
}

template <class T>
static inline T __shfl_sync(unsigned mask, T v, int src_lane) {
    return qnalo_emu::shuffle(mask, v, src_lane & 31);
}

template <class T>
static inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
    return qnalo_emu::shuffle(mask, v, (qnalo_emu::current & 31) ^ (lane_mask & 31));
}

template <class T>
static inline T __shfl_down_sync(unsigned mask, T v, unsigned delta) {
    int lane = qnalo_emu::current & 31;
    return qnalo_emu::shuffle(mask, v, lane + (int)delta < 32 ? lane + (int)delta : lane);
}

extern "C" const char* qnalo_emu_error() { return qnalo_emu::error; }
extern "C" void qnalo_emu_set_schedule(int schedule) { qnalo_emu::schedule = (qnalo_emu::Schedule)schedule; }
