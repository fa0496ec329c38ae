"""LITv2 (HiLo attention) on NumPy + Numba, channels-last tokens, float32.

Bottom-up as in the official code: HiLo attention -> Block / ConvFFN block -> stage -> DTM -> model.
Tokens are kept as (B*H*W, C) row-major arrays so that every linear layer is one BLAS GEMM; biases are left out
of the GEMMs and folded into the kernel that reads the result (see qnalo.kernels). Sizes follow the official
dense-prediction copy, which equals the classification copy at the official resolutions: the image is
zero-padded to a multiple of 4, HiLo pads each map to a multiple of its window, DTM floors odd sizes.
"""
import numpy as np

from ..weights import release_pages
from .classifier import Classifier
from .inputs import check_image_batch
from .parts import Linear, Norm, add_residual, read_only
from .tensors import check_tensor_shapes, draw_tensors, head_shapes
from .litv2_config import LITv2Config

LN_EPS = 1e-5
BN_EPS = 1e-5


def engine_tensor_shapes(cfg: LITv2Config):
    """name -> shape of every tensor a qnalo LITv2 weights file holds (docs/format.md)."""
    e = cfg.embed_dim
    shapes = {"patch_embed.proj.weight": (48, e), "patch_embed.proj.bias": (e,),
              "patch_embed.norm.weight": (e,), "patch_embed.norm.bias": (e,)}
    for i in range(4):
        c = cfg.stage_dim(i)
        hd = cfg.head_dim(i)
        lo, hi = cfg.lo_heads[i] * hd, cfg.hi_heads(i) * hd
        for b in range(cfg.depths[i]):
            p = f"layers.{i}.blocks.{b}."
            norms = ("norm2",) if not cfg.window_sizes[i] else ("norm1", "norm2")
            for n in norms:
                shapes[p + n + ".weight"] = (c,)
                shapes[p + n + ".bias"] = (c,)
            hidden = cfg.mlp_ratio * c
            shapes.update({p + "mlp.fc1.weight": (c, hidden), p + "mlp.fc1.bias": (hidden,),
                           p + "mlp.dwconv.dwconv.weight": (3, 3, hidden), p + "mlp.dwconv.dwconv.bias": (hidden,),
                           p + "mlp.fc2.weight": (hidden, c), p + "mlp.fc2.bias": (c,)})
            if lo:
                shapes.update({p + "attn.l_q.weight": (c, lo), p + "attn.l_q.bias": (lo,),
                               p + "attn.l_kv.weight": (c, 2 * lo), p + "attn.l_kv.bias": (2 * lo,),
                               p + "attn.l_proj.weight": (lo, lo), p + "attn.l_proj.bias": (lo,)})
            if hi:
                shapes.update({p + "attn.h_qkv.weight": (c, 3 * hi), p + "attn.h_qkv.bias": (3 * hi,),
                               p + "attn.h_proj.weight": (hi, hi), p + "attn.h_proj.bias": (hi,)})
        if i < 3:
            p = f"layers.{i}.downsample."
            shapes.update({p + "dconv.weight": (4 * c, 2 * c), p + "dconv.bias": (2 * c,),
                           p + "dconv.conv_offset.weight": (4 * c, 8), p + "dconv.conv_offset.bias": (8,)})
            for n in ("weight", "bias", "running_mean", "running_var"):
                shapes[p + "norm_layer." + n] = (2 * c,)
        if i in cfg.out_norms:
            shapes[f"norm{i}.weight"] = (c,)
            shapes[f"norm{i}.bias"] = (c,)
    shapes.update(head_shapes(cfg.num_features, cfg.num_classes))
    return shapes


