"""``synthaug.imaging.to_hwc_uint8``: the one conversion of a PIL image, array or tensor into a
uint8 H×W×C image, used by the cache's codec and every other reader of images."""

import numpy as np
import pytest
import torch
from PIL import Image

from synthaug.cache.codec import as_image_batch
from synthaug.imaging import pil_channels, to_hwc_uint8


def test_every_form_of_one_image_gives_the_same_array_in_the_codec_and_in_imaging():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    gray = rgb[:, :, :1].copy()
    for image, want in [
        (rgb, rgb), (gray, gray), (gray[:, :, 0], gray),
        (Image.fromarray(rgb), rgb), (Image.fromarray(gray[:, :, 0]), gray),
        (torch.from_numpy(rgb).permute(2, 0, 1), rgb), (torch.from_numpy(gray[:, :, 0]), gray),
    ]:
        assert np.array_equal(to_hwc_uint8(image), want)
        assert np.array_equal(as_image_batch([image])[0], want)


@pytest.mark.parametrize("image", [torch.rand(3, 4, 4), np.random.default_rng(0).random((4, 4, 3)), torch.zeros(1, 4, 4, dtype=torch.int64)])
def test_a_float_or_wide_image_is_refused_with_the_conversion_to_use_never_rescaled(image):
    with pytest.raises(ValueError, match=r"source\[2\].*must be uint8.*Convert float images with"):
        to_hwc_uint8(image, name="source[2]")
    with pytest.raises(ValueError, match=r"image 0 .*uint8"):
        as_image_batch([image])


@pytest.mark.parametrize("mode, channels", [("1", 1), ("L", 1), ("LA", 1), ("I", 1), ("I;16", 1), ("F", 1), ("P", 3), ("RGB", 3), ("RGBA", 3), ("CMYK", 3)])
def test_gray_modes_stay_one_channel_and_every_other_mode_becomes_rgb(mode, channels):
    image = Image.fromarray(np.full((3, 4), 100, np.uint8)).convert(mode)
    assert pil_channels(mode) == channels
    assert to_hwc_uint8(image).shape == (3, 4, channels)
    assert as_image_batch([image])[0].shape == (3, 4, channels)


def test_shapes_and_types_that_are_no_image_are_refused():
    for image, message in [(np.zeros((2, 2, 4), np.uint8), "C = 1 or 3"), (torch.zeros(1, 1, 2, 2, dtype=torch.uint8), "H×W or C×H×W"),
                           ("a.png", "is a str; expected a PIL image")]:
        with pytest.raises(ValueError, match=message):
            to_hwc_uint8(image)
