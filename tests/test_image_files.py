"""famevil_fast.load_images: image files as one batch of CLIP-normalised pixels, and its errors."""

import pytest
import torch
from PIL import Image

import famevil_fast
from famevil_fast.data.transforms import reference_transform


def _image(path, size=(50, 30), colour=(200, 20, 40)):
    Image.new("RGB", size, colour).save(path)
    return path


def test_files_in_order_through_the_evaluation_transform(tmp_path):
    wide, tall = _image(tmp_path / "wide.png", (50, 30)), _image(tmp_path / "tall.jpg", (21, 47), (0, 90, 10))
    pixels = famevil_fast.load_images([wide, str(tall)], size=17)
    assert pixels.shape == (2, 3, 17, 17) and pixels.dtype == torch.float32
    with Image.open(tall) as image:
        assert torch.equal(pixels[1], reference_transform(image, 17))
    assert torch.equal(famevil_fast.load_images(wide, size=17), pixels[:1])  # one path
    squashed = famevil_fast.load_images([wide], size=17, eval_resize="squash")
    assert squashed.shape == (1, 3, 17, 17)


def test_bad_arguments_are_named(tmp_path):
    good = _image(tmp_path / "a.png")
    (tmp_path / "broken.jpg").write_bytes(b"not an image")
    with pytest.raises(FileNotFoundError, match="image file not found: .*missing.png"):
        famevil_fast.load_images([good, tmp_path / "missing.png"], size=8)
    with pytest.raises(ValueError, match="cannot read image .*broken.jpg"):
        famevil_fast.load_images([tmp_path / "broken.jpg"], size=8)
    with pytest.raises(ValueError, match="no image paths"):
        famevil_fast.load_images([], size=8)
    for size in (0, 8.0, True):
        with pytest.raises(ValueError, match="size must be a positive int"):
            famevil_fast.load_images([good], size=size)
    with pytest.raises(ValueError, match="eval_resize must be one of"):
        famevil_fast.load_images([good], size=8, eval_resize="stretch")
    with pytest.raises(ValueError, match="is a directory, not an image file"):
        famevil_fast.load_images([tmp_path], size=8)


def test_an_image_over_pil_s_pixel_limit_is_named(tmp_path, monkeypatch):
    big, good = _image(tmp_path / "big.png", (64, 64)), _image(tmp_path / "a.png", (20, 20))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 > 2 x 1000: DecompressionBombError
    named = r"cannot read image .*big\.png: it exceeds PIL's pixel limit"
    with pytest.raises(ValueError, match=named) as info:
        famevil_fast.load_images([good, big], size=8)
    assert "raise PIL.Image.MAX_IMAGE_PIXELS to read it" in str(info.value)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)
    assert famevil_fast.load_images([good, big], size=8).shape == (2, 3, 8, 8)  # the limit raised
