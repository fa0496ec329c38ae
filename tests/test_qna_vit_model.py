"""QnA-ViT end to end: the qnalo engine (Numba kernels and NumPy reference ops) against the PyTorch reference.

The PyTorch reference (tests/reference/qna_vit_torch.py) is written in the project's PyTorch layout of QnA-ViT;
its engine_tensors() maps a state dict to the engine's layout (docs/format.md)."""
import collections
import copy
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import qnalo
from qnalo.kernels import qna
from qnalo.models.qna_vit import QnAViT, engine_tensor_shapes, random_tensors, stage_sides
from qnalo.models.qna_vit_config import QNA_VIT_VARIANTS, QnAViTConfig
from qnalo.weights import save_weights
from model_helpers import (BAD_INPUTS, check_non_contiguous_input, check_non_finite_stays_in_its_image,
                           check_parity_of_a_quiet_stream, image, torch_run)
from tolerances import assert_logits_close

torch = pytest.importorskip("torch")
from reference.qna_torch import FusedKQnA  # noqa: E402
from reference.qna_vit_torch import (  # noqa: E402
    LN_EPS, Mlp, QnAViT as TorchQnAViT, WindowMSA, engine_tensors, qna_vit_reference, randomize_)

torch.set_num_threads(2)


def _reference_from_config(cfg, seed):
    kw = cfg.to_dict()
    kw.pop("img_size")
    return randomize_(TorchQnAViT(**kw).eval(), seed=seed)


def _engine_from_reference(ref, cfg, backend="numba"):
    return QnAViT(cfg, engine_tensors(ref.state_dict()), backend=backend)


def _check(model, ref, x, what=""):
    for i, (f, r) in enumerate(zip(model.forward_features(x), torch_run(ref, x, features=True))):
        assert_logits_close(f, r, what=f"{what} stage {i} features", op="features")
    if model.config.num_classes:
        assert_logits_close(model(x), torch_run(ref, x), what=f"{what} logits")


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def small_cases(draw):
    """A small random config and an image size it accepts: the MSA windows are drawn from the common divisors
    of the stage sides of that size, so odd maps appear wherever they are legal."""
    h, w = draw(st.integers(1, 70)), draw(st.integers(1, 70))
    embed = draw(st.sampled_from([4, 8]))
    qna_hd = draw(st.sampled_from([d for d in (1, 2, 4) if embed % d == 0]))
    msa_hd = draw(st.sampled_from([2, 4, 8]))
    msa_depths, windows = [], []
    for i, (sh, sw) in enumerate(zip(stage_sides(h), stage_sides(w))):
        msa_depths.append(draw(st.integers(0, 1 if i < 2 else 2)))
        common = [d for d in _divisors(sh) if sw % d == 0]
        windows.append(draw(st.sampled_from(common)) if msa_depths[-1] else 7)
    dims = [embed * 2 ** i for i in range(4)]
    cfg = QnAViTConfig(
        embed_dim=embed, qna_depths=tuple(draw(st.integers(0, 1)) for _ in range(4)), msa_depths=tuple(msa_depths),
        qna_heads=tuple(c // qna_hd for c in dims), msa_heads=tuple(max(1, c // msa_hd) for c in dims),
        qna_kernel_sizes=tuple(draw(st.sampled_from([1, 3, 5, 7])) for _ in range(4)), msa_windows=tuple(windows),
        n_queries=draw(st.integers(1, 3)), num_classes=draw(st.sampled_from([0, 2, 9])))
    return cfg, h, w


@settings(max_examples=20)
@given(case=small_cases(), seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3),
       backend=st.sampled_from(["numba", "numpy"]))
@example(case=(QnAViTConfig(embed_dim=8, qna_depths=(1, 1, 1, 1), msa_depths=(0, 1, 2, 1), qna_heads=(2, 4, 8, 16),
                            msa_heads=(1, 2, 4, 8), qna_kernel_sizes=(3, 7, 3, 5), msa_windows=(7, 3, 1, 1),
                            num_classes=9), 69, 45), seed=0, b=2, backend="numba")   # maps 18x12, 9x6, 5x3, 3x2
@example(case=(QnAViTConfig(embed_dim=4, qna_depths=(0, 0, 0, 0), msa_depths=(0, 0, 0, 0), qna_heads=(4, 8, 16, 32),
                            qna_kernel_sizes=(1, 1, 1, 1), num_classes=2), 1, 3), seed=1, b=3, backend="numpy")
def test_parity_random_configs(case, seed, b, backend):
    cfg, h, w = case
    ref = _reference_from_config(cfg, seed)
    _check(_engine_from_reference(ref, cfg, backend), ref, image(seed, b, h, w))


