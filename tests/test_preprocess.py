"""qnalo/preprocess.py against PyTorch/Pillow restatements of the official pipelines (tests/reference)."""
import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from qnalo import preprocess
from model_helpers import photo

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")
from reference.preprocess_torch import litv2_reference, qna_vit_reference  # noqa: E402

sizes = dict(seed=st.integers(0, 2**32 - 1), h=st.integers(230, 700), w=st.integers(230, 700))


@settings(deadline=None, max_examples=30)
@given(**sizes, img_size=st.sampled_from([224, 384]))
@example(seed=0, h=375, w=500, img_size=224)   # a typical ImageNet validation image, landscape
@example(seed=1, h=500, w=333, img_size=224)   # portrait, odd
@example(seed=2, h=256, w=256, img_size=384)
def test_litv2_matches_the_torchvision_pipeline(seed, h, w, img_size):
    img = Image.fromarray(photo(seed, h, w))
    got = preprocess.litv2_eval(img, img_size)
    want = litv2_reference(img, img_size).numpy()
    assert got.shape == want.shape == (1, 3, img_size, img_size) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)   # float32 ToTensor / normalise rounding


@settings(deadline=None, max_examples=30)
@given(**sizes)
@example(seed=0, h=375, w=500)
@example(seed=1, h=224, w=224)                  # the crop (196) is upsampled back to 224
def test_qna_vit_matches_the_tensorflow_bicubic_pipeline(seed, h, w):
    pixels = photo(seed, h, w)
    got = preprocess.qna_vit_eval(pixels)
    want, resized = qna_vit_reference(pixels)
    # the two evaluations of the resize agree to rounding; the uint8 truncation then agrees wherever a value
    # is not within that rounding of an integer
    frac = resized.numpy() % 1.0
    near_integer = np.minimum(frac, 1.0 - frac) < 2 * preprocess.INTEGER_SLACK
    diff = np.abs(got - want.numpy())[0].transpose(1, 2, 0)
    assert (diff[~near_integer] < 1e-5).all(), f"max diff {diff[~near_integer].max()}"
    assert got.shape == (1, 3, 224, 224) and got.dtype == np.float32


def test_bicubic_rows_are_normalised_and_exact_on_constants():
    for n_in, n_out in ((196, 224), (437, 224), (224, 224), (3, 7)):
        m = preprocess.bicubic_matrix(n_in, n_out)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(preprocess.bicubic_matrix(224, 224), np.eye(224), atol=1e-12)
    flat = np.full((300, 400, 3), 128, np.uint8)
    out = preprocess.qna_vit_eval(flat)
    np.testing.assert_allclose(out[0, :, 0, 0], (128 - preprocess.IMAGENET_MEAN * 255) / (preprocess.IMAGENET_STD * 255),
                               rtol=1e-6)
    assert np.ptp(out, axis=(2, 3)).max() == 0


def test_paths_and_bad_pixels(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(photo(3, 300, 260)).save(path)
    np.testing.assert_array_equal(preprocess.litv2_eval(str(path)), preprocess.litv2_eval(Image.open(path)))
    np.testing.assert_array_equal(preprocess.official_eval("qna_vit", 224, str(path)),
                                  preprocess.qna_vit_eval(np.asarray(Image.open(path).convert("RGB"))))
    with pytest.raises(ValueError, match="uint8"):
        preprocess.qna_vit_eval(np.zeros((10, 10, 3), np.float32))
    with pytest.raises(ValueError, match="no official preprocessing"):
        preprocess.official_eval("resnet", 224, str(path))
