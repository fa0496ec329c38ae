"""The kernel threads: the large kernels are split by rows across NUM_THREADS threads (`split_rows`), the calling
thread taking the first share; the workers spin briefly between tasks instead of sleeping (see _Workers).

qnalo uses no Numba threading layer: the OpenMP layer shares the process's OpenMP runtime and made a LITv2-S
forward pass 6x slower with PyTorch imported in the same process (580 vs 95 ms), and the work-queue layer cost
~160 us per launch and aborts on concurrent launches."""
import os
import threading
import time

from . import spin


def available_cpus():
    """The CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _default_threads():
    for name in ("QNALO_NUM_THREADS", "NUMBA_NUM_THREADS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return available_cpus()


NUM_THREADS = _default_threads()
# Below this many element-operations per thread a kernel stays on the calling thread. On 2 cores the split
# measured neutral in a whole LITv2-S pass (min of 6x8 runs: 70.6 ms split vs 67.3 ms serial, medians 81 vs 82:
# OpenBLAS's idle workers hold the other core) while a lone stage-0 dwconv ran 1.6x faster split; so only
# kernels this large are split, for machines with more cores.
MIN_WORK_PER_THREAD = 1_000_000

# Spin budgets (pause instructions, ~40 ns each here): a worker waits ~1 ms for the next task before it sleeps,
# which spans the serial stretches between split kernels of a forward pass; the caller waits as long for the
# workers to finish their shares. SETTLE: a worker that sees a task waits ~10 us more before taking the GIL,
# while the caller unboxes its own share's arguments (a GIL taken while held puts the taker to sleep).
WORKER_SPINS = 25_000
CALLER_SPINS = 25_000
SETTLE = 250
TASK, DONE, WORKER_ASLEEP, CALLER_ASLEEP = 0, 1, 2, 3   # columns of a worker's counter row
CONTENTION_CHECK_S = 0.01


def _runnable_threads():
    """Threads running or ready to run on the machine now (/proc/stat procs_running; 0 where unknown)."""
    try:
        with open("/proc/stat", "rb") as f:
            for line in f:
                if line.startswith(b"procs_running"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class _Workers:
    """NUM_THREADS - 1 daemon threads that run the later shares of split_rows. The hand-off is a counter row
    per worker: the caller queues a share and bumps TASK; the worker, spinning on it without the GIL
    (spin.py), claims the share, runs it, then sets DONE from inside its next spin, when it no longer holds
    the GIL; the caller spins on DONE. A share its worker has not claimed by the time the caller is through
    its own is taken back and run by the caller: on a busy machine a descheduled worker costs a serial run,
    not a wait (pure spinning had made LITv2-S 2x slower than one thread beside a CPU hog). Each side spins
    a bounded time, then sleeps on a condition the other side signals (the GIL orders the flag updates made
    while holding it). One split runs at a time; a thread that finds the workers busy runs its kernel
    unsplit."""

    def __init__(self, n):
        self._spin = spin
        self.counters = spin.counters(n)
        self.pending = [[] for _ in range(n)]   # at most one (seq, fn, args); list.pop() claims it atomically
        self.errors = [None] * n
        self.posted = 0
        self.checked, self.contended = -1.0, False
        self.busy = threading.Lock()
        self.cond = threading.Condition()
        for w in range(n):
            threading.Thread(target=self._work, args=(w,), name=f"qnalo-{w + 1}", daemon=True).start()

    def _spins(self):
        """WORKER_SPINS, or 0 while more threads are runnable on the machine than qnalo uses: a spinning
        thread then takes CPU time from the ones doing the work (beside one CPU hog, spinning made a LITv2-S
        pass 1.4x slower than one thread). Checked every CONTENTION_CHECK_S from /proc/stat."""
        now = time.monotonic()
        if now - self.checked > CONTENTION_CHECK_S:
            self.checked, self.contended = now, _runnable_threads() > NUM_THREADS
        return 0 if self.contended else WORKER_SPINS

    def _work(self, w):
        row, flat, last = self.counters[w], w * 8, 0
        wait_until, signal_and_wait = self._spin.wait_until, self._spin.signal_and_wait
        state = wait_until(self.counters, flat + TASK, 1, self._spins(), SETTLE, -1)
        while True:
            while state == 2:              # the caller sleeps until DONE, which is set: wake it
                with self.cond:
                    self.cond.notify_all()
                state = wait_until(self.counters, flat + TASK, last + 1, self._spins(), SETTLE, -1)
            if state == 0:
                with self.cond:
                    # the caller may have gone to sleep on DONE just as it was set: its flag store and this
                    # thread's DONE store then its flag load can pass each other (x86 reorders a store before a
                    # later load), so each saw the other's old value; under the lock the flag is seen
                    if row[CALLER_ASLEEP]:
                        self.cond.notify_all()
                    row[WORKER_ASLEEP] = 1
                    while row[TASK] <= last:
                        self.cond.wait()
                    row[WORKER_ASLEEP] = 0
            last = int(row[TASK])
            try:
                seq, fn, args = self.pending[w].pop()
            except IndexError:             # the caller took its share back
                state = wait_until(self.counters, flat + TASK, last + 1, self._spins(), SETTLE, -1)
                continue
            try:
                fn(*args)
            except BaseException as exc:   # handed to the caller, which raises it
                self.errors[w] = exc
            fn = args = None   # the share's arrays are not kept alive while this thread waits for the next one
            state = signal_and_wait(self.counters, flat + DONE, seq, flat + TASK, last + 1, self._spins(),
                                    SETTLE, flat + CALLER_ASLEEP)

    def run(self, fn, args, bounds):
        """fn(*args, bounds[k], bounds[k+1]) for every k, the first on this thread; False if busy."""
        if not self.busy.acquire(blocking=False):
            return False
        try:
            self.posted += 1
            n = len(bounds) - 2
            for w in range(n):
                self.pending[w].append((self.posted, fn, (*args, bounds[w + 1], bounds[w + 2])))
                self.counters[w, TASK] = self.posted
                if self.counters[w, WORKER_ASLEEP]:
                    with self.cond:
                        self.cond.notify_all()
            own_error = None
            try:
                fn(*args, bounds[0], bounds[1])
            except BaseException as exc:   # raised once every share is done, so none writes on afterwards
                own_error = exc
            for w in range(n):
                self._finish(w)
            errors = [exc for exc in self.errors if exc is not None]
            self.errors = [None] * n
            if own_error is not None or errors:
                raise own_error if own_error is not None else errors[0]
            return True
        finally:
            self.busy.release()

    def _finish(self, w):
        """Share w is done when this returns: run here if its worker has not claimed it, else waited for."""
        try:
            _, fn, args = self.pending[w].pop()
        except IndexError:
            pass
        else:
            try:
                fn(*args)
            except BaseException as exc:
                self.errors[w] = exc
            return
        row = self.counters[w]
        spins = 0 if self.contended else CALLER_SPINS
        if self._spin.wait_until(self.counters, w * 8 + DONE, self.posted, spins, 0, -1):
            return
        with self.cond:
            row[CALLER_ASLEEP] = 1
            while row[DONE] < self.posted:
                self.cond.wait()
            row[CALLER_ASLEEP] = 0


_workers_lock = threading.Lock()
_workers_state = {"key": None, "workers": None}


def _workers():
    # one set per process and thread count: threads do not survive fork, so a forked child starts its own
    with _workers_lock:
        if _workers_state["key"] != (os.getpid(), NUM_THREADS):
            _workers_state["workers"] = _Workers(NUM_THREADS - 1)
            _workers_state["key"] = (os.getpid(), NUM_THREADS)
        return _workers_state["workers"]


def set_num_threads(n):
    """Threads that split kernels from now on (default: QNALO_NUM_THREADS, NUMBA_NUM_THREADS, else the CPUs this
    process may run on). Only before the first model is built in this process: running workers are not resized."""
    global NUM_THREADS
    n = int(n)
    if n < 1:
        raise ValueError(f"thread count must be positive, got {n}")
    with _workers_lock:
        running = _workers_state["key"] == (os.getpid(), NUM_THREADS)
        if running and n != NUM_THREADS:
            raise ValueError(f"{NUM_THREADS} kernel threads are already running in this process; set the count "
                             "before building a model (or with QNALO_NUM_THREADS)")
        NUM_THREADS = n


def start_workers():
    """Starts the worker threads and loads their spin kernels, so that the first split pays neither."""
    scratch = spin.counters(1)
    spin.wait_until(scratch, TASK, 0, 0, 0, -1)
    spin.signal_and_wait(scratch, DONE, 0, TASK, 0, 0, 0, -1)
    if NUM_THREADS > 1:
        _workers()


def share_bounds(n_rows, work_per_row):
    """The bounds split_rows gives its shares: [0, ..., n_rows], one share per thread there is work for."""
    parts = max(1, min(NUM_THREADS, n_rows, n_rows * work_per_row // MIN_WORK_PER_THREAD))
    return [n_rows * k // parts for k in range(parts + 1)]


def split_rows(fn, n_rows, work_per_row, *args):
    """Run fn(*args, start, stop) over rows [0, n_rows), split across threads when there is enough work (the
    shares of share_bounds). The calling thread takes the first share itself."""
    bounds = share_bounds(n_rows, work_per_row)
    if len(bounds) <= 2 or not _workers().run(fn, args, bounds):
        fn(*args, 0, n_rows)
