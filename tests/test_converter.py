"""The LITv2 converter: config inference, the engine layout, every source format through torch.save, bad inputs,
the atomic write and the command line."""
import collections
import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

import qnalo
from qnalo.cli import main
from qnalo.errors import CheckpointError, UnsafeCheckpointError
from qnalo.models.litv2 import official_shapes
from qnalo.models.litv2_config import LITV2_VARIANTS, LITv2Config
from qnalo.weights import read_weights
from qnalo.weights_converter.convert import convert
from qnalo.weights_converter.litv2 import infer_litv2_config, litv2_engine_tensors, litv2_variant
from tolerances import assert_logits_close
from fake_modules import install_fake_yacs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_state_dict(embed_dim=32, depths=(1, 1, 2, 1), lo_heads=(0, 0, 3, 8), hi_heads=(0, 0, 1, 0),
                        num_classes=10, out_norms=(), head_dim=32, seed=0):
    """Random float32 tensors under the official keys (spec section 4.3, written out independently of the
    converter), with the int64 num_batches_tracked counters of the DTM BatchNorms."""
    rng = np.random.default_rng(seed)
    sd = {}

    def put(name, *shape):
        sd[name] = rng.standard_normal(shape).astype(np.float32)

    def linear(name, n_in, n_out):
        put(f"{name}.weight", n_out, n_in)
        put(f"{name}.bias", n_out)

    E = embed_dim
    put("patch_embed.proj.weight", E, 3, 4, 4)
    for name in ("patch_embed.proj.bias", "patch_embed.norm.weight", "patch_embed.norm.bias"):
        put(name, E)
    for i in range(4):
        C = E * 2 ** i
        for b in range(depths[i]):
            block = f"layers.{i}.blocks.{b}"
            lo, hi = lo_heads[i] * head_dim, hi_heads[i] * head_dim
            if lo or hi:
                put(f"{block}.norm1.weight", C)
                put(f"{block}.norm1.bias", C)
            if lo:
                linear(f"{block}.attn.l_q", C, lo)
                linear(f"{block}.attn.l_kv", C, 2 * lo)
                linear(f"{block}.attn.l_proj", lo, lo)
            if hi:
                linear(f"{block}.attn.h_qkv", C, 3 * hi)
                linear(f"{block}.attn.h_proj", hi, hi)
            put(f"{block}.norm2.weight", C)
            put(f"{block}.norm2.bias", C)
            linear(f"{block}.mlp.fc1", C, 4 * C)
            put(f"{block}.mlp.dwconv.dwconv.weight", 4 * C, 1, 3, 3)
            put(f"{block}.mlp.dwconv.dwconv.bias", 4 * C)
            linear(f"{block}.mlp.fc2", 4 * C, C)
        if i < 3:
            dtm = f"layers.{i}.downsample"
            put(f"{dtm}.dconv.weight", 2 * C, C, 2, 2)
            put(f"{dtm}.dconv.bias", 2 * C)
            put(f"{dtm}.dconv.conv_offset.weight", 8, C, 2, 2)
            put(f"{dtm}.dconv.conv_offset.bias", 8)
            for stat in ("weight", "bias", "running_mean", "running_var"):
                put(f"{dtm}.norm_layer.{stat}", 2 * C)
            sd[f"{dtm}.norm_layer.num_batches_tracked"] = np.array(1000, dtype=np.int64)
    for i in out_norms:
        put(f"norm{i}.weight", E * 2 ** i)
        put(f"norm{i}.bias", E * 2 ** i)
    if num_classes:
        put("norm.weight", 8 * E)
        put("norm.bias", 8 * E)
        linear("head", 8 * E, num_classes)
    return sd


