"""QnA-ViT hyper-parameters and the named variants (moabarar/qna models/qna_vit.py builders; spec qna.md 3.1)."""
import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from .tensors import ConfigDict


@dataclass(frozen=True)
class QnAViTConfig(ConfigDict):
    NAME = "QnA-ViT"   # in errors
    embed_dim: int = 64                       # base_dim: stage i is embed_dim * 2^i wide
    qna_depths: tuple = (2, 3, 2, 0)          # qna_layers: QnA blocks per stage, without the stride-2 block
    msa_depths: tuple = (0, 0, 4, 2)          # lsa_layers: MSA blocks per stage (they run before the QnA blocks)
    qna_heads: tuple = (8, 16, 32, 64)        # per stage; the stride-2 block of stage i uses 2 * qna_heads[i]
    msa_heads: tuple = (2, 4, 8, 16)          # lsa_heads
    qna_kernel_sizes: tuple = (3, 3, 3, 3)    # qna_receptive_field: the QnA window k (odd), padding (k - 1) // 2
    msa_windows: tuple = (7, 7, 14, 7)        # lsa_window: w x w windows; w must divide the stage's map
    n_queries: int = 2                        # qna_num_queries
    num_classes: int = 1000                   # 0 = backbone without head (forward_features only)
    img_size: int = 224                       # official evaluation resolution

    # fields that make a variant: a weights file must agree on them with the name it is loaded under
    ARCHITECTURE_FIELDS: ClassVar[tuple] = ("embed_dim", "qna_depths", "msa_depths", "qna_heads", "msa_heads",
                                            "qna_kernel_sizes", "msa_windows", "n_queries")

    def __post_init__(self):
        for name in ("qna_depths", "msa_depths", "qna_heads", "msa_heads", "qna_kernel_sizes", "msa_windows"):
            value = tuple(int(v) for v in getattr(self, name))
            if len(value) != 4:
                raise ValueError(f"{name} needs 4 entries (one per stage), got {value}")
            object.__setattr__(self, name, value)
        if self.embed_dim < 1 or self.n_queries < 1 or self.num_classes < 0:
            raise ValueError("embed_dim and n_queries must be positive, num_classes >= 0")
        for i in range(4):
            c = self.stage_dim(i)
            if min(self.qna_depths[i], self.msa_depths[i]) < 0:
                raise ValueError(f"stage {i}: negative block count")
            if self.has_qna(i):
                k, h = self.qna_kernel_sizes[i], self.qna_heads[i]
                if k < 1 or k % 2 == 0:
                    # even k: the official padding (k-1)//2 gives an off-centre window and a stride-2 output of
                    # floor(H/2), which no longer matches the skip's ceil(H/2)
                    raise ValueError(f"stage {i}: QnA window {k} must be odd")
                if h < 1 or c % h:
                    raise ValueError(f"stage {i}: dim {c} is not divisible by {h} QnA heads")
            if self.msa_depths[i]:
                h, w = self.msa_heads[i], self.msa_windows[i]
                if h < 1 or c % h:
                    raise ValueError(f"stage {i}: dim {c} is not divisible by {h} MSA heads")
                if w < 1:
                    raise ValueError(f"stage {i}: MSA window {w} must be positive")

    def stage_dim(self, i):
        return self.embed_dim * 2 ** i

    def has_qna(self, i):
        """Stage i has QnA layers: its QnA blocks, or its stride-2 block (stages 0-2)."""
        return self.qna_depths[i] > 0 or i < 3

    def qna_head_dim(self, i):
        return self.stage_dim(i) // self.qna_heads[i]

    def msa_head_dim(self, i):
        return self.stage_dim(i) // self.msa_heads[i]

    @property
    def num_features(self):
        return self.stage_dim(3)

    def macs(self, h, w):
        """Multiply-accumulates of one (3, h, w) image: every Dense, convolution and attention product (the QnA
        logits, the windowed sums of the numerator and denominator, the MSA products); normalisation,
        activations and softmax are left out."""
        h, w = -(-h // 4), -(-w // 4)                        # stem: 4x4 stride 4, SAME
        total = h * w * self.embed_dim * 3 * 16
        for i in range(4):
            c, n = self.stage_dim(i), h * w
            mlp = 8 * c * c
            window = self.msa_windows[i] ** 2
            total += self.msa_depths[i] * n * (4 * c * c + window * c * 2 + mlp)
            total += self.qna_depths[i] * (self._qna_macs(i, n, n, c, self.qna_heads[i]) + n * mlp)
            if i < 3:                                        # the stride-2 block: skip conv, QnA at 2C, MLP
                h, w = -(-h // 2), -(-w // 2)
                out = h * w
                total += out * c * 2 * c + self._qna_macs(i, n, out, 2 * c, 2 * self.qna_heads[i]) + out * 32 * c * c
        return total + (self.num_features * self.num_classes if self.num_classes else 0)

    def _qna_macs(self, i, n_in, n_out, features, heads):
        c, k2, nq = self.stage_dim(i), self.qna_kernel_sizes[i] ** 2, self.n_queries
        keys_values_logits = n_in * c * features * 2 + n_in * nq * features
        windows = n_out * k2 * nq * (features + heads)       # numerator and denominator
        return keys_values_logits + windows + n_out * features * features

    def miniature(self):
        """A config that runs the same kernels on the same kinds of arrays at a fraction of the cost (see
        warmup.warm_up): up to two blocks of each kind per stage, the same heads, windows, queries, resolution
        and head, and the narrowest width the heads divide."""
        def fits(e):
            return all(e * 2 ** i % h == 0 for i in range(4)
                       for h, used in ((self.qna_heads[i], self.has_qna(i)), (self.msa_heads[i], self.msa_depths[i]))
                       if used)
        narrow = next(e for e in range(1, self.embed_dim + 1) if fits(e))
        return dataclasses.replace(self, embed_dim=narrow, qna_depths=tuple(min(d, 2) for d in self.qna_depths),
                                   msa_depths=tuple(min(d, 2) for d in self.msa_depths))

    def replace(self, **overrides):
        return dataclasses.replace(self, **overrides)


_TINY = QnAViTConfig()
QNA_VIT_VARIANTS = {
    "qna_vit_tiny": _TINY,
    "qna_vit_tiny_7x7": _TINY.replace(qna_kernel_sizes=(7, 7, 7, 7)),
    "qna_vit_small": _TINY.replace(qna_depths=(2, 3, 6, 0), msa_depths=(0, 0, 12, 2)),
    "qna_vit_base": QnAViTConfig(embed_dim=96, qna_depths=(2, 3, 6, 0), msa_depths=(0, 0, 12, 2),
                                 qna_heads=(6, 12, 24, 48), msa_heads=(3, 6, 12, 24)),
}
