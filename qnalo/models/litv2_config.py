"""LITv2 hyper-parameters and the named variants (ziplab/LITv2 configs/litv2-*.yaml)."""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .tensors import ConfigDict


@dataclass(frozen=True)
class LITv2Config(ConfigDict):
    NAME = "LITv2"   # in errors
    embed_dim: int = 96
    depths: tuple = (2, 2, 6, 2)
    num_heads: tuple = (3, 6, 12, 24)
    window_sizes: tuple = (0, 0, 2, 1)   # LOCAL_WS; 0 = ConvFFN-only stage (no attention), 1 = global MSA
    alpha: float = 0.9                   # share of Lo-Fi heads; the split truncates: int(heads * alpha)
    lo_heads: tuple = None               # Lo-Fi heads per stage; None = derived from alpha like the official code
    mlp_ratio: int = 4
    num_classes: int = 1000              # 0 = backbone without final norm and head (dense checkpoints)
    img_size: int = 224                  # official evaluation resolution (any H, W runs; see README)
    out_norms: tuple = ()                # stages whose forward_features output has its own LayerNorm (dense ckpts)

    # fields that make a variant: a weights file must agree on them with the name it is loaded under
    ARCHITECTURE_FIELDS: ClassVar[tuple] = ("embed_dim", "depths", "num_heads", "window_sizes", "mlp_ratio")

    def __post_init__(self):
        for name in ("depths", "num_heads", "window_sizes", "out_norms"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        if self.lo_heads is None:
            object.__setattr__(self, "lo_heads", tuple(self._official_lo_heads(i) for i in range(4)))
        else:
            object.__setattr__(self, "lo_heads", tuple(int(v) for v in self.lo_heads))
        for i in range(4):
            if self.window_sizes[i] and self.stage_dim(i) % self.num_heads[i]:
                raise ValueError(f"stage {i}: dim {self.stage_dim(i)} is not divisible by {self.num_heads[i]} heads")
            if not 0 <= self.lo_heads[i] <= self.num_heads[i]:
                raise ValueError(f"stage {i}: lo_heads {self.lo_heads[i]} outside 0..{self.num_heads[i]}")

    def _official_lo_heads(self, i):
        ws = self.window_sizes[i]
        if ws == 0:
            return 0
        if ws == 1:  # window size 1: every head is Lo-Fi (plain global MSA), alpha is ignored
            return self.num_heads[i]
        return int(self.num_heads[i] * self.alpha)  # float64 product, truncated, as in the official code

    def stage_dim(self, i):
        return self.embed_dim * 2 ** i

    def hi_heads(self, i):
        return self.num_heads[i] - self.lo_heads[i] if self.window_sizes[i] else 0

    def head_dim(self, i):
        return self.stage_dim(i) // self.num_heads[i]

    @property
    def num_features(self):
        return self.stage_dim(3)

    def macs(self, h, w):
        """Multiply-accumulates of one (3, h, w) image: every Linear, convolution and attention product (HiLo's
        as its official flops(H, W) counts them); normalisation, activations, softmax, pooling and the deformable
        convolution's bilinear sampling are left out."""
        h, w = -(-h // 4), -(-w // 4)                        # patch embedding: 4x4 stride 4, padded
        total = h * w * self.embed_dim * 3 * 16
        for i in range(4):
            c, n, ws = self.stage_dim(i), h * w, self.window_sizes[i]
            hidden = c * self.mlp_ratio
            block = n * c * hidden * 2 + n * hidden * 9      # ConvFFN: fc1, fc2, depthwise 3x3
            if ws:
                block += self._hilo_macs(i, h, w)
            total += self.depths[i] * block
            if i < 3:                                        # DTM: 2x2 stride-2 deformable conv and its offsets
                h, w = h // 2, w // 2
                total += h * w * c * 4 * (2 * c + 8)
        return total + (self.num_features * self.num_classes if self.num_classes else 0)

    def _hilo_macs(self, i, h, w):
        ws, c, hd = self.window_sizes[i], self.stage_dim(i), self.head_dim(i)
        hp, wp = ws * -(-h // ws), ws * -(-w // ws)          # padded to whole windows
        n, windows, kv = hp * wp, (hp // ws) * (wp // ws), (hp // ws) * (wp // ws)
        hi, lo = self.hi_heads(i) * hd, self.lo_heads[i] * hd
        hifi = n * c * 3 * hi + windows * (ws * ws) ** 2 * hi * 2 + n * hi * hi
        lofi = n * c * lo + kv * c * 2 * lo + n * lo * kv * 2 + n * lo * lo
        return hifi + lofi

    def miniature(self):
        """A config that runs the same kernels on the same kinds of arrays at a fraction of the cost (see
        warmup.warm_up): up to two blocks per stage (one block feeding another fuses differently from the
        last), the same heads, head split, windows, resolution and head, and the narrowest width the heads
        divide."""
        narrow = next(e for e in range(1, self.embed_dim + 1)
                      if all(not self.window_sizes[i] or e * 2 ** i % self.num_heads[i] == 0 for i in range(4)))
        return dataclasses.replace(self, embed_dim=narrow, depths=tuple(min(d, 2) for d in self.depths))

    def replace(self, **overrides):
        """A copy with some fields changed; the head split is re-derived unless given."""
        if "lo_heads" not in overrides:
            overrides["lo_heads"] = None
        return dataclasses.replace(self, **overrides)


LITV2_VARIANTS = {
    "litv2_s": LITv2Config(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24)),
    "litv2_m": LITv2Config(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24)),
    "litv2_b": LITv2Config(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32)),
    "litv2_b_384": LITv2Config(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), img_size=384),
}
