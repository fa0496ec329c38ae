"""qnalo.layers against the official layers: HiLo, DTM and QnA's PyTorch layout against the PyTorch references
that carry the official names (tests/reference), QnA and the window MSA from Flax parameter trees against a
float64 NumPy transcription of the official Flax forward (exponentials of raw logits, the two grouped
convolutions, biases of use_bias=True), on the kernels and on the NumPy reference backend, and on the CUDA
emulator. The bar is the issue's: max |delta| <= 1e-4 * max(1, max|ref|) ("layer" in the tolerance table)."""
import math

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from qnalo.errors import CheckpointError, InputError
from qnalo.layers import DTM, QnA, HiLo, WindowMSA
from qnalo.testing import HiLoCase, QnACase, assert_parity, hilo_configs, qna_configs

BACKENDS = ("numba", "numpy")


def assert_layer_close(actual, ref, what):
    assert_parity(actual, ref, "layer", what=what)   # scaled by max(1, max|ref|)


# -- an independent transcription of the official Flax forwards, in float64 ----------------------------------

def flax_qna(params, x, heads, k, stride):
    """FusedKQnA.__call__ (moabarar/qna layers/qna.py) as its code computes it: exp of the raw logits, the
    numerator and denominator as zero-padded depthwise correlations with exp(rpe) (* attn_scale), their ratio
    summed over the queries, then to_out."""
    x = np.asarray(x, np.float64)
    b, h, w, c = x.shape
    wk = params["Wk"].astype(np.float64)
    f = wk.shape[1]
    d = f // heads
    q = params["query"].astype(np.float64).reshape(-1, heads, d)
    nq = q.shape[0]
    q = q / (np.linalg.norm(q, axis=-1, keepdims=True) + 1e-6) / math.sqrt(d)
    logits = np.einsum("bhwc,cnd,qnd->bhwqn", x, wk.reshape(c, heads, d), q)
    if "Wk_b" in params:
        logits = logits + np.einsum("nd,qnd->qn", params["Wk_b"].astype(np.float64), q)
    v = x @ params["to_v"]["kernel"].astype(np.float64) + params["to_v"].get("bias", 0.0)
    e = np.exp(logits)                                                     # (B, H, W, nq, h)
    ev = e[..., None] * v.reshape(b, h, w, 1, heads, d)                    # (B, H, W, nq, h, d)
    rpe = np.exp(params["rpe_bias"].astype(np.float64)).reshape(k, k, nq, heads)
    scale = params["attn_scale_weights"].astype(np.float64).reshape(k, k, nq, heads)
    p = (k - 1) // 2
    ho, wo = (h + 2 * p - k) // stride + 1, (w + 2 * p - k) // stride + 1
    e_pad = np.pad(e, ((0, 0), (p, p), (p, p), (0, 0), (0, 0)))
    ev_pad = np.pad(ev, ((0, 0), (p, p), (p, p), (0, 0), (0, 0), (0, 0)))
    num = np.zeros((b, ho, wo, nq, heads, d))
    den = np.zeros((b, ho, wo, nq, heads))
    for a in range(k):
        for bb in range(k):
            rows, cols = slice(a, a + stride * (ho - 1) + 1, stride), slice(bb, bb + stride * (wo - 1) + 1, stride)
            num += ev_pad[:, rows, cols] * (rpe[a, bb] * scale[a, bb])[..., None]
            den += e_pad[:, rows, cols] * rpe[a, bb]
    out = (num / den[..., None]).sum(axis=3).reshape(b, ho, wo, f)
    return out @ params["to_out"]["kernel"].astype(np.float64) + params["to_out"].get("bias", 0.0)


def flax_msa(params, windows, heads, window):
    """MultiHeadSelfAttention.__call__ with its RelativePositionalEmbedding on (B', w*w, C) windows: to_qkv
    reshaped per head to [q | k | v], q.k / sqrt(d) + the Swin relative bias, softmax, to_out."""
    x = np.asarray(windows, np.float64)
    bw, n, c = x.shape
    d = c // heads
    qkv = (x @ params["to_qkv"]["kernel"] + params["to_qkv"].get("bias", 0.0)).reshape(bw, n, heads, 3 * d)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:]
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    rel = coords[:, :, None] - coords[:, None, :] + window - 1
    index = rel[0] * (2 * window - 1) + rel[1]
    bias = params["RelativePositionalEmbedding_0"]["rpe_bias"].astype(np.float64)[index].transpose(2, 0, 1)
    scores = np.einsum("bqhd,bkhd->bhqk", q / math.sqrt(d), k) + bias
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    attn = scores / scores.sum(axis=-1, keepdims=True)
    out = np.einsum("bhqk,bkhd->bqhd", attn, v).reshape(bw, n, c)
    return out @ params["to_out"]["kernel"] + params["to_out"].get("bias", 0.0)