def expected_engine_tensor(key, value):
    """docs/format.md, element by element (loops, not the converter's transposes)."""
    value = np.asarray(value, dtype=np.float32)
    if key == "patch_embed.proj.weight":
        out = np.empty((48, value.shape[0]), np.float32)
        for c in range(3):
            for ky in range(4):
                for kx in range(4):
                    out[c * 16 + ky * 4 + kx] = value[:, c, ky, kx]
        return out
    if key.endswith("dwconv.dwconv.weight"):
        out = np.empty((3, 3, value.shape[0]), np.float32)
        for ky in range(3):
            for kx in range(3):
                out[ky, kx] = value[:, 0, ky, kx]
        return out
    if key.endswith(("dconv.weight", "conv_offset.weight")):
        n_out, channels = value.shape[:2]
        out = np.empty((4 * channels, n_out), np.float32)
        for ky in range(2):
            for kx in range(2):
                for c in range(channels):
                    out[(ky * 2 + kx) * channels + c] = value[:, c, ky, kx]
        return out
    if value.ndim == 2:  # every 2-D official tensor is a Linear weight (out, in)
        return np.ascontiguousarray(value.T)
    return value


def assert_engine_tensors(tensors, state_dict):
    expected_keys = {k for k in state_dict if not k.endswith("num_batches_tracked")}
    assert set(tensors) == expected_keys
    for key in expected_keys:
        want = expected_engine_tensor(key, state_dict[key])
        assert tensors[key].dtype == np.float32 and tensors[key].flags.c_contiguous, key
        np.testing.assert_array_equal(tensors[key], want, err_msg=key)


