"""The hostile-file campaign (issue 6): real checkpoints of every source format the converter reads, and converted
qnalo files, damaged and booby-trapped in every way we could think of, through `convert` and `qnalo.load`.

Every case must end in success (a change that did not matter, e.g. a flipped byte inside an unchecked tensor) or
in one of qnalo's own errors (CheckpointError, UnsafeCheckpointError, InputError) with a one-line message; any
other exception is a crash. A failed case writes nothing (the destination folder stays empty, no temp files), no
payload runs (each would create a canary file), and no lying size leads to a large allocation before it is
checked (tracemalloc peak under a bound). The number of cases per test is its max_examples, or its parameters;
README.md's Reliability section gives the totals.

Formats: LITv2 classification .pth ({'model': sd}), LITv2 training checkpoint (model, optimizer, epoch),
mmdet-style dense .pth (state_dict with backbone.), a raw QnA-ViT state dict .pth, a QnA-ViT Flax msgpack
checkpoint (TrainState), a PyTorch-layout .safetensors state dict, and a converted qnalo .safetensors."""
import io
import json
import os
import pathlib
import pickle
import shutil
import struct
import tempfile
import tracemalloc
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

import qnalo
from qnalo.errors import QnaloError
from qnalo.weights_converter.convert import convert

torch = pytest.importorskip("torch")
from reference.litv2_torch import LITv2, randomize_ as randomize_litv2  # noqa: E402
from reference.qna_vit_torch import QnAViT, randomize_ as randomize_qna  # noqa: E402
from test_convert_qna_vit import flax_params_from_torch, write_flax_checkpoint  # noqa: E402

CASES = 200                     # per mutation kind and format (hypothesis examples)
ALLOCATION_BOUND = 64 * 2**20   # a lying file may not make the converter allocate more than this
CAMPAIGN = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck))


def _litv2_reference():
    return randomize_litv2(LITv2(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), alpha=0.5,
                                 num_classes=5).eval(), seed=1)


def _qna_reference():
    return randomize_qna(QnAViT(embed_dim=8, qna_depths=(1, 1, 1, 0), msa_depths=(0, 0, 1, 1),
                                qna_heads=(2, 2, 4, 8), msa_heads=(1, 2, 2, 4), msa_windows=(8, 4, 2, 1),
                                num_classes=3).eval(), seed=2)


