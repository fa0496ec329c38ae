"""The NumPy reference ops against PyTorch, op by op (the first link of the parity chain; the kernels are
checked against these references in tests/test_kernels_*.py)."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from qnalo.kernels import deform_conv, dwconv_gelu, gelu, layernorm, softmax, window_msa
from qnalo.models import litv2 as litv2_engine, qna_vit as qna_vit_engine
from qnalo.models.litv2 import HiLoAttention
from qnalo.models.ops import NUMBA, NUMPY
from tolerances import assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional
from reference import litv2_torch, qna_vit_torch  # noqa: E402
from reference.litv2_torch import HiLo, deform_conv2d, randomize_  # noqa: E402

seeds = st.integers(0, 2**31 - 1)


def _rand(rng, *shape, scale=1.0):
    return rng.standard_normal(shape) * scale


@given(seed=seeds, n=st.integers(1, 40), c=st.integers(1, 100))
def test_layernorm(seed, n, c):
    rng = np.random.default_rng(seed)
    x, w, b = _rand(rng, n, c, scale=3.0), _rand(rng, c), _rand(rng, c)
    ref = F.layer_norm(torch.from_numpy(x), (c,), torch.from_numpy(w), torch.from_numpy(b), 1e-5).numpy()
    assert_close(layernorm.layernorm_ref(x, w, b, 1e-5), ref, "any", "float64")


# The LayerNorm eps each engine model passes to its ops, and the one its PyTorch reference's LayerNorms use
MODEL_LN_EPS = {"litv2": (litv2_engine.LN_EPS, litv2_torch.LN_EPS),
                "qna_vit": (qna_vit_engine.LN_EPS, qna_vit_torch.LN_EPS)}


@pytest.mark.torch
@given(seed=seeds, n=st.integers(1, 40), c=st.integers(2, 100), model=st.sampled_from(sorted(MODEL_LN_EPS)),
       var_over_eps=st.floats(0.01, 100.0), backend=st.sampled_from(["numpy", "numba"]))
@example(seed=0, n=56, c=96, model="litv2", var_over_eps=1.0, backend="numba")         # LITv2-S stage 0 rows
@example(seed=1, n=49, c=768, model="litv2", var_over_eps=0.01, backend="numpy")       # stage 3
@example(seed=2, n=56, c=64, model="qna_vit", var_over_eps=1.0, backend="numba")       # QnA-ViT-Tiny stage 0
@example(seed=3, n=196, c=256, model="qna_vit", var_over_eps=100.0, backend="numpy")   # stage 2
def test_layernorm_where_eps_matters(torch, seed, n, c, model, var_over_eps, backend):
    """Each backend's layernorm and residual_add_layernorm, called with the eps the model passes, against
    torch's layer_norm with its reference's eps, on rows whose variance lies within 100x of that eps either way
    (row means ~ N(0, 0.1^2): 3 to 1000 standard deviations off zero): there the eps is a sizeable part of the
    denominator, and an eps 10x off scales the normalised values by 1.0045 (LITv2, variance 100 eps) to ~3x."""
    engine_eps, torch_eps = MODEL_LN_EPS[model]
    rng = np.random.default_rng(seed)
    dtype = np.float64 if backend == "numpy" else np.float32
    ops = NUMPY if backend == "numpy" else NUMBA
    std = np.sqrt(var_over_eps * torch_eps / 3)   # x, y and bias each: their sum has variance var_over_eps * eps
    x = (_rand(rng, n, c, scale=std) + _rand(rng, n, 1, scale=0.1)).astype(dtype)
    y, bias = _rand(rng, n, c, scale=std).astype(dtype), _rand(rng, c, scale=std).astype(dtype)
    w, b = (1.0 + _rand(rng, c, scale=0.1)).astype(dtype), _rand(rng, c, scale=0.1).astype(dtype)

    def torch_ln(rows):
        t = [torch.from_numpy(np.asarray(a, np.float64)) for a in (rows, w, b)]
        return torch.nn.functional.layer_norm(t[0], (c,), t[1], t[2], torch_eps).numpy()

    # NumPy reference in float64: the float64 bar; the Numba kernel (float32 only) against torch in float64 on
    # the same float32 inputs: the kernel's own bar (its float32 rounding of the output is all that differs)
    op, dt = ("any", "float64") if backend == "numpy" else ("layernorm", "float32")
    assert_close(ops.layernorm(x, w, b, engine_eps, np.empty_like(x)), torch_ln(x), op, dt,
                 what=f"{backend} layernorm, {model}")
    out = ops.residual_add_layernorm(x, y, bias, w, b, engine_eps, np.empty_like(x))   # x += y + bias in place
    assert_close(out, torch_ln(x), op, dt, what=f"{backend} residual_add_layernorm, {model}")


def test_gelu_is_torch_exact_gelu():
    x = np.linspace(-10, 10, 20001)
    assert_close(gelu.gelu_ref(x), F.gelu(torch.from_numpy(x)).numpy(), "any", "float64")


@given(seed=seeds, b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), c=st.integers(1, 12))
@example(seed=0, b=1, h=14, w=14, c=48)
def test_dwconv3x3_gelu(seed, b, h, w, c):
    rng = np.random.default_rng(seed)
    hidden, pre_bias, weight, bias = _rand(rng, b, h, w, c), _rand(rng, c), _rand(rng, c, 1, 3, 3), _rand(rng, c)
    t = torch.from_numpy((hidden + pre_bias).transpose(0, 3, 1, 2).copy())
    ref = F.gelu(F.conv2d(t, torch.from_numpy(weight), torch.from_numpy(bias), padding=1, groups=c))
    out = dwconv_gelu.dwconv3x3_gelu_ref(hidden, pre_bias, weight[:, 0].transpose(1, 2, 0), bias)
    assert_close(out, ref.numpy().transpose(0, 2, 3, 1), "any", "float64")


@given(seed=seeds, b=st.integers(1, 3), h=st.integers(2, 11), w=st.integers(2, 11), c=st.integers(1, 6),
       offset_scale=st.sampled_from([0.5, 2.0, 8.0]))
@example(seed=0, b=2, h=9, w=7, c=3, offset_scale=8.0)
def test_deformable_conv(seed, b, h, w, c, offset_scale):
    rng = np.random.default_rng(seed)
    x = _rand(rng, b, c, h, w)
    offsets = _rand(rng, b, 8, h // 2, w // 2, scale=offset_scale)
    weight, bias = _rand(rng, 2 * c, c, 2, 2), _rand(rng, 2 * c)
    ref = deform_conv2d(*(torch.from_numpy(a) for a in (x, offsets, weight, bias))).numpy()
    cols = deform_conv.deform_sample_ref(x.transpose(0, 2, 3, 1).copy(), offsets.transpose(0, 2, 3, 1).copy())
    engine_weight = weight.transpose(2, 3, 1, 0).reshape(4 * c, 2 * c)   # docs/format.md
    out = cols.reshape(-1, 4 * c) @ engine_weight + bias
    assert_close(out.reshape(b, h // 2, w // 2, 2 * c), ref.transpose(0, 2, 3, 1), "any", "float64")


@given(seed=seeds, rows=st.integers(1, 30), m=st.integers(1, 60))
def test_scaled_softmax(seed, rows, m):
    s = _rand(np.random.default_rng(seed), rows, m, scale=5.0)
    ref = torch.softmax(torch.from_numpy(s) * 0.3, dim=-1).numpy()
    assert_close(softmax.scaled_softmax_rows_ref(s.copy(), 0.3), ref, "any", "float64")


@given(seed=seeds, heads=st.integers(1, 4), head_dim=st.sampled_from([4, 8]), ws=st.integers(1, 4),
       alpha=st.sampled_from([0.0, 0.5, 0.9, 1.0]), b=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9))
@example(seed=0, heads=12, head_dim=32, ws=2, alpha=0.9, b=1, h=14, w=14)   # LITv2-S layers.2
@example(seed=1, heads=24, head_dim=32, ws=1, alpha=0.9, b=1, h=7, w=7)    # layers.3
@example(seed=2, heads=4, head_dim=8, ws=2, alpha=0.5, b=2, h=15, w=21)    # padded windows
def test_hilo_attention(seed, heads, head_dim, ws, alpha, b, h, w):
    dim = heads * head_dim
    module = randomize_(HiLo(dim, heads, window_size=ws, alpha=alpha).double(), seed=seed)
    tensors = {f"attn.{k}": (v.detach().numpy().T.copy() if k.endswith("weight") else v.detach().numpy())
               for k, v in module.state_dict().items()}
    attn = HiLoAttention(NUMPY, tensors, "attn.", head_dim, module.h_heads, module.l_heads, ws)
    x = _rand(np.random.default_rng(seed), b, h * w, dim)
    with torch.no_grad():
        ref = module(torch.from_numpy(x), h, w).numpy()
    y, bias = attn(NUMPY, x.reshape(b * h * w, dim), b, h, w)
    # the engine keeps its head outputs in float32 (as in inference), so this link is held to the float32 bound
    assert_close((y + bias).reshape(b, h * w, dim), ref, "attention")


@pytest.mark.torch
@given(seed=seeds, b=st.integers(1, 3), gh=st.integers(1, 3), gw=st.integers(1, 3), ws=st.integers(1, 7),
       heads=st.integers(1, 4), hd=st.integers(1, 9), logit_scale=st.sampled_from([1.0, 4.0]))
@example(seed=0, b=1, gh=1, gw=1, ws=14, heads=8, hd=32, logit_scale=1.0)    # QnA-ViT-Tiny stage 2 at 224 (14x14)
@example(seed=1, b=2, gh=1, gw=1, ws=7, heads=16, hd=32, logit_scale=1.0)    # stage 3 at 224 (7x7)
@example(seed=2, b=1, gh=1, gw=2, ws=14, heads=8, hd=32, logit_scale=1.0)    # stage 2 at 209x437: 14x28, 1x2 windows
@example(seed=3, b=1, gh=1, gw=2, ws=7, heads=16, hd=32, logit_scale=4.0)    # stage 3 at 209x437: 7x14
def test_window_msa(torch, seed, b, gh, gw, ws, heads, hd, logit_scale):
    """window_msa_ref with the engine's relative_bias gather (qkv and proj around it, as the engine's MSA block
    runs them) against the QnA-ViT reference's WindowMSA module on the map split into windows as its Stage
    splits it: relative position bias table ~ N(0, 1), qkv weights times logit_scale (logits ~ logit_scale^2)."""
    dim = heads * hd
    module = qna_vit_torch.randomize_(qna_vit_torch.WindowMSA(dim, heads, ws).double(), seed=seed)
    with torch.no_grad():
        module.qkv.weight.mul_(logit_scale)
    wqkv, wproj, table = (p.detach().numpy() for p in (module.qkv.weight, module.proj.weight, module.rpb_table))
    x = _rand(np.random.default_rng(seed), b, gh * ws, gw * ws, dim)
    qkv = (x.reshape(-1, dim) @ wqkv.T).reshape(b, gh * ws, gw * ws, 3 * dim)
    out = window_msa.window_msa_ref(qkv, window_msa.relative_bias(table, ws), ws, heads, np.empty_like(x))
    out = (out.reshape(-1, dim) @ wproj.T).reshape(x.shape)
    windows = torch.from_numpy(x).reshape(b, gh, ws, gw, ws, dim).transpose(2, 3).reshape(-1, ws * ws, dim)
    with torch.no_grad():
        ref = module(windows).reshape(b, gh, gw, ws, ws, dim).transpose(2, 3).reshape(x.shape).numpy()
    assert_close(out, ref, "any", "float64")


@pytest.mark.torch
def test_window_msa_refuses_a_map_that_is_not_a_multiple_of_the_window(torch):
    # both sides refuse rather than run windows that overhang the map (the official LSAStage asserts too)
    stage = qna_vit_torch.Stage(8, 1, 0, 2, 2, 3, 3, 2, downsample=False)
    with pytest.raises(AssertionError, match="not divisible by the window 3"):
        stage(torch.zeros(1, 6, 7, 8))
    with pytest.raises(ValueError, match="window 3"):
        window_msa.window_msa_ref(np.zeros((1, 6, 7, 24)), np.zeros((2, 9, 9)), 3, 2, np.empty((1, 6, 7, 8)))