# The residual stream scaled to ~QUIET: the LayerNorms then see variances of 5e-9 to 8.5e-6 (medians over rows;
# measured over 40 random small_cases), around QnA-ViT's eps 1e-6, where the eps is a sizeable part of the
# denominator. Their outputs stay O(1), so the logits do too.
QUIET = 1e-3


@torch.no_grad()
def _quiet(ref, s=QUIET):
    """Scales by s every output that feeds the residual stream: the stem (no norm follows it: its output is
    the stream), each block's fc2, MSA proj and QnA proj_out (the stride-2 block's skip conv is linear in the
    stream, so it stays scaled)."""
    ref.stem.weight.mul_(s)
    for mod in ref.modules():
        if isinstance(mod, Mlp):
            mod.fc2.weight.mul_(s)
            mod.fc2.bias.mul_(s)
        elif isinstance(mod, WindowMSA):
            mod.proj.weight.mul_(s)
        elif isinstance(mod, FusedKQnA):
            mod.proj_out.weight.mul_(s)
    return ref


@pytest.mark.torch
@settings(max_examples=6)
@given(case=small_cases(), seed=st.integers(0, 2**31 - 1), b=st.integers(1, 3),
       backend=st.sampled_from(["numba", "numpy"]))
@example(case=(QnAViTConfig(embed_dim=8, qna_depths=(1, 1, 1, 1), msa_depths=(0, 1, 2, 1), qna_heads=(2, 4, 8, 16),
                            msa_heads=(1, 2, 4, 8), qna_kernel_sizes=(3, 7, 3, 5), msa_windows=(7, 3, 1, 1),
                            num_classes=9), 69, 45), seed=0, b=2, backend="numba")
@example(case=(QnAViTConfig(embed_dim=4, qna_depths=(1, 0, 1, 0), msa_depths=(1, 1, 0, 1), qna_heads=(2, 4, 8, 16),
                            msa_heads=(2, 2, 4, 4), qna_kernel_sizes=(3, 3, 3, 3), msa_windows=(3, 3, 7, 1),
                            num_classes=0), 45, 21), seed=1, b=2, backend="numpy")   # maps 12x6, 6x3, 3x2, 2x1
def test_parity_where_layernorm_eps_matters(torch, case, seed, b, backend):
    # every LayerNorm sees rows of variance within 100x of eps, so an eps 10x off moves its outputs by at least
    # 4%: with the engine's eps at 1e-5, every one of 62 cases failed by 3.8e3x to 1.1e4x its bar (where
    # test_parity_random_configs caught 13 of 62, by at most 17x)
    cfg, h, w = case
    ref = _quiet(_reference_from_config(cfg, seed))
    x = image(seed, b, h, w)
    check_parity_of_a_quiet_stream(ref, x, QUIET, LN_EPS, lambda r: _engine_from_reference(r, cfg, backend),
                                   logits=bool(cfg.num_classes))


# proj_k scaled by WIDE_KEYS: every QnA layer's logits span more than qna.FACTORED_RANGE (80) in some column of
# an image, up to several hundred, so qna_windows takes its per-window-max kernel (_qna_rows) instead of the
# factored one. The float32 reference cannot follow there: its per-image max shift leaves windows whose every
# exp underflows to 0 (0 / 0 = NaN), so the reference runs in float64.
WIDE_KEYS = 100.0


@pytest.mark.torch
@pytest.mark.parametrize("seed", [0, 3])
def test_wide_logits_take_the_per_window_max_path(torch, monkeypatch, seed):
    # stage maps 11x6, 6x3, 3x2, 2x1 (odd, k = 5 wider than stage 1's map); 4 QnA blocks + 3 stride-2 blocks
    cfg = QnAViTConfig(embed_dim=8, qna_depths=(1, 1, 1, 1), msa_depths=(0, 1, 0, 1), qna_heads=(2, 4, 8, 16),
                       msa_heads=(1, 2, 4, 8), qna_kernel_sizes=(3, 5, 3, 3), msa_windows=(7, 3, 7, 1), num_classes=7)
    ref = _reference_from_config(cfg, seed)
    with torch.no_grad():
        for mod in ref.modules():
            if isinstance(mod, FusedKQnA):
                mod.proj_k.weight.mul_(WIDE_KEYS)
    model = _engine_from_reference(ref, cfg)
    ref64 = copy.deepcopy(ref).double()
    x = image(seed, 2, 44, 24)
    paths = collections.Counter()
    split_rows = qna.split_rows

    def spy(fn, *args):
        paths[fn.__name__] += 1
        return split_rows(fn, *args)

    monkeypatch.setattr(qna, "split_rows", spy)
    feats = model.forward_features(x)
    assert paths == {"_qna_rows": 7}, paths   # every QnA layer, none on the factored path
    for i, (f, r) in enumerate(zip(feats, torch_run(ref64, x.astype(np.float64), features=True))):
        assert_logits_close(f, r, what=f"stage {i} features", op="features")
    assert_logits_close(model(x), torch_run(ref64, x.astype(np.float64)), what="logits")