def _torch_bytes(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _build_sources():
    """name -> (file suffix, bytes) of each source format, all small."""
    litv2_sd = _litv2_reference().state_dict()
    qna_sd = _qna_reference().state_dict()
    dense = LITv2(embed_dim=32, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), alpha=0.5, out_norms=(0, 1, 2, 3))
    dense_sd = {f"backbone.{k}": v for k, v in randomize_litv2(dense.eval(), seed=3).state_dict().items()}
    dense_sd["neck.conv.weight"] = torch.zeros(4, 4)
    sources = {
        "litv2_pth": (".pth", _torch_bytes({"model": litv2_sd})),
        "litv2_training": (".pth", _torch_bytes({"model": litv2_sd, "epoch": 3,
                                                  "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}})),
        "mmdet_pth": (".pth", _torch_bytes({"state_dict": dense_sd, "meta": {"epoch": 12}})),
        "qna_state_dict": (".pth", _torch_bytes(qna_sd)),
    }
    from safetensors.numpy import save as save_safetensors
    sources["qna_safetensors"] = (".safetensors",
                                  save_safetensors({k: v.numpy() for k, v in qna_sd.items()}))
    with tempfile.TemporaryDirectory() as folder:
        flat = flax_params_from_torch({k: v.numpy() for k, v in qna_sd.items()})
        flax = write_flax_checkpoint(pathlib.Path(folder) / "checkpoint_100", flat, step=100)
        sources["qna_flax"] = ("", flax.read_bytes())
        convert(flax, os.path.join(folder, "converted.safetensors"))
        with open(os.path.join(folder, "converted.safetensors"), "rb") as f:
            sources["qnalo_file"] = (".safetensors", f.read())
    return sources


SOURCES = _build_sources()
CONVERTIBLE = sorted(k for k in SOURCES if k != "qnalo_file")


def _attempt(blob, suffix, folder, canary):
    """Convert (or, for a qnalo file, load) `blob`; check the invariants; return 'ok' or the error class."""
    src_folder, out_folder = os.path.join(folder, "src"), os.path.join(folder, "out")
    os.makedirs(src_folder)
    os.makedirs(out_folder)
    src = os.path.join(src_folder, "checkpoint_100" if suffix == "" else "input" + suffix)
    with open(src, "wb") as f:
        f.write(blob)
    dst = os.path.join(out_folder, "converted.safetensors")
    tracemalloc.start()
    try:
        if suffix == ".safetensors" and _is_qnalo(blob):
            model = qnalo.load(src)
            model(np.zeros((1, 3, 32, 32), np.float32))
        else:
            convert(src, dst)
        outcome = "ok"
    except QnaloError as exc:
        message = str(exc)
        assert message and "\n" not in message, f"not one line: {message!r}"
        outcome = type(exc).__name__
    except Exception as exc:   # noqa: BLE001 - anything else is the crash this campaign looks for
        raise AssertionError(f"crash: {type(exc).__name__}: {exc}") from exc
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert not os.path.exists(canary), "a payload ran"
    assert peak < ALLOCATION_BOUND + 20 * len(blob), f"allocated {peak} bytes for a {len(blob)}-byte file"
    converted = not (suffix == ".safetensors" and _is_qnalo(blob))
    assert sorted(os.listdir(out_folder)) == (["converted.safetensors"] if outcome == "ok" and converted else [])
    assert sorted(os.listdir(src_folder)) == [os.path.basename(src)], "something was written beside the source"
    return outcome


def _is_qnalo(blob):
    return b'"qnalo.format"' in blob[:4096]


def _case_folder():
    return tempfile.mkdtemp(prefix="qnalo-hostile-")


def _run(blob, suffix):
    folder = _case_folder()
    canary = os.path.join(folder, "canary")
    try:
        return _attempt(blob, suffix, folder, canary)
    finally:
        shutil.rmtree(folder)


def test_every_source_converts_unharmed():
    for name in CONVERTIBLE:
        suffix, blob = SOURCES[name]
        assert _run(blob, suffix) == "ok", name
    assert _run(SOURCES["qnalo_file"][1], ".safetensors") == "ok"


@pytest.mark.parametrize("name", sorted(SOURCES))
@CAMPAIGN
@given(data=st.data())
def test_truncation_at_any_byte(name, data):
    suffix, blob = SOURCES[name]
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    assert _run(blob[:cut], suffix) != "ok"


@pytest.mark.parametrize("name", sorted(SOURCES))
@CAMPAIGN
@given(data=st.data())
def test_flipped_bytes(name, data):
    suffix, blob = SOURCES[name]
    damaged = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 16), label="flips")):
        position = data.draw(st.integers(0, len(blob) - 1))
        damaged[position] ^= data.draw(st.integers(1, 255))
    _run(bytes(damaged), suffix)


# --- zip surgery on the .pth archives --------------------------------------------------------------------------

PTH = sorted(k for k in SOURCES if SOURCES[k][0] == ".pth")


def _members(blob):
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        return [(info.filename, z.read(info.filename)) for info in z.infolist()]