def to_torch(torch, state_dict, prefix="", dtype=None):
    out = collections.OrderedDict()
    for key, value in state_dict.items():
        tensor = torch.from_numpy(np.array(value))
        out[prefix + key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return out


@pytest.fixture
def fake_yacs(monkeypatch):
    """yacs.config.CfgNode as a dict subclass in a module inserted into sys.modules, so pickles name it."""
    class CfgNode(dict):
        pass

    install_fake_yacs(monkeypatch, CfgNode)

    def make(tree):
        return CfgNode({k: make(v) if isinstance(v, dict) else v for k, v in tree.items()})
    return make


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


# --- config inference and the layout, on plain NumPy state dicts ------------------------------------------------

@pytest.mark.parametrize("lo, hi, alpha", [(3, 1, 0.9), (2, 2, 0.5), (0, 4, 0.0), (4, 0, 1.0), (1, 3, 0.4)])
def test_infer_config_of_the_head_split(lo, hi, alpha):
    sd = official_state_dict(lo_heads=(0, 0, lo, 8), hi_heads=(0, 0, hi, 0))
    config = infer_litv2_config(sd)
    assert config == LITv2Config(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_sizes=(0, 0, 2, 1),
                                 alpha=alpha, lo_heads=(0, 0, lo, 8), num_classes=10, img_size=224)
    assert_engine_tensors(litv2_engine_tensors(sd, config), sd)


def test_infer_config_of_a_dense_backbone():
    sd = official_state_dict(embed_dim=64, depths=(2, 1, 3, 2), lo_heads=(0, 0, 7, 16), hi_heads=(0, 0, 1, 0),
                             num_classes=0, out_norms=(1, 2, 3))
    config = infer_litv2_config(sd, file_name="mask_rcnn_litv2_x_fpn_1x_coco.pth")
    assert (config.embed_dim, config.depths, config.num_heads) == (64, (2, 1, 3, 2), (2, 4, 8, 16))
    assert (config.num_classes, config.out_norms, config.lo_heads, config.alpha) == (0, (1, 2, 3), (0, 0, 7, 16), 0.9)
    assert_engine_tensors(litv2_engine_tensors(sd, config), sd)


def test_a_head_split_that_no_released_alpha_gives_is_kept_exactly():
    sd = official_state_dict(embed_dim=64, lo_heads=(0, 0, 6, 16), hi_heads=(0, 0, 2, 0))
    config = infer_litv2_config(sd)
    assert config.lo_heads == (0, 0, 6, 16) and config.hi_heads(2) == 2 and config.alpha == 6 / 8


def test_head_dim_argument():
    sd = official_state_dict(lo_heads=(0, 0, 5, 16), hi_heads=(0, 0, 3, 0), head_dim=16)
    with pytest.raises(CheckpointError, match="80 rows, not a multiple of 32.*pass head_dim="):
        infer_litv2_config(sd)
    config = infer_litv2_config(sd, head_dim=16)
    assert config.num_heads == (2, 4, 8, 16) and config.lo_heads == (0, 0, 5, 16)


@pytest.mark.parametrize("file_name, window_sizes, img_size, want_ws, want_img", [
    ("litv2_s.pth", None, None, (0, 0, 2, 1), 224),
    ("retinanet_litv2_s_fpn_1x_coco_ws_4.pth", None, None, (0, 0, 4, 1), 224),
    ("litv2_b_384.pth", None, None, (0, 0, 2, 1), 384),
    ("model-a3842.pth", None, None, (0, 0, 2, 1), 224),   # 384 inside another number is not a resolution
    ("litv2_b_384.pth", (0, 0, 7, 1), 256, (0, 0, 7, 1), 256),
])
def test_window_sizes_and_img_size_hints(file_name, window_sizes, img_size, want_ws, want_img):
    config = infer_litv2_config(official_state_dict(), file_name, window_sizes=window_sizes, img_size=img_size)
    assert (config.window_sizes, config.img_size) == (want_ws, want_img)


def test_yacs_config_hints():
    yacs = {"MODEL": {"LIT": {"LOCAL_WS": [0, 0, 4, 1], "ALPHA": 0.8}}, "DATA": {"IMG_SIZE": 384}}
    config = infer_litv2_config(official_state_dict(), "ckpt_epoch_best.pth", yacs_config=yacs)
    assert (config.window_sizes, config.img_size, config.alpha) == ((0, 0, 4, 1), 384, 0.8)  # int(4 * 0.8) = 3


@pytest.mark.parametrize("window_sizes, message", [
    ((0, 0, 2, 2), None),                       # accepted: shapes cannot tell ws 2 from ws 1 for a Lo-only stage
    ((0, 0, 1, 1), "layers.2 has Hi-Fi weights"),
    ((0, 0, 0, 1), "layers.2 has attention weights but window size 0"),
    ((0, 2, 2, 1), "layers.1 has no attention weights but window size 2"),
])
def test_window_sizes_are_checked_against_the_shapes(window_sizes, message):
    if message is None:
        assert infer_litv2_config(official_state_dict(), window_sizes=window_sizes).window_sizes == window_sizes
    else:
        with pytest.raises(CheckpointError, match=message):
            infer_litv2_config(official_state_dict(), window_sizes=window_sizes)


@pytest.mark.parametrize("name", sorted(LITV2_VARIANTS))
def test_full_size_variants_are_recognised(name):
    variant = LITV2_VARIANTS[name]
    shapes = official_shapes(variant)
    assert len(shapes) + 3 == (219 if name == "litv2_s" else 459)  # spec 4.2, with the 3 counters
    params = sum(int(np.prod(s)) for k, s in shapes.items() if not k.endswith(("running_mean", "running_var")))
    assert params == {"litv2_s": 27_844_000, "litv2_m": 48_830_368}.get(name, 86_520_704)
    sd = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}  # shapes only, no memory
    config = infer_litv2_config(sd, f"{name}.pth")
    assert config == variant and litv2_variant(config) == name
    dense = {k: v for k, v in sd.items() if not k.startswith(("norm.", "head."))}
    dense.update({f"norm{i}.weight": np.zeros(variant.stage_dim(i), np.float32) for i in (1, 2, 3)})
    dense.update({f"norm{i}.bias": np.zeros(variant.stage_dim(i), np.float32) for i in (1, 2, 3)})
    assert litv2_variant(infer_litv2_config(dense, "retinanet.pth")) == ("litv2_b" if name == "litv2_b_384" else name)


def test_layout_of_the_spec_appendix_for_litv2_s():
    shapes = official_shapes(LITV2_VARIANTS["litv2_s"])
    assert shapes["layers.2.blocks.0.attn.l_q.weight"] == (320, 384)
    assert shapes["layers.2.blocks.0.attn.h_qkv.weight"] == (192, 384)
    assert shapes["layers.2.blocks.0.attn.h_proj.weight"] == (64, 64)
    assert shapes["layers.3.blocks.1.attn.l_kv.weight"] == (1536, 768)
    assert "layers.3.blocks.0.attn.h_qkv.weight" not in shapes and "layers.0.blocks.0.norm1.weight" not in shapes
    assert shapes["head.weight"] == (1000, 768)


