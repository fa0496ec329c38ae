"""The layers of both families on their own: built from an official module's own weights, called as the
official forward is, on the CPU kernels (backend="numba", the default), the plain-NumPy references
(backend="numpy": slow, simple, what the kernels are tested against) or CUDA (device="cuda").

    HiLo.from_state_dict(sd, dim, num_heads, window_size, alpha, qkv_bias=True)   layer(x, H, W)  (B, H*W, C)
    QnA.from_flax(params, num_heads, window_size, stride, n_queries=2)            layer(x)  (B, H, W, C) NHWC
    QnA.from_state_dict(sd, num_heads, window_size, stride, n_queries=2)          (the project's PyTorch layout)
    WindowMSA.from_flax(params, num_heads, window_size)                            layer(x)  (B, w*w, C) windows
    DTM.from_state_dict(sd, dim)                                                   layer(x, H, W) -> (y, Ho, Wo)

Weights are anything np.asarray takes (NumPy, PyTorch CPU tensors, JAX arrays), in the official module's own
names and layouts; they are copied, as float32, into the engine's layout once. Inputs may be any float dtype
(computed in float32) and come back as float32 arrays of the input's kind (NumPy, or CuPy on device="cuda").
Each layer has random(...) (official initialisation, biases drawn non-zero so that tests exercise them),
num_parameters (as the official module counts them) and the maths in its docstring.

The models are built from the same parts (qnalo.models.litv2, qnalo.models.qna_vit): a layer here is one of
them with its own weights, and gives the same bits as inside a model."""
import math

import numpy as np

from .errors import CheckpointError, InputError, key_mismatches
from .kernels.qna import _layout as _qna_layout, fold_queries, qna_output_size
from .models.parts import engine_arrays, move_to
from .models.litv2 import DTM as _DTMPart, OFFICIAL_KINDS, HiLoAttention, official_kind
from .models.ops import get_ops
from .models.qna_vit import (FLAX_SHAPE, FROM_FLAX, FROM_TORCH, QNA_LEAVES, TORCH_SHAPE, QnAAttention,
                              WindowMSA as _WindowMSAPart)

__all__ = ["HiLo", "QnA", "WindowMSA", "DTM", "hilo_heads"]


