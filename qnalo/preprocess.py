"""Each family's official evaluation preprocessing, image -> float32 NCHW batch of one.

LITv2 (ziplab/LITv2 classification/data/build.py; spec litv2.md section 6), on a PIL image:
    224 models: PIL bicubic resize of the shorter side to 256 (the longer side int(256 * long / short)), centre
    crop 224 at (int(round((h - 224) / 2)), int(round((w - 224) / 2))); 384 model: bicubic resize straight to
    384 x 384. Then / 255 and the ImageNet mean / std.
QnA-ViT (moabarar/qna data/imagenet_utils.py preprocess_for_eval; spec qna.md section 7), on decoded RGB pixels:
    a centre crop of side floor(0.875 * min(H, W)) at ((H - side + 1) // 2, (W - side + 1) // 2); TensorFlow's
    bicubic resize to 224 (Keys cubic a = -0.5, half-pixel centres, no antialiasing, taps outside the image
    dropped and the rest renormalised); clip to [0, 255]; truncate to uint8; minus mean * 255, over std * 255.
    TensorFlow reads its cubic weights from a 1024-entry table and resizes in float32; this evaluates them
    exactly in float64, so a resized value can differ from TensorFlow's in its last bits, and the uint8
    truncation then agrees except where a value lies that close to an integer. Values within 1e-6 below an
    integer count as that integer (a constant region stays constant).
"""
import math

import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
LITV2_CROP_RATIO = 224 / 256
QNA_CROP_RATIO = 224 / (224 + 32)
KEYS_A = -0.5
INTEGER_SLACK = 1e-6   # below TensorFlow's own float32 rounding of the resize (~1e-5 at 255)


def open_rgb(image):
    """A path or a PIL image -> an RGB PIL image (what torchvision's ImageFolder loader gives)."""
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as img:
        return img.convert("RGB")


def _normalised_nchw(pixels, mean, std):
    """(H, W, 3) values -> (1, 3, H, W) float32 (x - mean) / std."""
    x = (np.asarray(pixels, np.float32) - mean) / std
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], np.float32)


def litv2_eval(image, img_size=224):
    """LITv2's evaluation transform (see the module docstring) -> (1, 3, img_size, img_size) float32."""
    from PIL import Image
    img = open_rgb(image)
    if img_size == 384:            # the fine-tuned model: no crop, aspect ratio not kept
        img = img.resize((384, 384), Image.BICUBIC)
    else:
        short = int(img_size / LITV2_CROP_RATIO)
        w, h = img.size
        size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        img = img.resize(size, Image.BICUBIC)
        w, h = img.size
        top, left = int(round((h - img_size) / 2.0)), int(round((w - img_size) / 2.0))
        img = img.crop((left, top, left + img_size, top + img_size))
    return _normalised_nchw(np.asarray(img, np.float32) / 255.0, IMAGENET_MEAN, IMAGENET_STD)


def _keys(t):
    """The Keys cubic convolution kernel with a = -0.5 at offsets t (any shape)."""
    t = np.abs(t)
    a = KEYS_A
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return np.where(t <= 1, near, np.where(t < 2, far, 0.0))


def bicubic_matrix(n_in, n_out):
    """(n_out, n_in) float64 weights of TensorFlow's un-antialiased bicubic resize along one axis: output i
    samples input position (i + 0.5) * n_in / n_out - 0.5 from its four neighbours; out-of-range taps are
    dropped and the row renormalised."""
    centre = (np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5
    base = np.floor(centre).astype(np.int64)
    weights = np.zeros((n_out, n_in))
    for tap in range(-1, 3):
        idx = base + tap
        w = _keys(centre - idx)
        inside = (idx >= 0) & (idx < n_in)
        np.add.at(weights, (np.arange(n_out)[inside], idx[inside]), w[inside])
    return weights / weights.sum(axis=1, keepdims=True)


def qna_vit_eval(pixels, img_size=224):
    """QnA-ViT's evaluation pipeline on decoded pixels (H, W, 3) uint8 RGB (or a path / PIL image, decoded
    with Pillow) -> (1, 3, img_size, img_size) float32."""
    if not isinstance(pixels, np.ndarray):
        pixels = np.asarray(open_rgb(pixels))
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"expected decoded RGB pixels (H, W, 3) uint8, got {pixels.dtype} {pixels.shape}")
    h, w = pixels.shape[:2]
    side = int(math.floor(np.float32(QNA_CROP_RATIO) * np.float32(min(h, w))))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    crop = pixels[top:top + side, left:left + side].astype(np.float64)
    rows, cols = bicubic_matrix(side, img_size), bicubic_matrix(side, img_size)
    resized = np.tensordot(np.tensordot(rows, crop, axes=(1, 0)), cols, axes=(1, 1)).transpose(0, 2, 1)
    # + INTEGER_SLACK: a constant region must stay that constant (its weights sum to 1 only to rounding, and
    # 128 * (1 - 1e-16) would floor to 127)
    truncated = np.floor(np.clip(resized, 0.0, 255.0) + INTEGER_SLACK)
    return _normalised_nchw(truncated, IMAGENET_MEAN * 255.0, IMAGENET_STD * 255.0)


def official_eval(architecture, img_size, image):
    """The preprocessing of a model's family: architecture 'litv2' or 'qna_vit' (model.architecture)."""
    if architecture == "litv2":
        return litv2_eval(image, img_size)
    if architecture == "qna_vit":
        return qna_vit_eval(image, img_size)
    raise ValueError(f"no official preprocessing known for architecture {architecture!r}")