# -- QnA ---------------------------------------------------------------------------------------------------------

REAL_QNA = [QnACase(64, 64, 8, 3, 1, 2, False, 1, 56, 56, 1),      # QnA-ViT-Tiny stage 0
            QnACase(64, 128, 16, 3, 2, 2, False, 1, 56, 56, 2),    # its stride-2 layer
            QnACase(128, 128, 16, 7, 1, 2, False, 1, 28, 28, 3),   # tiny_7x7 stage 1
            QnACase(5, 8, 2, 7, 2, 2, True, 2, 3, 1, 4)]           # a map smaller than the window, biases


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=qna_configs())
@settings(max_examples=15)
@example(case=REAL_QNA[0])
@example(case=REAL_QNA[1])
@example(case=REAL_QNA[2])
@example(case=REAL_QNA[3])
def test_qna_from_flax_matches_the_official_forward(backend, case):
    layer = case.layer(backend=backend)
    out = layer(case.input())
    ho = -(-case.height // case.stride)
    assert out.shape == (case.batch, ho, -(-case.width // case.stride), case.features) and out.dtype == np.float32
    assert_layer_close(out, flax_qna(case.flax_params(), case.input(), case.num_heads, case.window_size, case.stride),
                       f"QnA {case}")


def test_qna_from_flax_takes_a_variables_dict_flat_paths_and_counts_parameters():
    case = QnACase(6, 8, 2, 3, 1, 2, True, 1, 5, 4, 7)
    tree = case.flax_params()
    flat = {"to_v/kernel": tree["to_v"]["kernel"], "to_v/bias": tree["to_v"]["bias"],
            "to_out/kernel": tree["to_out"]["kernel"], "to_out/bias": tree["to_out"]["bias"],
            **{k: v for k, v in tree.items() if not isinstance(v, dict)}}
    x = case.input()
    ref = case.layer()(x)
    np.testing.assert_array_equal(QnA.from_flax({"params": tree}, 2, 3, 1)(x), ref)
    np.testing.assert_array_equal(QnA.from_flax(flat, 2, 3, 1)(x), ref)
    assert QnA.from_flax(tree, 2, 3, 1).num_parameters == sum(v.size for v in flat.values())


def test_qna_key_bias_only_shifts_logits():
    # Wk_b adds q.Wk_b to every logit of a (query, head): the softmax cancels it, as in the official forward
    case = QnACase(6, 8, 2, 3, 1, 2, True, 1, 5, 4, 7)
    tree = case.flax_params()
    without = {**tree, "Wk_b": np.zeros_like(tree["Wk_b"])}
    assert_parity(QnA.from_flax(tree, 2, 3, 1)(case.input()), QnA.from_flax(without, 2, 3, 1)(case.input()), "qna")


@pytest.mark.torch
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=qna_configs())
@settings(max_examples=10)
@example(case=REAL_QNA[1])
def test_qna_from_state_dict_matches_the_pytorch_layout_reference(torch, backend, case):
    from reference.qna_torch import FusedKQnA
    case = QnACase(**{**case.__dict__, "use_bias": False})          # the PyTorch layout has no biases
    module = FusedKQnA(case.in_channels, case.features, case.num_heads, case.window_size, case.stride,
                       case.n_queries).double()
    tree = case.flax_params()
    sd = {"proj_k.weight": tree["Wk"].T, "proj_v.weight": tree["to_v"]["kernel"].T,
          "proj_out.weight": tree["to_out"]["kernel"].T[:, :, None, None], "q_param": tree["query"],
          "attn_scale": tree["attn_scale_weights"], "rpb_table": tree["rpe_bias"]}
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v, np.float64)) for k, v in sd.items()})
    layer = QnA.from_state_dict(module.state_dict(), case.num_heads, case.window_size, case.stride, case.n_queries,
                                backend=backend)
    x = case.input()
    with torch.no_grad():
        ref = module(torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    assert_layer_close(layer(x), ref, f"QnA.from_state_dict {case}")


def test_qna_says_what_does_not_fit():
    tree = QnACase(6, 8, 2, 3, 1, 2, False, 1, 5, 4, 7).flax_params()
    with pytest.raises(CheckpointError, match=r"n_queries=2, window_size=5, num_heads=2"):
        QnA.from_flax(tree, 2, 5, 1)
    with pytest.raises(CheckpointError, match=r"no 'Wk'.*FusedKQnA_0"):
        QnA.from_flax({"FusedKQnA_0": tree}, 2, 3, 1)
    with pytest.raises(CheckpointError, match="wrong shapes: to_v/kernel"):
        QnA.from_flax({**tree, "to_v": {"kernel": tree["to_v"]["kernel"][:, :4]}}, 2, 3, 1)
    with pytest.raises(CheckpointError, match="to_out/bias"):    # use_bias=True has all three biases
        QnA.from_flax({**tree, "Wk_b": np.zeros((2, 4), np.float32)}, 2, 3, 1)
    layer = QnA.from_flax(tree, 2, 3, 1)
    with pytest.raises(InputError, match="looks NCHW"):
        layer(np.zeros((1, 6, 5, 5), np.float32))
    with pytest.raises(InputError, match="floating-point"):
        layer(np.zeros((1, 5, 5, 6), np.int64))


# -- HiLo --------------------------------------------------------------------------------------------------------

REAL_HILO = [HiLoCase(384, 12, 2, 0.9, True, 1, 14, 14, 1),     # LITv2-S layers.2 at 224
             HiLoCase(768, 24, 1, 0.9, True, 1, 7, 7, 2),       # layers.3: global MSA
             HiLoCase(512, 16, 2, 0.9, True, 2, 15, 21, 3),     # LITv2-B layers.2, odd sizes: padded windows
             HiLoCase(64, 2, 4, 0.5, False, 1, 3, 2, 4)]        # a map smaller than the window, no qkv bias


def torch_hilo(torch, case):
    from reference.litv2_torch import HiLo as TorchHiLo
    module = TorchHiLo(case.dim, case.num_heads, window_size=case.window_size, alpha=case.alpha,
                       qkv_bias=case.qkv_bias).double()
    module.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in case.state_dict().items()})
    return module


