"""Train the embedded demo models (qnalo/demo/) in PyTorch, with this project's reference modules, and convert
them with qnalo's converter.

    python tests/reference/train_demo.py [--seed 0] [--out qnalo/demo]    # from a checkout; needs torch, sklearn

Data: scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package, no download), split by the
seed into 1,437 training and 360 held-out images. Each digit is drawn white on black and run through its model
family's official evaluation preprocessing at 32x32 (qnalo.preprocess), the same path `qnalo classify` takes for a
photo. Training augments with shifts of up to one source pixel. Everything is seeded and runs on one thread, so a
rerun on the same PyTorch build gives the same weights.

Writes litv2_digits.safetensors, qna_vit_digits.safetensors, digits_heldout.npz and manifest.json (see
qnalo/demo/__init__.py); each file goes through a temporary name, so an interrupted run leaves the old set.
"""
import argparse
import json
import math
import os
import shutil
import tempfile
import time

import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/, as pytest sees it
from reference.litv2_torch import LITv2              # noqa: E402
from reference.qna_vit_torch import QnAViT           # noqa: E402

from qnalo import demo                               # noqa: E402
from qnalo.preprocess import official_eval           # noqa: E402
from qnalo.weights_converter.convert import convert  # noqa: E402

HELDOUT_COUNT = 360
SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
# Small members of each family: heads of width 16 (LITv2, converted with head_dim=16) and 8 (QnA-ViT); LITv2's
# stage 2 has two Lo-Fi and two Hi-Fi heads with 2x2 windows, stage 3 global MSA.
LITV2_HEAD_DIM = 16
MODELS = {
    "litv2_digits": ("litv2", lambda: LITv2(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8),
                                            window_sizes=(0, 0, 2, 1), alpha=0.5, num_classes=10)),
    "qna_vit_digits": ("qna_vit", lambda: QnAViT(embed_dim=16, qna_depths=(1, 1, 1, 0), msa_depths=(0, 0, 1, 1),
                                                 qna_heads=(2, 4, 8, 16), msa_heads=(1, 2, 4, 8),
                                                 qna_kernel_sizes=(3, 3, 3, 3), msa_windows=(8, 4, 2, 1),
                                                 num_classes=10)),
}
TRAINING = dict(epochs=40, batch=32, lr=2e-3, weight_decay=0.05, warmup_epochs=2, label_smoothing=0.1)


def split(seed):
    """(train images, train labels, held-out images, held-out labels): uint8 (N, 8, 8) and int64 (N,)."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images, labels = demo.scale_digits(digits.images), digits.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(labels))
    test, train = np.sort(order[:HELDOUT_COUNT]), np.sort(order[HELDOUT_COUNT:])
    return images[train], labels[train], images[test], labels[test]


def shifted(images, dy, dx):
    """Digits moved by (dy, dx) pixels, zeros coming in."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def preprocess(architecture, images):
    """uint8 (N, 8, 8) -> float32 (N, 3, 32, 32), each through the family's official evaluation transform."""
    return np.concatenate([official_eval(architecture, demo.IMG_SIZE, demo.digit_picture(d)) for d in images])


def learning_rate(step, steps_per_epoch):
    warmup = TRAINING["warmup_epochs"] * steps_per_epoch
    total = TRAINING["epochs"] * steps_per_epoch
    if step < warmup:
        return TRAINING["lr"] * (step + 1) / warmup
    return TRAINING["lr"] * 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def train(name, architecture, build, train_images, train_labels, seed, log=print):
    """A trained model (eval mode) of MODELS[name]."""
    torch.manual_seed(seed)
    model = build()
    views = torch.from_numpy(np.stack([preprocess(architecture, shifted(train_images, dy, dx))
                                       for dy, dx in SHIFTS]))                # (9, N, 3, 32, 32)
    labels = torch.from_numpy(train_labels)
    opt = torch.optim.AdamW(model.parameters(), lr=TRAINING["lr"], weight_decay=TRAINING["weight_decay"])
    rng = np.random.default_rng(seed)
    n, batch = len(labels), TRAINING["batch"]
    steps_per_epoch = n // batch
    step = 0
    for epoch in range(TRAINING["epochs"]):
        model.train()
        order, choice = rng.permutation(n), rng.integers(0, len(SHIFTS), n)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * batch:(s + 1) * batch]
            x = views[torch.from_numpy(choice[idx]), torch.from_numpy(idx)]
            loss = F.cross_entropy(model(x), labels[idx], label_smoothing=TRAINING["label_smoothing"])
            for group in opt.param_groups:
                group["lr"] = learning_rate(step, steps_per_epoch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item()
            step += 1
        log(f"{name} epoch {epoch + 1}/{TRAINING['epochs']}: loss {total / steps_per_epoch:.3f}")
    return model.eval()


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python tests/reference/train_demo.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=demo.DEMO_DIR, help="folder to write (default: the package's qnalo/demo)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    train_images, train_labels, test_images, test_labels = split(args.seed)
    heldout = {"images": test_images, "labels": test_labels}
    report = {"seed": args.seed, "train_count": len(train_labels), "heldout_count": len(test_labels),
              "training": TRAINING, "torch": torch.__version__, "models": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for name, (architecture, build) in MODELS.items():
            start = time.perf_counter()
            model = train(name, architecture, build, train_images, train_labels, args.seed)
            with torch.no_grad():
                logits = model(torch.from_numpy(preprocess(architecture, test_images)))
            predictions = logits.argmax(1).numpy().astype(np.int64)
            heldout[f"torch_{name}"] = predictions
            accuracy = float((predictions == test_labels).mean())
            pth = os.path.join(scratch, f"{name}.pth")
            torch.save(model.state_dict(), pth)
            info = convert(pth, os.path.join(args.out, f"{name}.safetensors"), force=True,   # writes atomically
                           img_size=demo.IMG_SIZE, labels=demo.DIGIT_LABELS,
                           head_dim=LITV2_HEAD_DIM if architecture == "litv2" else None)
            report["models"][name] = {"architecture": architecture, "params": info["params"],
                                      "torch_heldout_accuracy": accuracy,
                                      "train_seconds": round(time.perf_counter() - start, 1)}
            print(f"{name}: {info['params']:,} parameters, held-out accuracy {accuracy:.2%}")
        npz = os.path.join(scratch, demo.HELDOUT_FILE)
        np.savez_compressed(npz, **heldout)
        _copy_atomic(npz, os.path.join(args.out, demo.HELDOUT_FILE))
        manifest = os.path.join(scratch, "manifest.json")
        with open(manifest, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2, sort_keys=True)
            f.write("\n")
        _copy_atomic(manifest, os.path.join(args.out, "manifest.json"))


def _copy_atomic(src, dst):
    fd, tmp = tempfile.mkstemp(prefix=".qnalo-", suffix=".tmp", dir=os.path.dirname(os.path.abspath(dst)))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)   # package data: readable by all (mkstemp makes 0600)
        os.replace(tmp, dst)
    except BaseException:
        os.unlink(tmp)
        raise


if __name__ == "__main__":
    main()
