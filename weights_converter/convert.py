"""Official checkpoint -> qnalo weights file: read, unwrap, detect the architecture family, convert, write.

Sources: a torch `.pth` (classification `{'model': sd}`, a training checkpoint with optimizer and yacs config
beside it, an mmdet/mmseg `{'state_dict': {'backbone.*', 'neck.*', ...}, 'meta'}`, or a raw state dict), or a
`.safetensors` raw state dict with the official key names.
"""
import hashlib
import os
from dataclasses import dataclass, field

import numpy as np

from qnalo.errors import CheckpointError
from qnalo.weights import FORMAT_MAGIC, save_weights
from qnalo.weights_converter.litv2 import convert_litv2, not_litv2_reason
from qnalo.weights_converter.pth_reader import load_pth

# Family name -> (why a state dict is not of this family, or None; its converter). A converter takes the
# state dict and the keyword hints that `convert` passes, and returns (tensors, config, variant, ignored keys).
FAMILIES = {"litv2": (not_litv2_reason, convert_litv2)}
# Parts of dense (mmdet/mmseg) models that are not the backbone: deliberately left out.
DENSE_HEAD_PREFIXES = ("neck.", "bbox_head.", "rpn_head.", "roi_head.", "decode_head.", "auxiliary_head.")
TRAINING_ENTRIES = ("optimizer", "lr_scheduler", "config", "amp")


@dataclass
class SourceCheckpoint:
    state_dict: dict                 # official key names (no module./backbone. prefix) -> arrays
    format: str                      # pth-classification | pth-training | pth-dense | state-dict | safetensors
    yacs_config: object = None       # the pickled training config (an inert dict stub), if any
    ignored_keys: list = field(default_factory=list)  # source keys deliberately left out


def convert(src, dst, force=False, img_size=None, window_sizes=None):
    """Convert the checkpoint `src` into the qnalo weights file `dst` (written atomically).

    An existing `dst` is an error unless force=True; nothing is written when anything fails. Returns a
    summary: path, architecture, variant, config, params (trainable parameter count), tensors, source."""
    src, dst = os.fspath(src), os.fspath(dst)
    _check_destination(dst, force)
    checkpoint = read_checkpoint(src)
    try:
        family = detect_family(checkpoint.state_dict)
        _, family_converter = FAMILIES[family]
        tensors, config, variant, ignored = family_converter(
            checkpoint.state_dict, file_name=os.path.basename(src), yacs_config=checkpoint.yacs_config,
            img_size=img_size, window_sizes=window_sizes)
    except CheckpointError as exc:
        raise type(exc)(f"{src}: {exc}") from None
    source = {"file": os.path.basename(src), "sha256": _sha256(src), "format": checkpoint.format,
              "variant": variant, "ignored_keys": sorted(checkpoint.ignored_keys + ignored)}
    if variant is None:
        del source["variant"]
    save_weights(dst, tensors, family, config.to_dict(), source=source, force=force)
    return {"path": dst, "architecture": family, "variant": variant, "config": config.to_dict(),
            "params": parameter_count(tensors), "tensors": len(tensors), "source": source}


def read_checkpoint(path):
    """Read `path` (.pth or .safetensors) and unwrap its state dict."""
    is_safetensors = path.endswith(".safetensors")
    obj = _read_safetensors(path) if is_safetensors else load_pth(path)
    try:
        checkpoint = unwrap_checkpoint(obj)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    if is_safetensors:
        checkpoint.format = "safetensors"
    return checkpoint


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
        raise FileExistsError(f"{dst} already exists; pass --force (force=True) to overwrite it")


def _sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
