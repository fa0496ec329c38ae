"""Helpers the end-to-end model tests share: random images, running a PyTorch reference, the bad inputs every
model must refuse with a clear InputError, and the non-contiguous-input check."""
import numpy as np
import pytest

from tolerances import assert_logits_close

# (input, what the InputError must say); a model test adds its own size errors
BAD_INPUTS = [
    (np.zeros((3, 32, 32), np.float32), "4-D NCHW"),
    (np.zeros((1, 32, 32, 3), np.float32), "channels-last"),
    (np.zeros((1, 1, 32, 32), np.float32), "3 channels"),
    (np.zeros((1, 3, 32, 32), np.float64), "float32"),
    (np.zeros((1, 3, 32, 32), np.uint8), "float32"),
    ([[[[0.0]]]], "numpy array"),
]


def photo(seed, h, w):
    """A smooth random image with edges (what real photos have), uint8 RGB (h, w, 3)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, h // 40), max(2, w // 40), 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BILINEAR), np.int16)
    return np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)


def real_photo(name="china.jpg"):
    """A real photograph that ships offline: scikit-learn's sample images (china.jpg, flower.jpg; 427x640)."""
    import os
    sklearn_datasets = pytest.importorskip("sklearn.datasets")
    path = os.path.join(os.path.dirname(sklearn_datasets.__file__), "images", name)
    assert os.path.exists(path), path
    return path


def image(seed, b, h, w):
    return np.random.default_rng(seed).standard_normal((b, 3, h, w)).astype(np.float32)


def torch_run(ref, x, features=False):
    import torch
    with torch.inference_mode():
        t = torch.from_numpy(x)
        if features:
            return [f.numpy() for f in ref.forward_features(t)]
        return ref(t).numpy()


def layernorm_input_variances(ref, x, logits):
    """The median over rows of the (biased) variance each nn.LayerNorm of the PyTorch reference `ref` sees
    while it computes forward_features(x), then (logits true) its logits, in call order."""
    import torch
    medians = []

    def record(module, args):
        medians.append(float(args[0].double().var(dim=-1, unbiased=False).median()))

    hooks = [m.register_forward_pre_hook(record) for m in ref.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        torch_run(ref, x, features=True)
        if logits:
            torch_run(ref, x)
    finally:
        for h in hooks:
            h.remove()
    return medians


def check_parity_of_a_quiet_stream(ref, x, quiet, ln_eps, make_engine, logits):
    """The parity check for a reference whose residual stream was scaled to ~`quiet`: every LayerNorm sees rows
    of variance within 100x of `ln_eps` (asserted, so the case stays where the eps matters), and the engine
    that make_engine(ref) builds matches it, its features compared in the stream's own units."""
    variances = layernorm_input_variances(ref, x, logits=logits)
    assert max(variances) <= 100 * ln_eps, variances
    model = make_engine(ref)
    for i, (f, r) in enumerate(zip(model.forward_features(x), torch_run(ref, x, features=True))):
        assert_logits_close(f / quiet, r / quiet, what=f"stage {i} features / {quiet}", op="features")
    if logits:
        assert_logits_close(model(x), torch_run(ref, x), what="logits")


def check_non_contiguous_input(model, ref, x):
    """A strided view of x gives bit-identical logits to x itself, and matches the reference."""
    strided = np.ascontiguousarray(x[:, ::-1].transpose(0, 1, 3, 2)).transpose(0, 1, 3, 2)[:, ::-1]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(model(strided), model(x))
    assert_logits_close(model(strided), torch_run(ref, x))


def check_non_finite_stays_in_its_image(model, numpy_model, bad):
    """A NaN/Inf pixel in image 0 of a batch of 2 (32x32): the kernels put NaN where the NumPy reference ops
    do, and image 1 is the same as alone."""
    x = image(0, 2, 32, 32)
    x[0, 0, 5, 5] = bad
    logits = model(x)
    np.testing.assert_array_equal(np.isnan(logits), np.isnan(numpy_model(x)))
    assert_logits_close(logits[1:], model(np.ascontiguousarray(x[1:])))


def check_threads_get_single_thread_outputs(model, images, calls):
    """One thread per image, each calling model(image) `calls` times while the others run: every output must
    be bit-identical to a lone call's (kernels release the GIL and share the worker threads)."""
    import threading
    expected = [model(x) for x in images]
    mismatches, errors = [], []

    def work(i):
        try:
            for _ in range(calls):
                if not np.array_equal(model(images[i]), expected[i]):
                    mismatches.append(i)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and mismatches == []