def test_missing_unexpected_and_misshaped_keys_are_named():
    sd = official_state_dict()
    config = infer_litv2_config(sd)
    del sd["layers.1.blocks.0.mlp.fc2.bias"]
    sd["layers.1.blocks.0.attn.rel_pos"] = np.zeros(3, np.float32)
    sd["layers.2.blocks.1.mlp.fc1.weight"] = np.zeros((10, 128), np.float32)
    with pytest.raises(CheckpointError) as info:
        litv2_engine_tensors(sd, config)
    message = str(info.value)
    assert "missing keys: layers.1.blocks.0.mlp.fc2.bias" in message
    assert "unexpected keys: layers.1.blocks.0.attn.rel_pos" in message
    assert "wrong shapes: layers.2.blocks.1.mlp.fc1.weight (10, 128) (expected (512, 128))" in message


def test_long_key_lists_are_cut():
    sd = official_state_dict()
    config = infer_litv2_config(sd)
    trimmed = {k: v for k, v in sd.items() if not k.startswith("layers.3.")}
    with pytest.raises(CheckpointError, match=r"and \d+ more"):
        litv2_engine_tensors(trimmed, config)


def test_integer_weights_are_refused():
    sd = official_state_dict()
    sd["head.bias"] = np.arange(10)
    with pytest.raises(CheckpointError, match="head.bias is int64"):
        litv2_engine_tensors(sd, infer_litv2_config(sd))


# --- every source format through torch.save ---------------------------------------------------------------------

def _convert_and_check(src, dst, state_dict, fmt, config=None, ignored=(), **kwargs):
    info = convert(src, dst, **kwargs)
    tensors, architecture, config_dict, source = read_weights(dst)
    assert architecture == "litv2" and info["architecture"] == "litv2"
    assert_engine_tensors(tensors, state_dict)
    want_config = config or infer_litv2_config(state_dict)
    assert LITv2Config.from_dict(config_dict) == want_config and info["config"] == want_config.to_dict()
    counters = [k for k in state_dict if k.endswith("num_batches_tracked")]
    assert source == {"file": os.path.basename(src), "sha256": sha256(src), "format": fmt,
                      "ignored_keys": sorted(list(ignored) + counters)}
    assert info["params"] == sum(v.size for k, v in state_dict.items()
                                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    return info


def test_classification_checkpoint(torch, tmp_path):
    sd = official_state_dict()
    torch.save({"model": to_torch(torch, sd)}, tmp_path / "litv2_x.pth")
    _convert_and_check(tmp_path / "litv2_x.pth", tmp_path / "out.safetensors", sd, "pth-classification")


def test_training_checkpoint_with_optimizer_and_yacs_config(torch, tmp_path, fake_yacs):
    sd = official_state_dict(lo_heads=(0, 0, 2, 8), hi_heads=(0, 0, 2, 0))
    model = to_torch(torch, sd)
    params = [torch.nn.Parameter(t.clone()) for t in model.values() if t.is_floating_point()]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 300)
    config = fake_yacs({"MODEL": {"TYPE": "litv2", "LIT": {"LOCAL_WS": [0, 0, 4, 1], "ALPHA": 0.5}},
                        "DATA": {"IMG_SIZE": 384}, "AMP_OPT_LEVEL": "O1"})
    torch.save({"model": model, "optimizer": optimizer.state_dict(), "lr_scheduler": scheduler.state_dict(),
                "max_accuracy": 81.2, "epoch": 299, "config": config,
                "amp": {"loss_scaler0": {"loss_scale": 32768.0, "unskipped": 17}}}, tmp_path / "ckpt_epoch_299.pth")
    want = LITv2Config(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_sizes=(0, 0, 4, 1),
                       alpha=0.5, lo_heads=(0, 0, 2, 8), num_classes=10, img_size=384)
    _convert_and_check(tmp_path / "ckpt_epoch_299.pth", tmp_path / "out.safetensors", sd, "pth-training", want)


