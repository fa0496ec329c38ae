"""Image classification with a loaded model: paths in, top-k class names and probabilities out.

    >>> from qnalo.classify import classify_files, expand_paths
    >>> files, problems = expand_paths(["photos/", "*.jpg"])
    >>> for result in classify_files(model, files, top=5):
    ...     print(result["image"], result.get("top") or result["error"])

Each image goes through its model family's official evaluation preprocessing (qnalo.preprocess) at the
model's resolution. An image that cannot be read gives a result with an "error" and the others go on.
"""
import glob
import os

import numpy as np

from .errors import InputError
from .labels import model_labels
from .preprocess import official_eval

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm")


def weights_folder():
    """Where `--model NAME` looks for NAME.safetensors: $QNALO_WEIGHTS, else ~/.cache/qnalo."""
    return os.environ.get("QNALO_WEIGHTS") or os.path.join(os.path.expanduser("~"), ".cache", "qnalo")


def named_model(model=None, weights=None, **build):
    """The model that `--model NAME` / `--weights FILE` name, with real weights (never random ones): a weights
    file (which must hold variant `model` when both are given), an embedded demo model, or a variant whose
    converted file is weights_folder()/NAME.safetensors. `build`: create_model's backend, device, dtype."""
    import qnalo
    from qnalo import demo

    if weights and model:
        return qnalo.create_model(model, weights=weights, **build)
    if weights:
        return qnalo.load(weights, **build)
    if not model:
        raise InputError("no model given; pass --model NAME or --weights FILE (from `qnalo convert`)")
    if model in demo.DEMO_MODELS:
        return qnalo.load(demo.demo_path(model), **build)
    if model not in qnalo.list_models():
        raise InputError(f"unknown model {model!r}; the demo models are {', '.join(demo.DEMO_MODELS)}, "
                         f"the variants {', '.join(qnalo.list_models())}")
    path = os.path.join(weights_folder(), f"{model}.safetensors")
    if not os.path.exists(path):
        raise InputError(f"no converted weights for {model} at {path}; convert the official checkpoint there "
                         f"(`qnalo convert {model}.pth {path}`) or pass --weights FILE")
    return qnalo.create_model(model, weights=path, **build)


def expand_paths(items):
    """Files named, found in folders (recursively, image extensions only, sorted) or matched by globs.
    Returns (files, problems): problems are (item, message) for what names nothing."""
    files, problems = [], []
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            found = [os.path.join(root, name) for root, _, names in os.walk(item) for name in names
                     if name.lower().endswith(IMAGE_EXTENSIONS)]
            if not found:
                problems.append((item, "folder holds no image files (" + ", ".join(IMAGE_EXTENSIONS) + ")"))
            files.extend(sorted(found))
        elif os.path.exists(item):
            files.append(item)
        elif glob.has_magic(item):
            matched = sorted(glob.glob(item, recursive=True))
            if not matched:
                problems.append((item, "no file matches this pattern"))
            for path in matched:
                sub_files, sub_problems = expand_paths([path])
                files.extend(sub_files)
                problems.extend(sub_problems)
        else:
            problems.append((item, "no such file or directory"))
    return files, problems


def softmax(logits):
    """(B, K) logits -> float64 probabilities, computed stably."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def top_k(probabilities, labels, k):
    """Rows of probabilities -> per row [{"rank", "index", "label", "probability"}] for the k most probable
    classes (ties: the lower index first)."""
    k = min(k, probabilities.shape[1])
    results = []
    for row in probabilities:
        order = np.argsort(-row, kind="stable")[:k]
        results.append([{"rank": r + 1, "index": int(i), "label": labels[i], "probability": float(row[i])}
                        for r, i in enumerate(order)])
    return results


def load_image(model, path):
    """One image -> (1, 3, S, S) float32 by the model family's evaluation preprocessing; ValueError if it
    cannot be read as an image."""
    from PIL import Image
    try:
        return official_eval(model.architecture, model.config.img_size, path)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Pillow raises these for missing, truncated, foreign or oversized files
        raise ValueError(f"cannot read as an image: {' '.join(str(exc).split()) or type(exc).__name__}") from None


def classify_files(model, files, top=5, batch=8, progress=None):
    """Yields, in order, {"image": path, "top": [...]} for each file (see top_k), or {"image": path, "error":
    message} for one that cannot be read. Images run through the model `batch` at a time; `progress`, if
    given, is called with the number of files just finished."""
    labels = model_labels(model)
    pending, ready = [], []   # pending: (path, array or None, error)

    def flush():
        arrays = [a for _, a, _ in pending if a is not None]
        ranked = iter(top_k(softmax(model(np.concatenate(arrays))), labels, top) if arrays else [])
        for path, array, error in pending:
            ready.append({"image": path, "error": error} if array is None else {"image": path, "top": next(ranked)})
        if progress is not None:
            progress(len(pending))
        pending.clear()

    for path in files:
        try:
            pending.append((path, load_image(model, path), None))
        except ValueError as exc:
            pending.append((path, None, str(exc)))
        if sum(a is not None for _, a, _ in pending) >= batch:
            flush()
        yield from ready
        ready.clear()
    if pending:
        flush()
    yield from ready
