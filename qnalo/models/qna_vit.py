"""QnA-ViT (moabarar/qna models/qna_vit.py) on NumPy + Numba, channels-last tokens, float32.

Bottom-up as in the official code: QnA attention / window MSA -> pre-norm block / stride-2 QnA block -> stages ->
model. Tokens are kept as (B*H*W, C) row-major arrays in image order, so that every linear layer is one GEMM
(`ops.pack_weight` / `ops.matmul`) and LayerNorm and the MLP are per-token kernels; biases are left out of the
GEMMs and added by the kernel that reads the result. The MSA kernel reads its w x w windows in place, so the
map is never split into windows (the official LSAStage splits it once per stage; LN and the MLP act per token,
so the two are the same). Sizes follow the official code: the stem pads 'SAME' (ceil(H/4), the smaller half of
the padding at the top / left), every stride-2 block gives ceil(side/2), and a stage with MSA blocks needs its
window to divide its map (the official LSAStage asserts it; here it is an InputError naming the sizes that work).
"""
import numpy as np

from ..errors import InputError
from ..kernels.qna import fold_queries, qna_output_size
from ..kernels.window_msa import relative_bias
from ..weights import release_pages
from .classifier import Classifier
from .inputs import check_image_batch
from .parts import Linear, Norm, add_residual, read_only
from .tensors import check_tensor_shapes, draw_tensors, head_shapes
from .qna_vit_config import QnAViTConfig

LN_EPS = 1e-6   # Flax nn.LayerNorm's default (official: fast variance E[x^2] - E[x]^2; here two-pass, ~1e-7 apart)


def _block_prefixes(cfg: QnAViTConfig):
    """(stage, kind, engine prefix, official Flax path) of every block in execution order; kind is 'msa', 'qna'
    or 'down' (the stride-2 block, numbered after the stage's QnA blocks in the Flax tree)."""
    for i in range(4):
        for j in range(cfg.msa_depths[i]):
            yield i, "msa", f"stages.{i}.msa.{j}.", f"LSAStage_{i}/MSA_Block_{j + 1}"
        for j in range(cfg.qna_depths[i]):
            yield i, "qna", f"stages.{i}.qna.{j}.", f"QnAStage_{i}/QnA_Block_{j + 1}"
        if i < 3:
            yield i, "down", f"stages.{i}.downsample.", f"QnAStage_{i}/QnA_Block_{cfg.qna_depths[i] + 1}_stride_2"


def engine_tensor_shapes(cfg: QnAViTConfig):
    """name -> shape of every tensor a qnalo QnA-ViT weights file holds (docs/format.md)."""
    e, nq = cfg.embed_dim, cfg.n_queries
    shapes = {"stem.weight": (48, e)}
    for i, kind, p, _ in _block_prefixes(cfg):
        c = cfg.stage_dim(i)
        f = 2 * c if kind == "down" else c          # the block's output width
        shapes.update({p + "norm1.weight": (c,), p + "norm1.bias": (c,),
                       p + "norm2.weight": (f,), p + "norm2.bias": (f,),
                       p + "mlp.fc1.weight": (f, 4 * f), p + "mlp.fc1.bias": (4 * f,),
                       p + "mlp.fc2.weight": (4 * f, f), p + "mlp.fc2.bias": (f,)})
        if kind == "msa":
            w = cfg.msa_windows[i]
            shapes.update({p + "attn.qkv.weight": (c, 3 * c), p + "attn.proj.weight": (c, c),
                           p + "attn.rpb_table": ((2 * w - 1) ** 2, cfg.msa_heads[i])})
        else:
            kk = cfg.qna_kernel_sizes[i] ** 2
            nc = nq * cfg.qna_heads[i] * (2 if kind == "down" else 1)
            shapes.update({p + "attn.proj_k.weight": (c, f), p + "attn.proj_v.weight": (c, f),
                           p + "attn.proj_out.weight": (f, f), p + "attn.q_param": (nq, f),
                           p + "attn.attn_scale": (kk, nc), p + "attn.rpb_table": (kk, nc)})
            if kind == "down":
                shapes[p + "skip.weight"] = (c, f)
    shapes.update(head_shapes(cfg.num_features, cfg.num_classes))
    return shapes