def test_raw_and_module_prefixed_state_dicts(torch, tmp_path):
    sd = official_state_dict(seed=3)
    torch.save(to_torch(torch, sd), tmp_path / "raw.pth")
    _convert_and_check(tmp_path / "raw.pth", tmp_path / "raw.safetensors", sd, "state-dict")
    torch.save({"model": to_torch(torch, sd, prefix="module.")}, tmp_path / "ddp.pth")
    _convert_and_check(tmp_path / "ddp.pth", tmp_path / "ddp.safetensors", sd, "pth-classification")


@pytest.mark.parametrize("out_norms", [(1, 2, 3), (0, 1, 2, 3)])
def test_dense_checkpoint(torch, tmp_path, out_norms):
    sd = official_state_dict(num_classes=0, out_norms=out_norms)
    heads = {"neck.lateral_convs.0.conv.weight": np.zeros((8, 64, 1, 1), np.float32),
             "bbox_head.retina_cls.weight": np.zeros((9, 8, 3, 3), np.float32),
             "decode_head.conv_seg.bias": np.zeros(150, np.float32)}
    state = to_torch(torch, sd, prefix="backbone.")
    state.update(to_torch(torch, heads))
    meta = {"epoch": 12, "iter": 88000, "mmcv_version": "1.4.0", "CLASSES": ("person", "car"),
            "config": "model = dict(type='RetinaNet')", "hook_msgs": {"last_ckpt": "epoch_12.pth"}}
    torch.save({"meta": meta, "state_dict": state, "optimizer": {"state": {}, "param_groups": []}},
               tmp_path / "retinanet_litv2_s_fpn_1x_coco_ws_4.pth")
    info = _convert_and_check(tmp_path / "retinanet_litv2_s_fpn_1x_coco_ws_4.pth", tmp_path / "out.safetensors", sd,
                              "pth-dense", infer_litv2_config(sd, window_sizes=(0, 0, 4, 1)), ignored=heads)
    assert info["config"]["out_norms"] == list(out_norms) and info["config"]["num_classes"] == 0


@pytest.mark.parametrize("lo, hi", [(0, 4), (4, 0), (2, 2)])
def test_alpha_sweep_checkpoints(torch, tmp_path, lo, hi):
    sd = official_state_dict(lo_heads=(0, 0, lo, 8), hi_heads=(0, 0, hi, 0), seed=lo)
    torch.save({"model": to_torch(torch, sd)}, tmp_path / f"alpha_{lo}.pth")
    info = _convert_and_check(tmp_path / f"alpha_{lo}.pth", tmp_path / "out.safetensors", sd, "pth-classification")
    assert info["config"]["lo_heads"] == [0, 0, lo, 8]


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16", "float64"])
def test_reduced_and_double_precision_sources(torch, tmp_path, dtype_name):
    sd = official_state_dict()
    state = to_torch(torch, sd, dtype=getattr(torch, dtype_name))
    torch.save({"model": state}, tmp_path / "half.pth")
    as_float32 = {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}
    _convert_and_check(tmp_path / "half.pth", tmp_path / "out.safetensors", as_float32, "pth-classification")


def test_non_contiguous_and_shared_storage_tensors(torch, tmp_path):
    sd = official_state_dict()
    state = to_torch(torch, sd)
    for key in ("layers.2.blocks.0.attn.l_q.weight", "layers.3.blocks.0.mlp.fc1.weight", "head.weight"):
        state[key] = state[key].t().contiguous().t()  # a transposed view, saved as is
    state["patch_embed.proj.weight"] = torch.stack([state["patch_embed.proj.weight"]] * 2, dim=-1)[..., 1]
    biases = [k for k in state if k.endswith(".bias")]
    pool = torch.cat([torch.zeros(5)] + [state[k] for k in biases])  # every bias a view into one storage
    offset = 5
    for key in biases:
        n = state[key].numel()
        state[key] = pool[offset:offset + n]
        offset += n
    for key in biases:
        assert state[key].untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
    assert not state["head.weight"].is_contiguous() and state["layers.1.blocks.0.norm2.bias"].storage_offset() > 0
    torch.save({"model": state}, tmp_path / "views.pth")
    as_numpy = {k: v.numpy() for k, v in state.items()}
    _convert_and_check(tmp_path / "views.pth", tmp_path / "out.safetensors", as_numpy, "pth-classification")


