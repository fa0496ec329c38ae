"""LITv2 state dicts (official key names) -> qnalo engine tensors and an LITv2Config inferred from the shapes.

The layout transforms are those of docs/format.md. The state dict does not store every hyper-parameter:
  * num_heads: dim / head_dim, with head_dim 32 in every released LITv2 (stages 0-1 included, which is the
    official default although those stages have no attention);
  * the HiLo split: lo heads = rows(l_q.weight) / head_dim, hi heads = rows(h_qkv.weight) / (3 head_dim);
  * window sizes cannot be told from the shapes (alpha = 1 with ws 2 has the same keys as ws 1): they come from
    an explicit argument, the pickled yacs config (MODEL.LIT.LOCAL_WS), "ws_4" in the file name (the dense
    *_ws_4 checkpoints), or the official default (0, 0, 2, 1), and are then checked against the shapes;
  * img_size (224 vs 384) likewise: argument, yacs DATA.IMG_SIZE, "384" in the file name, else 224.
"""
import re

import numpy as np

from qnalo.errors import CheckpointError, key_mismatches, missing_signature, name_list
from qnalo.models.litv2 import OFFICIAL_KINDS, official_kind, official_shapes
from qnalo.models.litv2_config import LITV2_VARIANTS, LITv2Config

HEAD_DIM = 32
DEFAULT_WINDOW_SIZES = (0, 0, 2, 1)
# The alphas of the released checkpoints (main models 0.9, the alpha sweep): the first one whose official
# head split reproduces the file's split is recorded as config.alpha (the engine itself uses lo_heads).
RELEASED_ALPHAS = (0.9, 0.0, 0.2, 0.4, 0.5, 0.7, 1.0)
# Keys a LITv2 state dict has whatever its size; their absence means "not a LITv2 checkpoint".
SIGNATURE_KEYS = ("patch_embed.proj.weight", "layers.0.blocks.0.mlp.dwconv.dwconv.weight",
                  "layers.0.downsample.dconv.conv_offset.weight")
_BLOCK_KEY = re.compile(r"layers\.(\d+)\.blocks\.(\d+)\.")


def is_training_counter(key):
    """BatchNorm's num_batches_tracked: a training counter, dropped by the conversion."""
    return key.endswith(".num_batches_tracked")


def not_litv2_reason(state_dict):
    """Why `state_dict` is not a LITv2 state dict (official key names), or None when it looks like one."""
    return missing_signature(state_dict, SIGNATURE_KEYS, "does not look like a LITv2 checkpoint", "keys")


def convert_litv2(state_dict, file_name="", yacs_config=None, img_size=None, window_sizes=None, head_dim=HEAD_DIM):
    """A LITv2 state dict -> (engine tensors, LITv2Config, variant name or None, ignored keys)."""
    config = infer_litv2_config(state_dict, file_name, yacs_config, img_size, window_sizes, head_dim)
    tensors = litv2_engine_tensors(state_dict, config)
    ignored = sorted(key for key in state_dict if is_training_counter(key))
    return tensors, config, litv2_variant(config), ignored


