"""Read PyTorch `.pth` checkpoints into NumPy without torch and without running pickled code.

A checkpoint written by torch >= 1.6 is a zip archive:

    <folder>/data.pkl       the pickled object (a dict of tensors, possibly nested in other containers)
    <folder>/data/<key>     one raw buffer per storage
    <folder>/byteorder      "little" or "big" (absent in older files: little)
    <folder>/version, ...   bookkeeping, not needed

The pickle is read by an unpickler that resolves only the globals a checkpoint needs (an allow-list):
  * what a state dict is made of: tensors (torch storages and rebuild functions), OrderedDict, torch.Size;
  * the pure-data builtins a pickled config or optimizer state can hold, under both builtins.* and the
    __builtin__.* of protocol 2: set, frozenset, complex, slice, range (__builtin__.xrange), bytes, bytearray,
    and _codecs.encode for the latin1 text through which protocol 2 writes bytes. Each is called only on
    arguments the pickle holds in full, so no call can iterate or allocate beyond the pickle's own size;
  * NumPy scalars and dtypes (a best accuracy can be a numpy.float64): numpy.dtype of a plain number or bool
    type, and numpy.core.multiarray.scalar / numpy._core.multiarray.scalar (numpy 1 / 2) of one such number's
    raw bytes. They are rebuilt here (np.frombuffer); NumPy's own constructors never see pickled arguments.
Foreign classes of harmless training metadata (a yacs config, an argparse.Namespace of command-line options)
become inert stubs, and anything else is refused before it can run. Tensors come back as NumPy arrays viewing
the storage buffers (read-only views, except bfloat16, which is widened to a new float32 array); their size is
checked against the buffer first.
"""
import collections
import io
import math
import os
import pickle
import pickletools
import re
import zipfile
from typing import NamedTuple

import numpy as np

from qnalo.errors import CheckpointError, UnsafeCheckpointError

# torch.save before 1.6 wrote a pickled magic number first, then the rest, without a zip around it.
_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
# Deflate cannot compress better than about 1032:1; a larger declared ratio is a lie (or a zip bomb).
_MAX_DEFLATE_RATIO = 1032
# A tensor view may overlap itself (stride 0), so it can hold more elements than its storage. Materialising
# such a view could allocate without bound, so it is accepted only up to this many elements.
_MAX_OVERLAPPING_ELEMENTS = 1 << 20
_MAX_DIMS = 32

# Foreign classes that may sit beside the weights (the classification training loop pickles its yacs
# config; other loops their parsed arguments). They are replaced by an inert `ForeignObject` subclass; the
# real class is never imported.
STUBBED_MODULES = ("yacs",)
STUBBED_CLASSES = ("argparse.Namespace",)
# The plain number and bool types numpy names when it pickles a dtype ('f8', 'i8', 'b1', 'c16', ...); anything
# else ('O8' objects, 'V16' records with fields, '(2,)f8' subarrays) is refused.
_NUMPY_NUMBER_TYPE = re.compile(r"[biufc]\d{1,2}")
_NUMPY_BYTE_ORDERS = ("<", ">", "|", "=")


class _Dtype(NamedTuple):
    """A tensor element type: the torch name (for messages) and the NumPy type of its raw buffer.
    (Immutable, like every object the pickle can reach: a BUILD opcode must not alter shared state.)"""
    torch_name: str
    numpy: np.dtype

    def __repr__(self):
        return f"torch.{self.torch_name}"


# bfloat16 has no NumPy type: its raw bits are read as uint16 and widened to float32 after the view.
_BFLOAT16 = _Dtype("bfloat16", np.dtype(np.uint16))
_DTYPES = {d.torch_name: d for d in [_BFLOAT16] + [_Dtype(name, np.dtype(name)) for name in (
    "float64", "float32", "float16", "int64", "int32", "int16", "int8", "uint8", "bool", "uint16", "uint32", "uint64")]}
_UNTYPED = _DTYPES["uint8"]  # an UntypedStorage counts bytes; the tensor record names the dtype


