"""Official checkpoint -> qnalo weights file: read, unwrap, detect the architecture family, convert, write.

Sources, told apart by their first bytes (then by name): a torch `.pth` zip (classification `{'model': sd}`, a
training checkpoint with optimizer and yacs config beside it, an mmdet/mmseg `{'state_dict': {'backbone.*',
'neck.*', ...}, 'meta'}`, or a raw state dict; a legacy non-zip pickle is refused with how to re-save it), a
`.safetensors` raw state dict with the official key names, or an official Flax (QnA-ViT) msgpack checkpoint:
a `checkpoint_<step>` file, or a folder of them (the highest step is read). State dicts are LITv2 (official
keys) or QnA-ViT (the project's PyTorch layout); Flax trees are QnA-ViT.
"""
import hashlib
import os
import re
from dataclasses import dataclass, field

import numpy as np

from qnalo.errors import CheckpointError, name_list
from qnalo.weights import FORMAT_MAGIC, save_weights
from qnalo.weights_converter.flax_reader import find_checkpoint, flax_params, read_flax_checkpoint
from qnalo.weights_converter.litv2 import convert_litv2, not_litv2_reason
from qnalo.weights_converter.pth_reader import load_pth
from qnalo.weights_converter.qna_vit import QUERY_SEMANTICS, TORCH_SIGNATURE as QNA_VIT_SIGNATURE
from qnalo.weights_converter.qna_vit import convert_qna_vit_flax, convert_qna_vit_torch, not_qna_vit_reason

# Family name -> (why a state dict is not of this family, or None; its converter). A converter takes the
# state dict and the keyword hints that `convert` passes, and returns (tensors, config, variant, ignored keys).
FAMILIES = {"litv2": (not_litv2_reason, convert_litv2), "qna_vit": (not_qna_vit_reason, convert_qna_vit_torch)}
# Flax trees hold QnA-ViT only: (family, converter of the flattened params).
FLAX_FAMILY = ("qna_vit", convert_qna_vit_flax)
# TrainState fields beside `params` (flax.training.checkpoints.save_checkpoint): not needed for inference.
FLAX_TRAINING_ENTRIES = ("step", "opt_state", "batch_stats", "dynamic_scale")
PTH_SUFFIXES = (".pth", ".pt", ".pkl", ".bin", ".tar", ".ckpt")
FLAX_CHECKPOINT_NAME = re.compile(r"checkpoint_\d+$")
# Parts of dense (mmdet/mmseg) models that are not the backbone: deliberately left out.
DENSE_HEAD_PREFIXES = ("neck.", "bbox_head.", "rpn_head.", "roi_head.", "decode_head.", "auxiliary_head.")
TRAINING_ENTRIES = ("optimizer", "lr_scheduler", "config", "amp")


@dataclass
class SourceCheckpoint:
    state_dict: dict                 # official key names (no module./backbone. prefix) -> arrays
    format: str                      # pth-* | state-dict | safetensors | flax-checkpoint | flax-params
    yacs_config: object = None       # the pickled training config (an inert dict stub), if any
    ignored_keys: list = field(default_factory=list)  # source keys deliberately left out
    path: str = None                 # the file read (a Flax folder: its latest checkpoint_<step>)


CONVERT_STEPS = ("read", "map", "hash", "write")


def convert(src, dst, force=False, img_size=None, window_sizes=None, labels=None, head_dim=None, progress=None):
    """Convert the checkpoint `src` into the qnalo weights file `dst` (written atomically).

    head_dim: LITv2's width per head (default 32, that of every released LITv2; shapes cannot tell it).
    labels: class names to record (one per class; `qnalo classify` prints them; default: ImageNet's names for a
    1000-class head, else the class numbers).
    progress: called with the name of each step as it starts (CONVERT_STEPS), for a progress bar.
    An existing `dst` is an error unless force=True; nothing is written when anything fails. Returns a
    summary: path, architecture, variant, config, params (trainable parameter count), tensors, source."""
    src, dst = os.fspath(src), os.fspath(dst)
    step = progress or (lambda name: None)
    _check_destination(dst, force)
    step("read")
    checkpoint = read_checkpoint(src)
    src = checkpoint.path or src
    step("map")
    try:
        if checkpoint.format.startswith("flax"):
            family, family_converter = FLAX_FAMILY
        else:
            family = detect_family(checkpoint.state_dict)
            _, family_converter = FAMILIES[family]
        tensors, config, variant, ignored = family_converter(
            checkpoint.state_dict, file_name=os.path.basename(src), yacs_config=checkpoint.yacs_config,
            img_size=img_size, window_sizes=window_sizes, **({"head_dim": head_dim} if head_dim else {}))
    except CheckpointError as exc:
        raise type(exc)(f"{src}: {exc}") from None
    step("hash")
    source = {"file": os.path.basename(src), "sha256": _sha256(src), "format": checkpoint.format,
              "variant": variant, "ignored_keys": sorted(checkpoint.ignored_keys + ignored)}
    if variant is None:
        del source["variant"]
    if labels is not None:
        labels = [str(label) for label in labels]
        if len(labels) != config.num_classes:
            raise CheckpointError(f"{src}: {len(labels)} labels given for a head of {config.num_classes} classes")
        source["labels"] = labels
    if family == "qna_vit":
        source["query"] = QUERY_SEMANTICS   # q_param holds the raw official query (spec qna.md 6.4)
    step("write")
    save_weights(dst, tensors, family, config.to_dict(), source=source, force=force)
    return {"path": dst, "architecture": family, "variant": variant, "config": config.to_dict(),
            "params": parameter_count(tensors), "tensors": len(tensors), "source": source}


