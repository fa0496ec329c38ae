"""The QnA-ViT converter: official Flax checkpoints (msgpack, written here as flax.serialization does) and the
project's PyTorch layout, against the PyTorch reference; bad trees, bfloat16, the atomic write and the CLI.

The Flax trees are built from a randomised reference model by this file's own inverse mapping (PyTorch layout ->
Flax tree, written from spec qna.md section 4, not from the converter)."""
import os
import re
import subprocess
import sys

import msgpack
import numpy as np
import pytest

import qnalo
from qnalo.cli import main
from qnalo.errors import CheckpointError
from qnalo.models.qna_vit import official_flax_shapes as flax_shapes
from qnalo.models.qna_vit_config import QNA_VIT_VARIANTS, QnAViTConfig
from qnalo.weights import read_weights
from qnalo.weights_converter.convert import convert
from qnalo.weights_converter.qna_vit import convert_qna_vit_flax
from model_helpers import image, torch_run
from tolerances import assert_logits_close

torch = pytest.importorskip("torch")
from reference.qna_vit_torch import QnAViT as TorchQnAViT, engine_tensors, qna_vit_reference, randomize_  # noqa: E402

torch.set_num_threads(2)

# small configurations: MSA blocks in stages 1-3 (windows dividing the 56x56 input's maps 14, 7, 4, 2), every
# kind of block, k 3 and 5, 2 and 3 queries, a classifier and a backbone
SMALL = {
    "classifier": QnAViTConfig(embed_dim=8, qna_depths=(1, 2, 1, 0), msa_depths=(0, 1, 1, 1), qna_heads=(2, 4, 8, 16),
                               msa_heads=(1, 2, 4, 8), qna_kernel_sizes=(3, 3, 5, 3), msa_windows=(7, 7, 2, 2),
                               n_queries=2, num_classes=7),
    "backbone": QnAViTConfig(embed_dim=4, qna_depths=(0, 1, 1, 1), msa_depths=(1, 0, 0, 1), qna_heads=(1, 2, 4, 8),
                             msa_heads=(2, 2, 4, 4), qna_kernel_sizes=(5, 3, 3, 3), msa_windows=(7, 7, 14, 1),
                             n_queries=3, num_classes=0),
}


def reference_model(cfg, seed=0):
    kw = cfg.to_dict()
    kw.pop("img_size")
    return randomize_(TorchQnAViT(**kw).eval(), seed=seed)