# -- official layouts -> engine tensors -------------------------------------------------------------------------
# The one key table of the family: the converter (weights_converter/qna_vit.py) and qnalo.layers use it.
# Leaf kinds: how an engine tensor is stored in each source (engine shape -> source shape; source -> engine).
#   dense   Flax Dense kernel (in, out) = engine; torch Linear (out, in)
#   conv1x1 Flax (1, 1, in, out); torch (out, in, 1, 1); engine (in, out)
#   out1x1  the QnA output projection: a Flax Dense kernel (in, out), a torch 1x1 conv (out, in, 1, 1) (DAT port)
#   stem    Flax HWIO (4, 4, 3, E); torch OIHW (E, 3, 4, 4); engine (48, E), row c*16 + ky*4 + kx
#   scale   attn_scale: (1, 1, k^2, nc) in both sources; engine (k^2, nc)
#   plain   the same everywhere (LayerNorm, biases, queries, rpe tables)
FLAX_SHAPE = {"dense": lambda s: s, "out1x1": lambda s: s, "conv1x1": lambda s: (1, 1) + s,
              "stem": lambda s: (4, 4, 3, s[1]), "scale": lambda s: (1, 1) + s, "plain": lambda s: s}
TORCH_SHAPE = {"dense": lambda s: s[::-1], "conv1x1": lambda s: s[::-1] + (1, 1),
               "out1x1": lambda s: s[::-1] + (1, 1), "stem": lambda s: (s[1], 3, 4, 4),
               "scale": lambda s: (1, 1) + s, "plain": lambda s: s}
FROM_FLAX = {"dense": lambda a: a, "out1x1": lambda a: a, "conv1x1": lambda a: a[0, 0],
             "scale": lambda a: a[0, 0], "plain": lambda a: a,
             "stem": lambda a: a.transpose(2, 0, 1, 3).reshape(48, a.shape[3])}   # HWIO -> row c*16 + ky*4 + kx
FROM_TORCH = {"dense": lambda a: a.T, "conv1x1": lambda a: a[:, :, 0, 0].T, "out1x1": lambda a: a[:, :, 0, 0].T,
              "scale": lambda a: a[0, 0], "plain": lambda a: a,
              "stem": lambda a: a.reshape(a.shape[0], 48).T}                     # OIHW -> row c*16 + ky*4 + kx

# A block's leaves: (Flax path in the block, engine name in the block, kind). QNA_LEAVES are also the layer's
# own (qnalo.layers.QnA), without the FusedKQnA_0/ and attn. prefixes.
LN_LEAVES = (("LayerNorm_0/scale", "norm1.weight", "plain"), ("LayerNorm_0/bias", "norm1.bias", "plain"),
             ("LayerNorm_1/scale", "norm2.weight", "plain"), ("LayerNorm_1/bias", "norm2.bias", "plain"))
MLP_LEAVES = (("MlpBlock_0/Dense_0/kernel", "mlp.fc1.weight", "dense"),
              ("MlpBlock_0/Dense_0/bias", "mlp.fc1.bias", "plain"),
              ("MlpBlock_0/Dense_1/kernel", "mlp.fc2.weight", "dense"),
              ("MlpBlock_0/Dense_1/bias", "mlp.fc2.bias", "plain"))
MSA_LEAVES = (("MultiHeadSelfAttention_0/to_qkv/kernel", "attn.qkv.weight", "dense"),
              ("MultiHeadSelfAttention_0/to_out/kernel", "attn.proj.weight", "dense"),
              ("MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/rpe_bias", "attn.rpb_table", "plain"))
QNA_LEAVES = (("FusedKQnA_0/Wk", "attn.proj_k.weight", "dense"),
              ("FusedKQnA_0/to_v/kernel", "attn.proj_v.weight", "dense"),
              ("FusedKQnA_0/to_out/kernel", "attn.proj_out.weight", "out1x1"),
              ("FusedKQnA_0/query", "attn.q_param", "plain"),
              ("FusedKQnA_0/attn_scale_weights", "attn.attn_scale", "scale"),
              ("FusedKQnA_0/rpe_bias", "attn.rpb_table", "plain"))