# -- every registered variant at full size (numba; the NumPy backend once, on tiny) ----------------------------

def _full_size(name, b, h, w, backend):
    ref = randomize_(qna_vit_reference(name), seed=0)
    model = _engine_from_reference(ref, QNA_VIT_VARIANTS[name], backend)
    x = image(0, b, h, w)
    assert_logits_close(model(x), torch_run(ref, x), what=f"{name} {h}x{w} {backend} logits")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(QNA_VIT_VARIANTS))
def test_variants_full_size(name):
    _full_size(name, 1, 224, 224, "numba")


@pytest.mark.slow
def test_tiny_numpy_backend_odd_sizes():
    # 209x437: stage maps 53x110 -> 27x55 (odd, the stem's 'SAME' padding uneven) -> 14x28 -> 7x14, so stage 2
    # runs 1x2 windows of 14 and stage 3 1x2 windows of 7 (windowed, not global, attention); 2 images
    _full_size("qna_vit_tiny", 2, 209, 437, "numpy")


# -- tensor tables and parameter counts ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,leaves", [
    ("qna_vit_tiny", 15_715_560, 214), ("qna_vit_tiny_7x7", 15_753_960, 214),
    ("qna_vit_small", 24_971_560, 358), ("qna_vit_base", 55_670_008, 358)])
def test_tensor_table_matches_the_reference(name, params, leaves):
    shapes = engine_tensor_shapes(QNA_VIT_VARIANTS[name])
    mapped = engine_tensors(qna_vit_reference(name).state_dict())
    assert {k: v.shape for k, v in mapped.items()} == shapes
    assert (sum(int(np.prod(s)) for s in shapes.values()), len(shapes)) == (params, leaves)   # spec 3.2


# -- input handling ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_model():
    # stage sides of a 32x32 image: 8, 4, 2, 1; MSA in stages 1 (4x4 window) and 3
    cfg = QnAViTConfig(embed_dim=8, qna_depths=(1, 1, 1, 0), msa_depths=(0, 1, 0, 1), qna_heads=(2, 4, 8, 16),
                       msa_heads=(1, 2, 4, 8), msa_windows=(7, 4, 7, 1), num_classes=5)
    ref = _reference_from_config(cfg, 0)
    return _engine_from_reference(ref, cfg), ref


@pytest.mark.parametrize("x,message", BAD_INPUTS + [
    (np.zeros((1, 3, 0, 32), np.float32), "too small"),
    (np.zeros((1, 3, 40, 32), np.float32), r"height 40 gives a stage-1 side of 5, not a multiple of its 4x4.*"
                                           r"heights that work: 25-32, 57-64"),
])
def test_bad_input_is_a_clear_error(small_model, x, message):
    model, _ = small_model
    with pytest.raises(qnalo.InputError, match=message):
        model(x)


def test_official_windows_name_the_sizes_that_work():
    # the official model runs only where ceil(H/16) is a multiple of 14 (spec 3.10): 384 does not
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qnalo.create_model("qna_vit_tiny")
    with pytest.raises(qnalo.InputError, match=r"384x224: height 384 gives a stage-2 side of 24, not a multiple "
                                                r"of its 14x14 .*heights that work: 209-224, 433-448, 657-672"):
        model(np.zeros((1, 3, 384, 224), np.float32))


def test_non_contiguous_input_just_works(small_model):
    model, ref = small_model
    x = image(3, 2, 32, 60)
    check_non_contiguous_input(model, ref, x)


def test_empty_batch(small_model):
    model, _ = small_model
    assert model(np.zeros((0, 3, 32, 32), np.float32)).shape == (0, 5)
    assert [f.shape for f in model.forward_features(np.zeros((0, 3, 32, 32), np.float32))] == [
        (0, 8, 8, 8), (0, 16, 4, 4), (0, 32, 2, 2), (0, 64, 1, 1)]


def test_backbone_has_no_head():
    cfg = QnAViTConfig(embed_dim=4, qna_depths=(0, 0, 0, 0), msa_depths=(0, 0, 0, 0), qna_heads=(1, 2, 4, 8),
                       num_classes=0)
    model = QnAViT(cfg, random_tensors(cfg))
    assert [f.shape for f in model.forward_features(image(0, 1, 9, 9))] == [
        (1, 4, 3, 3), (1, 8, 2, 2), (1, 16, 1, 1), (1, 32, 1, 1)]
    with pytest.raises(qnalo.InputError, match="forward_features"):
        model(image(0, 1, 9, 9))


