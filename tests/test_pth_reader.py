"""The torch-free .pth reader: round trips through torch.save, damaged and hostile files."""
import argparse
import collections
import io
import os
import pickle
import subprocess
import sys
import tempfile
import zipfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

from qnalo.errors import CheckpointError, UnsafeCheckpointError
from qnalo.weights_converter.pth_reader import ForeignObject, NumpyDtype, load_pth
from fake_modules import install_fake_yacs


def write_archive(path, data_pkl, storages=None, folder="archive", byteorder=b"little", extra=None,
                  compression=zipfile.ZIP_STORED):
    """A torch-style zip checkpoint written by hand (no torch): data.pkl plus data/<key> buffers."""
    with zipfile.ZipFile(path, "w", compression) as z:
        z.writestr(f"{folder}/data.pkl", data_pkl)
        if byteorder is not None:
            z.writestr(f"{folder}/byteorder", byteorder)
        for key, raw in (storages or {}).items():
            z.writestr(f"{folder}/data/{key}", raw)
        for name, raw in (extra or {}).items():
            z.writestr(f"{folder}/{name}", raw)
        z.writestr(f"{folder}/version", b"3\n")
    return path


def archive_entries(path):
    with zipfile.ZipFile(path) as z:
        return {info.filename: z.read(info) for info in z.infolist()}


def rewrite_archive(src, dst, edit, compression=zipfile.ZIP_STORED):
    """Copy a zip, letting edit(name, data) return new data or None to drop the entry."""
    with zipfile.ZipFile(dst, "w", compression) as out:
        for name, data in archive_entries(src).items():
            data = edit(name, data)
            if data is not None:
                out.writestr(name, data)
    return dst


def global_pickle(module, name, args):
    """A protocol-2 pickle calling module.name(*args) through GLOBAL + REDUCE (what __reduce__ gadgets emit)."""
    body = pickle.dumps(tuple(args), protocol=2)[2:-1]  # the argument tuple, without PROTO and STOP
    return b"\x80\x02c" + f"{module}\n{name}\n".encode() + body + b"R."


def tensor_pickle(storage_class, key, numel, offset, size, stride):
    """The pickle torch writes for one tensor, written with opcodes (no torch needed)."""
    def tup(values):
        return b"(" + b"".join(b"J" + int(v).to_bytes(4, "little", signed=True) for v in values) + b"t"
    pid = (b"(X\x07\x00\x00\x00storage" + b"ctorch\n" + storage_class.encode() + b"\n"
           + b"X" + len(key).to_bytes(4, "little") + key.encode() + b"X\x06\x00\x00\x00cuda:0"
           + b"J" + numel.to_bytes(4, "little") + b"tQ")
    return (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(" + pid + b"J" + offset.to_bytes(4, "little", signed=True)
            + tup(size) + tup(stride) + b"\x89ccollections\nOrderedDict\n)RtR.")


# --- without torch ---------------------------------------------------------------------------------------------

def test_hand_written_tensor_record_is_a_strided_view(tmp_path):
    values = np.arange(12, dtype="<f4")
    path = write_archive(tmp_path / "t.pth", tensor_pickle("FloatStorage", "0", 12, 1, (2, 3), (1, 4)),
                         {"0": values.tobytes()})
    got = load_pth(path)
    np.testing.assert_array_equal(got, [[1, 5, 9], [2, 6, 10]])
    assert not got.flags.writeable


def test_big_endian_archive(tmp_path):
    values = np.arange(6, dtype=">f4")
    path = write_archive(tmp_path / "t.pth", tensor_pickle("FloatStorage", "0", 6, 0, (2, 3), (3, 1)),
                         {"0": values.tobytes()}, byteorder=b"big")
    got = load_pth(path)
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, np.arange(6).reshape(2, 3))