def infer_litv2_config(state_dict, file_name="", yacs_config=None, img_size=None, window_sizes=None,
                       head_dim=HEAD_DIM):
    """The LITv2Config of `state_dict` (official key names): from its shapes, plus the hints of the module
    docstring for what the shapes cannot tell (explicit arguments first)."""
    reason = not_litv2_reason(state_dict)
    if reason:
        raise CheckpointError(reason)
    patch = np.shape(state_dict["patch_embed.proj.weight"])
    if len(patch) != 4 or patch[1:] != (3, 4, 4):
        raise CheckpointError(f"patch_embed.proj.weight has shape {patch}, expected (embed_dim, 3, 4, 4)")
    embed_dim = patch[0]
    dims = [embed_dim * 2 ** i for i in range(4)]
    if any(dim % head_dim for dim in dims):
        raise CheckpointError(f"stage widths {dims} are not multiples of the head dim {head_dim}; pass head_dim=N")
    num_heads = [dim // head_dim for dim in dims]
    depths = _depths(state_dict)
    splits = [_head_split(state_dict, i, head_dim) for i in range(4)]
    window_sizes = _window_sizes(window_sizes, yacs_config, file_name)
    for i, (lo, hi) in enumerate(splits):
        _check_split(i, lo, hi, num_heads[i], window_sizes[i], head_dim)
    lo_heads = [lo for lo, _ in splits]
    has_head = "head.weight" in state_dict
    return LITv2Config(
        embed_dim=embed_dim, depths=depths, num_heads=num_heads, window_sizes=window_sizes,
        alpha=_alpha(embed_dim, num_heads, window_sizes, lo_heads, yacs_config), lo_heads=lo_heads,
        num_classes=int(np.shape(state_dict["head.weight"])[0]) if has_head else 0,
        img_size=_img_size(img_size, yacs_config, file_name),
        out_norms=[i for i in range(4) if f"norm{i}.weight" in state_dict])


def litv2_variant(config):
    """The LITV2_VARIANTS name whose architecture `config` has (a dense backbone counts as its variant)."""
    for name, variant in LITV2_VARIANTS.items():
        if config == LITv2Config(**{**variant.to_dict(), "num_classes": config.num_classes,
                                    "out_norms": config.out_norms}):
            return name
    return None


def litv2_engine_tensors(state_dict, config):
    """Official-name tensors (NumPy, any float dtype) -> engine-layout float32 tensors (docs/format.md).

    The keys must be exactly those of `config` (num_batches_tracked counters aside, which are dropped); a
    missing, unexpected or mis-shaped key raises CheckpointError naming it."""
    layout = official_shapes(config)
    present = {key: tuple(np.shape(value)) for key, value in state_dict.items() if not is_training_counter(key)}
    problems = key_mismatches(present, layout)
    if problems:
        raise CheckpointError(f"the state dict does not match the LITv2 configuration: {'; '.join(problems)}")
    tensors = {}
    for key in layout:
        value = np.asarray(state_dict[key])
        if value.dtype.kind != "f":
            raise CheckpointError(f"{key} is {value.dtype}, expected a floating-point tensor")
        kind = OFFICIAL_KINDS[official_kind(key)]
        tensors[key] = np.ascontiguousarray(kind[1](value.astype(np.float32, copy=False)))
    return tensors


def _depths(state_dict):
    blocks = [set() for _ in range(4)]
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match and int(match.group(1)) < 4:
            blocks[int(match.group(1))].add(int(match.group(2)))
    empty = [f"layers.{i}.blocks" for i in range(4) if not blocks[i]]
    if empty:
        raise CheckpointError(f"does not look like a LITv2 checkpoint: no {name_list(empty)}")
    return [max(indices) + 1 for indices in blocks]  # a gap shows up as missing keys later


def _head_split(state_dict, stage, head_dim):
    """(lo heads, hi heads) of block 0 of `stage`, from the rows of l_q and h_qkv (0 where absent)."""
    heads = []
    for module, per_head in (("l_q", head_dim), ("h_qkv", 3 * head_dim)):
        key = f"layers.{stage}.blocks.0.attn.{module}.weight"
        rows = np.shape(state_dict[key])[0] if key in state_dict else 0
        if rows % per_head:
            raise CheckpointError(
                f"{key} has {rows} rows, not a multiple of {per_head} (head dim {head_dim}); pass head_dim=N")
        heads.append(rows // per_head)
    return tuple(heads)


_PASS_WINDOW_SIZES = "pass window_sizes=(W0, W1, W2, W3)"


def _check_split(stage, lo, hi, num_heads, window_size, head_dim):
    where = f"layers.{stage}"
    if window_size == 0:
        if lo or hi:
            raise CheckpointError(f"{where} has attention weights but window size 0; {_PASS_WINDOW_SIZES}")
        return
    if lo + hi == 0:
        raise CheckpointError(f"{where} has no attention weights but window size {window_size}; {_PASS_WINDOW_SIZES}")
    if lo + hi != num_heads:
        raise CheckpointError(
            f"{where}: {lo} Lo-Fi + {hi} Hi-Fi heads of dim {head_dim} do not make its {num_heads} heads; "
            "pass head_dim=N")
    if window_size == 1 and hi:
        raise CheckpointError(
            f"{where} has Hi-Fi weights (h_qkv), so its window size cannot be 1; {_PASS_WINDOW_SIZES}")


def _window_sizes(explicit, yacs_config, file_name):
    if explicit is not None:
        sizes = explicit
    elif _yacs_value(yacs_config, "MODEL", "LIT", "LOCAL_WS") is not None:
        sizes = _yacs_value(yacs_config, "MODEL", "LIT", "LOCAL_WS")
    elif re.search(r"(?<![A-Za-z])ws_?4(?!\d)", file_name):
        sizes = (0, 0, 4, 1)
    else:
        sizes = DEFAULT_WINDOW_SIZES
    try:
        sizes = tuple(int(s) for s in sizes)
    except (TypeError, ValueError):
        raise CheckpointError(f"window sizes {sizes!r} are not 4 integers") from None
    if len(sizes) != 4 or min(sizes) < 0:
        raise CheckpointError(f"window sizes {sizes} are not 4 integers >= 0")
    return sizes


def _img_size(explicit, yacs_config, file_name):
    if explicit is not None:
        return int(explicit)
    from_config = _yacs_value(yacs_config, "DATA", "IMG_SIZE")
    if isinstance(from_config, int):
        return from_config
    return 384 if re.search(r"(?<!\d)384(?!\d)", file_name) else 224


def _alpha(embed_dim, num_heads, window_sizes, lo_heads, yacs_config):
    """A value of alpha whose official split int(heads * alpha) gives `lo_heads` (information only):
    the yacs ALPHA or a released one if one does, else the Lo-Fi share of stage 2."""
    from_config = _yacs_value(yacs_config, "MODEL", "LIT", "ALPHA")
    usable = isinstance(from_config, (int, float)) and 0 <= from_config <= 1
    candidates = ([from_config] if usable else []) + list(RELEASED_ALPHAS)
    for alpha in candidates:
        official = LITv2Config(embed_dim=embed_dim, num_heads=num_heads, window_sizes=window_sizes, alpha=alpha)
        if list(official.lo_heads) == list(lo_heads):
            return float(alpha)
    return lo_heads[2] / num_heads[2]


def _yacs_value(node, *path):
    for name in path:
        if not isinstance(node, dict) or name not in node:
            return None
        node = node[name]
    return node
