"""The QnA layer: the fused Numba window kernel, and the layer as the models run it (qnalo.models.qna_vit's
QnAAttention, through qnalo.layers.QnA), vs their float64 NumPy references, and properties both must have."""
import math

import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from qnalo.kernels import qna, threads
from qnalo.layers import QnA
from tolerances import assert_close

cases = dict(seed=st.integers(0, 2**32 - 1), b=st.integers(1, 3), h=st.integers(1, 11), w=st.integers(1, 11),
             c=st.integers(1, 24), heads=st.integers(1, 4), hd=st.integers(1, 8), nq=st.integers(1, 3),
             k=st.sampled_from([1, 3, 5, 7]), stride=st.sampled_from([1, 2]),
             # std of the logits: at 50 many exceed 88, where the official float32 exp overflows
             logit_scale=st.sampled_from([1.0, 50.0]))


# QnA-ViT layers (spec 3.1: tiny stage 0 has 8 QnA heads of 8 channels; its 2 heads are the unused MSA ones)
# and edge cases, shared with tests/test_qna_vs_torch.py
EXAMPLES = [
    dict(seed=0, b=1, h=56, w=56, c=64, heads=8, hd=8, nq=2, k=3, stride=1, logit_scale=1.0),     # tiny stage 0
    dict(seed=1, b=1, h=56, w=56, c=64, heads=16, hd=8, nq=2, k=3, stride=2, logit_scale=1.0),    # its stride-2 layer
    dict(seed=2, b=1, h=56, w=56, c=64, heads=8, hd=8, nq=2, k=7, stride=1, logit_scale=1.0),     # tiny_7x7 stage 0
    dict(seed=3, b=2, h=14, w=14, c=256, heads=32, hd=8, nq=2, k=3, stride=1, logit_scale=1.0),   # tiny stage 2
    dict(seed=4, b=2, h=7, w=9, c=32, heads=4, hd=16, nq=2, k=7, stride=2, logit_scale=50.0),     # odd, k > map
    dict(seed=5, b=2, h=1, w=1, c=3, heads=2, hd=3, nq=3, k=5, stride=1, logit_scale=50.0),
    dict(seed=6, b=1, h=2, w=3, c=5, heads=1, hd=4, nq=2, k=3, stride=2, logit_scale=1.0),
    dict(seed=7, b=3, h=5, w=4, c=4, heads=2, hd=2, nq=1, k=1, stride=2, logit_scale=1.0),
    dict(seed=8, b=1, h=6, w=7, c=8, heads=2, hd=4, nq=2, k=4, stride=2, logit_scale=1.0),       # even k: off-centre
]


def real_and_edge_examples(test):
    for ex in reversed(EXAMPLES):
        test = example(**ex)(test)
    return test