def test_mismatched_tensors_are_named():
    cfg = QnAViTConfig(embed_dim=4, qna_depths=(1, 0, 0, 0), msa_depths=(0, 0, 0, 1), qna_heads=(1, 2, 4, 8),
                       msa_heads=(1, 1, 1, 2), msa_windows=(7, 7, 7, 1), num_classes=3)
    tensors = random_tensors(cfg)
    del tensors["stages.0.qna.0.attn.q_param"]
    tensors["extra.weight"] = np.zeros(3, np.float32)
    tensors["stages.3.msa.0.attn.rpb_table"] = np.zeros((9, 2), np.float32)
    with pytest.raises(qnalo.CheckpointError, match=r"QnA-ViT.*q_param.*extra\.weight.*rpb_table \(9, 2\)"):
        QnAViT(cfg, tensors)


def test_invalid_configs_are_refused():
    with pytest.raises(ValueError, match="must be odd"):
        QnAViTConfig(qna_kernel_sizes=(4, 3, 3, 3))
    with pytest.raises(ValueError, match="not divisible by 3 QnA heads"):
        QnAViTConfig(qna_heads=(3, 16, 32, 64))


# -- API ---------------------------------------------------------------------------------------------------------

def test_list_models():
    assert {"qna_vit_tiny", "qna_vit_tiny_7x7", "qna_vit_small", "qna_vit_base"} <= set(qnalo.list_models())


def test_create_model_random_init_warns():
    with pytest.warns(UserWarning, match="random weights"):
        model = qnalo.create_model("qna_vit_tiny_7x7")
    assert model.num_parameters == 15_753_960 and model.config == QNA_VIT_VARIANTS["qna_vit_tiny_7x7"]
    with pytest.warns(UserWarning, match="random weights"):
        small = qnalo.create_model("qna_vit_tiny", embed_dim=8, qna_heads=(1, 2, 4, 8), msa_heads=(1, 2, 4, 8),
                                   num_classes=4, backend="numpy")
    assert small(image(0, 1, 224, 224)).shape == (1, 4)


def test_weights_file_round_trip(tmp_path, small_model):
    model, ref = small_model
    tensors = engine_tensors(ref.state_dict())
    path = tmp_path / "small.safetensors"
    save_weights(path, tensors, "qna_vit", model.config.to_dict(), source={"variant": None})
    loaded = qnalo.load(path)
    assert isinstance(loaded, QnAViT) and loaded.config == model.config
    x = image(1, 2, 32, 32)
    np.testing.assert_array_equal(loaded(x), model(x))
    assert_logits_close(qnalo.load(path, backend="numpy")(x), torch_run(ref, x))
    with pytest.raises(qnalo.CheckpointError, match="not of qna_vit_tiny.*embed_dim.*qnalo.load"):
        qnalo.create_model("qna_vit_tiny", weights=path)
    with pytest.raises(qnalo.CheckpointError, match="holds a qna_vit model, not litv2_s"):
        qnalo.create_model("litv2_s", weights=path)


def test_inference_never_imports_torch():
    code = ("import sys, warnings, numpy as np, qnalo; warnings.simplefilter('ignore');"
            "m = qnalo.create_model('qna_vit_tiny', embed_dim=8, qna_heads=(1, 2, 4, 8), msa_heads=(1, 2, 4, 8));"
            "m(np.zeros((1, 3, 224, 224), np.float32)); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_stays_in_its_image(small_model, bad):
    # every op mixes tokens only within one image; the kernels agree with the NumPy reference on where NaN goes
    model, ref = small_model
    check_non_finite_stays_in_its_image(model, QnAViT(model.config, engine_tensors(ref.state_dict()), backend="numpy"),
                                        bad)


def test_runs_with_numba_jit_disabled():
    # NUMBA_DISABLE_JIT=1 (debugging) runs the QnA, MSA and GELU kernels as plain Python; results must not change
    code = ("import warnings, numpy as np, qnalo; warnings.simplefilter('ignore');"
            "kw = dict(embed_dim=4, qna_depths=(1, 0, 0, 0), msa_depths=(0, 0, 0, 1), qna_heads=(2, 2, 4, 8),"
            " msa_heads=(1, 1, 1, 2), msa_windows=(7, 7, 7, 1), num_classes=3);"
            "x = np.random.default_rng(0).random((2, 3, 13, 9), dtype=np.float32);"
            "d = np.abs(qnalo.create_model('qna_vit_tiny', **kw)(x)"
            " - qnalo.create_model('qna_vit_tiny', backend='numpy', **kw)(x));"
            "assert d.max() < 1e-5, d.max()")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "NUMBA_DISABLE_JIT": "1"})