@pytest.mark.parametrize("numel, offset, size, stride, what", [
    (1 << 30, 0, (4,), (1,), "declares"),              # numel far beyond the buffer: refused before reading
    (12, 0, (4, 4), (4, 1), "does not fit"),           # the view runs past the storage
    (12, 10, (3,), (1,), "does not fit"),              # the offset pushes it past the end
    (12, 0, (1 << 30, 1 << 30), (0, 0), "does not fit"),  # a stride-0 view of 2^60 elements
    (12, 0, (3,), (-1,), "invalid tensor"),
    (12, -1, (3,), (1,), "invalid tensor"),
])
def test_lying_tensor_records_are_refused(tmp_path, numel, offset, size, stride, what):
    path = write_archive(tmp_path / "t.pth", tensor_pickle("FloatStorage", "0", numel, offset, size, stride),
                         {"0": np.zeros(12, np.float32).tobytes()})
    with pytest.raises(CheckpointError, match=what):
        load_pth(path)


def test_missing_storage_entry(tmp_path):
    path = write_archive(tmp_path / "t.pth", tensor_pickle("FloatStorage", "7", 4, 0, (4,), (1,)))
    with pytest.raises(CheckpointError, match="missing archive/data/7"):
        load_pth(path)


def test_not_a_file_and_not_a_zip(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_pth(tmp_path / "absent.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        load_pth(tmp_path)
    (tmp_path / "text.pth").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a zip archive"):
        load_pth(tmp_path / "text.pth")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a zip archive"):
        load_pth(tmp_path / "empty.pth")


def test_zip_without_data_pkl(tmp_path):
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as z:
        z.writestr("folder/readme.txt", "hi")
    with pytest.raises(CheckpointError, match="no <folder>/data.pkl"):
        load_pth(tmp_path / "other.zip")


def test_legacy_magic_number_is_recognised(tmp_path):
    (tmp_path / "old.pth").write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="legacy.*re-save"):
        load_pth(tmp_path / "old.pth")


UNSAFE_GLOBALS = [("os", "system"), ("posix", "system"), ("builtins", "eval"), ("builtins", "exec"),
                  ("builtins", "getattr"), ("subprocess", "Popen"), ("subprocess", "check_call"),
                  ("numpy", "load"), ("torch", "load"), ("torch._utils", "_rebuild_device_tensor_from_numpy"),
                  # beside the pure-data builtins, under both names: what calls, imports or looks up
                  ("__builtin__", "eval"), ("__builtin__", "exec"), ("__builtin__", "getattr"),
                  ("__builtin__", "apply"), ("builtins", "__import__"), ("__builtin__", "__import__"),
                  ("builtins", "object"), ("builtins", "type"), ("builtins", "open"), ("builtins", "list"),
                  ("copyreg", "_reconstructor"), ("copy_reg", "_reconstructor"), ("_codecs", "decode"),
                  # beside NumPy's scalar and dtype: what rebuilds arrays or calls NumPy on pickled arguments
                  ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "frombuffer"), ("numpy", "float64"), ("numpy.dtypes", "Float64DType"),
                  ("numpy", "ndarray"), ("argparse", "ArgumentParser")]


@pytest.mark.parametrize("module, name", UNSAFE_GLOBALS)
def test_unsafe_globals_are_refused_before_running(tmp_path, module, name):
    canary = tmp_path / "CANARY"
    payload = global_pickle(module, name, [f"touch {canary}"])
    with pytest.raises(UnsafeCheckpointError, match=rf"{module}\.{name}"):
        load_pth(write_archive(tmp_path / "evil.pth", payload))
    assert not canary.exists()