def layer_args(seed, b, h, w, c, heads, hd, nq, k, stride, logit_scale):
    """x and the engine-layout weights of a random layer whose logits have std ~logit_scale on these inputs."""
    rng = np.random.default_rng(seed)
    f = heads * hd

    def randn(*shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    x = randn(b, h, w, c)
    # keys ~ N(0, (logit_scale * sqrt(hd))^2), unit queries / sqrt(hd): logits ~ N(0, logit_scale^2)
    wk, query, wv = randn(c, f, scale=logit_scale * math.sqrt(hd / c)), randn(nq, f), randn(c, f, scale=c ** -0.5)
    w_in = np.concatenate([qna.fold_queries(query, wk, heads), wv], axis=1)
    return dict(x=x, w_in=w_in, w_out=randn(f, f, scale=f ** -0.5), rpe=randn(k * k, nq * heads),
                attn_scale=randn(k * k, nq * heads), heads=heads, stride=stride, query=query, wk=wk, wv=wv)


def reference(x, w_in, w_out, rpe, attn_scale, heads, stride, **_raw):
    return qna.qna_attention_ref(x, w_in, w_out, rpe, attn_scale, heads, stride)


def layer(x, w_out, rpe, attn_scale, heads, stride, query, wk, wv, **_folded):
    """The layer the models run, on the same weights (its queries folded into the keys as w_in's are)."""
    tensors = {"proj_k.weight": wk, "proj_v.weight": wv, "proj_out.weight": w_out, "q_param": query,
               "rpb_table": rpe, "attn_scale": attn_scale}
    return QnA(tensors, heads, stride)(x)


def _compare(args, logit_scale, what="qna"):
    out = layer(**args)
    ref = reference(**args)
    assert out.dtype == np.float32 and np.isfinite(out).all()
    # a float32 logit carries ~eps*|logit| rounding, which moves the softmax weights by that much relatively:
    # the error grows with the logits' size, so atol does too (measurements in tolerances.py)
    assert_close(out, ref, "qna", scale=max(1.0, logit_scale), what=what)


@given(**cases)
@real_and_edge_examples
def test_qna_attention(seed, b, h, w, c, heads, hd, nq, k, stride, logit_scale):
    args = layer_args(seed, b, h, w, c, heads, hd, nq, k, stride, logit_scale)
    _compare(args, logit_scale)


def test_output_sizes():
    assert [qna.qna_output_size(n, 3, 2) for n in (1, 2, 7, 8, 56)] == [1, 1, 4, 4, 28]   # ceil(n / 2)
    assert [qna.qna_output_size(n, 7, 2) for n in (1, 2, 7, 8)] == [1, 1, 4, 4]
    assert [qna.qna_output_size(n, k, 1) for n in (1, 9) for k in (1, 3, 7)] == [1, 1, 1, 9, 9, 9]
    args = layer_args(0, 2, 7, 8, 4, 2, 2, 2, 3, 2, 1.0)
    assert layer(**args).shape == reference(**args).shape == (2, 4, 4, 4)


def _windows(ops, lv, rpe, scale, heads, stride, ho, wo):
    out = np.zeros((lv.shape[0], ho, wo, lv.shape[-1] - rpe.shape[1]), lv.dtype)
    return ops(lv, rpe, scale, heads, stride, out)


@pytest.mark.parametrize("ops", [qna.qna_windows, qna.qna_windows_ref], ids=["numba", "numpy"])
def test_border_cells_are_dropped_not_zero_logits(ops):
    # a 1x2 map, k = 3, one head, one query: pixel (0, 0) sees cells (0, 0), (0, 1) at offsets 4, 5 only
    logits, values = np.float32([1.0, -0.5]), np.float32([2.0, 3.0])
    lv = np.stack([logits, values], axis=-1).reshape(1, 1, 2, 2)
    rpe = np.arange(9, dtype=np.float32).reshape(9, 1) * 0.25
    scale = np.linspace(-1.0, 1.5, 9, dtype=np.float32).reshape(9, 1)
    out = _windows(ops, lv, rpe, scale, 1, 1, 1, 2)
    for j, cells in ((0, [(0, 4), (1, 5)]), (1, [(0, 3), (1, 4)])):
        z = np.array([logits[c] + rpe[t, 0] for c, t in cells], np.float64)
        p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
        expect = sum(p[i] * scale[t, 0] * values[c] for i, (c, t) in enumerate(cells))
        np.testing.assert_allclose(out[0, 0, j, 0], expect, rtol=1e-6)


@pytest.mark.parametrize("ops", [layer, reference], ids=["numba", "numpy"])
@pytest.mark.parametrize("k,stride", [(1, 1), (1, 2), (3, 1), (7, 2)])
def test_single_cell_windows_give_the_summed_scale_times_the_value(ops, k, stride):
    # spec 2.3: k = 1, or a 1x1 map with any k: each softmax is over one cell, so out = (sum_q S[centre]) * v
    h = 1 if k > 1 else 5
    args = layer_args(3, 2, h, h, 6, 3, 4, 2, k, stride, 50.0)
    f = 12
    centre = (k // 2) * k + k // 2
    coef = args["attn_scale"][centre].astype(np.float64).reshape(2, 3).sum(axis=0).repeat(4)
    v = args["x"][:, ::stride, ::stride].astype(np.float64) @ args["w_in"][:, 6:]
    expect = (v * coef) @ args["w_out"]
    assert_close(ops(**args), expect, "qna", what=f"k={k} stride={stride}, F={f}")


def test_logits_far_beyond_float32_exp_range_are_safe():
    # adding the same constant to every logit of a (query, head) changes nothing; the official exp() would
    # give inf/inf = NaN here
    args = layer_args(4, 2, 9, 7, 8, 2, 4, 2, 3, 1, 1.0)
    lv = (args["x"].reshape(-1, 8) @ args["w_in"]).reshape(2, 9, 7, -1)
    shifted = lv.copy()
    shifted[..., :4] += np.float32([1e4, -1e4, 200.0, 89.0])
    base = _windows(qna.qna_windows, lv, args["rpe"], args["attn_scale"], 2, 1, 9, 7)
    out = _windows(qna.qna_windows, shifted, args["rpe"], args["attn_scale"], 2, 1, 9, 7)
    # |logit| ~ 1e4 in float32 keeps ~1e-3 of its fraction: bound by that, not by the table
    np.testing.assert_allclose(out, base, atol=1e-2)
    args["rpe"] = args["rpe"] + np.float32(300.0)
    assert np.isfinite(layer(**args)).all()


def test_nan_stays_in_its_image_and_window():
    args = layer_args(5, 3, 8, 8, 4, 2, 2, 2, 3, 1, 1.0)
    args["x"][1, 0, 0, 0] = np.nan
    out = layer(**args)
    ref = reference(**args)
    assert np.isnan(out[1, :2, :2]).all() and np.isnan(ref[1, :2, :2]).all()
    assert np.isfinite(out[[0, 2]]).all() and np.isfinite(out[1, 2:]).all() and np.isfinite(out[1, :, 2:]).all()


def test_fold_is_queries_normalised_per_head_times_keys():
    rng = np.random.default_rng(6)
    query, wk, x = rng.standard_normal((2, 12)), rng.standard_normal((5, 12)), rng.standard_normal((7, 5))
    keys = (x @ wk).reshape(7, 3, 4)
    q = query.reshape(2, 3, 4)
    q = q / (np.sqrt((q ** 2).sum(-1, keepdims=True)) + 1e-6) / 2.0
    expect = np.einsum("nhd,qhd->nqh", keys, q).reshape(7, 6)
    np.testing.assert_allclose(x @ qna.fold_queries(query, wk, 3), expect, rtol=1e-12, atol=1e-12)
    assert qna.fold_queries(query.astype(np.float32), wk.astype(np.float32), 3).dtype == np.float32


def test_bad_layouts_are_refused():
    args = layer_args(0, 1, 4, 4, 4, 2, 2, 2, 3, 1, 1.0)
    with pytest.raises(ValueError, match="k\\*k"):
        reference(**{**args, "rpe": args["rpe"][:8], "attn_scale": args["attn_scale"][:8]})
    with pytest.raises(ValueError, match="heads=3"):
        layer(**{**args, "heads": 3})
    # other float inputs are computed in float32, as float32 inputs are
    np.testing.assert_array_equal(layer(**{**args, "x": args["x"].astype(np.float64)}), layer(**args))


def test_empty_batch():
    args = layer_args(0, 1, 5, 5, 4, 2, 2, 2, 3, 2, 1.0)
    args["x"] = args["x"][:0]
    assert layer(**args).shape == (0, 3, 3, 4)


@pytest.mark.parametrize("n_threads", [2, 3, 5])
def test_split_matches_single_thread(monkeypatch, n_threads):
    args = layer_args(7, 2, 13, 9, 8, 2, 4, 2, 5, 1, 1.0)
    single = layer(**args)
    monkeypatch.setattr(threads, "NUM_THREADS", n_threads)
    monkeypatch.setattr(threads, "MIN_WORK_PER_THREAD", 1)
    np.testing.assert_array_equal(layer(**args), single)


@given(seed=st.integers(0, 2**32 - 1), spread=st.floats(0.0, 79.0), stride=st.sampled_from([1, 2]),
       k=st.sampled_from([1, 3, 5, 7]), h=st.integers(1, 13), w=st.integers(1, 13))
@example(seed=0, spread=79.0, stride=1, k=7, h=13, w=13)
@example(seed=1, spread=79.0, stride=2, k=3, h=1, w=13)
def test_factored_path_holds_up_to_its_range_limit(seed, spread, stride, k, h, w):
    # below FACTORED_RANGE (logit range + rpe range per column) qna_windows factors exp(logit + rpe) into
    # per-cell and per-offset exponentials; the smallest factor, exp(-79.x), is still a normal float32
    rng = np.random.default_rng(seed)
    heads, nq, d = 2, 2, 3
    lv = rng.standard_normal((2, h, w, nq * heads + heads * d)).astype(np.float32)
    lv[..., :nq * heads] = rng.uniform(0.0, spread, (2, h, w, nq * heads))
    lv[0, 0, 0, :nq * heads], lv[1, -1, -1, :nq * heads] = 0.0, spread   # the whole range in every column
    rpe = rng.uniform(0.0, 0.5, (k * k, nq * heads)).astype(np.float32)
    assert float(spread) + 0.5 < qna.FACTORED_RANGE
    scale = rng.standard_normal((k * k, nq * heads)).astype(np.float32)
    ho, wo = qna.qna_output_size(h, k, stride), qna.qna_output_size(w, k, stride)
    out = _windows(qna.qna_windows, lv, rpe, scale, heads, stride, ho, wo)
    ref = _windows(qna.qna_windows_ref, lv.astype(np.float64), rpe, scale, heads, stride, ho, wo)
    assert np.isfinite(out).all()
    assert_close(out, ref, "qna", scale=max(1.0, spread / math.sqrt(12)), what=f"logit range {spread}")


def test_wide_logit_ranges_take_the_per_window_max_kernel(monkeypatch):
    calls = []
    monkeypatch.setattr(qna, "split_rows", lambda fn, *a: (calls.append(fn.__name__), threads.split_rows(fn, *a)))
    args = layer_args(9, 1, 6, 6, 4, 2, 2, 2, 3, 1, 1.0)
    lv = (args["x"].reshape(-1, 4) @ args["w_in"]).reshape(1, 6, 6, -1)
    for shift, kernel_name in ((0.0, "_qna_factored_rows"), (100.0, "_qna_rows")):
        wide = lv.copy()
        wide[0, 0, 0, 0] += shift
        calls.clear()
        out = _windows(qna.qna_windows, wide, args["rpe"], args["attn_scale"], 2, 1, 6, 6)
        assert calls == [kernel_name]
        assert_close(out, _windows(qna.qna_windows_ref, wide, args["rpe"], args["attn_scale"], 2, 1, 6, 6), "qna")