def official_layout(cfg):
    """[(Flax path, engine name, kind)] for every tensor of `cfg`; the PyTorch-layout name is the engine name."""
    rows = [("StemBlock_0/conv_1x1/kernel", "stem.weight", "stem")]
    for _, kind, engine, flax in _block_prefixes(cfg):
        leaves = [*LN_LEAVES, *MLP_LEAVES, *(MSA_LEAVES if kind == "msa" else QNA_LEAVES)]
        if kind == "down":
            leaves.append(("Conv_0/kernel", "skip.weight", "conv1x1"))
        rows += [(f"{flax}/{f}", engine + e, k) for f, e, k in leaves]
    if cfg.num_classes:
        rows += [("ClassificationHead_0/LayerNorm_0/scale", "norm.weight", "plain"),
                 ("ClassificationHead_0/LayerNorm_0/bias", "norm.bias", "plain"),
                 ("ClassificationHead_0/head_logits/kernel", "head.weight", "dense"),
                 ("ClassificationHead_0/head_logits/bias", "head.bias", "plain")]
    return rows


def official_flax_shapes(cfg):
    """Flax path -> shape of every parameter leaf of `cfg` (spec 4.2)."""
    engine = engine_tensor_shapes(cfg)
    return {f: tuple(FLAX_SHAPE[k](engine[e])) for f, e, k in official_layout(cfg)}


def official_torch_shapes(cfg):
    """PyTorch-layout name -> shape of every tensor of `cfg` (spec 6.4)."""
    engine = engine_tensor_shapes(cfg)
    return {e: tuple(TORCH_SHAPE[k](engine[e])) for _, e, k in official_layout(cfg)}


def check_tensors(tensors, cfg: QnAViTConfig, where="weights"):
    """Missing, unexpected or mis-shaped tensors are one error that names them."""
    check_tensor_shapes(tensors, engine_tensor_shapes(cfg), "QnA-ViT", where)


def random_tensors(cfg: QnAViTConfig, seed=0):
    """Random weights in engine layout, drawn like the official initialisation (for tests and benchmarks):
    kernels lecun-normal (normal of std 1/sqrt(fan_in), truncated at 2 std), biases and both rpe tables zero,
    LayerNorm scales one, queries trunc-normal(2) * sqrt(1/d), attn_scale N(0, 0.02^2)."""
    def draw(rng, name, leaf, shape):
        if leaf == "weight" and len(shape) == 1:
            return np.ones(shape)
        if leaf in ("bias", "rpb_table"):
            return np.zeros(shape)
        if leaf == "attn_scale":
            return rng.normal(0.0, 0.02, shape)
        if leaf == "q_param":
            d = cfg.qna_head_dim(int(name.split(".")[1]))
            return np.clip(rng.normal(0.0, 1.0, shape), -2.0, 2.0) * np.sqrt(1.0 / d)
        std = 1.0 / np.sqrt(shape[0])
        return np.clip(rng.normal(0.0, std, shape), -2 * std, 2 * std)

    return draw_tensors(engine_tensor_shapes(cfg), draw, seed)