# -- official state dict -> engine tensors ------------------------------------------------------------------------
# The one key table of the family (the converter and qnalo.layers use it): the engine keeps the official key
# names and changes the layouts, by kind: (official shape from the engine shape, engine array from the official).
OFFICIAL_KINDS = {
    "plain": (lambda s: s, lambda a: a),
    "linear": (lambda s: s[::-1], lambda a: a.T),                                   # Linear (out, in) -> (in, out)
    "patch": (lambda s: (s[1], 3, 4, 4), lambda a: a.reshape(a.shape[0], -1).T),    # (E, 3, 4, 4) -> (48, E)
    "dwconv": (lambda s: (s[2], 1, 3, 3), lambda a: a[:, 0].transpose(1, 2, 0)),    # (4C, 1, 3, 3) -> (3, 3, 4C)
    # (out, C, 2, 2) -> (4C, out), row (ky*2 + kx)*C + c: dconv and its offset conv
    "conv2x2": (lambda s: (s[1], s[0] // 4, 2, 2), lambda a: a.transpose(2, 3, 1, 0).reshape(-1, a.shape[0])),
}
_LINEAR_MODULES = ("mlp.fc1", "mlp.fc2", "attn.l_q", "attn.l_kv", "attn.l_proj", "attn.h_qkv", "attn.h_proj", "head")


def official_kind(key):
    """The OFFICIAL_KINDS entry of an official (= engine) LITv2 key."""
    if key == "patch_embed.proj.weight":
        return "patch"
    if key.endswith("dwconv.dwconv.weight"):
        return "dwconv"
    if key.endswith(("dconv.weight", "dconv.conv_offset.weight")):
        return "conv2x2"
    if any(key == m + ".weight" or key.endswith("." + m + ".weight") for m in _LINEAR_MODULES):
        return "linear"
    return "plain"


def official_layout(cfg: LITv2Config):
    """[(official key, engine key, kind)] of every tensor of cfg (the keys are the same; num_batches_tracked, a
    training counter, is not among them)."""
    return [(key, key, official_kind(key)) for key in engine_tensor_shapes(cfg)]


def official_shapes(cfg: LITv2Config):
    """Official key -> shape of every tensor of cfg's official state dict."""
    engine = engine_tensor_shapes(cfg)
    return {o: tuple(OFFICIAL_KINDS[k][0](engine[e])) for o, e, k in official_layout(cfg)}


def check_tensors(tensors, cfg: LITv2Config, where="weights"):
    """Missing, unexpected or mis-shaped tensors are one error that names them."""
    check_tensor_shapes(tensors, engine_tensor_shapes(cfg), "LITv2", where)


def _draw_official(rng, name, leaf, shape):
    if leaf in ("running_var",) or (leaf == "weight" and len(shape) == 1):
        return np.ones(shape)                      # LayerNorm / BatchNorm scale, BN variance
    if leaf in ("bias", "running_mean") or "conv_offset" in name:
        return np.zeros(shape)                     # biases, BN mean, offset conv (zero-init officially)
    if "dwconv" in name:
        return rng.normal(0.0, np.sqrt(2.0 / 9.0), shape)
    return np.clip(rng.normal(0.0, 0.02, shape), -0.04, 0.04)   # trunc_normal(std=.02)


def random_tensors(cfg: LITv2Config, seed=0):
    """Random weights in engine layout, drawn like the official initialisation (for tests and benchmarks)."""
    return draw_tensors(engine_tensor_shapes(cfg), _draw_official, seed)


class HiLoAttention:
    """Hi-Fi heads attend inside ws x ws windows, Lo-Fi heads attend to ws x ws average-pooled keys/values;
    output channels are [Hi-Fi | Lo-Fi], each branch with its own output projection. t holds the engine-layout
    tensors prefix + {h_qkv, h_proj, l_q, l_kv, l_proj}.{weight, bias} of the branches that have heads."""

    def __init__(self, ops, t, prefix, head_dim, hi_heads, lo_heads, ws):
        self.ws = ws
        self.head_dim = head_dim
        self.scale = self.head_dim ** -0.5
        self.hi_heads, self.lo_heads = hi_heads, lo_heads
        self.hi_dim, self.lo_dim = self.hi_heads * self.head_dim, self.lo_heads * self.head_dim
        lin = lambda name: Linear(ops, t[prefix + name + ".weight"], t[prefix + name + ".bias"])  # noqa: E731
        # both branches read the same normalised tokens: h_qkv and l_q are one GEMM, [h_qkv | l_q] (C, 3hi + lo)
        inputs = [n for n, used in (("h_qkv", self.hi_heads), ("l_q", self.lo_heads)) if used]
        self.in_proj = Linear(ops, np.concatenate([t[prefix + n + ".weight"] for n in inputs], axis=1),
                               np.concatenate([t[prefix + n + ".bias"] for n in inputs]))
        for n in inputs:
            release_pages(t[prefix + n + ".weight"])   # copied into in_proj
        self.q_col = 3 * self.hi_dim                   # where l_q's columns start
        if self.hi_heads:
            self.h_proj = lin("h_proj")
        if self.lo_heads:
            self.l_kv, self.l_proj = lin("l_kv"), lin("l_proj")
        # read-only, as the weights are: residual_add_layernorm then runs one specialization for both its biases
        self.proj_bias = read_only(np.concatenate(([self.h_proj.bias] if self.hi_heads else [])
                                                  + ([self.l_proj.bias] if self.lo_heads else [])))

    def __call__(self, ops, xn, b, h, w):
        """xn (B*h*w, C) normalised tokens -> the projected output (B*h*w, C) without its bias, and that bias."""
        c = xn.shape[1]
        heads_out = ops.xp.empty((b, h, w, c), dtype=ops.dtype)
        projected = self.in_proj.matmul(xn).reshape(b, h, w, -1)   # [qkv | q], no bias
        bias = self.in_proj.bias
        if self.hi_heads:
            ops.hifi_attention(projected, bias, self.ws, self.hi_heads, self.head_dim, self.scale, heads_out)
        if self.lo_heads:
            xn4 = xn.reshape(b, h, w, c)
            pooled = ops.window_avgpool(xn4, self.ws) if self.ws > 1 else xn4
            kv = self.l_kv.matmul(pooled.reshape(-1, c)).reshape(b, -1, 2 * self.lo_dim)
            ops.lofi_attention(projected, self.q_col, bias[self.q_col:], kv, self.l_kv.bias, self.lo_heads,
                               self.head_dim, self.scale, heads_out, self.hi_dim)
        heads_out = heads_out.reshape(-1, c)
        out = ops.empty(heads_out.shape)
        if self.hi_heads:
            self.h_proj.matmul(heads_out[:, :self.hi_dim], out[:, :self.hi_dim])
        if self.lo_heads:
            self.l_proj.matmul(heads_out[:, self.hi_dim:], out[:, self.hi_dim:])
        return out, self.proj_bias

    def to(self, mover):
        mover.parts(self.in_proj, getattr(self, "h_proj", None), getattr(self, "l_kv", None),
                    getattr(self, "l_proj", None))
        self.proj_bias = mover.array(self.proj_bias)


class ConvFFN:
    """fc1 -> depthwise 3x3 (zero pad 1) -> exact GELU -> fc2."""

    def __init__(self, ops, t, prefix):
        self.fc1 = Linear(ops, t[prefix + "fc1.weight"], t[prefix + "fc1.bias"])
        self.dw_weight = t[prefix + "dwconv.dwconv.weight"]
        self.dw_bias = t[prefix + "dwconv.dwconv.bias"]
        self.fc2 = Linear(ops, t[prefix + "fc2.weight"], t[prefix + "fc2.bias"])

    def __call__(self, ops, xn, b, h, w):
        return ops.conv_ffn(xn, b, h, w, self.fc1.weight, self.fc1.bias, self.dw_weight, self.dw_bias,
                            self.fc2.weight), self.fc2.bias

    def to(self, mover):
        mover.parts(self.fc1, self.fc2)
        self.dw_weight, self.dw_bias = mover.array(self.dw_weight), mover.array(self.dw_bias)


class Block:
    """Pre-norm residual block: [x + HiLo(norm1 x)], x + ConvFFN(norm2 x). Stages 0-1 have no attention."""

    def __init__(self, ops, t, prefix, cfg, stage):
        ws = cfg.window_sizes[stage]
        self.attn = HiLoAttention(ops, t, prefix + "attn.", cfg.head_dim(stage), cfg.hi_heads(stage),
                                  cfg.lo_heads[stage], ws) if ws else None
        self.norm1 = Norm(t, prefix + "norm1") if self.attn else None
        self.norm2 = Norm(t, prefix + "norm2")
        self.mlp = ConvFFN(ops, t, prefix + "mlp.")

    @property
    def first_norm(self):
        return self.norm1 or self.norm2

    def to(self, mover):
        mover.parts(self.attn, self.norm1, self.norm2, self.mlp)

    def __call__(self, ops, x, xn, b, h, w, next_norm):
        """The block contract of both families: x (B*h*w, C) the residual stream, xn = this block's first
        LayerNorm of it; returns (x, xn, h, w) after the block, xn = next_norm(x) when a block follows. Here x
        is updated in place and the map keeps its size."""
        if self.attn:
            y, bias = self.attn(ops, xn, b, h, w)
            ops.residual_add_layernorm(x, y, bias, self.norm2.weight, self.norm2.bias, LN_EPS, xn)
        y, bias = self.mlp(ops, xn, b, h, w)
        add_residual(ops, x, y, bias, next_norm, LN_EPS, xn)
        return x, xn, h, w


class DTM:
    """Deformable token merging: offsets from a 2x2/s2 conv, DCNv1 2x2/s2 sampling, BatchNorm (folded into the
    deformable conv's weights at load time), GELU. Halves H and W (floor), doubles C."""

    def __init__(self, ops, t, prefix):
        self.offset = Linear(ops, t[prefix + "dconv.conv_offset.weight"], t[prefix + "dconv.conv_offset.bias"])
        scale = t[prefix + "norm_layer.weight"].astype(np.float64) / np.sqrt(
            t[prefix + "norm_layer.running_var"].astype(np.float64) + BN_EPS)
        weight = t[prefix + "dconv.weight"].astype(np.float64) * scale
        bias = (t[prefix + "dconv.bias"] - t[prefix + "norm_layer.running_mean"]) * scale \
            + t[prefix + "norm_layer.bias"]
        self.conv = Linear(ops, weight.astype(np.float32), bias.astype(np.float32))
        release_pages(t[prefix + "dconv.weight"])   # folded into a copy

    def __call__(self, ops, x, b, h, w):
        c = x.shape[1]
        x4 = x.reshape(b, h, w, c)
        ho, wo = h // 2, w // 2
        patches = x4[:, :2 * ho, :2 * wo].reshape(b, ho, 2, wo, 2, c).transpose(0, 1, 3, 2, 4, 5)
        offsets = self.offset.matmul(patches.reshape(b * ho * wo, 4 * c)) + self.offset.bias
        cols = ops.deform_sample(x4, offsets.reshape(b, ho, wo, 8))
        y = self.conv.matmul(cols.reshape(b * ho * wo, 4 * c))
        return ops.bias_gelu(y, self.conv.bias), ho, wo

    def to(self, mover):
        mover.parts(self.offset, self.conv)


class LITv2(Classifier):
    """A LITv2 classifier or dense backbone. `model(x)` -> logits; `model.forward_features(x)` -> 4 NCHW maps."""

    architecture = "litv2"
    LN_EPS = LN_EPS
    NO_HEAD = ("this model is a dense-prediction backbone (converted from a detection/segmentation "
               "checkpoint) and has no classification head; call model.forward_features(x)")
    min_size = 29   # the smallest side whose stage-3 map is non-empty: ceil(29/4) = 8 -> 4 -> 2 -> 1

    def __init__(self, cfg: LITv2Config, tensors, backend="numba", source=None, dtype="float32"):
        t = self._setup(cfg, tensors, backend, source, check_tensors, dtype)
        self.patch = Linear(self._ops, t["patch_embed.proj.weight"], t["patch_embed.proj.bias"])
        self.patch_norm = Norm(t, "patch_embed.norm")
        self.stages = [[Block(self._ops, t, f"layers.{i}.blocks.{j}.", cfg, i) for j in range(cfg.depths[i])]
                       for i in range(4)]
        self.downsamples = [DTM(self._ops, t, f"layers.{i}.downsample.") for i in range(3)]
        self.out_norms = {i: Norm(t, f"norm{i}") for i in cfg.out_norms}
        if cfg.num_classes:
            self.norm = Norm(t, "norm")
            self.head = Linear(self._ops, t["head.weight"], t["head.bias"])
        self.num_parameters = int(sum(v.size for k, v in tensors.items()
                                      if not k.endswith(("running_mean", "running_var"))))

    random_tensors = staticmethod(random_tensors)

    def _parts(self):
        return [self.patch, self.patch_norm, *(b for stage in self.stages for b in stage), *self.downsamples,
                *self.out_norms.values(), getattr(self, "norm", None), getattr(self, "head", None)]

    # -- input checks ---------------------------------------------------------------------------------------
    # LITv2-S and -B: 264 and 352 B per pixel at batch 1 (see Classifier.forward_bytes)
    ACTIVATION_BYTES_PER_PIXEL_CHANNEL = 2.75

    def _check_input(self, x):
        return check_image_batch(x, "LITv2", self.min_size, 32, self._ops.xp)

    @staticmethod
    def feature_sizes(height, width):
        """(H_i, W_i) of the four stage maps for an input of height x width."""
        h, w = -(-height // 4), -(-width // 4)
        sizes = [(h, w)]
        for _ in range(3):
            h, w = h // 2, w // 2
            sizes.append((h, w))
        return sizes

    # -- forward ----------------------------------------------------------------------------------------------
    def _patch_embed(self, x):
        b, _, height, width = x.shape
        h, w = -(-height // 4), -(-width // 4)
        if (4 * h, 4 * w) != (height, width):   # zero-pad right and bottom to a multiple of 4
            x = self._ops.xp.pad(x, ((0, 0), (0, 0), (0, 4 * h - height), (0, 4 * w - width)))
        patches = x.reshape(b, 3, h, 4, w, 4).transpose(0, 2, 4, 1, 3, 5).reshape(b * h * w, 48)
        tokens = self.patch.matmul(patches)
        tokens += self.patch.bias
        return tokens, h, w

    def _run_stage(self, i, tokens, b, h, w):
        """The blocks of stage i on tokens (B*h*w, C), in place."""
        blocks = self.stages[i]
        first = blocks[0].first_norm
        xn = self._ops.layernorm(tokens, first.weight, first.bias, LN_EPS, self._ops.xp.empty_like(tokens))
        for j, blk in enumerate(blocks):
            tokens, xn, h, w = blk(self._ops, tokens, xn, b, h, w,
                                   blocks[j + 1].first_norm if j + 1 < len(blocks) else None)
        return tokens

    def _stages(self, x, keep_early=True):
        """Yields (tokens (B*h*w, C), h, w) of each stage before its downsampling.

        Stages 0-1 mix no tokens across images, so on the CPU large maps run there a few images at a time
        (ops.tokens_per_group stage-0 tokens; one 224 image has 3136): their 4C-wide hidden buffers then stay in
        cache instead of streaming through memory (batch 8 at 224 would make 38 MB buffers). Stages 2-3 run on
        the whole batch, where larger GEMMs pay; on a GPU every stage does."""
        ops = self._ops
        b = x.shape[0]
        per_image = -(-x.shape[2] // 4) * -(-x.shape[3] // 4)
        group = b if ops.tokens_per_group is None else max(1, ops.tokens_per_group // per_image)
        early, merged = ([], []), []
        for start in range(0, b, group):
            n = min(group, b - start)
            tokens, h, w = self._patch_embed(x[start:start + n])
            tokens = ops.layernorm(tokens, self.patch_norm.weight, self.patch_norm.bias, LN_EPS,
                                   ops.xp.empty_like(tokens))
            for i in (0, 1):
                tokens = self._run_stage(i, tokens, n, h, w)
                if keep_early:
                    early[i].append((tokens, h, w))
                tokens, h, w = self.downsamples[i](ops, tokens, n, h, w)
            merged.append(tokens)
        for parts in early if keep_early else ():
            yield (ops.xp.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]), *parts[0][1:]
        tokens = ops.xp.concatenate(merged) if len(merged) > 1 else merged[0]
        for i in (2, 3):
            yield self._run_stage(i, tokens, b, h, w), h, w
            if i < 3:
                tokens, h, w = self.downsamples[i](ops, tokens, b, h, w)

    def forward_features(self, x):
        """x (B, 3, H, W) float32 -> [(B, C_i, H_i, W_i) for the 4 stages], taken before each downsampling;
        with a dense checkpoint's per-stage norms applied where it has them."""
        x, to_caller = self._input(x)
        b, xp = x.shape[0], self._ops.xp
        if b == 0:
            return [to_caller(xp.zeros((0, self.config.stage_dim(i), h, w), self._ops.dtype))
                    for i, (h, w) in enumerate(self.feature_sizes(*x.shape[2:]))]
        feats = []
        for i, (tokens, h, w) in enumerate(self._stages(x)):
            if i in self.out_norms:
                n = self.out_norms[i]
                tokens = self._ops.layernorm(tokens, n.weight, n.bias, LN_EPS, xp.empty_like(tokens))
            feats.append(to_caller(xp.ascontiguousarray(tokens.reshape(b, h, w, -1).transpose(0, 3, 1, 2))))
        return feats