class _Gadget:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_reduce_gadget_inside_a_state_dict(tmp_path, protocol):
    canary = tmp_path / "CANARY"
    payload = pickle.dumps({"model": {"w": _Gadget(f"touch {canary}")}}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        load_pth(write_archive(tmp_path / "evil.pth", payload))
    assert not canary.exists()


# --- pure data beside the weights: a config's builtins, NumPy values (issue 16) ----------------------------------

def load_pickle(tmp_path, payload):
    return load_pth(write_archive(tmp_path / "data.pth", payload))


DATA_BUILTIN_CALLS = [("set", [[1, 2]], {1, 2}), ("set", [], set()), ("frozenset", [(3, "a")], frozenset({3, "a"})),
                      ("complex", [1.5, -2.0], 1.5 - 2j), ("slice", [1, None, 2], slice(1, None, 2)),
                      ("range", [0, 10, 3], range(0, 10, 3)), ("bytes", [], b""),
                      ("bytearray", [b"\x00\xffab"], bytearray(b"\x00\xffab"))]


@pytest.mark.parametrize("module", ["builtins", "__builtin__"])
@pytest.mark.parametrize("name, args, expected", DATA_BUILTIN_CALLS)
def test_pure_data_builtins_under_both_module_names(tmp_path, module, name, args, expected):
    got = load_pickle(tmp_path, global_pickle(module, name, args))
    assert type(got) is type(expected) and got == expected


def test_protocol_2_names_python_2_builtins(tmp_path):
    """What pickle.dumps(protocol=2) (and so torch.save) writes for pure data: __builtin__.*, range as xrange,
    bytes as _codecs.encode of latin1 text."""
    data = {"set": {1, 2}, "frozenset": frozenset({"x"}), "complex": 2j, "slice": slice(None, 4), "range": range(5),
            "bytes": b"\x00\x80\xff", "empty": b"", "bytearray": bytearray(b"ab"), "nested": [{(1, 2)}, {frozenset()}]}
    payload = pickle.dumps(data, protocol=2)
    for name in (b"set", b"frozenset", b"complex", b"slice", b"xrange", b"bytes", b"bytearray"):
        assert b"c__builtin__\n" + name + b"\n" in payload, name
    assert b"c_codecs\nencode\n" in payload
    assert load_pickle(tmp_path, payload) == data


@pytest.mark.parametrize("payload, message", [
    (global_pickle("__builtin__", "bytes", [1 << 40]), r"bytes\(int\) is not pickled data"),
    (global_pickle("builtins", "bytearray", [1 << 40]), r"bytearray\(int\) is not pickled data"),
    (b"\x80\x02c__builtin__\nset\n" + global_pickle("__builtin__", "xrange", [1 << 40])[2:-1] + b"\x85R.",
     r"set\(range\) is not pickled data"),
    (global_pickle("builtins", "complex", ["1+2j"]), r"complex\(str\) is not pickled data"),
    (global_pickle("_codecs", "encode", ["abc", "rot13"]), "a pickle writes bytes as latin1"),
    (global_pickle("_codecs", "encode", [b"abc", "latin1"]), "not pickled data"),
])
def test_pure_data_builtins_take_only_held_values(tmp_path, payload, message):
    """No call iterates or allocates beyond what the pickle holds: bytes(2^40) is refused, not allocated."""
    with pytest.raises(CheckpointError, match=message) as info:
        load_pickle(tmp_path, payload)
    assert "damaged data.pkl" in str(info.value)


def test_build_cannot_alter_an_allowed_global(tmp_path):
    """BUILD on the set constructor itself (to raise its argument limit) fails, and changes nothing after."""
    for state in [{"max_args": 9}, (None, {"max_args": 9})]:
        with pytest.raises(CheckpointError, match="damaged data.pkl"):
            load_pickle(tmp_path, b"\x80\x02c__builtin__\nset\n" + pickle.dumps(state, protocol=2)[2:-1] + b"b.")
    with pytest.raises(CheckpointError, match=r"set\(list, int\) is not pickled data"):
        load_pickle(tmp_path, global_pickle("__builtin__", "set", [[1], 2]))


NUMPY_VALUES = [np.float64(81.5), np.float32(-1.25), np.float16(3.5), np.int64(-3), np.int32(7), np.uint8(255),
                np.bool_(True), np.complex128(1 - 2j), np.float64("nan")]
NUMPY_DTYPES = [np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.int64), np.dtype(bool), np.dtype(">i4"),
                np.dtype("<c8"), np.dtype(np.uint16)]


def _same_numpy_value(got, expected):
    return type(got) is type(expected) and (got == expected or (np.isnan(got) and np.isnan(expected)))


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_scalars_from_the_installed_numpy(tmp_path, protocol):
    payload = pickle.dumps(NUMPY_VALUES, protocol=protocol)
    assert b"multiarray" in payload and b"scalar" in payload
    got = load_pickle(tmp_path, payload)
    assert all(_same_numpy_value(g, e) for g, e in zip(got, NUMPY_VALUES, strict=True)), got