def read_checkpoint(path):
    """Read `path` (any source format of the module docstring) and unwrap its state dict or Flax params."""
    kind = source_kind(path)
    if kind == "flax":
        return read_flax(path)
    if kind == "unknown":
        raise CheckpointError(f"{path}: not a checkpoint qnalo can read: neither a PyTorch .pth (a zip archive), "
                              "a Flax msgpack checkpoint_<step> file nor a .safetensors state dict")
    is_safetensors = kind == "safetensors"
    obj = _read_safetensors(path) if is_safetensors else load_pth(path)
    try:
        checkpoint = unwrap_checkpoint(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if is_safetensors:
        checkpoint.format = "safetensors"
    return checkpoint


def source_kind(path):
    """'pth', 'safetensors', 'flax' or 'unknown', from the first bytes of the file (a folder: 'flax')."""
    if os.path.isdir(path):
        return "flax"
    if path.endswith(".safetensors"):
        return "safetensors"
    if not os.path.isfile(path):
        return "pth"          # load_pth names the missing file
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] == b"PK" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pth"          # a zip archive, or a pickle (legacy torch.save: load_pth says how to re-save it)
    if head[:1] and (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return "flax"         # a msgpack map: what flax.serialization writes at the top
    if FLAX_CHECKPOINT_NAME.match(os.path.basename(path)):
        return "flax"         # named like one: the Flax reader says what is wrong
    return "pth" if path.lower().endswith(PTH_SUFFIXES) else "unknown"


def read_flax(path):
    """A Flax checkpoint (TrainState {step, params, opt_state, ...} or a bare params tree) -> its flat params;
    the TrainState's other fields are recorded as ignored."""
    path = find_checkpoint(path)
    tree = read_flax_checkpoint(path)
    if "params" not in tree and "StemBlock_0" in tree:   # a bare params tree (spec qna.md 11, question 1)
        return SourceCheckpoint(flax_params({"params": tree}, path), "flax-params", path=path)
    params = flax_params(tree, path)
    unexpected = [str(key) for key in tree if key != "params" and key not in FLAX_TRAINING_ENTRIES]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected top-level entries {name_list(unexpected)} beside params "
                              f"(a Flax TrainState has {', '.join(FLAX_TRAINING_ENTRIES)})")
    return SourceCheckpoint(params, "flax-checkpoint", path=path,
                            ignored_keys=[key for key in FLAX_TRAINING_ENTRIES if key in tree])


def unwrap_checkpoint(obj):
    """The state dict inside a loaded checkpoint, its format, and the keys left out (dense heads/necks)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"holds a {type(obj).__name__}, not a state dict or a dict with 'model'/'state_dict'")
    if isinstance(obj.get("model"), dict):
        training = any(entry in obj for entry in TRAINING_ENTRIES)
        return SourceCheckpoint(_strip_module(obj["model"]), "pth-training" if training else "pth-classification",
                                yacs_config=obj.get("config"))
    if isinstance(obj.get("state_dict"), dict):
        if not any(str(key).startswith(("backbone.", "module.backbone.")) for key in obj["state_dict"]):
            if any(str(key).removeprefix("module.") in QNA_VIT_SIGNATURE for key in obj["state_dict"]):
                return SourceCheckpoint(_strip_module(obj["state_dict"]), "pth-state-dict")   # a QnA-ViT layout
            raise CheckpointError("a dense checkpoint ('state_dict') without backbone.* keys")
        state_dict, ignored = {}, []
        for key, value in _strip_module(obj["state_dict"]).items():
            if key.startswith("backbone."):
                state_dict[key.removeprefix("backbone.")] = value
            elif key.startswith(DENSE_HEAD_PREFIXES):
                ignored.append(key)
            else:
                state_dict[key] = value  # reported as unexpected by the family converter
        return SourceCheckpoint(state_dict, "pth-dense", ignored_keys=ignored)
    return SourceCheckpoint(_strip_module(obj), "state-dict")


def detect_family(state_dict):
    reasons = []
    for name, (not_this_family, _) in FAMILIES.items():
        reason = not_this_family(state_dict)
        if reason is None:
            return name
        reasons.append(reason)
    raise CheckpointError("; ".join(reasons))


def parameter_count(tensors):
    """Trainable parameters (BatchNorm running statistics are buffers, not parameters)."""
    return sum(int(v.size) for k, v in tensors.items() if not k.endswith(("running_mean", "running_var")))


def _strip_module(state_dict):
    """Check that every entry is a tensor and drop the `module.` prefix of (Distributed)DataParallel."""
    stripped = {}
    for key, value in state_dict.items():
        if not isinstance(key, str) or not isinstance(value, np.ndarray):
            raise CheckpointError(f"state dict entry {str(key)[:80]!r} is a {type(value).__name__}, not a tensor")
        name = key.removeprefix("module.")
        if name in stripped:
            raise CheckpointError(f"state dict has both {name!r} and 'module.{name}'")
        stripped[name] = value
    return stripped


def _read_safetensors(path):
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="np") as f:
            if (f.metadata() or {}).get("qnalo.format") == FORMAT_MAGIC:
                raise CheckpointError(f"{path}: already a qnalo weights file, nothing to convert")
            return {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors file ({str(exc).splitlines()[0]})") from None


def _check_destination(dst, force):
    folder = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: output folder does not exist")
    if os.path.isdir(dst):
        raise IsADirectoryError(f"{dst} is a folder; give the path of the .safetensors file to write")
    if os.path.exists(dst) and not force:
        raise FileExistsError(f"{dst} already exists; pass force=True to overwrite it")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
