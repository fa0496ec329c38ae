"""The qnalo weights file: one .safetensors file, float32 tensors in the engine's layout, plus metadata.

Format version 1 (documented in docs/format.md). Metadata keys (all strings, safetensors requires it):

    qnalo.format          "qnalo-weights"      -- the magic: tells a qnalo file from any other safetensors file
    qnalo.format_version  "1"
    qnalo.architecture    "litv2" | "qna_vit"
    qnalo.config          JSON object: every hyper-parameter the architecture needs to rebuild the model
    qnalo.source          JSON object: where the weights came from (file name, sha256, source format)
"""
import json
import math
import mmap
import os
import secrets

import numpy as np

from .errors import CheckpointError

FORMAT_MAGIC = "qnalo-weights"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 * 2**20   # safetensors' own limit is 100 MB; a LITv2-B header is ~60 kB


def save_weights(path, tensors, architecture, config, source=None, force=False):
    """Write `tensors` (name -> float32 array) atomically, as a safetensors file (written here, streamed).

    The data goes to a file with no name (Linux O_TMPFILE; elsewhere a hidden temp file in the same folder),
    which gets its name only once complete and flushed to disk: a write that fails or is killed leaves nothing
    at `path`, and with O_TMPFILE nothing at all. An existing `path` is an error unless force=True."""
    path = os.fspath(path)
    if os.path.exists(path) and not force:
        raise FileExistsError(f"{path} already exists; pass force=True to overwrite it")
    arrays = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if value.dtype != np.float32:
            raise ValueError(f"tensor {name!r} is {value.dtype}, the qnalo format stores float32 only")
        arrays[name] = np.ascontiguousarray(value, dtype="<f4")
    metadata = {
        "qnalo.format": FORMAT_MAGIC,
        "qnalo.format_version": str(FORMAT_VERSION),
        "qnalo.architecture": architecture,
        "qnalo.config": json.dumps(config, sort_keys=True),
        "qnalo.source": json.dumps(source or {}, sort_keys=True),
    }
    folder = os.path.dirname(os.path.abspath(path))
    fd, named = _unnamed_file(folder)
    try:
        with os.fdopen(fd, "wb", closefd=False) as f:
            _write_safetensors(f, arrays, metadata)
            f.flush()
            os.fsync(fd)
        if named is None:                       # O_TMPFILE: give it a hidden name, then the real one
            named = _hidden_name(folder)
            folder_fd = os.open(folder, os.O_RDONLY)
            try:   # with a dir fd os.link calls linkat(..., AT_SYMLINK_FOLLOW); plain link() would not follow
                os.link(f"/proc/self/fd/{fd}", os.path.basename(named), dst_dir_fd=folder_fd, follow_symlinks=True)
            finally:
                os.close(folder_fd)
        os.replace(named, path)
    except BaseException:
        if named is not None and os.path.exists(named):
            os.unlink(named)
        raise
    finally:
        os.close(fd)


