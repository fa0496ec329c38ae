"""Training checkpoints as the official LITv2 loop writes them (issue 16): `save_checkpoint` pickles the model, the
optimizer, timm's LR scheduler, apex's loss scaler, the best accuracy (a NumPy scalar), the epoch and the frozen
yacs config (whose bookkeeping holds a set) into one file. `qnalo convert` must read it like the released
{'model': state_dict} file, with the same logits."""
import types

import numpy as np
import pytest

import qnalo
from qnalo.cli import main
from qnalo.weights import read_weights
from qnalo.weights_converter.convert import convert
from qnalo.weights_converter.pth_reader import ForeignObject, load_pth
from model_helpers import image, torch_run
from tolerances import assert_logits_close

pytestmark = pytest.mark.torch
yacs_config = pytest.importorskip("yacs.config")

# Window sizes and image size that the state dict cannot tell and that differ from the converter's defaults:
# the training file's config gives them, the released file needs them as arguments.
ARCHITECTURE = dict(embed_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_sizes=(0, 0, 4, 1), alpha=0.5,
                    num_classes=7)
IMG_SIZE = 384
EPOCH = 5


def official_config(architecture, img_size):
    """A CfgNode shaped like the official classification/config.py (its nodes and fields, small values), cloned,
    edited and frozen as update_config leaves it."""
    CN = yacs_config.CfgNode
    defaults = CN()
    defaults.BASE = [""]
    defaults.DATA = CN()
    defaults.DATA.BATCH_SIZE, defaults.DATA.DATA_PATH, defaults.DATA.DATASET = 128, "", "imagenet"
    defaults.DATA.IMG_SIZE, defaults.DATA.INTERPOLATION, defaults.DATA.ZIP_MODE = img_size, "bicubic", False
    defaults.DATA.CACHE_MODE, defaults.DATA.PIN_MEMORY, defaults.DATA.NUM_WORKERS = "part", True, 8
    defaults.MODEL = CN()
    defaults.MODEL.TYPE, defaults.MODEL.NAME, defaults.MODEL.RESUME, defaults.MODEL.PRETRAINED = "lit", "lit-s", "", ""
    defaults.MODEL.NUM_CLASSES, defaults.MODEL.DROP_RATE, defaults.MODEL.DROP_PATH_RATE = 1000, 0.0, 0.1
    defaults.MODEL.LABEL_SMOOTHING, defaults.MODEL.OFFSET_LR_MULTI = 0.1, 1.0
    defaults.MODEL.LIT = CN()
    lit = defaults.MODEL.LIT
    lit.PATCH_SIZE, lit.IN_CHANS, lit.EMBED_DIM, lit.DEPTHS, lit.NUM_HEADS = 4, 3, 96, [2, 2, 6, 2], [3, 6, 12, 24]
    lit.WINDOW_SIZE, lit.MLP_RATIO, lit.QKV_BIAS, lit.QK_SCALE, lit.APE = 7, 4.0, True, None, False
    lit.PATCH_NORM, lit.HAS_MSA, lit.ALPHA, lit.LOCAL_WS = True, [0, 0, 1, 1], 0.9, [0, 0, 2, 1]
    defaults.TRAIN = CN()
    train = defaults.TRAIN
    train.START_EPOCH, train.EPOCHS, train.WARMUP_EPOCHS, train.WEIGHT_DECAY = 0, 300, 20, 0.05
    train.BASE_LR, train.WARMUP_LR, train.MIN_LR, train.CLIP_GRAD = 5e-4, 5e-7, 5e-6, 5.0
    train.AUTO_RESUME, train.ACCUMULATION_STEPS, train.USE_CHECKPOINT = True, 0, False
    train.LR_SCHEDULER = CN()
    train.LR_SCHEDULER.NAME, train.LR_SCHEDULER.DECAY_EPOCHS, train.LR_SCHEDULER.DECAY_RATE = "cosine", 30, 0.1
    train.OPTIMIZER = CN()
    train.OPTIMIZER.NAME, train.OPTIMIZER.EPS, train.OPTIMIZER.BETAS = "adamw", 1e-8, (0.9, 0.999)
    train.OPTIMIZER.MOMENTUM = 0.9
    defaults.AUG = CN()
    defaults.AUG.COLOR_JITTER, defaults.AUG.AUTO_AUGMENT = 0.4, "rand-m9-mstd0.5-inc1"
    defaults.AUG.REPROB, defaults.AUG.REMODE, defaults.AUG.RECOUNT = 0.25, "pixel", 1
    defaults.AUG.MIXUP, defaults.AUG.CUTMIX, defaults.AUG.CUTMIX_MINMAX = 0.8, 1.0, None
    defaults.AUG.MIXUP_PROB, defaults.AUG.MIXUP_SWITCH_PROB, defaults.AUG.MIXUP_MODE = 1.0, 0.5, "batch"
    defaults.TEST = CN()
    defaults.TEST.CROP = True
    defaults.AMP_OPT_LEVEL, defaults.OUTPUT, defaults.TAG, defaults.SAVE_FREQ = "O1", "", "default", 1
    defaults.PRINT_FREQ, defaults.SEED, defaults.EVAL_MODE, defaults.THROUGHPUT_MODE = 10, 0, False, False
    defaults.LOCAL_RANK = 0

    config = defaults.clone()
    config.defrost()
    config.MODEL.NUM_CLASSES = architecture["num_classes"]
    config.MODEL.LIT.EMBED_DIM = architecture["embed_dim"]
    config.MODEL.LIT.DEPTHS, config.MODEL.LIT.NUM_HEADS = list(architecture["depths"]), list(architecture["num_heads"])
    config.MODEL.LIT.ALPHA, config.MODEL.LIT.LOCAL_WS = architecture["alpha"], list(architecture["window_sizes"])
    config.OUTPUT = "output/lit-s/default"
    config.freeze()
    return config