class _StorageClass(NamedTuple):
    """Stands for `torch.FloatStorage` & co. in the pickle: only says which element type a storage has.
    Not callable: a pickle that tries to construct a storage itself fails."""
    dtype: _Dtype


_STORAGE_CLASSES = {
    ("torch", "DoubleStorage"): _DTYPES["float64"], ("torch", "FloatStorage"): _DTYPES["float32"],
    ("torch", "HalfStorage"): _DTYPES["float16"], ("torch", "BFloat16Storage"): _BFLOAT16,
    ("torch", "LongStorage"): _DTYPES["int64"], ("torch", "IntStorage"): _DTYPES["int32"],
    ("torch", "ShortStorage"): _DTYPES["int16"], ("torch", "CharStorage"): _DTYPES["int8"],
    ("torch", "ByteStorage"): _DTYPES["uint8"], ("torch", "BoolStorage"): _DTYPES["bool"],
    ("torch", "UntypedStorage"): _UNTYPED, ("torch.storage", "UntypedStorage"): _UNTYPED,
}
# Tensor types torch can save but that have no NumPy counterpart: a clear "unsupported", not "unsafe".
_UNSUPPORTED_TORCH_PREFIXES = ("float8_", "float4_", "complex", "bits", "qint", "quint", "Complex", "QInt", "QUInt")


class _DataConstructor(NamedTuple):
    """Stands for a pure-data builtin in the pickle: calls `make` on at most `max_args` arguments of the
    `argument_types`, values the pickle holds in full. (So that bytes(1 << 40) or set(range(1 << 40)) cannot
    allocate or iterate without bound; and immutable, so that a BUILD opcode cannot alter it.)"""
    make: object
    argument_types: tuple
    max_args: int

    def __call__(self, *args):
        if len(args) > self.max_args or not all(isinstance(arg, self.argument_types) for arg in args):
            raise TypeError(f"{self.make.__name__}({', '.join(type(arg).__name__ for arg in args)}) is not "
                            "pickled data")
        return self.make(*args)


def _encode_latin1(text, encoding):
    """_codecs.encode as protocol 2 writes bytes: latin1 text whose code points are the bytes."""
    if encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode to {str(encoding)[:20]!r}; a pickle writes bytes as latin1")
    return text.encode("latin1")


_HELD_ITEMS = (list, tuple, set, frozenset)
_DATA_BUILTINS = {
    "set": _DataConstructor(set, _HELD_ITEMS, 1), "frozenset": _DataConstructor(frozenset, _HELD_ITEMS, 1),
    "complex": _DataConstructor(complex, (int, float), 2), "slice": _DataConstructor(slice, (object,), 3),
    "range": _DataConstructor(range, (int,), 3), "bytes": _DataConstructor(bytes, (bytes,), 1),
    "bytearray": _DataConstructor(bytearray, (bytes,), 1),
}
_DATA_GLOBALS = {
    **{(module, name): make for module in ("builtins", "__builtin__") for name, make in _DATA_BUILTINS.items()},
    ("__builtin__", "xrange"): _DATA_BUILTINS["range"],  # what protocol 2 calls range
    ("_codecs", "encode"): _DataConstructor(_encode_latin1, (str,), 2),
}


class ForeignObject(dict):
    """Inert stand-in for a pickled foreign object (e.g. a yacs CfgNode, itself a dict subclass).

    Keeps the pickled dict items, the constructor arguments and the state, and runs nothing else.
    `foreign_name` says which class it stands for."""

    foreign_name = "?"
    pickled_args = ()     # arguments of a call (REDUCE); a NEWOBJ creation calls no __init__
    pickled_state = None  # what BUILD passed

    def __init__(self, *args):  # never dict.__init__: the arguments are only recorded
        super().__init__()
        self.pickled_args = args

    def __setstate__(self, state):
        self.pickled_state = state

    def __repr__(self):
        return f"<stub {self.foreign_name} {dict.__repr__(self)}>"