def test_safetensors_state_dict_source(tmp_path):
    from safetensors.numpy import save_file
    sd = official_state_dict()
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, tmp_path / "litv2.safetensors")
    _convert_and_check(str(tmp_path / "litv2.safetensors"), tmp_path / "out.safetensors", sd, "safetensors")
    with pytest.raises(CheckpointError, match="already a qnalo weights file"):
        convert(tmp_path / "out.safetensors", tmp_path / "again.safetensors")


def test_round_trip_with_the_pytorch_reference(torch, tmp_path):
    reference = pytest.importorskip("reference.litv2_torch")
    model = reference.randomize_(reference.LITv2(embed_dim=32, depths=(1, 2, 2, 1), num_heads=(1, 2, 4, 8),
                                                 window_sizes=(0, 0, 2, 1), alpha=0.5, num_classes=7), seed=0)
    torch.save({"model": model.state_dict()}, tmp_path / "ref.pth")
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    _convert_and_check(tmp_path / "ref.pth", tmp_path / "out.safetensors", sd, "pth-classification")
    image = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
    with torch.inference_mode():
        expected = model.eval()(torch.from_numpy(image)).numpy()
    assert_logits_close(qnalo.load(tmp_path / "out.safetensors", backend="numpy")(image), expected)
    dense = reference.LITv2(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_sizes=(0, 0, 2, 1),
                            alpha=0.9, num_classes=0, out_norms=(1, 2, 3))
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in dense.state_dict().items()}}, tmp_path / "dense.pth")
    sd = {k: v.numpy() for k, v in dense.state_dict().items()}
    _convert_and_check(tmp_path / "dense.pth", tmp_path / "dense.safetensors", sd, "pth-dense")


# --- bad inputs and the atomic write ----------------------------------------------------------------------------