class QnAAttention:
    """The QnA layer (kernels/qna.py): one GEMM to [logits | values] with the normalised queries folded into
    the key projection at load time, the fused window kernel, the output projection. QnA-ViT's layers have no
    biases (official use_bias=False); a layer with use_bias=True (qnalo.layers.QnA) passes in_bias, the
    (nq*h + F,) bias of [logits | values] (the logits' part is the key bias folded with the queries)."""

    def __init__(self, ops, t, prefix, heads, stride, in_bias=None):
        self.heads, self.stride = heads, stride
        folded = fold_queries(t[prefix + "q_param"], t[prefix + "proj_k.weight"], heads)
        self.in_proj = Linear(ops, np.concatenate([folded, t[prefix + "proj_v.weight"]], axis=1), in_bias)
        for n in ("proj_k.weight", "proj_v.weight"):
            release_pages(t[prefix + n])   # folded / copied into in_proj
        self.out_proj = Linear(ops, t[prefix + "proj_out.weight"], None)
        self.rpe = t[prefix + "rpb_table"]
        self.attn_scale = t[prefix + "attn_scale"]
        self.ksize = int(round(self.rpe.shape[0] ** 0.5))
        self.features = t[prefix + "proj_out.weight"].shape[0]

    def __call__(self, ops, xn, b, h, w):
        """xn (B*h*w, C) normalised tokens -> (B*ho*wo, F_out) without proj_out's bias, ho, wo."""
        lv = self.in_proj.matmul(xn).reshape(b, h, w, -1)
        if self.in_proj.bias is not None:
            lv += self.in_proj.bias
        ho, wo = qna_output_size(h, self.ksize, self.stride), qna_output_size(w, self.ksize, self.stride)
        out = ops.xp.empty((b, ho, wo, self.features), ops.dtype)
        ops.qna_windows(lv, self.rpe, self.attn_scale, self.heads, self.stride, out)
        return self.out_proj.matmul(out.reshape(-1, self.features)), ho, wo

    def to(self, mover):
        mover.parts(self.in_proj, self.out_proj)
        self.rpe, self.attn_scale = mover.array(self.rpe), mover.array(self.attn_scale)


class WindowMSA:
    """Multi-head self-attention in w x w windows with the Swin-style relative position bias; to_qkv in the
    official per-head interleaved order, no biases (official use_bias=False)."""

    def __init__(self, ops, t, prefix, heads, window):
        self.heads, self.window = heads, window
        self.qkv = Linear(ops, t[prefix + "qkv.weight"], None)
        self.proj = Linear(ops, t[prefix + "proj.weight"], None)
        self.rel_bias = relative_bias(t[prefix + "rpb_table"], window).astype(np.float32)

    def __call__(self, ops, xn, b, h, w):
        c = xn.shape[1]
        qkv = self.qkv.matmul(xn).reshape(b, h, w, 3 * c)
        if self.qkv.bias is not None:   # QnA-ViT has none; qnalo.layers.WindowMSA of a use_bias module does
            qkv += self.qkv.bias
        out = ops.xp.empty((b, h, w, c), ops.dtype)
        ops.window_msa(qkv, self.rel_bias, self.window, self.heads, out)
        return self.proj.matmul(out.reshape(-1, c)), h, w

    def to(self, mover):
        mover.parts(self.qkv, self.proj)
        self.rel_bias = mover.array(self.rel_bias)


class Mlp:
    """Dense(C -> 4C) -> tanh GELU -> Dense(4C -> C), with biases."""

    def __init__(self, ops, t, prefix):
        self.fc1 = Linear(ops, t[prefix + "fc1.weight"], t[prefix + "fc1.bias"])
        self.fc2 = Linear(ops, t[prefix + "fc2.weight"], t[prefix + "fc2.bias"])

    def __call__(self, ops, xn):
        return ops.mlp_gelu_tanh(xn, self.fc1.weight, self.fc1.bias, self.fc2.weight), self.fc2.bias

    def to(self, mover):
        mover.parts(self.fc1, self.fc2)


