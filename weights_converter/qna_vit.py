"""QnA-ViT weights -> qnalo engine tensors and a QnAViTConfig inferred from the shapes.

Two sources, one table (qnalo.models.qna_vit.official_layout, beside the model):
  * the official Flax parameter tree (moabarar/qna; spec qna.md section 4), flattened to 'A/B/C' paths by
    flax_reader.flax_params: Dense kernels are (in, out), Conv kernels HWIO, LayerNorm `scale` / `bias`;
  * the project's PyTorch layout (spec 6.4; tests/reference/qna_vit_torch.py documents it): Linear (out, in),
    Conv OIHW, DAT's QnA names, `q_param` the RAW official query (normalised at load, as the official code does).
Both land on the engine layout of docs/format.md, so the same weights give identical engine tensors.

Hyper-parameters come from the shapes: embed_dim from the stem, block counts from the block names, QnA heads,
queries and window from `query` / `rpe_bias` (k^2, nq*h) (the stride-2 layer has 2h heads), MSA heads and window
from the relative-position table ((2w-1)^2, heads). Entries the weights cannot tell (the heads / window of a
stage without such blocks) are taken from the registered variant that agrees with everything the shapes say,
else from the official rules (MSA head dim 32, window 7; QnA head dim and k of the previous stage).
"""
import math

import numpy as np

from qnalo.errors import CheckpointError, key_mismatches, missing_signature
from qnalo.models.qna_vit import (FROM_FLAX, FROM_TORCH, official_flax_shapes, official_layout,
                                  official_torch_shapes)
from qnalo.models.qna_vit_config import QNA_VIT_VARIANTS, QnAViTConfig

# Leaves whose presence tells a QnA-ViT source; their absence means "not this family".
FLAX_SIGNATURE = ("StemBlock_0/conv_1x1/kernel",)
TORCH_SIGNATURE = ("stem.weight", "stages.0.downsample.skip.weight")
QUERY_SEMANTICS = "raw"   # q_param / query: the official unnormalised query (the engine normalises it)
_MSA_HEAD_DIM, _MSA_WINDOW = 32, 7

# -- family detection -----------------------------------------------------------------------------------------

def not_qna_vit_reason(state_dict):
    """Why a state dict is not in the QnA-ViT PyTorch layout, or None when it looks like one."""
    return missing_signature(state_dict, TORCH_SIGNATURE, "not a QnA-ViT state dict (PyTorch layout) either")


def not_qna_vit_flax_reason(params):
    """Why a flattened Flax params tree is not QnA-ViT's, or None when it looks like it."""
    return missing_signature(params, FLAX_SIGNATURE, "does not look like a QnA-ViT Flax checkpoint", "parameters")


# -- conversion ---------------------------------------------------------------------------------------------

def convert_qna_vit_flax(params, img_size=None, window_sizes=None, **_hints):
    """Flax params ('A/B/C' -> array) -> (engine tensors, QnAViTConfig, variant name or None, ignored keys)."""
    return _convert(params, not_qna_vit_flax_reason(params), _flax_hints, True, img_size, window_sizes)


def convert_qna_vit_torch(state_dict, img_size=None, window_sizes=None, **_hints):
    """PyTorch-layout state dict (module./wrapper prefixes already removed) -> (tensors, config, variant, [])."""
    return _convert(state_dict, not_qna_vit_reason(state_dict), _torch_hints, False, img_size, window_sizes)


def _convert(source, reason, hints, flax, img_size, window_sizes):
    if window_sizes is not None:
        raise CheckpointError("--window-sizes is a LITv2 option; QnA-ViT windows are read from the shapes")
    if reason:
        raise CheckpointError(reason)
    config = _infer_config(hints(source), img_size)
    expected, what = (official_flax_shapes, "the Flax parameter tree") if flax else (official_torch_shapes,
                                                                                    "the state dict")
    present = {key: tuple(np.shape(value)) for key, value in source.items()}
    problems = key_mismatches(present, expected(config))
    if problems:
        raise CheckpointError(f"{what} does not match the QnA-ViT configuration its shapes imply: "
                              f"{'; '.join(problems)}")
    transforms = FROM_FLAX if flax else FROM_TORCH
    tensors = {}
    for flax_path, name, kind in official_layout(config):
        key = flax_path if flax else name
        value = np.asarray(source[key])
        if value.dtype.kind != "f":
            raise CheckpointError(f"{key} is {value.dtype}, expected a floating-point tensor")
        tensors[name] = np.ascontiguousarray(transforms[kind](value.astype(np.float32, copy=False)), np.float32)
    return tensors, config, qna_vit_variant(config), []


