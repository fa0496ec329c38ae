"""kernels/_jit, threads and pages: row splitting across threads gives bit-identical results to one thread, runs every row once
however the shares are handed over, and survives errors and concurrent callers; the page release of LLVM; kernels
declared with one signature compile it once, whatever the layouts and threads that call them."""
import os
import sys
import threading
import time

import numba
import numpy as np
import pytest

from qnalo.kernels import _jit, deform_conv, pages, threads, dwconv_gelu, gemm, hilo, layernorm, qna, softmax, window_msa


def _all_kernels(rng):
    x = rng.standard_normal((37, 24)).astype(np.float32)
    y = rng.standard_normal((37, 24)).astype(np.float32)
    w, b = rng.standard_normal(24).astype(np.float32), rng.standard_normal(24).astype(np.float32)
    img = rng.standard_normal((2, 9, 7, 6)).astype(np.float32)
    offsets = (rng.standard_normal((2, 4, 3, 8)) * 3).astype(np.float32)
    qkv = rng.standard_normal((2, 7, 9, 3 * 2 * 4)).astype(np.float32)
    qkv_bias = rng.standard_normal(3 * 2 * 4).astype(np.float32)
    kv, kv_bias = rng.standard_normal((2, 5, 16)).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    weight = gemm.PackedWeight(rng.standard_normal((24, 100)).astype(np.float32))   # 7 panels
    lv = rng.standard_normal((3, 9, 11, 2 * 2 + 8)).astype(np.float32)   # 3 images: shares cross images
    rpe, scale = (rng.standard_normal((9, 4)).astype(np.float32) for _ in range(2))

    def qna_windows(logit_scale, stride):
        scaled = lv.copy()
        scaled[..., :4] *= logit_scale
        out = np.empty((3, qna.qna_output_size(9, 3, stride), qna.qna_output_size(11, 3, stride), 8), np.float32)
        return qna.qna_windows(scaled, rpe, scale, 2, stride, out)

    return {
        "gemm": gemm.matmul(x, weight),
        "layernorm": layernorm.layernorm(x, w, b, 1e-5, np.empty_like(x)),
        "residual_add": layernorm.residual_add(x.copy(), y, b),
        "residual_add_layernorm": layernorm.residual_add_layernorm(x.copy(), y, b, w, b, 1e-5, np.empty_like(x)),
        "lofi": hilo.lofi_attention(qkv, 0, qkv_bias[:8], kv, kv_bias, 2, 4, 0.5, np.zeros((2, 7, 9, 8), np.float32),
                                    0),
        "dwconv": dwconv_gelu.dwconv3x3_gelu(img, img[0, 0, 0], np.ones((3, 3, 6), np.float32), img[1, 1, 1]),
        "deform": deform_conv.deform_sample(img, offsets),
        "hifi": hilo.hifi_attention(qkv, qkv_bias, 2, 2, 4, 0.5, np.zeros((2, 7, 9, 8), np.float32)),
        # the factored path (its halo rows are rebuilt per share) and the per-window-max path (logits x 40)
        **{f"qna_s{s}_x{m}": qna_windows(m, s) for s in (1, 2) for m in (1, 40)},
    }


@pytest.mark.parametrize("n_threads", [2, 3, 5])
def test_split_matches_single_thread(monkeypatch, n_threads):
    single = _all_kernels(np.random.default_rng(0))
    monkeypatch.setattr(threads, "NUM_THREADS", n_threads)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    split = _all_kernels(np.random.default_rng(0))
    for name in single:
        np.testing.assert_array_equal(split[name], single[name], err_msg=name)


def test_split_rows_covers_every_row_once(monkeypatch):
    monkeypatch.setattr(threads, "NUM_THREADS", 4)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    seen = []
    threads.split_rows(lambda start, stop: seen.extend(range(start, stop)), 10, 1)
    assert sorted(seen) == list(range(10))