@pytest.mark.parametrize("protocol", [2, 4])
def test_numpy_dtypes_from_the_installed_numpy(tmp_path, protocol):
    got = load_pickle(tmp_path, pickle.dumps(NUMPY_DTYPES, protocol=protocol))
    assert all(isinstance(g, NumpyDtype) for g in got)
    assert [np.dtype(g) for g in got] == NUMPY_DTYPES  # byte order included: '>i4' != '<i4'


@pytest.mark.parametrize("module", ["numpy.core.multiarray", "numpy._core.multiarray"])
def test_numpy_scalar_of_numpy_1_and_2(tmp_path, module):
    """numpy 1 names numpy.core.multiarray.scalar, numpy 2 numpy._core.multiarray.scalar: both are read."""
    payload = pickle.dumps(np.float64(81.5), protocol=2)
    written = b"numpy._core.multiarray" if b"numpy._core.multiarray" in payload else b"numpy.core.multiarray"
    payload = payload.replace(b"c" + written + b"\nscalar\n", b"c" + module.encode() + b"\nscalar\n")
    assert module.encode() + b"\nscalar" in payload
    got = load_pickle(tmp_path, payload)
    assert type(got) is np.float64 and got == 81.5
    older = load_pickle(tmp_path, global_pickle("numpy", "dtype", ["f8", 0, 1]))  # align, copy as ints
    assert np.dtype(older) == np.float64


def test_big_endian_numpy_scalar(tmp_path):
    """A scalar pickled on a big-endian machine: the dtype's state says '>', the raw bytes are big-endian."""
    payload = pickle.dumps(np.float64(81.5), protocol=4)
    little, big = np.array(81.5, "<f8").tobytes(), np.array(81.5, ">f8").tobytes()
    assert payload.count(b"\x8c\x01<") == 1 and payload.count(little) == 1
    got = load_pickle(tmp_path, payload.replace(b"\x8c\x01<", b"\x8c\x01>").replace(little, big))
    assert type(got) is np.float64 and got == 81.5


@pytest.mark.parametrize("dtype, shown", [(np.dtype(object), "O8"), (np.dtype([("a", "O")]), "V8"),
                                          (np.dtype([("a", "f8"), ("b", "i4")]), "V12"),
                                          (np.dtype(("f8", (2,))), "V16"), (np.dtype("U3"), "U3"),
                                          (np.dtype("M8[ns]"), "M8")])
def test_numpy_dtypes_other_than_plain_numbers_are_refused(tmp_path, dtype, shown):
    canary = tmp_path / "CANARY"
    with pytest.raises(UnsafeCheckpointError, match=rf"numpy\.dtype\('{shown}'\)"):
        load_pickle(tmp_path, pickle.dumps([dtype, _Gadget(f"touch {canary}")], protocol=2))
    assert not canary.exists()


def test_numpy_arrays_are_refused(tmp_path):
    with pytest.raises(UnsafeCheckpointError, match=r"numpy\.(_core|core)\.multiarray\._reconstruct"):
        load_pickle(tmp_path, pickle.dumps({"acc": np.arange(3.0)}, protocol=2))


@pytest.mark.parametrize("old, new, message", [
    (b"NNNJ", b"NX\x01\x00\x00\x00a\x85NJ", "not the state of a plain numpy dtype"),  # field names on 'f8'
    (b"X\x01\x00\x00\x00<", b"X\x01\x00\x00\x00!", "not the state of a plain numpy dtype"),  # no byte order
    (b"C\x08" + np.float64(1.5).tobytes(), b"C\x07" + np.float64(1.5).tobytes()[1:], "malformed NumPy scalar"),
])
def test_malformed_numpy_records(tmp_path, old, new, message):
    payload = pickle.dumps(np.float64(1.5), protocol=3)  # protocol 3: no frame lengths to keep
    assert payload.count(old) == 1
    edited = payload.replace(old, new)
    with pytest.raises(CheckpointError, match=message):
        load_pickle(tmp_path, edited)


def test_numpy_scalar_needs_a_pickled_dtype(tmp_path):
    with pytest.raises(CheckpointError, match="malformed NumPy scalar"):
        load_pickle(tmp_path, global_pickle("numpy._core.multiarray", "scalar", ["f8", b"\x00" * 8]))