def _from_torch(value):
    """A PyTorch tensor (one that requires grad, sits on a GPU or is bfloat16 included) as a NumPy array, without
    importing torch; anything else as it is."""
    if not hasattr(value, "detach"):
        return value
    value = value.detach().cpu()
    return (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()


def _host_array(value, name):
    """A float32 NumPy copy-or-view of a weight given as anything np.asarray takes (PyTorch tensors included)."""
    value = _from_torch(value)
    try:
        array = np.asarray(value)
    except Exception as exc:   # noqa: BLE001 - whatever the container raises, say which weight it was
        raise CheckpointError(f"{name}: cannot be read as an array ({exc})") from None
    if array.dtype.kind not in "fiu":
        raise CheckpointError(f"{name} is {array.dtype}, expected a floating-point tensor")
    return array.astype(np.float32, copy=False)


def _take(weights, shapes, what, hint=""):
    """name -> float32 array for every name of `shapes` from the mapping `weights`, after checking that its
    names and shapes are exactly those; one CheckpointError naming every mismatch otherwise."""
    if not hasattr(weights, "keys"):
        raise CheckpointError(f"{what}: expected a mapping of parameter names to arrays, got {type(weights).__name__}")
    arrays = {k: _host_array(v, k) for k, v in weights.items()}
    problems = key_mismatches({k: tuple(a.shape) for k, a in arrays.items()}, shapes)
    if problems:
        raise CheckpointError(f"{what}: " + "; ".join(problems) + hint)
    return arrays


def _flatten_flax(params, prefix=""):
    """A Flax parameter tree (nested mappings, FrozenDict, or already 'a/b' keys) -> {'a/b': leaf}."""
    flat = {}
    for key, value in params.items():
        path = f"{prefix}{key}"
        if hasattr(value, "keys") and not hasattr(value, "shape"):
            flat.update(_flatten_flax(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _unwrap_flax(params):
    if hasattr(params, "keys") and set(params.keys()) == {"params"}:   # a variables dict: {"params": {...}}
        return params["params"]
    return params


def _litv2_layout(model_key, array):
    """An official LITv2 tensor in the engine's layout, by the kind its key has in the model's key table."""
    return OFFICIAL_KINDS[official_kind(model_key)][1](array)


# QnA-ViT's QnA leaves (the model's key table) relative to the layer: Flax leaf, engine name, layout kind
_QNA_LAYER_LEAVES = tuple((leaf.removeprefix("FusedKQnA_0/"), engine.removeprefix("attn."), kind)
                          for leaf, engine, kind in QNA_LEAVES)


def _input_array(x, xp):
    """x as an array of xp (NumPy or CuPy), float32, C-contiguous; (array, function bringing outputs back)."""
    x = _from_torch(x)
    if xp is not np and isinstance(x, xp.ndarray):
        return xp.ascontiguousarray(x, dtype=xp.float32), (lambda a: a)
    x = np.asarray(x)
    if x.dtype.kind != "f":
        raise InputError(f"expected a floating-point input, got {x.dtype}")
    if xp is np:
        return np.ascontiguousarray(x, dtype=np.float32), (lambda a: a)
    return xp.ascontiguousarray(xp.asarray(x, dtype=xp.float32)), xp.asnumpy


class _Layer:
    """Backend and device of a layer; subclasses build self._part with CPU ops, then to() moves it."""

    device, dtype = "cpu", "float32"

    def _start(self, backend, device, dtype):
        self.backend = backend
        self._ops = get_ops(backend)
        return lambda: self.to(device, dtype)

    def to(self, device, dtype="float32"):
        """Moves the layer's weights to `device` ("cpu", or "cuda": CUDA kernels on CuPy arrays) and returns it;
        dtype="float16" (CUDA) stores weights and activations in half precision, computing in float32."""
        return move_to(self, device, dtype)

    def _parts(self):
        return [self._part]

    def _prepare(self, x):
        x, back = _input_array(x, self._ops.xp)
        if self._ops.dtype != np.float32:
            x = x.astype(self._ops.dtype)
        return x, (lambda a: back(a).astype(np.float32, copy=False) if self.dtype != "float32" else back(a))


# -- HiLo ----------------------------------------------------------------------------------------------------

def hilo_heads(dim, num_heads, window_size, alpha):
    """(head_dim, hi_heads, lo_heads) as the official HiLo derives them: lo = int(num_heads * alpha) (a float64
    product, truncated); window_size 1 makes every head Lo-Fi (a plain global MSA)."""
    if num_heads < 1 or dim % num_heads:
        raise InputError(f"HiLo: dim {dim} must be a positive multiple of num_heads {num_heads}")
    if window_size < 1:
        raise InputError(f"HiLo: window_size must be >= 1, got {window_size}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"HiLo: alpha is the share of Lo-Fi heads, 0..1; got {alpha}")
    lo = num_heads if window_size == 1 else int(num_heads * alpha)
    return dim // num_heads, num_heads - lo, lo


def _hilo_official_shapes(dim, hd, hi, lo, qkv_bias):
    shapes = {}
    for name, n_in, n_out, biased in (("l_q", dim, lo * hd, qkv_bias), ("l_kv", dim, 2 * lo * hd, qkv_bias),
                                      ("l_proj", lo * hd, lo * hd, True), ("h_qkv", dim, 3 * hi * hd, qkv_bias),
                                      ("h_proj", hi * hd, hi * hd, True)):
        if (lo if name.startswith("l_") else hi) == 0:
            continue
        shapes[name + ".weight"] = (n_out, n_in)
        if biased:
            shapes[name + ".bias"] = (n_out,)
    return shapes


class HiLo(_Layer):
    """HiLo attention (LITv2), the official module's forward(x, H, W) with the dense-prediction copy's padding.

    x (B, N = H*W, C) (the block's LayerNorm output) is viewed as a (B, H, W, C) map and zero-padded bottom
    and right to a multiple of ws (not masked: padded tokens are real keys and values). hd = C / num_heads;
    lo = int(num_heads * alpha) Lo-Fi heads, hi = num_heads - lo Hi-Fi heads (ws = 1: every head Lo-Fi).

      Hi-Fi  [q|k|v] = x @ h_qkv; in each ws x ws window, per head: softmax(q k^T * hd^-0.5) v; then h_proj.
      Lo-Fi  q = x @ l_q; [k|v] = avgpool_ws(x) @ l_kv (pool, then project; ws = 1: no pool);
             per head softmax(q k^T * hd^-0.5) v over all pooled tokens; then l_proj.
      out    [Hi-Fi | Lo-Fi] along channels, cropped to H x W: (B, N, C).

    Channels: h_qkv's output is (q|k|v) x head x hd, l_kv's (k|v) x head x hd."""

    def __init__(self, tensors, dim, num_heads, window_size=2, alpha=0.5, *, num_parameters=None, backend="numba",
                 device="cpu", dtype="float32"):
        """tensors: engine layout, {h_qkv, h_proj, l_q, l_kv, l_proj}.{weight (in, out), bias} of the branches
        with heads (from_state_dict builds it from the official layout)."""
        moved = self._start(backend, device, dtype)
        self.dim, self.num_heads, self.window_size, self.alpha = dim, num_heads, window_size, alpha
        self.head_dim, self.hi_heads, self.lo_heads = hilo_heads(dim, num_heads, window_size, alpha)
        self._part = HiLoAttention(self._ops, engine_arrays(tensors), "", self.head_dim, self.hi_heads,
                                   self.lo_heads, window_size)
        self.num_parameters = num_parameters if num_parameters is not None else sum(v.size for v in tensors.values())
        moved()

    @classmethod
    def from_state_dict(cls, state_dict, dim, num_heads, window_size=2, alpha=0.5, qkv_bias=True, **options):
        """The official ziplab/LITv2 HiLo module's state dict (h_qkv.weight (3*hi*hd, C), h_proj, l_q, l_kv,
        l_proj, with biases; l_q, l_kv and h_qkv have theirs only if qkv_bias, as in the official module).
        options: backend, device, dtype."""
        hd, hi, lo = hilo_heads(dim, num_heads, window_size, alpha)
        shapes = _hilo_official_shapes(dim, hd, hi, lo, qkv_bias)
        hint = ""
        if not qkv_bias and any(k.endswith(".bias") and k.split(".")[0] in ("l_q", "l_kv", "h_qkv")
                                for k in state_dict):
            hint = " (this state dict has qkv biases: pass qkv_bias=True)"
        elif qkv_bias and any(k in state_dict for k in ("l_q.weight", "h_qkv.weight")) and not any(
                k in state_dict for k in ("l_q.bias", "h_qkv.bias")):
            hint = " (a module built with qkv_bias=False has no qkv biases: pass qkv_bias=False)"
        official = _take(state_dict, shapes, f"HiLo(dim={dim}, num_heads={num_heads}, window_size={window_size}, "
                         f"alpha={alpha}, qkv_bias={qkv_bias}) state dict", hint)
        tensors = {}
        for name in ("l_q", "l_kv", "l_proj", "h_qkv", "h_proj"):
            if name + ".weight" in official:   # the model's key table: attn.<name>.weight is a Linear
                w = official[name + ".weight"]
                tensors[name + ".weight"] = np.ascontiguousarray(_litv2_layout("attn." + name + ".weight", w))
                tensors[name + ".bias"] = official.get(name + ".bias", np.zeros(w.shape[0], np.float32))
        return cls(tensors, dim, num_heads, window_size, alpha,
                   num_parameters=sum(v.size for v in official.values()), **options)

    @staticmethod
    def random_state_dict(dim, num_heads, window_size=2, alpha=0.5, qkv_bias=True, seed=0):
        """An official-layout state dict: weights as the official trunc_normal(std .02), biases N(0, .02^2)
        (zeros officially; drawn here so that tests exercise them)."""
        hd, hi, lo = hilo_heads(dim, num_heads, window_size, alpha)
        rng = np.random.default_rng(seed)
        return {k: (np.clip(rng.normal(0, 0.02, s), -0.04, 0.04) if len(s) == 2 else rng.normal(0, 0.02, s))
                .astype(np.float32) for k, s in _hilo_official_shapes(dim, hd, hi, lo, qkv_bias).items()}

    @classmethod
    def random(cls, dim, num_heads, window_size=2, alpha=0.5, qkv_bias=True, seed=0, **options):
        return cls.from_state_dict(cls.random_state_dict(dim, num_heads, window_size, alpha, qkv_bias, seed),
                                   dim, num_heads, window_size, alpha, qkv_bias, **options)

    def __call__(self, x, H, W):
        """x (B, H*W, C) -> (B, H*W, C) float32."""
        x, back = self._prepare(x)
        if x.ndim != 3 or x.shape[2] != self.dim:
            raise InputError(f"HiLo: expected x of shape (B, H*W, {self.dim}), got {tuple(x.shape)}")
        H, W = int(H), int(W)
        if H < 1 or W < 1 or x.shape[1] != H * W:
            raise InputError(f"HiLo: x has {x.shape[1]} tokens, not H*W = {H}*{W}")
        b = x.shape[0]
        if b == 0:
            return back(self._ops.xp.zeros(x.shape, self._ops.dtype))
        out, bias = self._part(self._ops, x.reshape(b * H * W, self.dim), b, H, W)
        out += bias
        return back(out.reshape(b, H * W, self.dim))

    def __repr__(self):
        return (f"HiLo(dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"alpha={self.alpha}: {self.hi_heads} Hi-Fi / {self.lo_heads} Lo-Fi heads, {self.backend}, "
                f"{self.device})")


# -- QnA -----------------------------------------------------------------------------------------------------

def _qna_engine_shapes(c_in, f, f_out, heads, k, nq):
    return {"proj_k.weight": (c_in, f), "proj_v.weight": (c_in, f), "proj_out.weight": (f, f_out), "q_param": (nq, f),
            "attn_scale": (k * k, nq * heads), "rpb_table": (k * k, nq * heads)}


def _qna_flax_shapes(c_in, f, f_out, heads, k, nq, biases):
    engine = _qna_engine_shapes(c_in, f, f_out, heads, k, nq)
    shapes = {leaf: FLAX_SHAPE[kind](engine[name]) for leaf, name, kind in _QNA_LAYER_LEAVES}
    if biases:
        shapes.update({"Wk_b": (heads, f // heads), "to_v/bias": (f,), "to_out/bias": (f_out,)})
    return shapes


def _qna_torch_shapes(c_in, f, f_out, heads, k, nq):
    engine = _qna_engine_shapes(c_in, f, f_out, heads, k, nq)
    return {name: TORCH_SHAPE[kind](engine[name]) for _, name, kind in _QNA_LAYER_LEAVES}


class QnA(_Layer):
    """QnA attention (FusedKQnA of moabarar/qna), the official Flax module's __call__(x) on NHWC maps.

    x (B, H, W, C) (the block's LayerNorm output); h heads, F features, d = F / h, nq learned queries, a k x k
    window with stride s and padding p = (k - 1) // 2: output (B, Ho, Wo, F_out), Ho = (H + 2p - k) // s + 1
    (= ceil(H / s) for odd k). Per output pixel, query qi and head hi, over the window's cells inside the map:

      q[qi, hi]  = query[qi, hi] / (||query[qi, hi]|| + 1e-6) / sqrt(d)      (input-independent)
      logit      = q[qi, hi] . (x @ Wk + Wk_b)[cell, hi]  +  rpe_bias[cell offset, qi*h + hi]
      weight     = softmax of the logits over the window's cells (cells outside the map drop out)
                   * attn_scale_weights[cell offset, qi*h + hi]                  (signed, after the softmax)
      out[hi]    = sum over qi and cells of weight * (x @ to_v + to_v bias)[cell, hi]
    then out @ to_out (+ to_out bias). The biases exist only in a module built with use_bias=True.

    Numerics: the official code exponentiates raw logits (float32 inf/NaN past ~88); here every exponential is
    shifted by a maximum, which is exact where the official result is finite and stays finite elsewhere."""

    def __init__(self, tensors, num_heads, stride, *, biases=None, num_parameters=None, backend="numba",
                 device="cpu", dtype="float32"):
        """tensors: engine layout (proj_k.weight (C, F), proj_v.weight (C, F), proj_out.weight (F, F_out),
        q_param (nq, F) raw, rpb_table and attn_scale (k*k, nq*h)); biases: None, or (Wk_b (h, d), to_v (F,),
        to_out (F_out,))."""
        moved = self._start(backend, device, dtype)
        t = engine_arrays(tensors)
        try:   # the window kernels' own check of the layout, before anything is built
            _qna_layout(t["proj_k.weight"].shape[1] + t["rpb_table"].shape[1], t["rpb_table"], t["attn_scale"],
                        num_heads, stride)
        except ValueError as exc:
            raise InputError(f"QnA: {exc}") from None
        self.num_heads, self.stride = num_heads, stride
        self.in_channels, self.features = t["proj_k.weight"].shape
        self.out_features = t["proj_out.weight"].shape[1]
        self.n_queries = t["q_param"].shape[0]
        self.window_size = math.isqrt(t["rpb_table"].shape[0])
        in_bias = None
        if biases is not None:
            key_bias, v_bias, _ = biases
            # the key bias adds q.Wk_b to every logit of a (query, head): folded with the queries like Wk
            logit_bias = fold_queries(t["q_param"], np.asarray(key_bias, np.float32).reshape(1, -1), num_heads)[0]
            in_bias = engine_arrays({"b": np.concatenate([logit_bias, v_bias])})["b"]
        self._part = QnAAttention(self._ops, t, "", num_heads, stride, in_bias)
        if biases is not None:   # to_out's bias: the part returns its output without it, and this layer adds it
            self._part.out_proj.bias = engine_arrays({"b": biases[2]})["b"]
        self.num_parameters = num_parameters if num_parameters is not None else sum(v.size for v in tensors.values())
        moved()

    @staticmethod
    def _geometry(query_shape, rpe_shape, num_heads, window_size, stride, n_queries, what):
        nq, f = query_shape
        kk, nc = rpe_shape
        if window_size < 1 or stride < 1:
            raise InputError(f"{what}: window_size and stride must be >= 1, got {window_size} and {stride}")
        if num_heads < 1 or f % num_heads:
            raise InputError(f"{what}: {f} features are not a multiple of num_heads={num_heads}")
        if (nq, kk, nc) != (n_queries, window_size ** 2, n_queries * num_heads):
            raise CheckpointError(
                f"{what}: the weights hold {nq} queries of {f} features and a ({kk}, {nc}) position table, not "
                f"n_queries={n_queries}, window_size={window_size}, num_heads={num_heads} (which need "
                f"({window_size ** 2}, {n_queries * num_heads})); pass the module's own settings")
        return f

    @classmethod
    def from_flax(cls, params, num_heads, window_size, stride, n_queries=2, **options):
        """The official Flax module's parameter subtree as a checkpoint stores it: Wk (C, F), query (nq, F),
        rpe_bias (k*k, nq*h), attn_scale_weights (1, 1, k*k, nq*h), to_v/kernel (C, F), to_out/kernel
        (F, F_out), and, with use_bias=True, Wk_b (h, d), to_v/bias, to_out/bias. Nested dicts, a FrozenDict or
        'to_v/kernel' keys; {"params": ...} is unwrapped. options: backend, device, dtype."""
        flat = _flatten_flax(_unwrap_flax(params))
        what = f"QnA.from_flax(num_heads={num_heads}, window_size={window_size}, stride={stride})"
        for need in ("Wk", "query", "rpe_bias", "to_out/kernel"):
            if need not in flat:
                raise CheckpointError(f"{what}: no {need!r} among the parameters {sorted(flat)} (pass the "
                                      "FusedKQnA module's own subtree, e.g. params['FusedKQnA_0'])")
        c_in, f = np.shape(flat["Wk"])
        f = cls._geometry(np.shape(flat["query"]), np.shape(flat["rpe_bias"]), num_heads, window_size, stride,
                          n_queries, what)
        f_out = np.shape(flat["to_out/kernel"])[-1]
        biases = any(k in flat for k in ("Wk_b", "to_v/bias", "to_out/bias"))
        p = _take(flat, _qna_flax_shapes(c_in, f, f_out, num_heads, window_size, n_queries, biases), what,
                  " (a module with use_bias=True has all of Wk_b, to_v/bias and to_out/bias)" if biases else "")
        tensors = {engine: FROM_FLAX[kind](p[leaf]) for leaf, engine, kind in _QNA_LAYER_LEAVES}
        return cls(tensors, num_heads, stride, num_parameters=sum(v.size for v in p.values()),
                   biases=(p["Wk_b"], p["to_v/bias"], p["to_out/bias"]) if biases else None, **options)

    @classmethod
    def from_state_dict(cls, state_dict, num_heads, window_size, stride, n_queries=2, **options):
        """The project's PyTorch layout of the layer (LeapLabTHU/DAT's names; docs/format.md): proj_k.weight and
        proj_v.weight (F, C), proj_out.weight (F_out, F, 1, 1), q_param (nq, F) holding the RAW official
        query (normalised here, as the official code does), attn_scale (1, 1, k*k, nq*h), rpb_table
        (k*k, nq*h). num_heads is the layer's own head count h (DAT's stride-2 layer doubles its argument)."""
        what = f"QnA.from_state_dict(num_heads={num_heads}, window_size={window_size}, stride={stride})"
        for need in ("proj_k.weight", "q_param", "rpb_table", "proj_out.weight"):
            if need not in state_dict:
                raise CheckpointError(f"{what}: no {need!r} among the keys {sorted(state_dict)}")
        f, c_in = np.shape(state_dict["proj_k.weight"])
        f = cls._geometry(np.shape(state_dict["q_param"]), np.shape(state_dict["rpb_table"]), num_heads,
                          window_size, stride, n_queries, what)
        f_out = np.shape(state_dict["proj_out.weight"])[0]
        p = _take(state_dict, _qna_torch_shapes(c_in, f, f_out, num_heads, window_size, n_queries), what)
        tensors = {engine: FROM_TORCH[kind](p[engine]) for _, engine, kind in _QNA_LAYER_LEAVES}
        return cls(tensors, num_heads, stride, **options)

    @staticmethod
    def random_flax(in_channels, features, num_heads, window_size, stride=1, n_queries=2, use_bias=False,
                    out_features=None, seed=0):
        """An official-layout Flax parameter tree: kernels lecun-normal, the query as the official init,
        rpe_bias N(0, 1) and attn_scale_weights N(0, 1) (zeros and N(0, .02^2) officially: drawn larger here
        so that tests see them), biases N(0, .1^2)."""
        rng = np.random.default_rng(seed)
        d, f_out = features // num_heads, out_features or features
        kk, nc = window_size ** 2, n_queries * num_heads

        def kernel(n_in, n_out):
            return np.clip(rng.normal(0, 1, (n_in, n_out)), -2, 2) / math.sqrt(n_in)
        tree = {"Wk": kernel(in_channels, features),
                "query": np.clip(rng.normal(0, 1, (n_queries, features)), -2, 2) * math.sqrt(1.0 / d),
                "rpe_bias": rng.normal(0, 1, (kk, nc)), "attn_scale_weights": rng.normal(0, 1, (1, 1, kk, nc)),
                "to_v": {"kernel": kernel(in_channels, features)}, "to_out": {"kernel": kernel(features, f_out)}}
        if use_bias:
            tree["Wk_b"] = rng.normal(0, 0.1, (num_heads, d))
            tree["to_v"]["bias"] = rng.normal(0, 0.1, features)
            tree["to_out"]["bias"] = rng.normal(0, 0.1, f_out)
        return {k: ({n: a.astype(np.float32) for n, a in v.items()} if isinstance(v, dict) else v.astype(np.float32))
                for k, v in tree.items()}

    @classmethod
    def random(cls, in_channels, features, num_heads, window_size, stride=1, n_queries=2, use_bias=False, seed=0,
               **options):
        return cls.from_flax(cls.random_flax(in_channels, features, num_heads, window_size, stride, n_queries,
                                             use_bias, seed=seed), num_heads, window_size, stride, n_queries,
                             **options)

    def output_size(self, h, w):
        return qna_output_size(h, self.window_size, self.stride), qna_output_size(w, self.window_size, self.stride)

    def __call__(self, x):
        """x (B, H, W, C) NHWC -> (B, Ho, Wo, F_out) float32."""
        x, back = self._prepare(x)
        if x.ndim != 4 or x.shape[3] != self.in_channels:
            hint = "; the input looks NCHW: pass x.transpose(0, 2, 3, 1)" if x.ndim == 4 and \
                x.shape[1] == self.in_channels else ""
            raise InputError(f"QnA: expected an NHWC map (B, H, W, {self.in_channels}), got {tuple(x.shape)}{hint}")
        b, h, w, c = x.shape
        ho, wo = self.output_size(h, w)
        if b == 0 or h == 0 or w == 0:
            return back(self._ops.xp.zeros((b, max(ho, 0), max(wo, 0), self.out_features), self._ops.dtype))
        y, ho, wo = self._part(self._ops, x.reshape(b * h * w, c), b, h, w)
        y = y.reshape(b, ho, wo, self.out_features)
        if self._part.out_proj.bias is not None:
            y += self._part.out_proj.bias
        return back(y)

    def __repr__(self):
        return (f"QnA({self.in_channels} -> {self.out_features}, num_heads={self.num_heads}, "
                f"window_size={self.window_size}, stride={self.stride}, n_queries={self.n_queries}, "
                f"{self.backend}, {self.device})")


# -- window MSA (QnA-ViT) --------------------------------------------------------------------------------------

class WindowMSA(_Layer):
    """QnA-ViT's window self-attention (MultiHeadSelfAttention of moabarar/qna with its Swin-style relative
    position bias), on windows of w x w tokens.

      [q_h | k_h | v_h] = (x @ to_qkv)[..., h*3d:(h+1)*3d]      (per-head interleaved, as the official reshape)
      out_h = softmax(q_h k_h^T / sqrt(d) + rpe_bias[relative index(i, j), h]) v_h;  out @ to_out

    Called as the Flax module: x (B', w*w, C), each row a window in row-major order; or a whole (B, H, W, C) map
    whose sides are multiples of w, attended window by window in place (as QnA-ViT's stage splits it)."""

    def __init__(self, tensors, num_heads, window_size, *, biases=None, num_parameters=None, backend="numba",
                 device="cpu", dtype="float32"):
        """tensors: engine layout, qkv.weight (C, 3C) per-head interleaved, proj.weight (C, C), rpb_table
        ((2w-1)^2, heads); biases: None or (to_qkv (3C,), to_out (C,))."""
        moved = self._start(backend, device, dtype)
        t = engine_arrays(tensors)
        self.num_heads, self.window_size = num_heads, window_size
        self.dim = t["proj.weight"].shape[0]
        self._part = _WindowMSAPart(self._ops, t, "", num_heads, window_size)
        if biases is not None:   # the part adds qkv's bias; to_out's it leaves to this layer
            self._part.qkv.bias, self._part.proj.bias = (engine_arrays({"b": b})["b"] for b in biases)
        self.num_parameters = num_parameters if num_parameters is not None else sum(v.size for v in tensors.values())
        moved()

    @classmethod
    def from_flax(cls, params, num_heads, window_size, **options):
        """The official Flax MultiHeadSelfAttention subtree: to_qkv/kernel (C, 3C), to_out/kernel (C, C),
        RelativePositionalEmbedding_0/rpe_bias ((2w-1)^2, heads), and to_qkv/bias, to_out/bias with
        use_bias=True."""
        flat = _flatten_flax(_unwrap_flax(params))
        what = f"WindowMSA.from_flax(num_heads={num_heads}, window_size={window_size})"
        if "to_qkv/kernel" not in flat:
            raise CheckpointError(f"{what}: no 'to_qkv/kernel' among the parameters {sorted(flat)}")
        c = np.shape(flat["to_qkv/kernel"])[0]
        if num_heads < 1 or c % num_heads or window_size < 1:
            raise InputError(f"{what}: {c} channels, num_heads and window_size must divide and be >= 1")
        shapes = {"to_qkv/kernel": (c, 3 * c), "to_out/kernel": (c, c),
                  "RelativePositionalEmbedding_0/rpe_bias": ((2 * window_size - 1) ** 2, num_heads)}
        biases = "to_qkv/bias" in flat or "to_out/bias" in flat
        if biases:
            shapes.update({"to_qkv/bias": (3 * c,), "to_out/bias": (c,)})
        p = _take(flat, shapes, what)
        tensors = {"qkv.weight": p["to_qkv/kernel"], "proj.weight": p["to_out/kernel"],
                   "rpb_table": p["RelativePositionalEmbedding_0/rpe_bias"]}
        return cls(tensors, num_heads, window_size, num_parameters=sum(v.size for v in p.values()),
                   biases=(p["to_qkv/bias"], p["to_out/bias"]) if biases else None, **options)

    @staticmethod
    def random_flax(dim, num_heads, window_size, use_bias=False, seed=0):
        """Kernels lecun-normal, rpe_bias N(0, 1) (zeros officially), biases N(0, .1^2)."""
        rng = np.random.default_rng(seed)
        tree = {"to_qkv": {"kernel": rng.normal(0, 1 / math.sqrt(dim), (dim, 3 * dim))},
                "to_out": {"kernel": rng.normal(0, 1 / math.sqrt(dim), (dim, dim))},
                "RelativePositionalEmbedding_0": {"rpe_bias": rng.normal(0, 1, ((2 * window_size - 1) ** 2,
                                                                                 num_heads))}}
        if use_bias:
            tree["to_qkv"]["bias"] = rng.normal(0, 0.1, 3 * dim)
            tree["to_out"]["bias"] = rng.normal(0, 0.1, dim)
        return {k: {n: a.astype(np.float32) for n, a in v.items()} for k, v in tree.items()}

    @classmethod
    def random(cls, dim, num_heads, window_size, use_bias=False, seed=0, **options):
        return cls.from_flax(cls.random_flax(dim, num_heads, window_size, use_bias, seed), num_heads, window_size,
                             **options)

    def __call__(self, x):
        """x (B', w*w, C) windows -> (B', w*w, C); or a map (B, H, W, C), sides multiples of w -> (B, H, W, C)."""
        x, back = self._prepare(x)
        w = self.window_size
        if x.ndim == 3 and x.shape[1:] == (w * w, self.dim):
            maps = x.reshape(x.shape[0], w, w, self.dim)
        elif x.ndim == 4 and x.shape[3] == self.dim:
            maps = x
            if x.shape[1] % w or x.shape[2] % w:
                raise InputError(f"WindowMSA: a {x.shape[1]}x{x.shape[2]} map is not a whole number of {w}x{w} "
                                 "windows (the official stage asserts the same)")
        else:
            raise InputError(f"WindowMSA: expected windows (B, {w * w}, {self.dim}) or a map (B, H, W, {self.dim}), "
                             f"got {tuple(x.shape)}")
        b, h, wd, c = maps.shape
        if maps.size == 0:
            return back(self._ops.xp.zeros(x.shape, self._ops.dtype))
        y, _, _ = self._part(self._ops, maps.reshape(b * h * wd, c), b, h, wd)
        if self._part.proj.bias is not None:
            y += self._part.proj.bias
        return back(y.reshape(x.shape))


# -- DTM (LITv2) -------------------------------------------------------------------------------------------------

class DTM(_Layer):
    """Deformable token merging (LITv2): x (B, H*W, C) -> (y (B, Ho*Wo, 2C), Ho, Wo), Ho = H // 2, Wo = W // 2.

      offsets  = conv2x2/s2(x; dconv.conv_offset)                      8 channels: (dy, dx) of each of the 4 taps
      sampled  = x bilinearly at (2i + ky + dy, 2j + kx + dx) for the 4 taps (ky, kx); zero outside the map
      y        = GELU(BatchNorm(conv of the samples with dconv.weight + dconv.bias))   (DCNv1, running stats)

    BatchNorm (eps 1e-5) is folded into the conv's weights once."""

    def __init__(self, tensors, dim, *, num_parameters=None, backend="numba", device="cpu", dtype="float32"):
        moved = self._start(backend, device, dtype)
        self.dim = dim
        self._part = _DTMPart(self._ops, engine_arrays(tensors), "")
        self.num_parameters = num_parameters if num_parameters is not None else sum(
            v.size for k, v in tensors.items() if not k.endswith(("running_mean", "running_var")))
        moved()

    @staticmethod
    def _official_shapes(dim):
        shapes = {"dconv.weight": (2 * dim, dim, 2, 2), "dconv.bias": (2 * dim,),
                  "dconv.conv_offset.weight": (8, dim, 2, 2), "dconv.conv_offset.bias": (8,)}
        shapes.update({f"norm_layer.{n}": (2 * dim,) for n in ("weight", "bias", "running_mean", "running_var")})
        return shapes

    @classmethod
    def from_state_dict(cls, state_dict, dim, **options):
        """The official LITv2 DTM module's state dict: dconv.weight (2C, C, 2, 2), dconv.bias,
        dconv.conv_offset.{weight (8, C, 2, 2), bias}, norm_layer.{weight, bias, running_mean, running_var}
        (num_batches_tracked is ignored)."""
        sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
        p = _take(sd, cls._official_shapes(dim), f"DTM(dim={dim}) state dict")
        tensors = {name: np.ascontiguousarray(_litv2_layout("layers.0.downsample." + name, a)) for name, a in p.items()}
        return cls(tensors, dim, num_parameters=sum(v.size for k, v in p.items()
                                                    if not k.endswith(("running_mean", "running_var"))), **options)

    @classmethod
    def random_state_dict(cls, dim, seed=0):
        """Weights N(0, 1/fan_in), offsets N(0, .5^2) per weight (zero officially: drawn so that samples move),
        BatchNorm statistics and affine drawn around 0 / 1."""
        rng = np.random.default_rng(seed)
        sd = {"dconv.weight": rng.normal(0, 1 / math.sqrt(4 * dim), (2 * dim, dim, 2, 2)),
              "dconv.bias": rng.normal(0, 0.1, 2 * dim),
              "dconv.conv_offset.weight": rng.normal(0, 0.5 / math.sqrt(4 * dim), (8, dim, 2, 2)),
              "dconv.conv_offset.bias": rng.normal(0, 0.5, 8),
              "norm_layer.weight": rng.uniform(0.5, 1.5, 2 * dim), "norm_layer.bias": rng.normal(0, 0.1, 2 * dim),
              "norm_layer.running_mean": rng.normal(0, 0.1, 2 * dim),
              "norm_layer.running_var": rng.uniform(0.5, 1.5, 2 * dim)}
        return {k: v.astype(np.float32) for k, v in sd.items()}

    @classmethod
    def random(cls, dim, seed=0, **options):
        return cls.from_state_dict(cls.random_state_dict(dim, seed), dim, **options)

    def __call__(self, x, H, W):
        x, back = self._prepare(x)
        H, W = int(H), int(W)
        if x.ndim != 3 or x.shape[2] != self.dim or x.shape[1] != H * W:
            raise InputError(f"DTM: expected x of shape (B, H*W = {H}*{W}, {self.dim}), got {tuple(x.shape)}")
        if H < 2 or W < 2:
            raise InputError(f"DTM: a {H}x{W} map has no 2x2 patch to merge; it needs H, W >= 2")
        b = x.shape[0]
        if b == 0:
            return back(self._ops.xp.zeros((0, (H // 2) * (W // 2), 2 * self.dim), self._ops.dtype)), H // 2, W // 2
        y, ho, wo = self._part(self._ops, x.reshape(b * H * W, self.dim), b, H, W)
        return back(y.reshape(b, ho * wo, 2 * self.dim)), ho, wo

