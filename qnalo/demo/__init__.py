"""The embedded demo: a small LITv2 and a small QnA-ViT trained on scikit-learn's handwritten digits.

Files (written by tests/reference/train_demo.py, reproducible from its seed):
    litv2_digits.safetensors, qna_vit_digits.safetensors   converted with `qnalo convert` (labels "0".."9")
    digits_heldout.npz   images (N, 8, 8) uint8 (the digits' 0..16 scaled to 0..255), labels (N,) int64,
                         torch_<model> (N,) int64: the PyTorch model's predictions, recorded at training time
    manifest.json        seed, split, training settings, PyTorch accuracies

A digit becomes an RGB picture (white on black) and then goes through its model family's official evaluation
preprocessing at 32 x 32, exactly as a photo would (qnalo.preprocess).
"""
import json
import os

import numpy as np

DEMO_DIR = os.path.dirname(os.path.abspath(__file__))
DEMO_MODELS = ("litv2_digits", "qna_vit_digits")
IMG_SIZE = 32
DIGIT_LABELS = tuple(str(d) for d in range(10))
HELDOUT_FILE = "digits_heldout.npz"


def demo_path(name):
    """The weights file of an embedded demo model."""
    if name not in DEMO_MODELS:
        raise ValueError(f"unknown demo model {name!r}; the demo models are {', '.join(DEMO_MODELS)}")
    return os.path.join(DEMO_DIR, f"{name}.safetensors")


def digit_picture(pixels):
    """(8, 8) uint8 grey levels -> an RGB PIL image of the digit, white on black."""
    from PIL import Image
    pixels = np.asarray(pixels)
    if pixels.shape != (8, 8) or pixels.dtype != np.uint8:
        raise ValueError(f"expected an (8, 8) uint8 digit, got {pixels.dtype} {pixels.shape}")
    return Image.fromarray(pixels, mode="L").convert("RGB")


def scale_digits(values):
    """scikit-learn's digits (0..16 floats) -> uint8 grey levels 0..255."""
    return np.rint(np.asarray(values, np.float64) * (255.0 / 16.0)).astype(np.uint8)


def heldout():
    """The held-out digits and the recorded PyTorch predictions: a dict of arrays (see the module docstring)."""
    with np.load(os.path.join(DEMO_DIR, HELDOUT_FILE)) as data:
        return {key: data[key] for key in data.files}


def manifest():
    with open(os.path.join(DEMO_DIR, "manifest.json"), encoding="utf-8") as f:
        return json.load(f)


def preprocess_digits(architecture, images):
    """(N, 8, 8) uint8 digits -> (N, 3, 32, 32) float32, each through its family's official preprocessing."""
    from qnalo.preprocess import official_eval
    return np.concatenate([official_eval(architecture, IMG_SIZE, digit_picture(d)) for d in images])


def evaluate(name, batch=60, latency_calls=20, device="cpu", dtype="float32"):
    """Runs demo model `name` on the held-out digits (on `device`, storing `dtype`). Returns a dict: params,
    count, accuracy, agreement (with the recorded PyTorch predictions), disagreements (their indices), load_s
    (reading the file and loading the kernels, compiling them on a machine's first run), images_per_s at `batch`,
    latency_ms (median, batch 1); NumPy in and out, so on a GPU the times include the copies."""
    import time

    import qnalo
    data = heldout()
    start = time.perf_counter()
    model = qnalo.load(demo_path(name), device=device, dtype=dtype)
    load_s = time.perf_counter() - start
    x = preprocess_digits(model.architecture, data["images"])          # (N, 3, 32, 32)
    model(x[:batch])                                                    # first call: buffers, caches
    start = time.perf_counter()
    predictions = np.concatenate([model(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])
    elapsed = time.perf_counter() - start
    latencies = []
    for i in range(latency_calls):
        start = time.perf_counter()
        model(x[i:i + 1])
        latencies.append(time.perf_counter() - start)
    recorded = data[f"torch_{name}"]
    return {"name": name, "architecture": model.architecture, "device": device, "dtype": dtype,
            "params": model.num_parameters, "count": len(x),
            "accuracy": float((predictions == data["labels"]).mean()),
            "agreement": float((predictions == recorded).mean()),
            "disagreements": np.flatnonzero(predictions != recorded).tolist(), "load_s": load_s,
            "images_per_s": len(x) / elapsed, "latency_ms": float(np.median(latencies)) * 1e3}
