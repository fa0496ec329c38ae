"""The two official evaluation pipelines written with PyTorch tensor ops (and Pillow for LITv2's resize, as
torchvision does on PIL images): the references qnalo/preprocess.py is tested against.

LITv2: torchvision's Resize(256, BICUBIC) -> CenterCrop(224) -> ToTensor -> Normalize, following
torchvision.transforms.functional (resize: the shorter side to `size`, the longer int(size * long / short);
center_crop: top = int(round((h - th) / 2.0)), left likewise). torchvision itself is not importable beside
this project's CPU torch, so its algorithm is restated here.
QnA-ViT: tf.image.resize(BICUBIC) (half-pixel centres, Keys a = -0.5, out-of-image taps dropped and the rest
renormalised), evaluated per output pixel over its 4 x 4 neighbourhood with torch gathers."""
import math

import numpy as np
import torch
from PIL import Image

MEAN = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64)
STD = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64)


def litv2_reference(img, img_size=224):
    """PIL RGB image -> (1, 3, S, S) float32 tensor."""
    if img_size == 384:
        img = img.resize((384, 384), Image.BICUBIC)
    else:
        size = int((256 / 224) * img_size)
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = size, int(size * long / short)
        img = img.resize((new_short, new_long) if w <= h else (new_long, new_short), Image.BICUBIC)
        w, h = img.size
        top, left = int(round((h - img_size) / 2.0)), int(round((w - img_size) / 2.0))
        img = img.crop((left, top, left + img_size, top + img_size))
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(torch.float32) / 255.0
    return ((t.to(torch.float64) - MEAN[:, None, None]) / STD[:, None, None]).to(torch.float32)[None]


def _keys(t):
    t = t.abs()
    a = -0.5
    return torch.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                       torch.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, torch.zeros_like(t)))


def tf_bicubic_resize(pixels, size):
    """(H, W, C) float64 tensor -> (size, size, C), per output pixel over its 4 x 4 input neighbourhood."""
    h, w, _ = pixels.shape

    def taps(n_in):
        centre = (torch.arange(size, dtype=torch.float64) + 0.5) * (n_in / size) - 0.5
        idx = torch.floor(centre).long()[:, None] + torch.arange(-1, 3)[None, :]        # (size, 4)
        wgt = _keys(centre[:, None] - idx.to(torch.float64))
        wgt = torch.where((idx >= 0) & (idx < n_in), wgt, torch.zeros_like(wgt))
        return idx.clamp(0, n_in - 1), wgt / wgt.sum(dim=1, keepdim=True)

    (ry, wy), (rx, wx) = taps(h), taps(w)
    neigh = pixels[ry[:, None, :, None], rx[None, :, None, :]]                            # (S, S, 4, 4, C)
    return (neigh * (wy[:, None, :, None, None] * wx[None, :, None, :, None])).sum(dim=(2, 3))


def qna_vit_reference(pixels, img_size=224):
    """(H, W, 3) uint8 numpy -> (1, 3, S, S) float32 tensor; also returns the resized crop before the
    uint8 truncation."""
    h, w = pixels.shape[:2]
    side = int(math.floor(np.float32(224 / 256) * np.float32(min(h, w))))
    top, left = (h - side + 1) // 2, (w - side + 1) // 2
    crop = torch.from_numpy(pixels[top:top + side, left:left + side].astype(np.float64))
    resized = tf_bicubic_resize(crop, img_size)
    x = torch.floor(resized.clamp(0.0, 255.0))
    x = (x - MEAN * 255.0) / (STD * 255.0)
    return x.permute(2, 0, 1)[None].to(torch.float32), resized