def state_dict_numpy(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


# -- the test-side inverse mapping: PyTorch layout -> Flax tree (spec 4.1, 4.2, 4.4) -------------------------

_BLOCK_LEAF = {   # PyTorch-layout leaf inside a block -> (Flax path inside the block, how the array changes)
    "norm1.weight": ("LayerNorm_0/scale", "same"), "norm1.bias": ("LayerNorm_0/bias", "same"),
    "norm2.weight": ("LayerNorm_1/scale", "same"), "norm2.bias": ("LayerNorm_1/bias", "same"),
    "mlp.fc1.weight": ("MlpBlock_0/Dense_0/kernel", "linear"), "mlp.fc1.bias": ("MlpBlock_0/Dense_0/bias", "same"),
    "mlp.fc2.weight": ("MlpBlock_0/Dense_1/kernel", "linear"), "mlp.fc2.bias": ("MlpBlock_0/Dense_1/bias", "same"),
    "skip.weight": ("Conv_0/kernel", "conv"),
}
_MSA_LEAF = {"attn.qkv.weight": ("MultiHeadSelfAttention_0/to_qkv/kernel", "linear"),
             "attn.proj.weight": ("MultiHeadSelfAttention_0/to_out/kernel", "linear"),
             "attn.rpb_table": ("MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/rpe_bias", "same")}
_QNA_LEAF = {"attn.proj_k.weight": ("FusedKQnA_0/Wk", "linear"),
             "attn.proj_v.weight": ("FusedKQnA_0/to_v/kernel", "linear"),
             "attn.proj_out.weight": ("FusedKQnA_0/to_out/kernel", "conv1x1_dense"),
             "attn.q_param": ("FusedKQnA_0/query", "same"),
             "attn.attn_scale": ("FusedKQnA_0/attn_scale_weights", "same"),
             "attn.rpb_table": ("FusedKQnA_0/rpe_bias", "same")}
_TOP = {"stem.weight": ("StemBlock_0/conv_1x1/kernel", "conv"),
        "norm.weight": ("ClassificationHead_0/LayerNorm_0/scale", "same"),
        "norm.bias": ("ClassificationHead_0/LayerNorm_0/bias", "same"),
        "head.weight": ("ClassificationHead_0/head_logits/kernel", "linear"),
        "head.bias": ("ClassificationHead_0/head_logits/bias", "same")}
_CHANGE = {"same": lambda a: a,
           "linear": lambda a: a.T,                          # Linear (out, in) -> Dense kernel (in, out)
           "conv": lambda a: a.transpose(2, 3, 1, 0),       # OIHW -> HWIO
           "conv1x1_dense": lambda a: a[:, :, 0, 0].T}      # 1x1 conv (out, in, 1, 1) -> Dense kernel (in, out)


def flax_params_from_torch(state_dict):
    """{Flax path: array} of a reference state dict (NumPy), the official names of spec 4.2."""
    n_qna = {}
    for key in state_dict:
        m = re.match(r"stages\.(\d)\.qna\.(\d+)\.", key)
        if m:
            n_qna[int(m[1])] = max(n_qna.get(int(m[1]), 0), int(m[2]) + 1)
    flat = {}
    for key, value in state_dict.items():
        if key in _TOP:
            path, change = _TOP[key]
        else:
            m = re.match(r"stages\.(\d)\.(msa|qna|downsample)\.(?:(\d+)\.)?(.+)$", key)
            stage, kind, index, leaf = int(m[1]), m[2], m[3], m[4]
            if kind == "msa":
                block = f"LSAStage_{stage}/MSA_Block_{int(index) + 1}"
            elif kind == "qna":
                block = f"QnAStage_{stage}/QnA_Block_{int(index) + 1}"
            else:
                block = f"QnAStage_{stage}/QnA_Block_{n_qna.get(stage, 0) + 1}_stride_2"
            table = _BLOCK_LEAF if leaf in _BLOCK_LEAF else (_MSA_LEAF if kind == "msa" else _QNA_LEAF)
            inner, change = table[leaf]
            path = f"{block}/{inner}"
        flat[path] = np.ascontiguousarray(_CHANGE[change](value))
    return flat


def nest(flat):
    tree = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def record(array, dtype_name=None, code=1):
    """flax.serialization's array record: ExtType(code, msgpack([shape, dtype name, C-order bytes]))."""
    array = np.ascontiguousarray(array)
    return msgpack.ExtType(code, msgpack.packb([list(array.shape), dtype_name or array.dtype.name, array.tobytes()]))


def encode(node, dtype_name=None):
    if isinstance(node, dict):
        return {key: encode(value, dtype_name) for key, value in node.items()}
    if isinstance(node, np.ndarray):
        if dtype_name == "bfloat16":
            return record((node.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16), "bfloat16")
        return record(node)
    return node


def write_flax_checkpoint(path, flat, step=1000, dtype_name=None, bare=False):
    """A TrainState as flax.training.checkpoints.save_checkpoint writes it: {step, params, opt_state (an optax
    chain of masked AdamWs, tuples as '0', '1', ... maps), batch_stats None, dynamic_scale None}."""
    params = nest(flat)
    if bare:
        payload = encode(params, dtype_name)
    else:
        moments = {k: np.zeros_like(v) for k, v in list(flat.items())[:3]}
        adam = {"0": {"count": record(np.array(step, np.int32), code=3), "mu": encode(nest(moments)),
                      "nu": encode(nest(moments))}, "1": {}, "2": {}}
        payload = {"step": step, "params": encode(params, dtype_name),
                   "opt_state": {"0": {}, "1": {"inner_state": adam}, "2": {"inner_state": adam}},
                   "batch_stats": None, "dynamic_scale": None}
    path.write_bytes(msgpack.packb(payload, use_bin_type=True))
    return path


def used(cfg):
    """The hyper-parameters `cfg`'s weights depend on (a stage without MSA or QnA blocks leaves its heads and
    window unused, and the shapes cannot tell them)."""
    stages = [(cfg.msa_depths[i], cfg.qna_depths[i],
               (cfg.msa_heads[i], cfg.msa_windows[i]) if cfg.msa_depths[i] else None,
               (cfg.qna_heads[i], cfg.qna_kernel_sizes[i]) if cfg.has_qna(i) else None) for i in range(4)]
    return cfg.embed_dim, cfg.n_queries, cfg.num_classes, stages


def assert_same_files(a, b):
    ta, arch_a, cfg_a, _ = read_weights(a)
    tb, arch_b, cfg_b, _ = read_weights(b)
    assert (arch_a, cfg_a) == (arch_b, cfg_b) and set(ta) == set(tb)
    for key in ta:
        np.testing.assert_array_equal(ta[key], tb[key], err_msg=key)


# -- the Flax path against the reference -----------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SMALL))
def test_flax_checkpoint_runs_like_the_reference(tmp_path, name):
    cfg = SMALL[name]
    ref = reference_model(cfg, seed=3)
    sd = state_dict_numpy(ref)
    folder = tmp_path / "workdir"
    folder.mkdir()
    write_flax_checkpoint(folder / "checkpoint_10", flax_params_from_torch({k: v * 0 for k, v in sd.items()}))
    write_flax_checkpoint(folder / "checkpoint_2000", flax_params_from_torch(sd), step=2000)
    info = convert(folder, tmp_path / "out.safetensors")   # a folder: its latest step
    tensors, architecture, config, source = read_weights(tmp_path / "out.safetensors")
    assert architecture == "qna_vit" and used(QnAViTConfig.from_dict(config)) == used(cfg) and info["variant"] is None
    assert source["file"] == "checkpoint_2000" and source["format"] == "flax-checkpoint"
    assert source["ignored_keys"] == ["batch_stats", "dynamic_scale", "opt_state", "step"]
    assert source["query"] == "raw"
    want = engine_tensors(ref.state_dict())
    assert set(tensors) == set(want)
    for key in want:
        np.testing.assert_array_equal(tensors[key], want[key], err_msg=key)
    model = qnalo.load(tmp_path / "out.safetensors")
    x = image(1, 2, 56, 56)
    if cfg.num_classes:
        assert_logits_close(model(x), torch_run(ref, x), what=f"{name} logits")
    for i, (f, r) in enumerate(zip(model.forward_features(x), torch_run(ref, x, features=True))):
        assert_logits_close(f, r, what=f"{name} stage {i}", op="features")


@pytest.mark.parametrize("name", sorted(SMALL))
def test_pytorch_layout_gives_the_same_file_as_flax(tmp_path, name):
    ref = reference_model(SMALL[name], seed=5)
    sd = state_dict_numpy(ref)
    write_flax_checkpoint(tmp_path / "checkpoint_7", flax_params_from_torch(sd))
    convert(tmp_path / "checkpoint_7", tmp_path / "flax.safetensors")
    wrapped = {"model.pth": {"model": ref.state_dict()}, "raw.pth": ref.state_dict(),
               "state.pth": {"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}},
               "ddp.pth": {"model": {f"module.{k}": v for k, v in ref.state_dict().items()}, "optimizer": {}}}
    formats = {"model.pth": "pth-classification", "raw.pth": "state-dict", "state.pth": "pth-state-dict",
               "ddp.pth": "pth-training"}
    for file_name, obj in wrapped.items():
        torch.save(obj, tmp_path / file_name)
        dst = tmp_path / f"{file_name}.safetensors"
        info = convert(tmp_path / file_name, dst)
        assert info["architecture"] == "qna_vit" and info["source"]["format"] == formats[file_name]
        assert info["source"]["ignored_keys"] == [] and info["source"]["query"] == "raw"
        assert_same_files(tmp_path / "flax.safetensors", dst)   # identical engine tensors and config


def test_bfloat16_checkpoint_is_widened_exactly(tmp_path):
    cfg = SMALL["classifier"]
    flat = flax_params_from_torch(state_dict_numpy(reference_model(cfg, seed=6)))
    truncated = {k: ((v.view(np.uint32) >> 16) << 16).view(np.float32) for k, v in flat.items()}   # bf16 values
    write_flax_checkpoint(tmp_path / "checkpoint_1", flat, dtype_name="bfloat16")
    write_flax_checkpoint(tmp_path / "checkpoint_2", truncated)
    convert(tmp_path / "checkpoint_1", tmp_path / "bf16.safetensors")
    convert(tmp_path / "checkpoint_2", tmp_path / "f32.safetensors")
    assert_same_files(tmp_path / "bf16.safetensors", tmp_path / "f32.safetensors")
    tensors = read_weights(tmp_path / "bf16.safetensors")[0]
    assert all(t.dtype == np.float32 for t in tensors.values())
    np.testing.assert_array_equal(tensors["head.bias"], truncated["ClassificationHead_0/head_logits/bias"])


def test_bare_params_tree(tmp_path):
    flat = flax_params_from_torch(state_dict_numpy(reference_model(SMALL["backbone"], seed=7)))
    write_flax_checkpoint(tmp_path / "checkpoint_1", flat)
    write_flax_checkpoint(tmp_path / "params.msgpack", flat, bare=True)
    convert(tmp_path / "checkpoint_1", tmp_path / "a.safetensors")
    info = convert(tmp_path / "params.msgpack", tmp_path / "b.safetensors")
    assert info["source"]["format"] == "flax-params" and info["source"]["ignored_keys"] == []
    assert_same_files(tmp_path / "a.safetensors", tmp_path / "b.safetensors")


# -- the real shapes ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, leaves, params", [
    ("qna_vit_tiny", 214, 15_715_560), ("qna_vit_tiny_7x7", 214, 15_753_960),
    ("qna_vit_small", 358, 24_971_560), ("qna_vit_base", 358, 55_670_008)])