class Block:
    """Pre-norm residual block (official BaseBlock): x + Mix(norm1 x), then x + MLP(norm2 x). The stride-2
    block (`skip` given) replaces the first residual by skip(x) + Mix(norm1 x), skip a 1x1 stride-2 conv of the
    un-normalised input, and doubles the width."""

    def __init__(self, ops, t, prefix, mixer, skip=False):
        self.mixer = mixer
        self.norm1 = Norm(t, prefix + "norm1")
        self.norm2 = Norm(t, prefix + "norm2")
        self.mlp = Mlp(ops, t, prefix + "mlp.")
        self.skip = Linear(ops, t[prefix + "skip.weight"], None) if skip else None
        # the mixers have no output bias; read-only, as the weights are (one residual_add_layernorm specialization)
        self.zero_bias = read_only(np.zeros(self.norm2.weight.shape, np.float32))

    def __call__(self, ops, x, xn, b, h, w, next_norm):
        """The block contract of both families (see litv2.Block): returns (x, xn, h, w) after the block. x is
        updated in place unless the block downsamples, which returns a new, smaller map."""
        y, ho, wo = self.mixer(ops, xn, b, h, w)
        if self.skip is not None:
            c = x.shape[1]
            x = self.skip.matmul(ops.xp.ascontiguousarray(x.reshape(b, h, w, c)[:, ::2, ::2]).reshape(-1, c))
            xn = ops.xp.empty_like(x)
        ops.residual_add_layernorm(x, y, self.zero_bias, self.norm2.weight, self.norm2.bias, LN_EPS, xn)
        y, bias = self.mlp(ops, xn)
        add_residual(ops, x, y, bias, next_norm, LN_EPS, xn)
        return x, xn, ho, wo

    def to(self, mover):
        mover.parts(self.mixer, self.norm1, self.norm2, self.mlp, self.skip)
        self.zero_bias = mover.array(self.zero_bias)


