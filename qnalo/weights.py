"""The qnalo weights file: one .safetensors file, float32 tensors in the engine's layout, plus metadata.

Format version 1 (documented in docs/format.md). Metadata keys (all strings, safetensors requires it):

    qnalo.format          "qnalo-weights"      -- the magic: tells a qnalo file from any other safetensors file
    qnalo.format_version  "1"
    qnalo.architecture    "litv2" | "qna_vit"
    qnalo.config          JSON object: every hyper-parameter the architecture needs to rebuild the model
    qnalo.source          JSON object: where the weights came from (file name, sha256, source format)
"""
import json
import os
import tempfile

import numpy as np

from .errors import CheckpointError

FORMAT_MAGIC = "qnalo-weights"
FORMAT_VERSION = 1


def save_weights(path, tensors, architecture, config, source=None, force=False):
    """Write `tensors` (name -> float32 array) atomically: a temp file in the same folder, then rename.

    An existing `path` is an error unless force=True; on any failure nothing is left at `path`.
    """
    from safetensors.numpy import save_file

    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")
    arrays = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype != np.float32:
            raise ValueError(f"tensor {name!r} is {value.dtype}, the qnalo format stores float32 only")
        arrays[name] = np.ascontiguousarray(value)
    metadata = {
        "qnalo.format": FORMAT_MAGIC,
        "qnalo.format_version": str(FORMAT_VERSION),
        "qnalo.architecture": architecture,
        "qnalo.config": json.dumps(config, sort_keys=True),
        "qnalo.source": json.dumps(source or {}, sort_keys=True),
    }
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".qnalo-", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_weights(path):
    """Read a qnalo weights file -> (tensors, architecture, config, source). Clear errors for anything else."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    meta = read_metadata(path)
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable safetensors data ({exc}); convert the checkpoint again") from None
    for name, value in tensors.items():
        if value.dtype != np.float32:
            raise CheckpointError(f"{path}: tensor {name!r} is {value.dtype}, expected float32")
    return tensors, meta["architecture"], meta["config"], meta["source"]


def read_metadata(path):
    """Parse and check the header of a qnalo file without loading its tensors."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="np") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: not a qnalo weights file (not readable as safetensors: {exc}); "
            "convert official checkpoints with `qnalo convert SRC DST`") from None
    if raw.get("qnalo.format") != FORMAT_MAGIC:
        raise CheckpointError(
            f"{path}: a safetensors file but not a qnalo weights file (no qnalo.format metadata); "
            "convert official checkpoints with `qnalo convert SRC DST`")
    version = raw.get("qnalo.format_version", "")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: qnalo weights format version {version!r}, this qnalo reads version {FORMAT_VERSION}; "
            "re-convert the source checkpoint with this qnalo")
    try:
        config = json.loads(raw["qnalo.config"])
        source = json.loads(raw.get("qnalo.source", "{}"))
    except (KeyError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged qnalo metadata ({exc}); re-convert the checkpoint") from None
    return {"architecture": raw.get("qnalo.architecture", ""), "config": config, "source": source}
