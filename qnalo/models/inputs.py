"""What a model checks before it runs: the input batch (an NCHW float32 array of the model's device, large
enough), and whether its forward pass fits in the memory left to this process."""
import os

import numpy as np

from ..errors import InputError


def check_image_batch(x, model_name, min_size, factor, xp=np):
    """The checks of a model input: a float32 NCHW array of the model's device (xp: numpy or cupy) (B, 3, H, W)
    with H, W >= min_size (the model downsamples by `factor`). Returns it as it is (Classifier._input makes it
    C-contiguous once the memory check has passed)."""
    if not isinstance(x, (np.ndarray, xp.ndarray)):
        where = "a numpy" if xp is np else f"a {xp.__name__} (or numpy)"
        hint = "; move it with cupy.asnumpy(x), or the model with model.to('cuda')" if xp is np and \
            type(x).__module__.startswith("cupy") else ""
        raise InputError(f"expected {where} array of shape (B, 3, H, W), got {type(x).__name__}{hint}")
    if x.ndim != 4:
        raise InputError(f"expected a 4-D NCHW array (B, 3, H, W), got shape {x.shape}"
                         + ("; add a batch axis with x[None]" if x.ndim == 3 else ""))
    if x.shape[1] != 3:
        hint = "; the input looks channels-last (NHWC): pass x.transpose(0, 3, 1, 2)" if x.shape[-1] == 3 else ""
        raise InputError(f"expected 3 channels in axis 1 (NCHW), got shape {x.shape}{hint}")
    if x.dtype != np.float32:
        raise InputError(f"expected float32 input, got {x.dtype}; convert with x.astype(np.float32)")
    if min(x.shape[2:]) < min_size:
        raise InputError(f"image {x.shape[2]}x{x.shape[3]} is too small: {model_name} needs at least "
                         f"{min_size}x{min_size} pixels (it downsamples by {factor})")
    return x


MEMORY_CHECK_FROM = 64 * 2**20   # smaller forward passes are not checked (LITv2-S at 224 needs 14 MiB)


def available_memory():
    """Bytes this process may still allocate: QNALO_MEMORY_LIMIT if set, else the smaller of the system's
    MemAvailable and what the cgroup (container) limit leaves; None where neither can be read."""
    if os.environ.get("QNALO_MEMORY_LIMIT", "").isdigit():
        return int(os.environ["QNALO_MEMORY_LIMIT"])
    limits = []
    try:
        with open("/proc/meminfo") as f:
            limits += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except OSError:
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            cap = f.read().strip()
        if cap.isdigit():
            with open("/sys/fs/cgroup/memory.current") as f:
                limits.append(int(cap) - int(f.read()))
    except (OSError, ValueError):
        pass
    return min(limits) if limits else None


def gib(n):
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
