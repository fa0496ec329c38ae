"""The qnalo weights file: round trip, and every way a file can lie or be damaged -> one clear CheckpointError."""
import json
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import qnalo
from qnalo.errors import CheckpointError
from qnalo.weights import read_metadata, read_weights, release_pages, save_weights

TENSORS = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4), "a.bias": np.ones(4, np.float32),
           "empty": np.zeros((0, 5), np.float32)}
CONFIG = {"embed_dim": 8}


@pytest.fixture()
def good_file(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights(path, TENSORS, "litv2", CONFIG, source={"file": "x.pth"})
    return path


def _raw(header, data=b""):
    blob = json.dumps(header).encode()
    return struct.pack("<Q", len(blob)) + blob + data


def _metadata():
    return {"qnalo.format": "qnalo-weights", "qnalo.format_version": "1", "qnalo.architecture": "litv2",
            "qnalo.config": json.dumps(CONFIG)}


def test_round_trip_is_zero_copy_and_read_only(good_file):
    tensors, architecture, config, source = read_weights(good_file)
    assert (architecture, config, source) == ("litv2", CONFIG, {"file": "x.pth"})
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(tensors[name], value)
        assert tensors[name].dtype == np.float32 and not tensors[name].flags.writeable
    assert read_metadata(good_file)["architecture"] == "litv2"


def test_existing_file_needs_force(good_file):
    before = good_file.read_bytes()
    with pytest.raises(FileExistsError, match="pass force=True to overwrite it"):
        save_weights(good_file, {"x": np.zeros(1, np.float32)}, "litv2", CONFIG)
    assert good_file.read_bytes() == before
    save_weights(good_file, {"x": np.zeros(1, np.float32)}, "litv2", CONFIG, force=True)
    assert list(read_weights(good_file)[0]) == ["x"]


def test_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="float32"):
        save_weights(tmp_path / "w.safetensors", {"x": np.zeros(1, np.float64)}, "litv2", CONFIG)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("content,message", [
    (b"", "too short"),
    (b"\x00" * 5, "too short"),
    (struct.pack("<Q", 10**12) + b"{}", "header claims"),
    (struct.pack("<Q", 4) + b"\xff\xfe{}", "unreadable header"),
    (_raw([1, 2]), "not a JSON object"),
    (_raw({"__metadata__": {"format": "pt"}}), "not a qnalo weights file"),
    (_raw({"__metadata__": {**_metadata(), "qnalo.format_version": "9"}}), "version '9'.*re-convert"),
    (_raw({"__metadata__": {**_metadata(), "qnalo.config": "{oops"}}), "damaged qnalo metadata"),
    (_raw({"__metadata__": _metadata(), "t": {"dtype": "F16", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4),
     "F16"),
    (_raw({"__metadata__": _metadata(), "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "outside the file"),
    (_raw({"__metadata__": _metadata(), "t": {"dtype": "F32", "shape": [10**9, 10**9], "data_offsets": [0, 8]}},
          b"\0" * 8), "bytes for shape"),
    (_raw({"__metadata__": _metadata(), "t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "damaged header entry"),
    (_raw({"__metadata__": _metadata(), "t": {"dtype": "F32", "shape": [2]}}, b"\0" * 8), "damaged header entry"),
    (_raw({"__metadata__": _metadata(), "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
           "u": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12), "overlap"),
])
def test_damaged_or_foreign_files(tmp_path, content, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        qnalo.load(path)


def test_missing_path_and_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_weights(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="not a file"):
        read_weights(tmp_path)


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])   # file is only read
@given(cut=st.integers(0, 10**6), flip=st.integers(0, 10**6), byte=st.integers(1, 255))
def test_truncated_or_flipped_files_fail_cleanly(good_file, cut, flip, byte):
    data = bytearray(good_file.read_bytes())
    damaged = good_file.with_name("damaged.safetensors")
    for variant in (data[:cut % len(data)], data[:flip % len(data)] + bytes([data[flip % len(data)] ^ byte])
                    + data[flip % len(data) + 1:]):
        damaged.write_bytes(bytes(variant))
        try:
            tensors, *_ = read_weights(damaged)
        except CheckpointError:
            continue
        # a flip in the tensor data (or in a name) is not detectable without a checksum: what reads must still
        # be well-formed views inside the file
        for value in tensors.values():
            assert value.dtype == np.float32 and not value.flags.writeable and value.nbytes <= len(variant)


def _resident_mib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_release_pages_drops_the_mapping_but_keeps_the_data(tmp_path):
    big = np.random.default_rng(0).standard_normal((2048, 2048)).astype(np.float32)   # 16 MiB
    path = tmp_path / "big.safetensors"
    save_weights(path, {"small": np.ones(3, np.float32), "big": big}, "litv2", CONFIG)
    tensors, *_ = read_weights(path)
    checksum = float(tensors["big"].sum(dtype=np.float64))   # maps every page in
    touched = _resident_mib()
    release_pages(tensors["big"])
    assert touched - _resident_mib() > 12, "the 16 MiB tensor's pages are still mapped"
    np.testing.assert_array_equal(tensors["big"], big)        # mapped back in on demand
    np.testing.assert_array_equal(tensors["small"], np.ones(3))
    assert float(tensors["big"].sum(dtype=np.float64)) == checksum
    release_pages(big)                                        # not file-backed: a no-op


def test_files_are_standard_safetensors(good_file):
    """qnalo writes the safetensors layout itself (to stream into an unnamed file); the library reads it."""
    from safetensors import safe_open
    from safetensors.numpy import load_file
    loaded = load_file(good_file)
    assert loaded.keys() == TENSORS.keys()
    for name, value in TENSORS.items():
        np.testing.assert_array_equal(loaded[name], value)
    with safe_open(good_file, "np") as f:
        assert f.metadata()["qnalo.format"] == "qnalo-weights"