class NumpyDtype:
    """A NumPy dtype read from a pickle, `numpy.dtype(type_string, align, copy)` then BUILD with numpy's state: a
    plain number or bool type in the byte order of the state. `dtype` is the np.dtype (np.dtype(x) accepts x).
    Each call makes a new one, so its BUILD changes nothing shared."""

    __slots__ = ("dtype",)

    def __init__(self, dtype):
        self.dtype = dtype

    def __setstate__(self, state):
        # (version, byte order, subarray, names, fields, elsize, alignment, flags[, metadata]); a plain type has
        # no subarray, names or fields, and takes only the byte order
        if not (isinstance(state, tuple) and len(state) >= 5 and state[1] in _NUMPY_BYTE_ORDERS
                and state[2:5] == (None, None, None)):
            raise ValueError(f"not the state of a plain numpy dtype: {str(state)[:80]}")
        self.dtype = self.dtype.newbyteorder(state[1])

    def __repr__(self):
        return f"<pickled numpy {self.dtype!r}>"


class _Storage(NamedTuple):
    """One storage of the archive as a flat, read-only NumPy array of its element type."""
    key: str
    array: np.ndarray
    dtype: _Dtype


def load_pth(path):
    """Load a torch zip checkpoint; tensors become NumPy arrays. Raises CheckpointError (one line) on any
    damaged, truncated or legacy file, UnsafeCheckpointError on a pickle asking for a non-allowed global."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    with open(path, "rb") as f:
        head = f.read(64)
    if head[:1] == b"\x80" and _LEGACY_MAGIC in head[:32]:
        raise CheckpointError(
            f"{path}: a legacy (torch < 1.6, non-zip) checkpoint; re-save it with a newer torch: "
            "torch.save(torch.load(old_path, map_location='cpu'), new_path)")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, OSError, NotImplementedError) as exc:
        why = f"a damaged or truncated zip archive: {_one_line(exc)}" if head[:2] == b"PK" else "not a zip archive"
        raise CheckpointError(f"{path}: not a PyTorch checkpoint ({why})") from None
    with archive:
        return _ArchiveReader(path, archive).load()


class _ArchiveReader:
    def __init__(self, path, archive):
        self.path = path
        self.archive = archive
        self.archive_size = os.path.getsize(path)
        self.storages = {}  # key -> raw bytes, shared by every tensor that views the storage
        self.folder = self._find_folder()
        self.byte_order = self._read_byte_order()

    def load(self):
        data = self._read_entry("data.pkl")
        _check_declared_lengths(self.path, data)
        unpickler = _RestrictedUnpickler(self, data)
        try:
            return unpickler.load()
        except CheckpointError:
            raise
        except Exception as exc:  # whatever a damaged pickle makes the unpickler raise
            raise CheckpointError(
                f"{self.path}: damaged data.pkl ({type(exc).__name__}: {_one_line(exc)})") from None

    def _find_folder(self):
        names = self.archive.namelist()
        pickles = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointError(f"{self.path}: a zip archive but not a PyTorch checkpoint (no <folder>/data.pkl)")
        if len(pickles) > 1:
            raise CheckpointError(f"{self.path}: several data.pkl in one archive ({', '.join(pickles[:4])})")
        folder = pickles[0][: -len("/data.pkl")]
        if f"{folder}/constants.pkl" in names:  # its data.pkl holds a scripted module, not a state dict
            raise CheckpointError(
                f"{self.path}: a TorchScript archive (torch.jit.save); save the model's state_dict() with torch.save")
        return folder

    def _read_byte_order(self):
        name = f"{self.folder}/byteorder"
        if name not in self.archive.NameToInfo:
            return "<"
        order = self._read_entry("byteorder").strip()
        if order not in (b"little", b"big"):
            raise CheckpointError(f"{self.path}: unknown byteorder {order[:16]!r}")
        return "<" if order == b"little" else ">"

    def _read_entry(self, relative_name, expected_size=None):
        name = f"{self.folder}/{relative_name}"
        info = self.archive.NameToInfo.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: missing {name} in the archive")
        if expected_size is not None and info.file_size != expected_size:
            raise CheckpointError(
                f"{self.path}: {name} holds {info.file_size} bytes, the pickle declares {expected_size}")
        if info.header_offset + info.compress_size > self.archive_size:
            raise CheckpointError(f"{self.path}: truncated file ({name} extends past its end)")
        if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 1024:
            raise CheckpointError(f"{self.path}: {name} declares an impossible compression ratio")
        try:
            return self.archive.read(info)
        except (zipfile.BadZipFile, EOFError, ValueError, OSError, NotImplementedError, RuntimeError) as exc:
            raise CheckpointError(f"{self.path}: damaged zip entry {name} ({_one_line(exc)})") from None

    def storage(self, storage_class, key, numel):
        """The storage `key` as a flat array of `numel` elements of the class's type (persistent_load)."""
        dtype = storage_class.dtype
        if key not in self.storages:
            self.storages[key] = self._read_entry(f"data/{key}", expected_size=numel * dtype.numpy.itemsize)
        raw = self.storages[key]
        if len(raw) != numel * dtype.numpy.itemsize:  # the same storage declared with two sizes
            raise CheckpointError(
                f"{self.path}: storage {key} holds {len(raw)} bytes, the pickle declares {numel} x {dtype}")
        return _Storage(key, np.frombuffer(raw, dtype=dtype.numpy.newbyteorder(self.byte_order)), dtype)

    def tensor(self, storage, offset, size, stride, dtype=None):
        """A strided view of `storage` (offset, size and stride in elements), checked before it is made."""
        if not isinstance(storage, _Storage):
            raise CheckpointError(f"{self.path}: malformed tensor record (its storage is a {type(storage).__name__})")
        array = storage.array
        if dtype is not None:  # an untyped (byte) storage viewed as `dtype` (torch._utils._rebuild_tensor_v3)
            if not isinstance(dtype, _Dtype) or array.nbytes % dtype.numpy.itemsize:
                raise CheckpointError(
                    f"{self.path}: malformed tensor record (dtype {dtype!r} on storage {storage.key})")
            array = array.view(dtype.numpy.newbyteorder(self.byte_order))
        else:
            dtype = storage.dtype
        if not (_is_int(offset) and _is_int_sequence(size) and _is_int_sequence(stride) and len(size) == len(stride)):
            raise CheckpointError(f"{self.path}: malformed tensor record on storage {storage.key}")
        if len(size) > _MAX_DIMS or offset < 0 or min(size, default=0) < 0 or min(stride, default=0) < 0:
            raise CheckpointError(
                f"{self.path}: invalid tensor on storage {storage.key}: size {tuple(size)}, stride {tuple(stride)}, "
                f"offset {offset}")
        count = math.prod(size)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride)) if count else -1
        if last >= array.size or count > max(array.size, _MAX_OVERLAPPING_ELEMENTS):
            raise CheckpointError(
                f"{self.path}: tensor of size {tuple(size)}, stride {tuple(stride)} at offset {offset} does not fit "
                f"storage {storage.key} of {array.size} elements")
        itemsize = array.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            array[offset:] if count else array[:0], shape=tuple(size), strides=tuple(s * itemsize for s in stride),
            writeable=False)
        if dtype is _BFLOAT16:
            return (view.astype(np.uint32) << 16).view(np.float32)
        if not view.dtype.isnative:
            return view.astype(view.dtype.newbyteorder("="))
        return view


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the allow-listed globals; everything else is refused before it can be called."""

    def __init__(self, reader, data):
        super().__init__(io.BytesIO(data))
        self.reader = reader
        self.stubs = {}
        self.allowed = {
            ("collections", "OrderedDict"): collections.OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): self._rebuild_tensor_v2,
            ("torch._utils", "_rebuild_tensor_v3"): self._rebuild_tensor_v3,
            ("torch._utils", "_rebuild_parameter"): self._rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self._rebuild_parameter,
            ("torch", "Size"): tuple,
            ("numpy", "dtype"): self._numpy_dtype,
            ("numpy.core.multiarray", "scalar"): self._numpy_scalar,   # numpy 1
            ("numpy._core.multiarray", "scalar"): self._numpy_scalar,  # numpy 2
            **_DATA_GLOBALS,
        }

    def find_class(self, module, name):
        if (module, name) in self.allowed:
            return self.allowed[(module, name)]
        if (module, name) in _STORAGE_CLASSES:
            return _StorageClass(_STORAGE_CLASSES[(module, name)])
        if module == "torch" and name in _DTYPES:  # dtype objects, written beside untyped storages
            return _DTYPES[name]
        if module == "torch" and name.startswith(_UNSUPPORTED_TORCH_PREFIXES):
            raise CheckpointError(f"{self.reader.path}: tensors of type torch.{name} are not supported")
        if module.split(".")[0] in STUBBED_MODULES or f"{module}.{name}" in STUBBED_CLASSES:
            return self._stub(f"{module}.{name}")
        raise self._refusal(f"{module}.{name}")

    def _refusal(self, what):
        return UnsafeCheckpointError(
            f"{self.reader.path}: the pickle asks for {what}, which no weights checkpoint needs; "
            "refusing to load it (it could run arbitrary code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self.reader.path}: unknown persistent record {str(pid)[:60]!r} in data.pkl")
        _, storage_class, key, _location, numel = pid  # the location ('cuda:0', 'cpu') is ignored
        if not (isinstance(storage_class, _StorageClass) and isinstance(key, str) and _is_int(numel) and numel >= 0):
            raise CheckpointError(f"{self.reader.path}: malformed storage record {str(pid)[:60]!r} in data.pkl")
        return self.reader.storage(storage_class, key, numel)

    def _stub(self, qualified_name):
        if qualified_name not in self.stubs:
            module, _, name = qualified_name.rpartition(".")
            self.stubs[qualified_name] = type(
                name, (ForeignObject,), {"foreign_name": qualified_name, "__module__": module})
        return self.stubs[qualified_name]

    def _rebuild_tensor_v2(self, storage, offset, size, stride, requires_grad=False, backward_hooks=None,
                           metadata=None):
        return self.reader.tensor(storage, offset, size, stride)

    def _rebuild_tensor_v3(self, storage, offset, size, stride, requires_grad, backward_hooks, dtype, metadata=None):
        return self.reader.tensor(storage, offset, size, stride, dtype)

    def _numpy_dtype(self, type_string, align=False, copy=False):
        """numpy.dtype as numpy pickles a dtype; align and copy do not matter to a plain type."""
        if not (isinstance(type_string, str) and _NUMPY_NUMBER_TYPE.fullmatch(type_string)):
            raise self._refusal(f"numpy.dtype({str(type_string)[:40]!r})")
        return NumpyDtype(np.dtype(type_string))

    def _numpy_scalar(self, dtype, raw):
        """numpy's scalar(dtype, raw bytes), read here: exactly one element of a plain type."""
        if not (isinstance(dtype, NumpyDtype) and isinstance(raw, bytes) and len(raw) == dtype.dtype.itemsize):
            raise CheckpointError(
                f"{self.reader.path}: malformed NumPy scalar in data.pkl (not the raw bytes of one value of a dtype)")
        return np.frombuffer(raw, dtype.dtype)[0]

    @staticmethod
    def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
        return data  # a Parameter is its tensor: the gradient flag and hooks do not matter for inference


def _check_declared_lengths(path, data):
    """Every length a pickle opcode declares (bytes, strings, frames) fits in the pickle: CPython's unpickler
    allocates a declared length before it reads, so four bytes of junk could make it ask for gigabytes.
    pickletools reads each argument from the data instead, so a lie shows as a short read."""
    try:
        for _ in pickletools.genops(data):
            pass
    except Exception as exc:   # whatever pickletools raises on a damaged pickle
        raise CheckpointError(f"{path}: damaged data.pkl ({type(exc).__name__}: {_one_line(exc)})") from None


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int_sequence(values):
    return isinstance(values, (tuple, list)) and all(_is_int(v) for v in values)


def _one_line(exc):
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