def test_every_variant_is_recognised_from_its_flax_shapes(name, leaves, params):
    variant = QNA_VIT_VARIANTS[name]
    shapes = flax_shapes(variant)
    assert (len(shapes), sum(int(np.prod(s)) for s in shapes.values())) == (leaves, params)   # spec 3.2
    tree = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}   # shapes only
    tensors, config, found, ignored = convert_qna_vit_flax(tree)
    assert found == name and config == variant and ignored == []


def test_spec_tree_of_tiny():
    shapes = flax_shapes(QNA_VIT_VARIANTS["qna_vit_tiny"])
    for path, shape in {   # spec 4.2, row by row
            "StemBlock_0/conv_1x1/kernel": (4, 4, 3, 64),
            "QnAStage_0/QnA_Block_2/FusedKQnA_0/attn_scale_weights": (1, 1, 9, 16),
            "QnAStage_0/QnA_Block_3_stride_2/Conv_0/kernel": (1, 1, 64, 128),
            "QnAStage_0/QnA_Block_3_stride_2/FusedKQnA_0/Wk": (64, 128),
            "QnAStage_0/QnA_Block_3_stride_2/FusedKQnA_0/rpe_bias": (9, 32),
            "QnAStage_0/QnA_Block_3_stride_2/LayerNorm_1/scale": (128,),
            "QnAStage_1/QnA_Block_4_stride_2/FusedKQnA_0/query": (2, 256),
            "LSAStage_2/MSA_Block_4/MultiHeadSelfAttention_0/to_qkv/kernel": (256, 768),
            "LSAStage_2/MSA_Block_1/MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/rpe_bias": (729, 8),
            "QnAStage_2/QnA_Block_3_stride_2/MlpBlock_0/Dense_0/kernel": (512, 2048),
            "LSAStage_3/MSA_Block_2/MultiHeadSelfAttention_0/RelativePositionalEmbedding_0/rpe_bias": (169, 16),
            "ClassificationHead_0/head_logits/kernel": (512, 1000)}.items():
        assert shapes[path] == shape, path


