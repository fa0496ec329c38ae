"""Read official Flax checkpoints into NumPy without JAX or Flax.

`flax.training.checkpoints.save_checkpoint` writes one msgpack file, `checkpoint_<step>` (no extension), holding
the serialised TrainState: nested msgpack maps with str keys ({step, params, opt_state, ...}; tuples and lists
become maps keyed '0', '1', ...). Arrays are msgpack extension types (flax.serialization):

    code 1  ndarray        payload: msgpack [shape, dtype name, raw C-order bytes]
    code 3  numpy scalar   the same payload, shape []
    code 2  complex        refused (not in these checkpoints)

Arrays of 2**30 bytes or more are split into {'__msgpack_chunked_array__': True, 'shape': {...}, 'chunks': {...}}
(the flattened array in pieces) and are reassembled here. bfloat16 arrays (dtype name 'bfloat16', which NumPy
lacks) are widened exactly to float32. Decoding msgpack runs no code; element types are limited to plain
numeric ones, and the converter checks every leaf against the tree it expects.
"""
import math
import os
import re

import numpy as np

from qnalo.errors import CheckpointError

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_SCALAR = 1, 2, 3
_CHUNKED = "__msgpack_chunked_array__"
_DTYPES = ("float32", "float16", "float64", "bfloat16", "int8", "int16", "int32", "int64", "uint8", "uint16",
           "uint32", "uint64", "bool")
_CHECKPOINT_NAME = re.compile(r"checkpoint_(\d+)$")


def find_checkpoint(path):
    """A checkpoint file as given, or in a directory the `checkpoint_<step>` with the highest step (as Flax's
    restore_checkpoint picks it)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return path
    steps = [(int(m.group(1)), name) for name in os.listdir(path) if (m := _CHECKPOINT_NAME.match(name))]
    if not steps:
        raise CheckpointError(f"{path}: a directory without a Flax checkpoint_<step> file")
    return os.path.join(path, max(steps)[1])


def read_flax_checkpoint(path):
    """The whole serialised tree of a Flax checkpoint file (or directory): nested dicts of NumPy arrays and
    plain values. A file that is not such a checkpoint is a CheckpointError naming what is wrong."""
    try:
        import msgpack
    except ImportError:  # pragma: no cover - msgpack is an install requirement
        raise CheckpointError("reading Flax checkpoints needs msgpack: pip install msgpack") from None
    path = find_checkpoint(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        raw = f.read()

    def ext_hook(code, data):
        if code in (_EXT_NDARRAY, _EXT_SCALAR):
            return _decode_array(path, data, msgpack)
        what = "a complex number" if code == _EXT_COMPLEX else f"msgpack extension type {code}"
        raise CheckpointError(f"{path}: holds {what}, which a Flax parameter checkpoint does not")

    try:
        tree = msgpack.unpackb(raw, ext_hook=ext_hook, raw=False, strict_map_key=False)
    except CheckpointError:
        raise
    except Exception as exc:   # msgpack raises ValueError subclasses, TypeError and its own FormatError
        raise CheckpointError(f"{path}: not a Flax msgpack checkpoint, or truncated "
                              f"({type(exc).__name__}: {exc})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: not a Flax checkpoint (the top level is {type(tree).__name__}, "
                              "not a map)")
    return _join_chunks(path, tree)


def flax_params(tree, path="checkpoint"):
    """tree['params'] flattened: {'QnAStage_0/QnA_Block_1/FusedKQnA_0/query': array, ...}."""
    params = tree.get("params") if isinstance(tree, dict) else None
    if not isinstance(params, dict):
        raise CheckpointError(f"{path}: no 'params' map (keys: {sorted(tree)[:10]}); not a Flax TrainState")
    flat = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(value, name)
            elif isinstance(value, np.ndarray):
                flat[name] = value
            else:
                raise CheckpointError(f"{path}: parameter {name} is a {type(value).__name__}, not an array")

    walk(params, "")
    return flat


def _decode_array(path, data, msgpack):
    try:
        shape, dtype_name, buffer = msgpack.unpackb(data, raw=False)
        shape = tuple(int(d) for d in shape)
    except Exception:
        raise CheckpointError(f"{path}: a damaged array record; the file is truncated or not a Flax checkpoint") \
            from None
    if isinstance(dtype_name, bytes):
        dtype_name = dtype_name.decode("ascii", "replace")
    if dtype_name not in _DTYPES:
        raise CheckpointError(f"{path}: an array of element type {dtype_name!r}; only plain numeric types are read")
    if any(d < 0 for d in shape) or not isinstance(buffer, bytes):
        raise CheckpointError(f"{path}: a damaged array record (shape {list(shape)})")
    stored = np.dtype(np.uint16 if dtype_name == "bfloat16" else dtype_name)
    count = math.prod(shape)   # exact: a lying shape must not wrap around int64
    if len(buffer) != count * stored.itemsize:
        raise CheckpointError(f"{path}: an array of shape {list(shape)} {dtype_name} has {len(buffer)} bytes, "
                              f"not {count * stored.itemsize}; the file is damaged")
    array = np.frombuffer(buffer, stored).reshape(shape)
    if dtype_name == "bfloat16":   # the top half of a float32: widening is exact
        array = (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _join_chunks(path, node):
    """Replace every chunked-array map by the array it holds (recursively)."""
    if not isinstance(node, dict):
        return node
    if node.get(_CHUNKED) is True:
        try:
            shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
            chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
            flat = np.concatenate([np.asarray(c).reshape(-1) for c in chunks]) if chunks else np.zeros(0)
            return flat.reshape(shape)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: a damaged chunked array") from None
    return {key: _join_chunks(path, value) for key, value in node.items()}