def qna_vit_variant(config):
    """The QNA_VIT_VARIANTS name whose architecture `config` has, or None."""
    for name, variant in QNA_VIT_VARIANTS.items():
        if all(getattr(config, f) == getattr(variant, f) for f in QnAViTConfig.ARCHITECTURE_FIELDS):
            return name
    return None


# -- config inference -----------------------------------------------------------------------------------------
# A "hints" dict: embed_dim, per stage the block counts and, where blocks exist, the shapes that tell heads,
# queries and windows. Built from either source, then turned into a config by _infer_config.

def _flax_hints(params):
    def blocks(stage_prefix, block_prefix):
        names = {key.split("/")[1] for key in params if key.startswith(stage_prefix + "/") and key.count("/") >= 2}
        plain = [int(n[len(block_prefix):]) for n in names if n.startswith(block_prefix)
                 and n[len(block_prefix):].isdigit()]
        strided = [n[len(block_prefix):-len("_stride_2")] for n in names
                   if n.startswith(block_prefix) and n.endswith("_stride_2")]
        return (max(plain) if plain else 0), [int(n) for n in strided if n.isdigit()]

    hints = {"embed_dim": _stem_width(params, "StemBlock_0/conv_1x1/kernel",
                                      lambda s: len(s) == 4 and s[:3] == (4, 4, 3), -1, "(4, 4, 3, embed_dim)"),
             "stages": []}
    for i in range(4):
        n_msa, _ = blocks(f"LSAStage_{i}", "MSA_Block_")
        n_qna, strided = blocks(f"QnAStage_{i}", "QnA_Block_")
        if i < 3 and len(strided) == 1:
            n_qna = max(n_qna, strided[0] - 1)   # the stride-2 block is numbered after the QnA blocks
        msa = "MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/rpe_bias"
        qna = [(f"QnAStage_{i}/QnA_Block_{j + 1}/FusedKQnA_0/", 1) for j in range(n_qna)]
        qna += [(f"QnAStage_{i}/QnA_Block_{n}_stride_2/FusedKQnA_0/", 2) for n in strided[:1]]
        hints["stages"].append(_stage(params, n_msa, n_qna,
                                      [f"LSAStage_{i}/MSA_Block_{j + 1}/{msa}" for j in range(n_msa)],
                                      [(p + "rpe_bias", p + "query", m) for p, m in qna]))
    hints["num_classes"] = _classes(params, "ClassificationHead_0/head_logits/bias")
    return hints


def _torch_hints(state_dict):
    def count(prefix):
        indices = {int(k[len(prefix):].split(".")[0]) for k in state_dict
                   if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()}
        return max(indices) + 1 if indices else 0

    hints = {"embed_dim": _stem_width(state_dict, "stem.weight", lambda s: len(s) == 4 and s[1:] == (3, 4, 4), 0,
                                      "(embed_dim, 3, 4, 4)"), "stages": []}
    for i in range(4):
        n_msa, n_qna = count(f"stages.{i}.msa."), count(f"stages.{i}.qna.")
        qna = [(f"stages.{i}.qna.{j}.attn.", 1) for j in range(n_qna)] + [(f"stages.{i}.downsample.attn.", 2)]
        hints["stages"].append(_stage(state_dict, n_msa, n_qna,
                                      [f"stages.{i}.msa.{j}.attn.rpb_table" for j in range(n_msa)],
                                      [(p + "rpb_table", p + "q_param", m) for p, m in qna]))
    hints["num_classes"] = _classes(state_dict, "head.bias")
    return hints


def _stage(source, n_msa, n_qna, msa_tables, qna_layers):
    """A stage's hints: block counts, the MSA tables' shapes, (rpe, query, head multiple) of each QnA layer."""
    return {"msa": n_msa, "qna": n_qna, "msa_rpe": [_shape(source, key) for key in msa_tables],
            "qna_rpe": [(_shape(source, rpe), _shape(source, query), m) for rpe, query, m in qna_layers]}


def _shape(source, key):
    return tuple(np.shape(source[key])) if key in source else None


