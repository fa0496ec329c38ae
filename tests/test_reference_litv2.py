"""Checks of the PyTorch LITv2 reference (tests/reference/litv2_torch.py) against the spec's facts."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, strategies as st  # noqa: E402

from reference.litv2_torch import (  # noqa: E402
    HiLo, LITv2, deform_conv2d, deform_conv2d_loop, litv2_reference, official_lo_heads, randomize_)

pytestmark = pytest.mark.torch
F = torch.nn.functional


def _meta(name, **kw):
    with torch.device("meta"):
        return litv2_reference(name, **kw)


def _n_params(model):
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------
# State dict and parameter counts (spec §2.3, §4, Appendix A)
# ------------------------------------------------------------------------------------------------
def _expected_litv2_s_keys():
    """Appendix A, rebuilt from the key pattern of §4.3 in the official (module registration) order."""
    E, depths, keys = 96, (2, 2, 6, 2), []
    keys += [("patch_embed.proj.weight", (E, 3, 4, 4)), ("patch_embed.proj.bias", (E,)),
             ("patch_embed.norm.weight", (E,)), ("patch_embed.norm.bias", (E,))]
    attn = {2: [("l_q", 320, 384), ("l_kv", 640, 384), ("l_proj", 320, 320), ("h_qkv", 192, 384), ("h_proj", 64, 64)],
            3: [("l_q", 768, 768), ("l_kv", 1536, 768), ("l_proj", 768, 768)]}
    for i, d in enumerate(depths):
        C = E * 2 ** i
        for b in range(d):
            p = f"layers.{i}.blocks.{b}."
            if i >= 2:
                keys += [(p + "norm1.weight", (C,)), (p + "norm1.bias", (C,))]
                for name, o, n in attn[i]:
                    keys += [(p + f"attn.{name}.weight", (o, n)), (p + f"attn.{name}.bias", (o,))]
            keys += [(p + "norm2.weight", (C,)), (p + "norm2.bias", (C,)),
                     (p + "mlp.fc1.weight", (4 * C, C)), (p + "mlp.fc1.bias", (4 * C,)),
                     (p + "mlp.dwconv.dwconv.weight", (4 * C, 1, 3, 3)), (p + "mlp.dwconv.dwconv.bias", (4 * C,)),
                     (p + "mlp.fc2.weight", (C, 4 * C)), (p + "mlp.fc2.bias", (C,))]
        if i < 3:
            p = f"layers.{i}.downsample."
            keys += [(p + "dconv.weight", (2 * C, C, 2, 2)), (p + "dconv.bias", (2 * C,)),
                     (p + "dconv.conv_offset.weight", (8, C, 2, 2)), (p + "dconv.conv_offset.bias", (8,))]
            keys += [(p + f"norm_layer.{n}", (2 * C,)) for n in ("weight", "bias", "running_mean", "running_var")]
            keys += [(p + "norm_layer.num_batches_tracked", ())]
    keys += [("norm.weight", (768,)), ("norm.bias", (768,)), ("head.weight", (1000, 768)), ("head.bias", (1000,))]
    return keys


def test_litv2_s_state_dict_is_appendix_a():
    sd = _meta("litv2_s").state_dict()
    got = [(k, tuple(v.shape)) for k, v in sd.items()]
    exp = _expected_litv2_s_keys()
    assert len(exp) == 219
    assert got == exp
    assert sd["layers.0.downsample.norm_layer.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("name,params,entries,bn_stats", [
    ("litv2_s", 27_844_000, 219, 2_688), ("litv2_m", 48_830_368, 459, 2_688),
    ("litv2_b", 86_520_704, 459, 3_584), ("litv2_b_384", 86_520_704, 459, 3_584)])
def test_parameter_counts(name, params, entries, bn_stats):
    m = _meta(name)
    assert _n_params(m) == params
    sd = m.state_dict()
    assert len(sd) == entries
    assert sum(v.numel() for k, v in sd.items() if k.endswith(("running_mean", "running_var"))) == bn_stats


@pytest.mark.parametrize("alpha,params,entries", [
    (0.0, 28_089_760, 183), (0.2, 27_844_000, 219), (0.4, 27_696_544, 219), (0.5, 27_647_392, 219),
    (0.7, 27_696_544, 219), (0.9, 27_844_000, 219), (1.0, 28_089_760, 195)])
def test_alpha_sweep_counts(alpha, params, entries):
    m = _meta("litv2_s", alpha=alpha)
    assert _n_params(m) == params
    assert len(m.state_dict()) == entries
    attn3 = m.layers[3].blocks[0].attn
    assert (attn3.l_heads, attn3.h_heads) == (24, 0)  # ws 1 ignores alpha


@pytest.mark.parametrize("alpha,lo,hi,shapes", [
    (0.0, 0, 12, {"h_qkv": (1152, 384), "h_proj": (384, 384)}),
    (0.2, 2, 10, {"l_q": (64, 384), "l_kv": (128, 384), "l_proj": (64, 64), "h_qkv": (960, 384), "h_proj": (320, 320)}),
    (0.4, 4, 8, {"l_q": (128, 384), "l_kv": (256, 384), "l_proj": (128, 128), "h_qkv": (768, 384),
                 "h_proj": (256, 256)}),
    (0.5, 6, 6, {"l_q": (192, 384), "l_kv": (384, 384), "l_proj": (192, 192), "h_qkv": (576, 384),
                 "h_proj": (192, 192)}),
    (0.7, 8, 4, {"l_q": (256, 384), "l_kv": (512, 384), "l_proj": (256, 256), "h_qkv": (384, 384),
                 "h_proj": (128, 128)}),
    (0.9, 10, 2, {"l_q": (320, 384), "l_kv": (640, 384), "l_proj": (320, 320), "h_qkv": (192, 384), "h_proj": (64, 64)}),
    (1.0, 12, 0, {"l_q": (384, 384), "l_kv": (768, 384), "l_proj": (384, 384)}),
])
def test_alpha_sweep_shapes(alpha, lo, hi, shapes):
    with torch.device("meta"):
        attn = HiLo(384, 12, window_size=2, alpha=alpha)
    assert (attn.l_heads, attn.h_heads) == (lo, hi)
    got = {k[:-len(".weight")]: tuple(v.shape) for k, v in attn.state_dict().items() if k.endswith(".weight")}
    assert got == shapes


@pytest.mark.parametrize("heads,alpha,expected", [
    (12, 0.9, 10), (16, 0.9, 14), (24, 0.9, 21), (3, 0.9, 2), (12, 0.7, 8), (12, 0.5, 6), (32, 0.9, 28)])
def test_head_split_truncates(heads, alpha, expected):
    assert official_lo_heads(heads, 2, alpha) == expected
    with torch.device("meta"):
        attn = HiLo(heads * 32, heads, window_size=2, alpha=alpha)
    assert (attn.l_heads, attn.h_heads) == (expected, heads - expected)
    assert attn.l_q.weight.shape == (expected * 32, heads * 32)


def test_window_size_one_is_all_lofi():
    with torch.device("meta"):
        attn = HiLo(768, 24, window_size=1, alpha=0.3)
    assert (attn.l_heads, attn.h_heads) == (24, 0)
    assert not hasattr(attn, "h_qkv")
    with pytest.raises(ValueError):
        HiLo(768, 24, window_size=1, alpha=0.9, lo_heads=12)


def test_lo_heads_override():
    m = _meta("litv2_s", lo_heads=(0, 0, 6, 24))
    attn = m.layers[2].blocks[0].attn
    assert (attn.l_heads, attn.h_heads) == (6, 6)
    assert _n_params(m) == 27_647_392  # the alpha 0.5 checkpoint


def test_dense_backbone_keys():
    det = _meta("litv2_s", out_norms=(1, 2, 3))
    keys = set(det.state_dict())
    assert {"norm1.weight", "norm2.bias", "norm3.weight"} <= keys
    assert not {"norm0.weight", "norm.weight", "head.weight"} & keys
    seg = _meta("litv2_s", out_norms=(0, 1, 2, 3))
    assert "norm0.weight" in seg.state_dict()


# ------------------------------------------------------------------------------------------------
# HiLo FLOPs (spec §2.8)
# ------------------------------------------------------------------------------------------------
def test_hilo_flops():
    with torch.device("meta"):
        demo = HiLo(384, 12, window_size=2, alpha=0.5)
        big = HiLo(768, 12, window_size=2, alpha=0.9)
    assert demo.flops(14, 14) == 83_467_776
    assert big.flops(14, 14) == 298_296_320
    assert _n_params(big) == 2_198_528


# ------------------------------------------------------------------------------------------------
# Deformable convolution (spec §3.7.1)
# ------------------------------------------------------------------------------------------------
@given(B=st.integers(1, 2), C=st.integers(1, 3), O=st.integers(1, 3), H=st.integers(2, 7), W=st.integers(2, 7),
       scale=st.sampled_from([0.0, 0.5, 1.5, 3.0]), seed=st.integers(0, 2 ** 31 - 1),
       integral=st.booleans())
def test_deform_conv2d_matches_scalar_loop(B, C, O, H, W, scale, seed, integral):
    g = torch.Generator().manual_seed(seed)
    Ho, Wo = H // 2, W // 2
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    off = torch.randn(B, 8, Ho, Wo, generator=g, dtype=torch.float64) * scale
    if integral:  # exact integer / half-integer positions exercise the floor and the band edges
        off = torch.round(off * 2) / 2
    w = torch.randn(O, C, 2, 2, generator=g, dtype=torch.float64)
    b = torch.randn(O, generator=g, dtype=torch.float64)
    ref = deform_conv2d_loop(x, off, w, b)
    out = deform_conv2d(x, off, w, b)
    assert out.shape == (B, O, Ho, Wo)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)
    out32 = deform_conv2d(x.float(), off.float(), w.float(), b.float())
    ref32 = deform_conv2d_loop(x.float(), off.float(), w.float(), b.float())
    np.testing.assert_allclose(out32.numpy(), ref32.numpy(), rtol=1e-5, atol=1e-5)


def test_deform_conv2d_border_band():
    """A sample at y = -1 (or H) is dropped entirely; one just inside sees only its in-image corners."""
    x = torch.arange(1.0, 17.0, dtype=torch.float64).reshape(1, 1, 4, 4)
    w = torch.zeros(1, 1, 2, 2, dtype=torch.float64)
    w[0, 0, 0, 0] = 1.0  # only tap (0, 0), base position (2ho, 2wo)
    off = torch.zeros(1, 8, 2, 2, dtype=torch.float64)
    off[0, 0, 0, 0] = -1.0            # (0,0): y = -1        -> 0
    off[0, 0, 0, 1] = -0.5            # (0,1): y = -0.5, x=2 -> 0.5 * x[0, 2]
    off[0, 1, 1, 0] = 1.75            # (1,0): y = 2, x = 1.75 -> 0.25*x[2,1] + 0.75*x[2,2]
    off[0, 1, 1, 1] = 1.5             # (1,1): y = 2, x = 3.5 -> 0.5 * x[2,3] (x=4 outside)
    out = deform_conv2d(x, off, w, None)[0, 0]
    img = x[0, 0]
    exp = torch.tensor([[0.0, 0.5 * img[0, 2]],
                        [0.25 * img[2, 1] + 0.75 * img[2, 2], 0.5 * img[2, 3]]], dtype=torch.float64)
    torch.testing.assert_close(out, exp, rtol=0, atol=1e-14)
    off[0, 1, 1, 1] = 2.0             # x = 4 == W -> outside the band -> 0
    assert deform_conv2d(x, off, w, None)[0, 0, 1, 1] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("H,W", [(8, 8), (7, 9), (14, 14)])
def test_deform_conv2d_zero_offsets_is_conv(dtype, H, W):
    g = torch.Generator().manual_seed(H * W)
    x = torch.randn(2, 6, H, W, generator=g).to(dtype)
    w = torch.randn(5, 6, 2, 2, generator=g).to(dtype)
    b = torch.randn(5, generator=g).to(dtype)
    off = torch.zeros(2, 8, H // 2, W // 2, dtype=dtype)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(deform_conv2d(x, off, w, b), F.conv2d(x, w, b, stride=2), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------------
# HiLo layouts, cross-checked with an independent SDPA formulation
# ------------------------------------------------------------------------------------------------
def _mha(q, k, v, heads):
    B, N, D = q.shape
    hd = D // heads
    split = lambda t: t.reshape(B, t.shape[1], heads, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return o.transpose(1, 2).reshape(B, N, D)


def test_hilo_ws1_is_global_mha():
    g = torch.Generator().manual_seed(0)
    attn = randomize_(HiLo(64, 4, window_size=1), seed=3).double()
    x = torch.randn(2, 15, 64, generator=g, dtype=torch.float64)
    k, v = attn.l_kv(x).chunk(2, dim=-1)
    exp = attn.l_proj(_mha(attn.l_q(x), k, v, 4))
    torch.testing.assert_close(attn(x, 3, 5), exp, rtol=1e-12, atol=1e-12)


def test_hilo_split_and_padding():
    """[Hi-Fi | Lo-Fi] channel order; padded windows/pools behave as explicit zero tokens."""
    g = torch.Generator().manual_seed(1)
    dim, heads, ws, H, W = 64, 4, 2, 5, 3
    attn = randomize_(HiLo(dim, heads, window_size=ws, alpha=0.5), seed=4).double()
    x = torch.randn(1, H * W, dim, generator=g, dtype=torch.float64)
    out = attn(x, H, W)
    Hp, Wp = 6, 4
    xp = F.pad(x.reshape(1, H, W, dim), (0, 0, 0, Wp - W, 0, Hp - H))       # zero tokens bottom/right
    # Hi-Fi: attention inside each 2x2 window of the padded map
    hi = torch.zeros(1, Hp, Wp, attn.h_dim, dtype=torch.float64)
    for r in range(0, Hp, ws):
        for c in range(0, Wp, ws):
            t = xp[:, r:r + ws, c:c + ws].reshape(1, ws * ws, dim)
            q, k, v = attn.h_qkv(t).chunk(3, dim=-1)
            hi[:, r:r + ws, c:c + ws] = attn.h_proj(_mha(q, k, v, attn.h_heads)).reshape(1, ws, ws, -1)
    # Lo-Fi: queries from every padded token, keys/values from the 2x2 means (zeros included)
    pooled = xp.reshape(1, Hp // ws, ws, Wp // ws, ws, dim).mean(dim=(2, 4)).reshape(1, -1, dim)
    k, v = attn.l_kv(pooled).chunk(2, dim=-1)
    q = attn.l_q(xp.reshape(1, Hp * Wp, dim))
    lo = attn.l_proj(_mha(q, k, v, attn.l_heads)).reshape(1, Hp, Wp, -1)
    exp = torch.cat([hi[:, :H, :W], lo[:, :H, :W]], dim=-1).reshape(1, H * W, dim)
    torch.testing.assert_close(out, exp, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Whole model
# ------------------------------------------------------------------------------------------------
def test_randomize_is_deterministic_and_dtype_independent():
    a = randomize_(LITv2(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)), seed=7)
    b = randomize_(LITv2(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)).double(), seed=7)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        if va.is_floating_point():
            assert torch.equal(va.double(), vb), k
    bn = a.layers[0].downsample.norm_layer
    assert (bn.running_var > 0).all() and bn.running_mean.abs().min() > 0
    assert all(p.abs().min() > 0 for n, p in a.named_parameters() if n.endswith("bias"))


def test_forward_shapes_and_head():
    m = randomize_(litv2_reference("litv2_s"), seed=0)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = m.forward_features(x)
        logits = m(x)
        tokens = feats[3].flatten(2).transpose(1, 2)
        torch.testing.assert_close(logits, m.head(m.norm(tokens).mean(1)))
    assert [tuple(f.shape) for f in feats] == [(2, 96, 56, 56), (2, 192, 28, 28), (2, 384, 14, 14), (2, 768, 7, 7)]
    assert logits.shape == (2, 1000) and torch.isfinite(logits).all() and logits.std() > 0.1


def test_float32_close_to_float64():
    m = randomize_(LITv2(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)), seed=2)
    m64 = randomize_(LITv2(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8)), seed=2).double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        y32, y64 = m(x), m64(x.double())
    assert (y32.double() - y64).abs().max() <= 1e-4 * max(1.0, y64.abs().max().item())


@pytest.mark.parametrize("size,maps", [
    ((225, 230), [(57, 58), (28, 29), (14, 14), (7, 7)]),
    ((250, 333), [(63, 84), (31, 42), (15, 21), (7, 10)])])
def test_dense_sizes(size, maps):
    m = randomize_(LITv2(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4), out_norms=(1, 2, 3)), seed=0)
    with torch.inference_mode():
        feats = m.forward_features(torch.randn(1, 3, *size))
    assert [tuple(f.shape[2:]) for f in feats] == maps
    assert [f.shape[1] for f in feats] == [16, 32, 64, 128]
    with pytest.raises(RuntimeError):
        m(torch.randn(1, 3, 64, 64))


def test_dense_norms_applied_except_stage0():
    cls = randomize_(LITv2(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4)), seed=5)
    det = LITv2(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4), out_norms=(1, 2, 3))
    det.load_state_dict({k: v for k, v in cls.state_dict().items() if not k.startswith(("norm.", "head."))},
                        strict=False)
    randomize_(det.norm1, seed=1), randomize_(det.norm2, seed=2), randomize_(det.norm3, seed=3)
    x = torch.randn(1, 3, 64, 48)
    with torch.inference_mode():
        raw, dense = cls.forward_features(x), det.forward_features(x)
        torch.testing.assert_close(dense[0], raw[0])
        for i in (1, 2, 3):
            norm = getattr(det, f"norm{i}")
            exp = norm(raw[i].flatten(2).transpose(1, 2)).transpose(1, 2).reshape(raw[i].shape)
            torch.testing.assert_close(dense[i], exp)


def test_offsets_cross_the_border():
    """randomize_'s offset convs move a good share of the DTM samples over the image border."""
    m = randomize_(litv2_reference("litv2_s"), seed=0)
    seen = []

    def hook(mod, inp, out):
        x = inp[0]
        H, W = x.shape[2:]
        Ho, Wo = out.shape[2:]
        y = (torch.arange(Ho) * 2.0).reshape(1, 1, Ho, 1) + torch.tensor([0, 0, 1, 1.0]).reshape(1, 4, 1, 1)
        xx = (torch.arange(Wo) * 2.0).reshape(1, 1, 1, Wo) + torch.tensor([0, 1, 0, 1.0]).reshape(1, 4, 1, 1)
        y, xx = y + out[:, 0::2], xx + out[:, 1::2]
        seen.append(((y < 0) | (y > H - 1) | (xx < 0) | (xx > W - 1)).double().mean().item())

    for layer in m.layers[:3]:
        layer.downsample.dconv.conv_offset.register_forward_hook(hook)
    with torch.inference_mode():
        m(torch.randn(1, 3, 224, 224))
    assert len(seen) == 3 and all(0.02 < s < 0.9 for s in seen), seen
    assert math.isfinite(sum(seen))


def test_window_size_4_pads_inside_hilo():
    """The *_ws_4 detection configs: layers.2 maps that are not multiples of 4 are padded, outputs keep H, W."""
    m = randomize_(LITv2(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4), window_sizes=(0, 0, 4, 1),
                         out_norms=(1, 2, 3)), seed=0)
    attn = m.layers[2].blocks[0].attn
    assert (attn.ws, attn.l_heads, attn.h_heads) == (4, 1, 1)
    with torch.inference_mode():
        feats = m.forward_features(torch.randn(1, 3, 250, 333))
    assert tuple(feats[2].shape[2:]) == (15, 21) and torch.isfinite(feats[3]).all()