def _write_safetensors(f, arrays, metadata):
    """The safetensors layout: 8-byte little-endian header length, the JSON header (padded with spaces to a
    multiple of 8, as safetensors does), then each tensor's bytes, back to back in header order."""
    header, offset = {"__metadata__": metadata}, 0
    for name, array in arrays.items():
        header[name] = {"dtype": "F32", "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    f.write(len(blob).to_bytes(8, "little"))
    f.write(blob)
    for array in arrays.values():
        f.write(memoryview(array.reshape(-1)).cast("B"))


def _unnamed_file(folder):
    """(fd, None) of an unnamed file in `folder`, or (fd, temp path) where the OS or file system has none."""
    if hasattr(os, "O_TMPFILE") and os.path.exists("/proc/self/fd"):
        try:
            return os.open(folder, os.O_TMPFILE | os.O_WRONLY, 0o666), None   # the mode goes through the umask
        except OSError:
            pass
    named = _hidden_name(folder)
    fd = os.open(named, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    return fd, named


def _hidden_name(folder):
    return os.path.join(folder, f".qnalo-{os.getpid()}-{secrets.token_hex(6)}.tmp")


def read_weights(path):
    """Read a qnalo weights file -> (tensors, architecture, config, source), with clear errors for anything else.

    The tensors are read-only float32 views of the memory-mapped file: nothing is copied, so a loaded model
    costs its file size in memory once, and pages are shared between processes that load the same file."""
    path = os.fspath(path)
    with _open_checked(path) as f:
        header, data_start = _read_header(path, f)
        meta = _check_metadata(path, header.pop("__metadata__", None))
        size = os.fstat(f.fileno()).st_size
        entries = _check_entries(path, header, size - data_start)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if entries else b""
    tensors = {name: np.frombuffer(mapped, np.float32, count=int(np.prod(shape)), offset=data_start + begin)
               .reshape(shape) for name, (shape, begin) in entries.items()}
    return tensors, meta["architecture"], meta["config"], meta["source"]


def release_pages(array):
    """Drop this process's mapping of the file pages behind `array`, a view of a file `read_weights` mapped,
    once its data has been copied elsewhere (packed for the kernels): the pages stop counting in this process's
    memory (the OS keeps them cached), so loading does not hold the weights twice. Any other array: no-op.
    The view stays valid; reading it again maps the pages back in."""
    owner = array
    while owner is not None and not isinstance(owner, mmap.mmap):
        owner = owner.obj if isinstance(owner, memoryview) else getattr(owner, "base", None)
    if owner is None or array.nbytes == 0 or not hasattr(owner, "madvise"):
        return
    start = array.ctypes.data - np.frombuffer(owner, np.uint8, count=1).ctypes.data
    first_page = start - start % mmap.PAGESIZE
    owner.madvise(mmap.MADV_DONTNEED, first_page, start + array.nbytes - first_page)


def read_metadata(path):
    """Parse and check the header of a qnalo file without touching its tensors."""
    with _open_checked(path) as f:
        header, _ = _read_header(path, f)
    return _check_metadata(path, header.get("__metadata__"))


def _open_checked(path):
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: not a file")
    return open(path, "rb")


_NOT_QNALO = "convert official checkpoints with `qnalo convert SRC DST`"


def _read_header(path, f):
    """The safetensors header: an 8-byte little-endian length, then that many bytes of JSON."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    if len(prefix) < 8:
        raise CheckpointError(f"{path}: not a qnalo weights file ({size} bytes, too short for a header); {_NOT_QNALO}")
    length = int.from_bytes(prefix, "little")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise CheckpointError(f"{path}: not a qnalo weights file or truncated (header claims {length} bytes, "
                              f"the file has {size}); {_NOT_QNALO}")
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path}: not a qnalo weights file (unreadable header); {_NOT_QNALO}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: not a qnalo weights file (header is not a JSON object); {_NOT_QNALO}")
    return header, 8 + length


def _check_metadata(path, raw):
    raw = raw if isinstance(raw, dict) else {}
    if raw.get("qnalo.format") != FORMAT_MAGIC:
        raise CheckpointError(f"{path}: a safetensors file but not a qnalo weights file (no qnalo.format "
                              f"metadata); {_NOT_QNALO}")
    version = raw.get("qnalo.format_version", "")
    if version != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: qnalo weights format version {version!r}, this qnalo reads version {FORMAT_VERSION}; "
            "re-convert the source checkpoint with this qnalo")
    try:
        config = json.loads(raw["qnalo.config"])
        source = json.loads(raw.get("qnalo.source", "{}"))
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: damaged qnalo metadata ({exc}); re-convert the checkpoint") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: damaged qnalo metadata (config is not an object); re-convert the checkpoint")
    return {"architecture": raw.get("qnalo.architecture", ""), "config": config, "source": source}


def _check_entries(path, header, data_size):
    """name -> (shape, byte offset): every tensor F32, inside the data section, sized as its shape says,
    overlapping no other. Checked before anything is mapped, so a lying header cannot cause a huge read."""
    entries = {}
    spans = []
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(shape)
            valid = all(isinstance(v, int) and v >= 0 for v in (*shape, begin, end))
        except (TypeError, KeyError, ValueError):
            valid = False
        if not valid:
            raise CheckpointError(f"{path}: damaged header entry for tensor {name!r}; re-convert the checkpoint")
        if dtype != "F32":
            raise CheckpointError(f"{path}: tensor {name!r} is {dtype}; qnalo files hold F32 only")
        if not begin <= end <= data_size:
            raise CheckpointError(f"{path}: tensor {name!r} lies outside the file (bytes {begin}..{end} of "
                                  f"{data_size}); the file is truncated or damaged")
        if end - begin != 4 * math.prod(shape):
            raise CheckpointError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {list(shape)}")
        entries[name] = (shape, begin)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap; the file is damaged")
    return entries
