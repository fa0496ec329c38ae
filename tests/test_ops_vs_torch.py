"""The NumPy reference ops against PyTorch, op by op (the first link of the parity chain; the kernels are
checked against these references in tests/test_kernels_*.py)."""
import numpy as np
import pytest
from hypothesis import example, given, strategies as st

from qnalo.kernels import deform_conv, dwconv_gelu, gelu, layernorm, softmax
from qnalo.models.litv2 import HiLoAttention
from qnalo.models.litv2_config import LITv2Config
from qnalo.models.ops import NUMPY
from tolerances import assert_close

torch = pytest.importorskip("torch")
F = torch.nn.functional
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
    cfg = LITv2Config(embed_dim=dim // 4 if dim % 4 == 0 else dim, num_heads=(1, 1, heads, 1),
                      window_sizes=(0, 0, ws, 1), alpha=alpha, depths=(1, 1, 1, 1)) if dim % 4 == 0 else None
    if cfg is None:
        return  # stage 2 of a LITv2 has 4 * embed_dim channels
    tensors = {f"attn.{k}": (v.detach().numpy().T.copy() if k.endswith("weight") else v.detach().numpy())
               for k, v in module.state_dict().items()}
    attn = HiLoAttention(NUMPY, tensors, "attn.", cfg, 2)
    x = _rand(np.random.default_rng(seed), b, h * w, dim)
    with torch.no_grad():
        ref = module(torch.from_numpy(x), h, w).numpy()
    y, bias = attn(NUMPY, x.reshape(b * h * w, dim), b, h, w)
    # the engine keeps its head outputs in float32 (as in inference), so this link is held to the float32 bound
    assert_close((y + bias).reshape(b, h * w, dim), ref, "attention")