def _zip(members, compression=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as z:
        for name, content in members:
            z.writestr(name, content)
    return buffer.getvalue()


@pytest.mark.parametrize("name", PTH)
@CAMPAIGN
@given(data=st.data())
def test_wrong_zip_members(name, data):
    """Members dropped, renamed, duplicated, swapped, emptied or replaced by junk; deflated archives."""
    members = _members(SOURCES[name][1])
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        i = data.draw(st.integers(0, len(members) - 1), label="member")
        member, content = members[i]
        edit = data.draw(st.sampled_from(["drop", "rename", "duplicate", "swap", "empty", "junk"]), label="edit")
        if edit == "drop":
            members.pop(i)
        elif edit == "rename":
            members[i] = (member.rsplit("/", 1)[0] + "/" + data.draw(st.sampled_from(["x", "data", "0", "../up",
                                                                                      "data.pkl"])), content)
        elif edit == "duplicate":
            members.insert(i, (member, content[: len(content) // 2]))
        elif edit == "swap":
            j = data.draw(st.integers(0, len(members) - 1))
            members[i], members[j] = (member, members[j][1]), (members[j][0], content)
        elif edit == "empty":
            members[i] = (member, b"")
        else:
            members[i] = (member, data.draw(st.binary(max_size=64)))
        if not members:
            break
    compression = data.draw(st.sampled_from([zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED]), label="compression")
    _run(_zip(members, compression), ".pth")


# --- pickles that reach outside the allow-list ------------------------------------------------------------------

def _global_call(module, name, *args):
    """Protocol-2 pickle opcodes that import module.name and call it with args (what __reduce__ produces)."""
    return (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + pickle.dumps(args, protocol=2)[2:-1]
            + b"R")


def _payloads(canary):
    """(label, pickle opcodes evaluating to one object) that would create `canary` if anything ran them."""
    shell = f"touch {canary}"
    python = f"open({canary!r}, 'w').close()"
    return [
        ("os.system", _global_call("os", "system", shell)),
        ("posix.system", _global_call("posix", "system", shell)),
        ("builtins.eval", _global_call("builtins", "eval", python)),
        ("builtins.exec", _global_call("builtins", "exec", python)),
        ("__builtin__.eval", _global_call("__builtin__", "eval", python)),
        ("subprocess.Popen", _global_call("subprocess", "Popen", ["touch", canary])),
        ("subprocess.check_call", _global_call("subprocess", "check_call", ["touch", canary])),
        ("builtins.open", _global_call("builtins", "open", canary, "w")),
        ("pathlib.Path.touch", _global_call("pathlib", "Path", canary)),
        ("builtins.getattr", _global_call("builtins", "getattr", "os", "system")),
        ("importlib.import_module", _global_call("importlib", "import_module", "os")),
        ("torch._utils._rebuild_tensor via os", _global_call("torch._utils", "_rebuild_tensor", shell)),
        ("numpy.core.multiarray._reconstruct", _global_call("numpy.core.multiarray", "_reconstruct", shell)),
        ("runpy._run_code", _global_call("runpy", "_run_code", python, {})),
        ("pickle.loads", _global_call("pickle", "loads", _global_call("os", "system", shell) + b".")),
    ]


def _embedded(payload, where):
    """A whole data.pkl: the payload alone, or inside a state-dict-like structure (dict value, list, nested)."""
    body = payload[2:]   # without the protocol header
    if where == "alone":
        return b"\x80\x02" + body + b"."
    if where == "dict value":
        return b"\x80\x02}X\x05\x00\x00\x00modelX\x01\x00\x00\x00w" + body + b"s."
    if where == "after a key":
        return (b"\x80\x02}(X\x05\x00\x00\x00epochK\x03X\x05\x00\x00\x00model}X\x01\x00\x00\x00b" + body
                + b"su.")
    return b"\x80\x02]" + body + b"a."   # in a list


@pytest.mark.parametrize("name", PTH)
@pytest.mark.parametrize("where", ["alone", "dict value", "after a key", "list"])
@pytest.mark.parametrize("gadget", range(15))
def test_pickle_gadgets_never_run(name, where, gadget):
    folder = _case_folder()
    canary = os.path.join(folder, "canary")
    label, payload = _payloads(canary)[gadget]
    members = [(m, _embedded(payload, where) if m.endswith("data.pkl") else c)
               for m, c in _members(SOURCES[name][1])]
    try:
        outcome = _attempt(_zip(members), ".pth", folder, canary)
    finally:
        shutil.rmtree(folder)
    assert outcome == "UnsafeCheckpointError", (label, outcome)


def test_a_reduce_gadget_class_is_refused(tmp_path):
    """A __reduce__ of a user class (what an attacker's pickle.dumps emits), at every protocol."""
    canary = str(tmp_path / "canary")

    class Gadget:
        def __reduce__(self):
            return (os.system, (f"touch {canary}",))

    for protocol in range(2, pickle.HIGHEST_PROTOCOL + 1):
        members = [(m, pickle.dumps({"model": {"w": Gadget()}}, protocol=protocol) if m.endswith("data.pkl")
                    else c) for m, c in _members(SOURCES["litv2_pth"][1])]
        assert _run(_zip(members), ".pth") == "UnsafeCheckpointError"
    assert not os.path.exists(canary)


# --- safetensors headers that lie ------------------------------------------------------------------------------

SAFETENSORS = sorted(k for k in SOURCES if SOURCES[k][0] == ".safetensors")


def _split(blob):
    length = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + length]), blob[8 + length:]


def _join(header, data, length=None):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


HUGE = st.sampled_from([2**31, 2**32 + 1, 2**40, 2**62, 10**15])


@pytest.mark.parametrize("name", SAFETENSORS)
@CAMPAIGN
@given(data=st.data())
@example(data=None)
def test_lying_safetensors_headers(name, data):
    header, body = _split(SOURCES[name][1])
    if data is None:   # the plainest lie: one tensor says it is a terabyte
        key = next(k for k in header if k != "__metadata__")
        header[key] = {**header[key], "shape": [2**20, 2**20], "data_offsets": [0, 4 * 2**40]}
        assert _run(_join(header, body), ".safetensors") != "ok"
        return
    keys = [k for k in header if k != "__metadata__"]
    key = data.draw(st.sampled_from(keys), label="tensor")
    entry = dict(header[key])
    lie = data.draw(st.sampled_from(["offsets beyond", "offsets reversed", "overlap", "shape huge", "shape wrong",
                                     "shape negative", "dtype", "entry junk", "length field", "metadata"]),
                    label="lie")
    length = None
    if lie == "offsets beyond":
        entry["data_offsets"] = [entry["data_offsets"][0], data.draw(HUGE)]
    elif lie == "offsets reversed":
        entry["data_offsets"] = entry["data_offsets"][::-1] if entry["data_offsets"][0] != entry["data_offsets"][1] \
            else [8, 0]
    elif lie == "overlap":
        other = header[data.draw(st.sampled_from(keys))]
        entry["data_offsets"] = list(other["data_offsets"])
    elif lie == "shape huge":
        entry["shape"] = [data.draw(HUGE), data.draw(st.integers(1, 2**20))]
    elif lie == "shape wrong":
        entry["shape"] = [int(np.prod(entry["shape"])) + data.draw(st.integers(1, 1000))]
    elif lie == "shape negative":
        entry["shape"] = [-data.draw(st.integers(1, 10)), *entry["shape"]]
    elif lie == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F64", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "X", ""]))
    elif lie == "entry junk":
        entry = data.draw(st.sampled_from([None, 1, "x", [], {"dtype": "F32"}, {"shape": [2], "data_offsets": 3}]))
    elif lie == "length field":
        length = data.draw(st.sampled_from([0, 1, 2**20, 2**40, 2**64 - 1]))
    else:
        header["__metadata__"] = data.draw(st.sampled_from([None, [], {"qnalo.format": 1}, {"format": "pt", "x": 3},
                                                            {**(header.get("__metadata__") or {}),
                                                             "qnalo.config": "[1, 2"}]))
    header[key] = entry
    _run(_join(header, body, length), ".safetensors")


# --- Flax msgpack arrays that lie -------------------------------------------------------------------------------

@CAMPAIGN
@given(data=st.data())
def test_lying_flax_arrays(data):
    """Flax's ext-encoded ndarrays ((shape, dtype, bytes)) whose shape or dtype disagrees with their bytes."""
    import msgpack
    _, blob = SOURCES["qna_flax"]
    tree = msgpack.unpackb(blob, raw=False, strict_map_key=False)

    def leaves(node, path=()):
        if isinstance(node, dict):
            for k, v in node.items():
                yield from leaves(v, path + (k,))
        elif isinstance(node, msgpack.ExtType):
            yield path

    paths = sorted(leaves(tree["params"]))
    path = data.draw(st.sampled_from(paths), label="leaf")
    node = tree["params"]
    for k in path[:-1]:
        node = node[k]
    shape, dtype, buffer = msgpack.unpackb(node[path[-1]].data, raw=False)
    lie = data.draw(st.sampled_from(["shape huge", "shape short", "dtype", "bytes cut", "not a triple"]), label="lie")
    if lie == "shape huge":
        shape = [data.draw(HUGE), *shape[1:]]
    elif lie == "shape short":
        shape = [max(1, int(np.prod(shape)) // 2)]
    elif lie == "dtype":
        dtype = data.draw(st.sampled_from(["object", "<U8", "complex64", "int8", "V4", "nonsense"]))
    elif lie == "bytes cut":
        buffer = buffer[: data.draw(st.integers(0, max(0, len(buffer) - 1)))]
    inner = msgpack.packb([1, 2] if lie == "not a triple" else [shape, dtype, buffer], use_bin_type=True)
    node[path[-1]] = msgpack.ExtType(node[path[-1]].code, inner)
    _run(msgpack.packb(tree, use_bin_type=True), "")