@pytest.mark.torch
@pytest.mark.parametrize("backend", BACKENDS)
@given(case=hilo_configs())
@settings(max_examples=15)
@example(case=REAL_HILO[0])
@example(case=REAL_HILO[1])
@example(case=REAL_HILO[2])
@example(case=REAL_HILO[3])
def test_hilo_from_state_dict_matches_the_official_module(torch, backend, case):
    module = torch_hilo(torch, case)
    layer = HiLo.from_state_dict(module.state_dict(), case.dim, case.num_heads, case.window_size, case.alpha,
                                 qkv_bias=case.qkv_bias, backend=backend)
    x = case.input()
    with torch.no_grad():
        ref = module(torch.from_numpy(x.astype(np.float64)), case.height, case.width).numpy()
    out = layer(x, case.height, case.width)
    assert out.shape == x.shape and out.dtype == np.float32
    assert_layer_close(out, ref, f"HiLo {case}")
    assert layer.num_parameters == sum(p.numel() for p in module.parameters())


def test_hilo_heads_follow_the_official_truncation():
    # int(heads * alpha) on the float64 product: 12 * 0.7 = 8.3999... -> 8; ws 1 makes every head Lo-Fi
    assert (HiLo.random(384, 12, 2, 0.7).lo_heads, HiLo.random(384, 12, 1, 0.0).lo_heads) == (8, 12)
    assert HiLo.random(96, 3, 2, 0.9).hi_heads == 1


def test_hilo_says_what_does_not_fit():
    sd = HiLo.random_state_dict(64, 2, 2, 0.5, qkv_bias=False)
    with pytest.raises(CheckpointError, match="pass qkv_bias=False"):
        HiLo.from_state_dict(sd, 64, 2, 2, 0.5)
    with pytest.raises(CheckpointError, match="pass qkv_bias=True"):
        HiLo.from_state_dict(HiLo.random_state_dict(64, 2, 2, 0.5), 64, 2, 2, 0.5, qkv_bias=False)
    with pytest.raises(CheckpointError, match=r"unexpected keys: attn\.l_q\.weight"):
        HiLo.from_state_dict({"attn." + k: v for k, v in sd.items()}, 64, 2, 2, 0.5, qkv_bias=False)
    with pytest.raises(InputError, match="multiple of num_heads"):
        HiLo.random(64, 3)
    with pytest.raises(InputError, match="alpha"):
        HiLo.random(64, 2, 2, 1.5)
    layer = HiLo.from_state_dict(sd, 64, 2, 2, 0.5, qkv_bias=False)
    with pytest.raises(InputError, match=r"not H\*W = 4\*4"):
        layer(np.zeros((1, 15, 64), np.float32), 4, 4)