def stage_sides(n):
    """The four stage sides for an input side n: ceil(n/4), then ceil(./2) per stride-2 block."""
    sides = [-(-n // 4)]
    for _ in range(3):
        sides.append(-(-sides[-1] // 2))
    return sides


class QnAViT(Classifier):
    """A QnA-ViT classifier (or, with num_classes 0, backbone). `model(x)` -> logits;
    `model.forward_features(x)` -> 4 NCHW maps, each stage's map before its stride-2 block (stage 3: its output),
    i.e. strides 4, 8, 16, 32, no extra norm (the official code defines no feature taps; spec 3.11)."""

    architecture = "qna_vit"
    LN_EPS = LN_EPS
    NO_HEAD = ("this model is a backbone without a classification head (num_classes 0); "
               "call model.forward_features(x)")

    def __init__(self, cfg: QnAViTConfig, tensors, backend="numba", source=None, dtype="float32"):
        t = self._setup(cfg, tensors, backend, source, check_tensors, dtype)
        ops = self._ops
        self.stem = Linear(ops, t["stem.weight"], None)
        self.stages = [[] for _ in range(4)]     # blocks before the stride-2 block
        self.downsamples = []
        for i, kind, p, _ in _block_prefixes(cfg):
            if kind == "msa":
                blk = Block(ops, t, p, WindowMSA(ops, t, p + "attn.", cfg.msa_heads[i], cfg.msa_windows[i]))
            else:
                heads = cfg.qna_heads[i] * (2 if kind == "down" else 1)
                attn = QnAAttention(ops, t, p + "attn.", heads, 2 if kind == "down" else 1)
                blk = Block(ops, t, p, attn, skip=kind == "down")
            (self.downsamples if kind == "down" else self.stages[i]).append(blk)
        order = [blk for i in range(4) for blk in self.stages[i] + self.downsamples[i:i + 1]]
        self._next_norm = {id(a): b.norm1 for a, b in zip(order, order[1:])}
        self._first_norm = order[0].norm1
        if cfg.num_classes:
            self.norm = Norm(t, "norm")
            self.head = Linear(ops, t["head.weight"], t["head.bias"])
        self.num_parameters = int(sum(v.size for v in tensors.values()))

    random_tensors = staticmethod(random_tensors)

    def _parts(self):
        # the norms _first_norm and _next_norm name belong to the blocks, which move them
        return [self.stem, *(b for stage in self.stages for b in stage), *self.downsamples,
                getattr(self, "norm", None), getattr(self, "head", None)]

    # -- input checks ---------------------------------------------------------------------------------------
    def _side_fits(self, n):
        sides = stage_sides(n)
        return all(sides[i] % self.config.msa_windows[i] == 0 for i in range(4) if self.config.msa_depths[i])

    def _working_sides(self, n, show=3):
        """'a-b, c-d, ...': the ranges of sides that fit the MSA windows, around n."""
        ranges, start = [], None
        for m in range(1, max(2 * n, 2048) + 2):
            if self._side_fits(m) and start is None:
                start = m
            elif not self._side_fits(m) and start is not None:
                ranges.append((start, m - 1))
                start = None
        below = [r for r in ranges if r[0] <= n][-show:]
        above = [r for r in ranges if r[0] > n][:show]
        return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in below + above)

    def warm_up_side(self):
        """The side nearest the resolution that fits the MSA windows (None if none up to twice it does)."""
        n = self.config.img_size
        return next((m for d in range(n) for m in (n + d, n - d) if m >= 32 and self._side_fits(m)), None)

    # QnA-ViT-Tiny: 128 (448 px) to 152 (224 px) B per pixel (see Classifier.forward_bytes)
    ACTIVATION_BYTES_PER_PIXEL_CHANNEL = 2.4

    def _check_input(self, x):
        x = check_image_batch(x, "QnA-ViT", 1, 32, self._ops.xp)
        cfg = self.config
        for axis, n in (("height", x.shape[2]), ("width", x.shape[3])):
            if not self._side_fits(n):
                sides = stage_sides(n)
                bad = next(i for i in range(4) if cfg.msa_depths[i] and sides[i] % cfg.msa_windows[i])
                raise InputError(
                    f"image {x.shape[2]}x{x.shape[3]}: {axis} {n} gives a stage-{bad} side of {sides[bad]}, not a "
                    f"multiple of its {cfg.msa_windows[bad]}x{cfg.msa_windows[bad]} attention windows (the official "
                    f"model asserts the same); {axis}s that work: {self._working_sides(n)}")
        return x

    def feature_sizes(self, height, width):
        """(H_i, W_i) of the four stage maps for an input of height x width."""
        return list(zip(stage_sides(height), stage_sides(width)))

    # -- forward ----------------------------------------------------------------------------------------------
    def _stem(self, x):
        """4x4 stride-4 conv, 'SAME' padding (XLA: total 4*ceil(H/4) - H, the smaller half at the top / left)."""
        b, _, height, width = x.shape
        h, w = -(-height // 4), -(-width // 4)
        ph, pw = 4 * h - height, 4 * w - width
        if ph or pw:
            x = self._ops.xp.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
        patches = self._ops.xp.ascontiguousarray(x.reshape(b, 3, h, 4, w, 4).transpose(0, 2, 4, 1, 3, 5)).reshape(-1, 48)
        return self.stem.matmul(patches), h, w

    def _stages(self, x, keep_early=True):
        """Yields (tokens (B*h*w, C), h, w) of each stage before its stride-2 block; the last is the output.
        keep_early is the Classifier's flag; nothing is kept across stages here, so it changes nothing."""
        ops, b = self._ops, x.shape[0]
        tokens, h, w = self._stem(x)
        xn = ops.layernorm(tokens, self._first_norm.weight, self._first_norm.bias, LN_EPS, ops.xp.empty_like(tokens))
        for i in range(4):
            for blk in self.stages[i]:
                tokens, xn, h, w = blk(ops, tokens, xn, b, h, w, self._next_norm.get(id(blk)))
            yield tokens, h, w
            if i < 3:
                blk = self.downsamples[i]
                tokens, xn, h, w = blk(ops, tokens, xn, b, h, w, self._next_norm.get(id(blk)))

    def forward_features(self, x):
        """x (B, 3, H, W) float32 -> [(B, C_i, H_i, W_i) for the 4 stages]."""
        x, to_caller = self._input(x)
        b, xp = x.shape[0], self._ops.xp
        if b == 0:
            return [to_caller(xp.zeros((0, self.config.stage_dim(i), h, w), self._ops.dtype))
                    for i, (h, w) in enumerate(self.feature_sizes(*x.shape[2:]))]
        return [to_caller(xp.ascontiguousarray(tokens.reshape(b, h, w, -1).transpose(0, 3, 1, 2)))
                for tokens, h, w in self._stages(x)]