def _llvm_rss_kib():
    total, in_llvm = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not line[0].isupper() or ":" not in head[0]:       # a mapping's first line
                in_llvm = "libllvmlite" in line
            elif in_llvm and head[0] == "Rss:":
                total += int(head[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.environ.get("NUMBA_DISABLE_JIT") == "1",
                    reason="Linux page release of the JIT's LLVM library")
def test_release_compiler_pages_drops_llvm_from_rss_and_kernels_still_run(monkeypatch):
    x = np.random.default_rng(1).standard_normal((37, 24)).astype(np.float32)
    weight = gemm.PackedWeight(np.ones((24, 5), np.float32))
    numba.njit(lambda v: v + 1)(1.0)   # compiling reads LLVM's pages back in, wherever an earlier test left them
    before = _llvm_rss_kib()
    assert pages.release_compiler_pages() > 0
    assert _llvm_rss_kib() < before / 2
    np.testing.assert_allclose(gemm.matmul(x, weight), x @ np.ones((24, 5), np.float32), rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("QNALO_KEEP_COMPILER_PAGES", "1")
    assert pages.release_compiler_pages() == 0


def _record_shares(log, slow_caller):
    def share(start, stop):
        name = threading.current_thread().name
        if slow_caller and start == 0:
            time.sleep(0.005)   # the caller's own share: its workers claim theirs meanwhile
        log.append((name, start, stop))
    return share


@pytest.mark.parametrize("contended", [False, True], ids=["spinning", "contended"])
@pytest.mark.parametrize("slow_caller", [False, True], ids=["short-shares", "slow-caller"])
def test_every_row_runs_once_whether_workers_claim_or_the_caller_takes_back(monkeypatch, contended,
                                                                            slow_caller):
    monkeypatch.setattr(threads, "NUM_THREADS", 3)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    if contended:   # more runnable threads than qnalo's: nobody spins, workers sleep and are woken
        monkeypatch.setattr(threads, "_runnable_threads", lambda: 99)
        monkeypatch.setattr(threads, "CONTENTION_CHECK_S", 0.0)
    log = []
    for _ in range(40):
        log.clear()
        threads.split_rows(_record_shares(log, slow_caller), 9, 1)
        assert sorted((a, b) for _, a, b in log) == [(0, 3), (3, 6), (6, 9)]
    if slow_caller:
        assert any(name.startswith("qnalo-") for name, _, _ in log)


def test_a_share_that_raises_raises_in_the_caller_and_the_workers_go_on(monkeypatch):
    monkeypatch.setattr(threads, "NUM_THREADS", 2)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)

    def share(start, stop):   # whichever thread runs rows 2-4 (a worker, or the caller taking them back)
        if start == 2:
            raise ZeroDivisionError(f"rows {start}-{stop}")

    for caller_share_sleeps in (0.0, 0.005):
        with pytest.raises(ZeroDivisionError, match="rows 2-4"):
            threads.split_rows(lambda a, b: time.sleep(caller_share_sleeps) if a == 0 else share(a, b), 4, 1)
    with pytest.raises(KeyError):   # the caller's own share raising, while a worker's share runs
        threads.split_rows(lambda a, b: (_ for _ in ()).throw(KeyError(a)) if a == 0 else time.sleep(0.002), 4, 1)
    seen = []
    threads.split_rows(lambda a, b: seen.append((a, b)), 4, 1)
    assert sorted(seen) == [(0, 2), (2, 4)]


def test_a_worker_keeps_no_share_alive_once_the_split_returns(monkeypatch):
    """A worker that ran a share must not hold its arguments while it waits for the next one: it had kept a
    model's last split activation (4.8 MB in LITv2-S) alive into the next allocations, which made a forward
    pass's peak memory depend on which thread ran a share."""
    import gc
    import weakref
    monkeypatch.setattr(threads, "NUM_THREADS", 2)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    ran_on = []

    def share(array, start, stop):
        ran_on.append(threading.current_thread().name)
        if start == 0:
            time.sleep(0.02)   # the caller's share is slow, so the worker claims its own

    for _ in range(20):
        ran_on.clear()
        array = np.ones(1000)
        alive = weakref.ref(array)
        threads.split_rows(share, 4, 1, array)
        del array
        gc.collect()
        if any(name.startswith("qnalo-") for name in ran_on):
            break
    assert any(name.startswith("qnalo-") for name in ran_on), "no worker ever claimed a share"
    assert alive() is None, "a worker thread still holds the last share's array"


def test_threads_sharing_the_workers_get_the_single_thread_result(monkeypatch):
    monkeypatch.setattr(threads, "NUM_THREADS", 2)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 40)).astype(np.float32)
    weight = gemm.PackedWeight(rng.standard_normal((40, 50)).astype(np.float32))
    expect = gemm.matmul(x, weight)
    failures = []

    def caller():
        for _ in range(30):
            if not np.array_equal(gemm.matmul(x, weight), expect):
                failures.append(threading.current_thread().name)

    callers = [threading.Thread(target=caller) for _ in range(8)]
    for t in callers:
        t.start()
    for t in callers:
        t.join()
    assert failures == []


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="specializations of the JIT")
def test_gemm_tiles_and_lofi_heads_compile_one_specialization_for_every_layout_and_caller():
    """gemm_tiles and hilo._lofi_heads (one_signature_kernel) take C-contiguous and strided arrays, from Python
    and from kernels that pass literal arguments, with one compiled specialization each (a cold start had
    compiled five and two), whose results agree across the layouts."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((24, 40)).astype(np.float32)
    weight = gemm.PackedWeight(w)
    x = rng.standard_normal((30, 32)).astype(np.float32)
    out = np.zeros((30, 48), np.float32)
    contiguous = gemm.matmul(np.ascontiguousarray(x[:, :24]), weight)
    strided = gemm.matmul(x[:, :24], weight, out[:, 8:])                   # rows of x and out both strided
    np.testing.assert_array_equal(contiguous, strided)
    np.testing.assert_allclose(contiguous, x[:, :24] @ w, rtol=1e-5, atol=1e-4)
    for q_col, n_cols in ((0, 8), (8, 24)):       # q (and out) C-contiguous, then column slices
        qkv = rng.standard_normal((2, 3, 4, n_cols)).astype(np.float32)
        kv = rng.standard_normal((2, 5, 16)).astype(np.float32)
        q_bias, kv_bias = rng.standard_normal(8).astype(np.float32), rng.standard_normal(16).astype(np.float32)
        expect = hilo.lofi_attention_ref(qkv, q_col, q_bias, kv, kv_bias, 2, 4, 0.5, np.zeros((2, 3, 4, 8)), 0)
        got = hilo.lofi_attention(qkv.copy(), q_col, q_bias, kv.copy(), kv_bias, 2, 4, 0.5,
                                  np.zeros((2, 3, 4, 8), np.float32), 0)
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-5)
    qkv = rng.standard_normal((1, 4, 4, 3 * 8)).astype(np.float32)
    window_msa.window_msa(qkv, rng.standard_normal((2, 4, 4)).astype(np.float32), 2, 2,
                          np.zeros((1, 4, 4, 8), np.float32))
    assert len(gemm.gemm_tiles.signatures) == 1
    assert len(hilo._lofi_heads.signatures) == 1


@pytest.mark.skipif(os.environ.get("NUMBA_DISABLE_JIT") == "1", reason="specializations of the JIT")
def test_a_one_signature_kernel_first_called_from_two_threads_at_once_compiles_once():
    @_jit.one_signature_kernel(_jit.array(1, "A"), _jit.nb.float32)
    def scale(x, factor):
        for i in range(x.shape[0]):
            x[i] *= factor

    arrays = [np.ones(5, np.float32), np.ones(10, np.float32)[::2]]   # C-contiguous, and strided
    start, errors = threading.Barrier(len(arrays)), []

    def call(x):
        start.wait()
        try:
            scale(x, np.float32(3.0))
        except Exception as exc:   # the one that found it being compiled must wait, not fail
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(x,)) for x in arrays]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all((x == 3.0).all() for x in arrays)
    assert len(scale.signatures) == 1




def test_cached_kernels_are_stamped_by_every_kernel_source(tmp_path):
    """A kernel's cached machine code carries code from other kernel modules (the GEMM in Lo-Fi, the softmax),
    so it is stale when any kernel source changes, not only its own file."""
    if numba.config.DISABLE_JIT:
        pytest.skip("no compiled kernels under NUMBA_DISABLE_JIT")
    for dispatcher in (hilo._lofi_heads, window_msa._window_heads, softmax.softmax_padded_rows, gemm.gemm_tiles):
        assert dispatcher._cache._impl.locator.get_source_stamp() == _jit.kernel_sources_digest()
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    before = _jit.kernel_sources_digest(str(tmp_path))
    _jit.kernel_sources_digest.cache_clear()
    (tmp_path / "b.py").write_text("y = 3\n")
    assert _jit.kernel_sources_digest(str(tmp_path)) != before