def test_not_litv2(torch, tmp_path):
    resnet = {"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.zeros(64), "fc.weight": torch.zeros(10, 64)}
    torch.save(resnet, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"resnet.pth: does not look like a LITv2 checkpoint: no patch_embed"):
        convert(tmp_path / "resnet.pth", tmp_path / "out.safetensors")
    assert os.listdir(tmp_path) == ["resnet.pth"]


@pytest.mark.parametrize("obj, message", [
    ([1, 2, 3], "holds a list"),
    ({"model": {"w": "not a tensor"}}, "entry 'w' is a str"),
    ({"state_dict": {"neck.w": np.zeros(2)}}, "without backbone"),
])
def test_containers_that_are_not_state_dicts(torch, tmp_path, obj, message):
    obj = {k: ({kk: torch.from_numpy(vv) if isinstance(vv, np.ndarray) else vv for kk, vv in v.items()}
               if isinstance(v, dict) else v) for k, v in obj.items()} if isinstance(obj, dict) else obj
    torch.save(obj, tmp_path / "odd.pth")
    with pytest.raises(CheckpointError, match=message):
        convert(tmp_path / "odd.pth", tmp_path / "out.safetensors")


def test_mismatching_keys_name_the_source(torch, tmp_path):
    sd = official_state_dict()
    del sd["norm.bias"]
    sd["layers.0.blocks.0.norm2.weight"] = np.zeros(5, np.float32)
    torch.save({"model": to_torch(torch, sd)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=r"bad.pth: .*missing keys: norm.bias.*wrong shapes: "
                                              r"layers.0.blocks.0.norm2.weight \(5,\)"):
        convert(tmp_path / "bad.pth", tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["bad.pth"]


def test_unsafe_checkpoint_is_refused_and_nothing_written(tmp_path):
    import pickle
    import zipfile

    class Gadget:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'CANARY'}",)

    with zipfile.ZipFile(tmp_path / "evil.pth", "w") as z:
        z.writestr("evil/data.pkl", pickle.dumps({"model": Gadget()}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match="system"):
        convert(tmp_path / "evil.pth", tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["evil.pth"]


def _small_checkpoint(torch, path):
    torch.save({"model": to_torch(torch, official_state_dict())}, path)
    return path


def test_existing_destination_needs_force(torch, tmp_path):
    src = _small_checkpoint(torch, tmp_path / "litv2.pth")
    dst = tmp_path / "out.safetensors"
    dst.write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="already exists"):
        convert(src, dst)
    assert dst.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["litv2.pth", "out.safetensors"]
    convert(src, dst, force=True)
    assert read_weights(dst)[1] == "litv2"


def test_missing_destination_folder(torch, tmp_path):
    src = _small_checkpoint(torch, tmp_path / "litv2.pth")
    with pytest.raises(FileNotFoundError, match="output folder does not exist"):
        convert(src, tmp_path / "no" / "such" / "out.safetensors")


@pytest.mark.parametrize("unnamed", [True, False], ids=["O_TMPFILE", "hidden-temp-file"])
def test_failure_while_writing_leaves_nothing(torch, tmp_path, monkeypatch, unnamed):
    from qnalo import weights

    src = _small_checkpoint(torch, tmp_path / "litv2.pth")
    if not unnamed:   # as where the OS or file system has no O_TMPFILE
        monkeypatch.delattr(os, "O_TMPFILE", raising=False)

    def failing_write(f, arrays, metadata):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(weights, "_write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "out.safetensors")
    assert sorted(os.listdir(tmp_path)) == ["litv2.pth"]


# --- command line -----------------------------------------------------------------------------------------------

def test_cli_convert(torch, tmp_path, capsys):
    src = _small_checkpoint(torch, tmp_path / "litv2.pth")
    dst = tmp_path / "out.safetensors"
    assert main(["convert", str(src), str(dst), "--img-size", "256", "--window-sizes", "0,0,4,1"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and str(dst) in out
    assert "wrote litv2 (custom configuration, 1,425,250 parameters)" in out
    config = read_weights(dst)[2]
    assert config["img_size"] == 256 and config["window_sizes"] == [0, 0, 4, 1]

    assert main(["convert", str(src), str(dst)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qnalo: error: ") and "already exists" in err and err.count("\n") == 1
    assert main(["convert", str(src), str(dst), "--force"]) == 0


@pytest.mark.parametrize("argv", [[], ["convert"], ["convert", "a.pth"], ["convert", "a", "b", "--window-sizes", "2,1"],
                                  ["convert", "a", "b", "--img-size", "-3"], ["frobnicate"]])
def test_cli_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2


@pytest.mark.parametrize("name, content, message", [
    ("missing.pth", None, "no such file"),
    ("text.pth", b"hello", "not a zip archive"),
])
def test_cli_bad_sources(tmp_path, capsys, name, content, message):
    if content is not None:
        (tmp_path / name).write_bytes(content)
    assert main(["convert", str(tmp_path / name), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("qnalo: error: ") and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("module", ["qnalo.weights_converter", "weights_converter"])
def test_module_entry_points(torch, tmp_path, module):
    src = _small_checkpoint(torch, tmp_path / "litv2.pth")
    dst = tmp_path / "out.safetensors"
    run = [sys.executable, "-m", module, str(src), str(dst)]
    ok = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("wrote litv2") and ok.stdout.count("\n") == 1
    again = subprocess.run(run, capture_output=True, text=True, cwd=REPO)
    assert again.returncode == 1 and again.stderr.startswith("qnalo: error: ") and again.stderr.count("\n") == 1
    assert "Traceback" not in again.stderr
    usage = subprocess.run([sys.executable, "-m", module], capture_output=True, text=True, cwd=REPO)
    assert usage.returncode == 2 and usage.stderr.startswith("qnalo: error: the following arguments are required")
    assert usage.stderr.count("\n") == 1 and "--help" in usage.stderr


def test_conversion_needs_no_torch(torch, tmp_path):
    src = _small_checkpoint(torch, tmp_path / "litv2.pth")
    code = ("import sys; from qnalo.weights_converter.convert import convert; "
            f"convert({str(src)!r}, {str(tmp_path / 'out.safetensors')!r}); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
