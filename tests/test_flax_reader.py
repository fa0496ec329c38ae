"""The Flax checkpoint reader: msgpack trees with flax.serialization's array records, read without JAX/Flax."""
import msgpack
import numpy as np
import pytest

from qnalo.errors import CheckpointError
from qnalo.weights_converter.flax_reader import flax_params, read_flax_checkpoint


def _record(array, dtype_name=None, code=1):
    """An array as flax.serialization writes it: ExtType(code, msgpack([shape, dtype name, bytes]))."""
    payload = msgpack.packb([list(array.shape), dtype_name or array.dtype.name, array.tobytes()])
    return msgpack.ExtType(code, payload)


def _write(path, tree):
    path.write_bytes(msgpack.packb(tree, use_bin_type=True))
    return path


RNG = np.random.default_rng(0)
KERNEL = RNG.standard_normal((3, 4)).astype(np.float32)
BIAS = RNG.standard_normal(4).astype(np.float32)
TREE = {"step": 1234,
        "params": {"Stem_0": {"Conv_0": {"kernel": _record(KERNEL)}},
                   "Head_0": {"bias": _record(BIAS), "count": _record(np.array(7, np.int32), code=3)}},
        "opt_state": {"0": {"mu": {"x": _record(np.zeros(2, np.float32))}}},
        "batch_stats": None, "dynamic_scale": None}


def test_round_trip(tmp_path):
    tree = read_flax_checkpoint(_write(tmp_path / "checkpoint_1234", TREE))
    assert tree["step"] == 1234 and tree["batch_stats"] is None
    params = flax_params(tree)
    assert sorted(params) == ["Head_0/bias", "Head_0/count", "Stem_0/Conv_0/kernel"]
    np.testing.assert_array_equal(params["Stem_0/Conv_0/kernel"], KERNEL)
    np.testing.assert_array_equal(params["Head_0/bias"], BIAS)
    assert params["Head_0/count"].shape == () and params["Head_0/count"] == 7


def test_bfloat16_is_widened_exactly(tmp_path):
    values = np.array([1.0, -2.5, 3.140625, 1e-3, np.inf], np.float32)
    top_halves = (values.view(np.uint32) >> 16).astype(np.uint16)   # bfloat16 = the top 16 bits of a float32
    tree = read_flax_checkpoint(_write(tmp_path / "c", {"params": {"w": _record(top_halves, "bfloat16")}}))
    widened = flax_params(tree)["w"]
    assert widened.dtype == np.float32
    np.testing.assert_array_equal(widened, (top_halves.astype(np.uint32) << 16).view(np.float32))
    np.testing.assert_array_equal(widened[:3], values[:3])   # exactly representable ones come back as they were


def test_chunked_array_is_reassembled(tmp_path):
    full = np.arange(10, dtype=np.float32).reshape(2, 5)
    chunked = {"__msgpack_chunked_array__": True, "shape": {"0": 2, "1": 5},
               "chunks": {"0": _record(full.reshape(-1)[:6]), "1": _record(full.reshape(-1)[6:])}}
    tree = read_flax_checkpoint(_write(tmp_path / "c", {"params": {"w": chunked}}))
    np.testing.assert_array_equal(flax_params(tree)["w"], full)


def test_a_directory_gives_its_latest_step(tmp_path):
    _write(tmp_path / "checkpoint_9", {"step": 9, "params": {}})
    _write(tmp_path / "checkpoint_10", {"step": 10, "params": {}})
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert read_flax_checkpoint(tmp_path)["step"] == 10
    with pytest.raises(CheckpointError, match="without a Flax checkpoint_<step>"):
        read_flax_checkpoint(tmp_path / "..")


@pytest.mark.parametrize("content, message", [
    (b"", "not a Flax msgpack checkpoint"),
    (b"PK\x03\x04 a zip, say a .pth", "not a Flax"),
    (msgpack.packb(TREE, use_bin_type=True)[:-9], "truncated"),
    (msgpack.packb([1, 2, 3]), "top level is list"),
    (msgpack.packb({"params": {"c": msgpack.ExtType(2, b"\x00" * 16)}}), "complex number"),
    (msgpack.packb({"params": {"c": msgpack.ExtType(7, b"")}}), "extension type 7"),
    (msgpack.packb({"params": {"c": _record(np.zeros(2, np.float32), "object")}}), "element type 'object'"),
    (msgpack.packb({"params": {"c": msgpack.ExtType(1, msgpack.packb([[4], "float32", b"\x00" * 12]))}}),
     "has 12 bytes, not 16"),
    (msgpack.packb({"params": {"c": msgpack.ExtType(1, b"\xc1")}}), "damaged array record"),
    (msgpack.packb({"params": {"c": {"__msgpack_chunked_array__": True, "shape": {"0": 3}}}}), "damaged chunked"),
])
def test_bad_files_are_one_clear_error(tmp_path, content, message):
    path = tmp_path / "checkpoint_1"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_flax_checkpoint(path)


def test_params_must_be_a_map_of_arrays(tmp_path):
    with pytest.raises(CheckpointError, match="no 'params' map"):
        flax_params(read_flax_checkpoint(_write(tmp_path / "c", {"step": 1, "target": {}})))
    with pytest.raises(CheckpointError, match="parameter a/b is a str"):
        flax_params(read_flax_checkpoint(_write(tmp_path / "c", {"params": {"a": {"b": "text"}}})))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        read_flax_checkpoint(tmp_path / "checkpoint_404")