def test_full_size_tiny_checkpoint(tmp_path):
    ref = randomize_(qna_vit_reference("qna_vit_tiny"), seed=0)
    sd = state_dict_numpy(ref)
    write_flax_checkpoint(tmp_path / "checkpoint_312500", flax_params_from_torch(sd), step=312500)
    info = convert(tmp_path, tmp_path / "qna_vit_tiny.safetensors")
    assert (info["variant"], info["params"], info["tensors"]) == ("qna_vit_tiny", 15_715_560, 214)
    tensors = read_weights(tmp_path / "qna_vit_tiny.safetensors")[0]
    want = engine_tensors(ref.state_dict())
    for key in want:
        np.testing.assert_array_equal(tensors[key], want[key], err_msg=key)
    x = image(0, 1, 224, 224)
    assert_logits_close(qnalo.load(tmp_path / "qna_vit_tiny.safetensors")(x), torch_run(ref, x), what="tiny logits")


# -- bad input: one error naming the problem, nothing written -----------------------------------------------------

def _small_flat(seed=8):
    return flax_params_from_torch(state_dict_numpy(reference_model(SMALL["classifier"], seed=seed)))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.pop("QnAStage_1/QnA_Block_2/FusedKQnA_0/to_v/kernel"),
     r"missing keys: QnAStage_1/QnA_Block_2/FusedKQnA_0/to_v/kernel$"),
    (lambda f: f.update({"QnAStage_1/QnA_Block_2/FusedKQnA_0/Wk_b": np.zeros((4, 4), np.float32)}),
     r"unexpected keys: QnAStage_1/QnA_Block_2/FusedKQnA_0/Wk_b$"),
    (lambda f: f.update({"LSAStage_3/MSA_Block_1/MlpBlock_0/Dense_1/bias": np.zeros(5, np.float32)}),
     r"wrong shapes: LSAStage_3/MSA_Block_1/MlpBlock_0/Dense_1/bias \(5,\) \(expected \(64,\)\)$"),
    (lambda f: f.update({"QnAStage_0/QnA_Block_1/FusedKQnA_0/rpe_bias": np.zeros((4, 4), np.float32)}),
     r"wrong shapes: QnAStage_0/QnA_Block_1/FusedKQnA_0/rpe_bias \(4, 4\) \(expected \(9, 4\)\)$"),
    (lambda f: f.update({"QnAStage_1/QnA_Block_1/FusedKQnA_0/query": np.zeros((2, 16), np.int32)}),
     r"QnAStage_1/QnA_Block_1/FusedKQnA_0/query is int32"),
])
def test_bad_trees_are_one_error_naming_the_leaf(tmp_path, change, message):
    flat = _small_flat()
    change(flat)
    write_flax_checkpoint(tmp_path / "checkpoint_5", flat)
    with pytest.raises(CheckpointError, match=r"checkpoint_5: .*" + message) as info:
        convert(tmp_path / "checkpoint_5", tmp_path / "out.safetensors")
    assert "\n" not in str(info.value)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint_5"]