def _stem_width(source, key, fits, axis, expected):
    shape = _shape(source, key)
    if shape is None or not fits(shape):
        raise CheckpointError(f"{key} has shape {shape}, expected {expected}")
    return int(shape[axis])


def _classes(source, key):
    shape = _shape(source, key)
    return int(shape[0]) if shape is not None and len(shape) == 1 else 0


def _most_common(values):
    values = [v for v in values if v is not None]
    return max(set(values), key=values.count) if values else None


def _msa_geometry(shape):
    """(window, heads) of an MSA relative-position table ((2w-1)^2, heads), or None."""
    if shape is None or len(shape) != 2:
        return None
    side = math.isqrt(shape[0])
    return ((side + 1) // 2, shape[1]) if side * side == shape[0] and side % 2 else None


def _qna_geometry(rpe, query, multiple):
    """(k, heads at the stage width, n_queries) of a QnA layer from rpe (k^2, nq*h') and query (nq, F), or None;
    h' = multiple * heads (the stride-2 layer has twice the heads)."""
    if rpe is None or query is None or len(rpe) != 2 or len(query) != 2 or not query[0]:
        return None
    k = math.isqrt(rpe[0])
    heads, rest = divmod(rpe[1], query[0] * multiple)
    return (k, heads, query[0]) if k * k == rpe[0] and not rest and heads else None


def _infer_config(hints, img_size):
    """A QnAViTConfig from the hints; each hyper-parameter a stage's blocks tell is the value most of them tell
    (so one damaged leaf is reported as that leaf, not as a different configuration)."""
    e = hints["embed_dim"]
    known = {"qna_heads": [None] * 4, "qna_kernel_sizes": [None] * 4, "msa_heads": [None] * 4,
             "msa_windows": [None] * 4}
    queries = []
    for i, stage in enumerate(hints["stages"]):
        dim = e * 2 ** i
        msa = _most_common([g for g in map(_msa_geometry, stage["msa_rpe"]) if g and dim % g[1] == 0])
        if msa:
            known["msa_windows"][i], known["msa_heads"][i] = msa
        qna = _most_common([g for g in (_qna_geometry(*layer) for layer in stage["qna_rpe"])
                            if g and g[0] % 2 and dim % g[1] == 0])   # odd windows, heads that divide the width
        if qna:
            known["qna_kernel_sizes"][i], known["qna_heads"][i] = qna[:2]
            queries.append(qna[2])
    n_queries = _most_common(queries)
    fixed = dict(embed_dim=e, qna_depths=tuple(s["qna"] for s in hints["stages"]),
                 msa_depths=tuple(s["msa"] for s in hints["stages"]), n_queries=n_queries or 2,
                 num_classes=hints["num_classes"], img_size=int(img_size) if img_size is not None else 224)
    for variant in QNA_VIT_VARIANTS.values():   # fill what the shapes cannot tell from a matching variant
        if (variant.embed_dim, variant.qna_depths, variant.msa_depths, variant.n_queries) == \
                (e, fixed["qna_depths"], fixed["msa_depths"], fixed["n_queries"]) and \
                all(v is None or v == getattr(variant, name)[i] for name, values in known.items()
                    for i, v in enumerate(values)):
            return variant.replace(num_classes=fixed["num_classes"], img_size=fixed["img_size"])
    filled = {name: list(values) for name, values in known.items()}
    for i in range(4):   # unused entries: the official rules
        dim = e * 2 ** i
        if filled["msa_heads"][i] is None:
            filled["msa_heads"][i] = max(1, dim // _MSA_HEAD_DIM) if dim % _MSA_HEAD_DIM == 0 else 1
        if filled["msa_windows"][i] is None:
            filled["msa_windows"][i] = _MSA_WINDOW
        if filled["qna_heads"][i] is None:
            filled["qna_heads"][i] = 2 * filled["qna_heads"][i - 1] if i and filled["qna_heads"][i - 1] else 1
        if filled["qna_kernel_sizes"][i] is None:
            filled["qna_kernel_sizes"][i] = filled["qna_kernel_sizes"][i - 1] if i else 3
    try:
        return QnAViTConfig(**fixed, **{name: tuple(values) for name, values in filled.items()})
    except ValueError as exc:
        raise CheckpointError(f"the shapes give no valid QnA-ViT configuration: {exc}") from None
