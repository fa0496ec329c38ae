"""qnalo: CPU inference for LITv2 (HiLo attention) and QnA-ViT, without PyTorch.

    >>> import qnalo
    >>> qnalo.list_models()
    ['litv2_b', 'litv2_b_384', 'litv2_m', 'litv2_s', 'qna_vit_base', 'qna_vit_small', 'qna_vit_tiny',
     'qna_vit_tiny_7x7']
    >>> model = qnalo.load("litv2_s.safetensors")        # a file written by `qnalo convert`
    >>> logits = model(images)                            # float32 NCHW (B, 3, H, W) -> (B, 1000)
    >>> feats = model.forward_features(images)            # 4 maps (B, C_i, H_i, W_i)
"""
import dataclasses
import os
import warnings

# In a checkout, kernels/ and weights_converter/ sit beside qnalo/ (the design card's layout) and an install
# puts them under qnalo/. Imported from a checkout's root, with or without an install, qnalo finds them there.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(__path__[0], "kernels")) and \
        os.path.isfile(os.path.join(_CHECKOUT, "kernels", "__init__.py")):
    __path__.append(_CHECKOUT)

from .errors import CheckpointError, InputError, QnaloError, UnsafeCheckpointError, VariantMismatchError
from .models import MODEL_REGISTRY, read_model_file, read_variant_file
from .models.ops import check_dtype, device_ops, get_ops

__version__ = "0.1.0"

__all__ = ["list_models", "create_model", "load", "set_num_threads", "QnaloError", "InputError", "CheckpointError",
           "UnsafeCheckpointError", "VariantMismatchError"]


def list_models():
    """The registered variant names."""
    return sorted(MODEL_REGISTRY)


def set_num_threads(n):
    """Kernel threads for this process (default: QNALO_NUM_THREADS, else every CPU it may use); call it before
    the first model is built."""
    from .kernels import threads
    try:
        threads.set_num_threads(n)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    if n > threads.available_cpus():   # threads beyond the CPUs take turns, and every split waits for the last one
        cpus = threads.available_cpus()
        warnings.warn(f"qnalo: {n} kernel threads but only {cpus} CPUs this process may use; the extra threads "
                      f"take turns, which is slower than {cpus}", stacklevel=2)


def create_model(name, weights=None, backend="numba", device="cpu", dtype="float32", **overrides):
    """Build a registered variant (see list_models) or an embedded demo model (qnalo.demo.DEMO_MODELS, with its
    own weights). `weights`: a qnalo weights file (from `qnalo convert`), which must hold this variant; without
    it a variant gets random weights and a warning, and `overrides` may replace config fields (e.g.
    num_classes=10), while a weights file carries its own config.
    backend: "numba" (fast kernels) or "numpy" (the plain reference ops), the CPU's op set.
    device: "cpu", or "cuda" (CuPy and an NVIDIA GPU; see model.to); dtype: "float32", or "float16" on CUDA
    (half-precision storage, float32 arithmetic)."""
    from . import demo
    if name not in MODEL_REGISTRY and name not in demo.DEMO_MODELS:
        raise InputError(f"unknown model {name!r}; available: {', '.join(list_models())}, and the embedded demo "
                         f"models {', '.join(demo.DEMO_MODELS)} (qnalo.demo.demo_path(name) gives their files)")
    if name in demo.DEMO_MODELS and weights is None:
        weights = demo.demo_path(name)
    if weights is not None:
        if overrides:
            raise InputError(f"config overrides ({', '.join(sorted(overrides))}) apply to random weights only; "
                             "a weights file carries its own config")
        _check_target(backend, device, dtype)
        model_cls, config, tensors, source = read_variant_file(name, weights)
        return _build(model_cls, config, tensors, backend, device, dtype, source)
    model_cls, config_cls, config = MODEL_REGISTRY[name]
    unknown = set(overrides) - {f.name for f in dataclasses.fields(config_cls)}
    if unknown:
        raise InputError(f"unknown config fields for {name}: {sorted(unknown)}")
    try:
        config = config.replace(**overrides)
    except (TypeError, ValueError) as exc:
        raise InputError(f"invalid config overrides for {name}: {exc}") from None
    _check_target(backend, device, dtype)   # before any weights are made
    warnings.warn(f"qnalo: {name} created with random weights; pass weights= a converted file "
                  "(see `qnalo convert`) for real predictions", stacklevel=2)
    return _build(model_cls, config, model_cls.random_tensors(config), backend, device, dtype, {"variant": name})


def load(path, backend="numba", device="cpu", dtype="float32"):
    """The model described by a qnalo weights file alone (its config travels in the file's metadata); backend,
    device and dtype as in create_model."""
    _check_target(backend, device, dtype)
    model_cls, config, tensors, source = read_model_file(path)
    return _build(model_cls, config, tensors, backend, device, dtype, source)


def _check_target(backend, device, dtype):
    dtype = check_dtype(device, dtype)
    get_ops(backend, dtype if device == "cpu" else "float32")   # bfloat16 on a CPU without it: says so
    if device != "cpu":
        device_ops(device, dtype)   # no CuPy, no GPU, an unknown device: an InputError that says so


def _build(model_cls, config, tensors, backend, device, dtype, source):
    if device == "cpu":
        return model_cls(config, tensors, backend=backend, source=source, dtype=check_dtype(device, dtype))
    # built on the plain reference ops (no CPU packing or kernel warm-up), then moved; `backend` is what
    # model.to("cpu") will use
    model = model_cls(config, tensors, backend="numpy", source=source)
    model.to(device, dtype)
    model.backend = backend
    return model