@pytest.mark.parametrize("name, content, message", [
    ("notes.txt", b"just some text", "not a checkpoint qnalo can read"),
    ("checkpoint_3", b"\xc1 not msgpack", "not a Flax msgpack checkpoint"),
    ("checkpoint_4", msgpack.packb({"step": 1, "params": {"Dense_0": {"kernel": record(np.zeros((2, 2)))}}}),
     "does not look like a QnA-ViT Flax checkpoint: no StemBlock_0/conv_1x1/kernel"),
    ("checkpoint_6", msgpack.packb({"step": 1, "params": {}, "ema_params": {}}), "unexpected top-level entries"),
])
def test_non_checkpoints(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        convert(tmp_path / name, tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == [name]


def test_legacy_pickle_is_told_apart_from_msgpack(tmp_path):
    sd = reference_model(SMALL["backbone"]).state_dict()
    torch.save({"model": sd}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"legacy \(torch < 1.6, non-zip\) checkpoint"):
        convert(tmp_path / "old.pth", tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == ["old.pth"]


def test_an_empty_folder(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(CheckpointError, match="without a Flax checkpoint_<step>"):
        convert(tmp_path / "src", tmp_path / "out.safetensors")


def test_window_sizes_option_is_refused_for_qna_vit(tmp_path):
    write_flax_checkpoint(tmp_path / "checkpoint_1", _small_flat())
    with pytest.raises(CheckpointError, match="--window-sizes is a LITv2 option"):
        convert(tmp_path / "checkpoint_1", tmp_path / "out.safetensors", window_sizes=(0, 0, 2, 1))
    convert(tmp_path / "checkpoint_1", tmp_path / "out.safetensors", img_size=448)
    assert read_weights(tmp_path / "out.safetensors")[2]["img_size"] == 448


def test_pytorch_layout_with_a_wrong_key(tmp_path):
    sd = reference_model(SMALL["classifier"]).state_dict()
    sd["stages.2.qna.0.attn.q_param"] = torch.zeros(3, 32)
    del sd["norm.bias"]
    torch.save({"model": sd}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth: .*missing keys: norm.bias; wrong shapes: "
                                              r"stages.2.qna.0.attn.q_param \(3, 32\) \(expected \(2, 32\)\)"):
        convert(tmp_path / "bad.pth", tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == ["bad.pth"]


def test_existing_destination_needs_force(tmp_path):
    write_flax_checkpoint(tmp_path / "checkpoint_1", _small_flat())
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(tmp_path / "checkpoint_1", dst)
    assert dst.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["checkpoint_1", "out.safetensors"]
    convert(tmp_path / "checkpoint_1", dst, force=True)
    assert read_weights(dst)[1] == "qna_vit"


# -- command line ---------------------------------------------------------------------------------------------------

def test_cli_convert(tmp_path, capsys):
    folder = tmp_path / "workdir"
    folder.mkdir()
    write_flax_checkpoint(folder / "checkpoint_9", _small_flat())
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(folder), str(dst)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("wrote qna_vit (custom configuration, ") and out.count("\n") == 1

    assert main(["convert", str(folder), str(dst)]) == 1   # exists, no --force
    err = capsys.readouterr().err
    assert err.startswith("qnalo: error: ") and "already exists" in err and err.count("\n") == 1

    flat = _small_flat()
    del flat["StemBlock_0/conv_1x1/kernel"]
    write_flax_checkpoint(folder / "checkpoint_10", flat)
    assert main(["convert", str(folder), str(tmp_path / "new.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qnalo: error: ") and "no StemBlock_0/conv_1x1/kernel" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors", "workdir"]


def test_cli_flax_conversion_needs_no_torch(tmp_path):
    write_flax_checkpoint(tmp_path / "checkpoint_1", _small_flat())
    dst = tmp_path / "out.safetensors"
    code = ("import sys; from qnalo.cli import main; "
            f"rc = main(['convert', {str(tmp_path / 'checkpoint_1')!r}, {str(dst)!r}]); "
            "assert rc == 0 and 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("wrote qna_vit") and dst.exists()