def test_argparse_namespace_is_an_inert_stub(tmp_path):
    got = load_pickle(tmp_path, pickle.dumps({"args": argparse.Namespace(lr=5e-4, model="litv2_s")}, protocol=2))
    args = got["args"]
    assert isinstance(args, ForeignObject) and not isinstance(args, argparse.Namespace)
    assert args.foreign_name == "argparse.Namespace" and args.pickled_state == {"lr": 5e-4, "model": "litv2_s"}


def test_storage_class_cannot_be_called(tmp_path):
    payload = global_pickle("torch", "FloatStorage", [3])
    with pytest.raises(CheckpointError, match="damaged data.pkl"):
        load_pth(write_archive(tmp_path / "t.pth", payload))


def test_a_damaged_pickle_gives_one_line(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_pth(write_archive(tmp_path / "t.pth", b"\x80\x02}q\x00(X\x01\x00"))
    assert "damaged data.pkl" in str(info.value) and "\n" not in str(info.value)


def test_torchscript_archive_is_named(tmp_path):
    path = write_archive(tmp_path / "scripted.pt", b"\x80\x02}.",
                         extra={"constants.pkl": b"\x80\x02).", "code/m.py": ""})
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_pth(path)


def test_unsupported_dtype_is_not_called_unsafe(tmp_path):
    payload = global_pickle("torch", "float8_e4m3fn", [])
    with pytest.raises(CheckpointError, match="not supported") as info:
        load_pth(write_archive(tmp_path / "t.pth", payload))
    assert not isinstance(info.value, UnsafeCheckpointError)


# --- round trips through torch.save -----------------------------------------------------------------------------

@pytest.fixture
def fake_yacs(monkeypatch, tmp_path):
    """A module yacs.config with a CfgNode (dict subclass) whose code leaves a canary if it ever runs."""
    canary = tmp_path / "YACS_CANARY"

    class CfgNode(dict):
        def __setstate__(self, state):
            canary.write_text("setstate ran")

        def __init__(self, *args):
            canary.write_text("init ran")
            super().__init__(*args)
            self.__dict__["__immutable__"] = False

    install_fake_yacs(monkeypatch, CfgNode)

    def make(tree):
        node = dict.__new__(CfgNode)
        node.__dict__["__immutable__"] = False
        for key, value in tree.items():
            dict.__setitem__(node, key, make(value) if isinstance(value, dict) else value)
        return node
    make.canary = canary
    return make


def test_round_trip_of_every_supported_dtype(torch, tmp_path):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(40, generator=g)
    objects = collections.OrderedDict(
        f32=torch.randn(3, 4, generator=g), f64=torch.randn(5, dtype=torch.float64, generator=g),
        f16=torch.randn(6, generator=g).half(), bf16=torch.randn(2, 3, generator=g).bfloat16(),
        i64=torch.arange(-3, 3), i32=torch.arange(4, dtype=torch.int32), i16=torch.arange(4, dtype=torch.int16),
        i8=torch.arange(-2, 2, dtype=torch.int8), u8=torch.arange(4, dtype=torch.uint8),
        b=torch.tensor([True, False, True]), u16=torch.tensor([0, 1, 65535], dtype=torch.uint16),
        scalar=torch.tensor(2.5), empty=torch.zeros(0, 3), counter=torch.tensor(7),
        transposed=torch.randn(3, 5, generator=g).t(), stepped=torch.randn(6, 8, generator=g)[::2, 1::3],
        shared_a=base[3:15].view(3, 4), shared_b=base[10:].view(5, 6),
        expanded=torch.randn(3, 1, generator=g).expand(3, 4),
        param=torch.nn.Parameter(torch.randn(4, generator=g)))
    torch.save({"model": objects, "meta": {"size": torch.Size([2, 3]), "epoch": 3, "names": ("a", "b")}},
               tmp_path / "all.pth")
    got = load_pth(tmp_path / "all.pth")
    assert got["meta"] == {"size": (2, 3), "epoch": 3, "names": ("a", "b")}
    assert isinstance(got["model"], collections.OrderedDict) and list(got["model"]) == list(objects)
    for name, tensor in objects.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        assert got["model"][name].dtype == expected.dtype, name
        np.testing.assert_array_equal(got["model"][name], expected, err_msg=name)


def test_shared_storage_is_read_once_and_views_it(torch, tmp_path):
    base = torch.arange(20, dtype=torch.float32)
    torch.save({"a": base[2:8].view(2, 3), "b": base[5:]}, tmp_path / "s.pth")
    assert sum(n.startswith("s/data/") for n in archive_entries(tmp_path / "s.pth")) == 1
    got = load_pth(tmp_path / "s.pth")
    np.testing.assert_array_equal(got["a"], [[2, 3, 4], [5, 6, 7]])
    np.testing.assert_array_equal(got["b"], np.arange(5, 20))
    assert np.shares_memory(got["a"], got["b"])


def test_cuda_location_is_ignored(torch, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
    weight = torch.randn(3, 2)
    torch.save({"w": weight}, tmp_path / "gpu.pth")
    assert b"cuda:0" in archive_entries(tmp_path / "gpu.pth")["gpu/data.pkl"]
    np.testing.assert_array_equal(load_pth(tmp_path / "gpu.pth")["w"], weight.numpy())


def test_training_checkpoint_with_yacs_config_never_runs_the_class(torch, tmp_path, fake_yacs):
    config = fake_yacs({"MODEL": {"LIT": {"LOCAL_WS": [0, 0, 4, 1], "ALPHA": 0.9}}, "DATA": {"IMG_SIZE": 384}})
    linear = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(linear.parameters())
    linear(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 10)
    torch.save({"model": linear.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": scheduler.state_dict(), "max_accuracy": 81.9, "epoch": 299, "config": config,
                "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 3}}}, tmp_path / "ckpt.pth")
    del sys.modules["yacs.config"], sys.modules["yacs"]  # the reader must not need (or import) the class
    got = load_pth(tmp_path / "ckpt.pth")
    assert not fake_yacs.canary.exists()
    cfg = got["config"]
    assert isinstance(cfg, ForeignObject) and cfg.foreign_name == "yacs.config.CfgNode"
    assert cfg["MODEL"]["LIT"]["LOCAL_WS"] == [0, 0, 4, 1] and cfg["DATA"]["IMG_SIZE"] == 384
    assert cfg.pickled_state == {"__immutable__": False}
    np.testing.assert_array_equal(got["model"]["weight"], linear.weight.detach().numpy())
    moments = got["optimizer"]["state"][0]
    np.testing.assert_array_equal(moments["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"].numpy())
    assert got["epoch"] == 299 and got["amp"]["loss_scaler0"]["unskipped"] == 3


def test_torch_save_of_pure_data_and_numpy_values(torch, tmp_path):
    """torch.save writes protocol 2: every allowed builtin and NumPy value as it really names them."""
    data = {"set": {1, 2}, "frozenset": frozenset({"a"}), "complex": 1 + 2j, "slice": slice(1, 2), "range": range(3),
            "bytes": b"xy", "bytearray": bytearray(b"ab"), "accuracy": np.float64(81.5), "count": np.int64(3),
            "flag": np.bool_(False), "args": argparse.Namespace(epochs=300), "w": torch.ones(2)}
    torch.save(data, tmp_path / "data.pth")
    got = load_pth(tmp_path / "data.pth")
    for key in ("set", "frozenset", "complex", "slice", "range", "bytes", "bytearray", "accuracy", "count", "flag"):
        assert type(got[key]) is type(data[key]) and got[key] == data[key], key
    assert got["args"].pickled_state == {"epochs": 300}
    np.testing.assert_array_equal(got["w"], [1, 1])


def test_deflated_archive_reads_the_same(torch, tmp_path):
    weight = torch.randn(4, 5)
    torch.save({"w": weight}, tmp_path / "plain.pth")
    rewrite_archive(tmp_path / "plain.pth", tmp_path / "deflated.pth", lambda n, d: d, zipfile.ZIP_DEFLATED)
    np.testing.assert_array_equal(load_pth(tmp_path / "deflated.pth")["w"], weight.numpy())


def test_missing_storage_in_a_torch_file(torch, tmp_path):
    torch.save({"w": torch.randn(4)}, tmp_path / "full.pth")
    rewrite_archive(tmp_path / "full.pth", tmp_path / "cut.pth", lambda n, d: None if n == "full/data/0" else d)
    with pytest.raises(CheckpointError, match="missing full/data/0"):
        load_pth(tmp_path / "cut.pth")


def test_storage_shorter_than_declared(torch, tmp_path):
    torch.save({"w": torch.randn(4)}, tmp_path / "full.pth")
    rewrite_archive(tmp_path / "full.pth", tmp_path / "short.pth", lambda n, d: d[:8] if n == "full/data/0" else d)
    with pytest.raises(CheckpointError, match="holds 8 bytes, the pickle declares 16"):
        load_pth(tmp_path / "short.pth")


def test_legacy_torch_file(torch, tmp_path):
    torch.save({"w": torch.randn(2)}, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match="legacy .*torch < 1.6.*re-save"):
        load_pth(tmp_path / "legacy.pth")


def test_torchscript_file(torch, tmp_path):
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), tmp_path / "scripted.pt")
    with pytest.raises(CheckpointError, match="TorchScript"):
        load_pth(tmp_path / "scripted.pt")


def test_float8_tensor_is_unsupported(torch, tmp_path):
    torch.save({"w": torch.zeros(3).to(torch.float8_e4m3fn)}, tmp_path / "f8.pth")
    with pytest.raises(CheckpointError, match="float8_e4m3fn are not supported"):
        load_pth(tmp_path / "f8.pth")


_SAMPLE = {}


def _sample_checkpoint(torch):
    """A small classification-style checkpoint's bytes (made once) and its expected tensors."""
    if not _SAMPLE:
        g = torch.Generator().manual_seed(1)
        sd = collections.OrderedDict(w=torch.randn(5, 3, generator=g), b=torch.randn(5, generator=g).half(),
                                     n=torch.tensor(4))
        buffer = io.BytesIO()
        torch.save({"model": sd, "epoch": 1}, buffer)
        _SAMPLE.update(blob=buffer.getvalue(), expected={k: v.numpy() for k, v in sd.items()})
    return _SAMPLE["blob"], _SAMPLE["expected"]


@given(data=st.data())
def test_truncated_files_give_checkpoint_errors(torch, data):
    blob, _ = _sample_checkpoint(torch)
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "cut.pth")
        with open(path, "wb") as f:
            f.write(blob[:cut])
        with pytest.raises(CheckpointError) as info:
            load_pth(path)
    assert "\n" not in str(info.value)


@given(data=st.data())
def test_corrupted_bytes_load_or_give_checkpoint_errors(torch, data):
    """Any single damaged byte: either it did not matter (e.g. a timestamp) or a CheckpointError, nothing else."""
    blob, expected = _sample_checkpoint(torch)
    position = data.draw(st.integers(0, len(blob) - 1), label="position")
    value = data.draw(st.integers(0, 255).filter(lambda v: v != blob[position]), label="value")
    damaged = blob[:position] + bytes([value]) + blob[position + 1:]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "damaged.pth")
        with open(path, "wb") as f:
            f.write(damaged)
        try:
            got = load_pth(path)
        except CheckpointError as exc:
            assert "\n" not in str(exc)
            return
    for name, value in expected.items():  # the zip CRC guards every buffer: loaded means unchanged
        np.testing.assert_array_equal(got["model"][name], value)


def test_reading_needs_no_torch(torch, tmp_path):
    torch.save({"model": {"w": torch.randn(3, 3), "h": torch.randn(2).bfloat16()}}, tmp_path / "w.pth")
    code = ("import sys; from qnalo.weights_converter.pth_reader import load_pth; "
            f"ckpt = load_pth({str(tmp_path / 'w.pth')!r}); assert ckpt['model']['w'].shape == (3, 3); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_declared_length_beyond_the_pickle_is_refused_before_it_is_allocated(tmp_path):
    """BINBYTES declaring 2.8 GB in a 40-byte data.pkl (a tensor's raw bytes read as a pickle): CPython's
    unpickler would allocate the declared size first (found by test_wrong_zip_members, a swapped member)."""
    import tracemalloc
    path = tmp_path / "lying.pth"
    write_archive(path, b"\x80\x02B" + (2_814_255_818).to_bytes(4, "little") + bytes(33))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match="damaged data.pkl .*2814255818 bytes"):
            load_pth(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, peak