def test_layers_take_pytorch_tensors_and_keep_the_input_untouched(torch):
    case = REAL_HILO[3]
    module = torch_hilo(torch, case).float()
    module.l_q.weight.requires_grad_(True)
    layer = HiLo.from_state_dict(module.state_dict(keep_vars=True), case.dim, case.num_heads, case.window_size,
                                 case.alpha, qkv_bias=False)
    x = torch.from_numpy(case.input())
    before = x.clone()
    out = layer(x, case.height, case.width)
    assert isinstance(out, np.ndarray) and torch.equal(x, before)
    np.testing.assert_array_equal(out, layer(case.input(), case.height, case.width))


# -- window MSA and DTM ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@given(heads=st.integers(1, 3), hd=st.sampled_from([1, 4, 8, 32]), window=st.integers(1, 7), use_bias=st.booleans(),
       windows=st.integers(1, 3), seed=st.integers(0, 99))
@settings(max_examples=10)
@example(heads=8, hd=32, window=7, use_bias=False, windows=2, seed=0)    # QnA-ViT-Tiny stage 3 (7x7)
def test_window_msa_from_flax_matches_the_official_forward(backend, heads, hd, window, use_bias, windows, seed):
    dim = heads * hd
    tree = WindowMSA.random_flax(dim, heads, window, use_bias, seed)
    layer = WindowMSA.from_flax(tree, heads, window, backend=backend)
    x = np.random.default_rng(seed).standard_normal((windows, window * window, dim)).astype(np.float32)
    assert_layer_close(layer(x), flax_msa(tree, x, heads, window), "WindowMSA")
    # a (B, H, W, C) map attends window by window, as QnA-ViT's stage splits it
    grid = x.reshape(1, windows, window, window, dim).transpose(0, 2, 1, 3, 4).reshape(1, window, windows * window, dim)
    by_window = layer(x).reshape(1, windows, window, window, dim).transpose(0, 2, 1, 3, 4).reshape(grid.shape)
    assert_parity(layer(grid), by_window, "window_msa")


@pytest.mark.torch
@pytest.mark.parametrize("backend", BACKENDS)
@given(dim=st.integers(1, 24), h=st.integers(2, 11), w=st.integers(2, 11), b=st.integers(1, 2), seed=st.integers(0, 99))
@settings(max_examples=10)
@example(dim=96, h=56, w=56, b=1, seed=0)    # LITv2-S layers.0 -> 1
def test_dtm_from_state_dict_matches_the_official_module(torch, backend, dim, h, w, b, seed):
    from reference.litv2_torch import DTM as TorchDTM
    module = TorchDTM(dim).double().eval()
    sd = DTM.random_state_dict(dim, seed)
    module.load_state_dict({k: torch.from_numpy(v.astype(np.float64)) for k, v in sd.items()}, strict=False)
    layer = DTM.from_state_dict(module.state_dict(), dim, backend=backend)
    x = np.random.default_rng(seed).standard_normal((b, h * w, dim)).astype(np.float32)
    with torch.no_grad():
        ref, rh, rw = module(torch.from_numpy(x.astype(np.float64)), h, w)
    out, ho, wo = layer(x, h, w)
    assert (ho, wo) == (rh, rw) == (h // 2, w // 2)
    assert_layer_close(out, ref.numpy(), "DTM")


# -- CUDA --------------------------------------------------------------------------------------------------------

def test_layers_on_cuda_match_the_cpu(cuda_cupy):
    hilo = REAL_HILO[3]
    x = hilo.input()
    assert_layer_close(hilo.layer(device="cuda")(x, hilo.height, hilo.width),
                       hilo.layer()(x, hilo.height, hilo.width), "HiLo on CUDA")
    qna = REAL_QNA[3]
    on_device = qna.layer(device="cuda")(cuda_cupy.asarray(qna.input()))
    assert isinstance(on_device, cuda_cupy.ndarray)
    assert_layer_close(cuda_cupy.asnumpy(on_device), qna.layer()(qna.input()), "QnA on CUDA")
    msa = WindowMSA.random(16, 2, 3, use_bias=True)
    windows = np.random.default_rng(0).standard_normal((2, 9, 16)).astype(np.float32)
    assert_layer_close(msa.to("cuda")(windows), WindowMSA.random(16, 2, 3, use_bias=True)(windows), "MSA on CUDA")
    dtm, grid = DTM.random(8), np.random.default_rng(1).standard_normal((1, 35, 8)).astype(np.float32)
    assert_layer_close(DTM.random(8, device="cuda")(grid, 5, 7)[0], dtm(grid, 5, 7)[0], "DTM on CUDA")