def cosine_scheduler_state(base_lr=5e-4, warmup_lr=5e-7, warmup_t=20, t_initial=300):
    """timm CosineLRScheduler.state_dict(): its __dict__ without the optimizer."""
    return {"param_group_field": "lr", "_initial_param_group_field": "initial_lr", "base_values": [base_lr],
            "metric": None, "noise_range_t": None, "noise_pct": 0.67, "noise_type": "normal", "noise_std": 1.0,
            "noise_seed": 42, "t_initial": t_initial, "t_mul": 1.0, "lr_min": 5e-6, "decay_rate": 1.0,
            "warmup_t": warmup_t, "warmup_lr_init": warmup_lr, "warmup_prefix": False, "cycle_limit": 1,
            "t_in_epochs": False, "warmup_steps": [(base_lr - warmup_lr) / warmup_t]}


@pytest.fixture(scope="module")
def checkpoints(torch, tmp_path_factory):
    """A small LITv2 after one AdamW step (so that the optimizer state holds tensors), saved in the official
    training layout and in the released one: the model (eval mode), its optimizer and the two paths."""
    reference = pytest.importorskip("reference.litv2_torch")
    folder = tmp_path_factory.mktemp("training")
    model = reference.randomize_(reference.LITv2(**ARCHITECTURE), seed=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, eps=1e-8, betas=(0.9, 0.999), weight_decay=0.05)
    logits = model.train()(torch.from_numpy(image(1, 2, 64, 64)))
    torch.nn.functional.cross_entropy(logits, torch.tensor([3, 5])).backward()
    optimizer.step()
    model.eval()
    training = folder / f"ckpt_epoch_{EPOCH}.pth"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_scheduler": cosine_scheduler_state(), "max_accuracy": np.float64(81.5), "epoch": EPOCH,
                "config": official_config(ARCHITECTURE, IMG_SIZE),
                "amp": {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}}, training)
    released = folder / "litv2_released.pth"
    torch.save({"model": model.state_dict()}, released)
    return types.SimpleNamespace(model=model, optimizer=optimizer, training=training, released=released)


def test_training_checkpoint_entries_read_as_data(checkpoints):
    got = load_pth(checkpoints.training)
    assert got["epoch"] == EPOCH and got["lr_scheduler"] == cosine_scheduler_state()
    assert type(got["max_accuracy"]) is np.float64 and got["max_accuracy"] == 81.5
    assert got["amp"] == {"loss_scaler0": {"loss_scale": 65536.0, "unskipped": 0}}
    config = got["config"]
    assert isinstance(config, ForeignObject) and config.foreign_name == "yacs.config.CfgNode"
    assert config.pickled_state["__immutable__"] is True and config.pickled_state["__deprecated_keys__"] == set()
    assert config["MODEL"]["LIT"]["LOCAL_WS"] == [0, 0, 4, 1] and config["DATA"]["IMG_SIZE"] == IMG_SIZE
    assert config["MODEL"]["NUM_CLASSES"] == 7
    assert config["TRAIN"]["OPTIMIZER"]["BETAS"] == (0.9, 0.999) and config["AUG"]["CUTMIX_MINMAX"] is None
    moments = checkpoints.optimizer.state_dict()["state"][0]
    for name in ("exp_avg", "exp_avg_sq", "step"):
        np.testing.assert_array_equal(got["optimizer"]["state"][0][name], moments[name].numpy(), err_msg=name)


def test_training_and_released_checkpoints_convert_alike(checkpoints, tmp_path):
    from_training = convert(checkpoints.training, tmp_path / "training.safetensors")
    from_released = convert(checkpoints.released, tmp_path / "released.safetensors", img_size=IMG_SIZE,
                            window_sizes=ARCHITECTURE["window_sizes"])
    assert from_training["source"]["format"] == "pth-training"
    assert from_released["source"]["format"] == "pth-classification"
    assert from_training["config"] == from_released["config"]
    assert from_training["source"]["ignored_keys"] == from_released["source"]["ignored_keys"]
    assert from_training["config"]["window_sizes"] == [0, 0, 4, 1] and from_training["config"]["img_size"] == IMG_SIZE

    x = image(2, 2, 64, 64)
    logits = qnalo.load(tmp_path / "training.safetensors", backend="numpy")(x)
    np.testing.assert_array_equal(logits, qnalo.load(tmp_path / "released.safetensors", backend="numpy")(x))
    assert_logits_close(logits, torch_run(checkpoints.model, x))


def test_cli_converts_a_training_checkpoint(checkpoints, tmp_path, capsys):
    dst = tmp_path / "cli.safetensors"
    assert main(["convert", str(checkpoints.training), str(dst)]) == 0
    assert str(dst) in capsys.readouterr().out
    tensors, architecture, config, source = read_weights(dst)
    assert architecture == "litv2" and source["format"] == "pth-training"
    assert config["num_classes"] == 7 and config["window_sizes"] == [0, 0, 4, 1] and config["img_size"] == IMG_SIZE
