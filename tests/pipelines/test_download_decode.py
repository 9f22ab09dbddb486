"""The download decoder on hostile images: the reason of each refusal, and the stored picture's size and colours."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from pipelines.download.decode import DECODE_ERROR, ImageDecoder
from tests.pipelines.hostile_server import cases, check_picture, png_header_only

IMAGE_SIZE = 64
DECODER = ImageDecoder(image_size=IMAGE_SIZE, min_image_size=24, min_width=40, max_aspect_ratio=3.0)
# The decoder's messages -> the catalog's reasons (stores/catalog.py), for the cases the decoder sees.
REASONS = {
    None: "success",
    "image too small": "too_small",
    "image area too large": "too_large",
    "aspect ratio too large": "aspect_ratio",
}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_served_picture_is_decoded_or_refused_for_its_reason(seed: int) -> None:
    checked = 0
    for case in cases(seed):
        if case.mode != "plain" or case.reason not in (*REASONS.values(), "decode"):
            continue  # drips, HTTP errors, redirects, opt-outs: the fetch's business
        encoded, width, height, original_width, original_height, error = DECODER(io.BytesIO(case.body))
        reason = "decode" if error and error.startswith(DECODE_ERROR) else REASONS.get(error, error)
        assert reason == case.reason, (case.name, error)
        if error is None:
            assert (original_width, original_height) == case.size
            with Image.open(io.BytesIO(encoded)) as img:
                assert img.format == "JPEG" and img.size == (width, height)
                check_picture(img, case, IMAGE_SIZE)
            checked += 1
    assert checked >= 12


def test_center_crop_and_small_pictures_are_kept_as_they_are() -> None:
    crop = ImageDecoder(image_size=32, resize_mode="center_crop")
    wide = Image.new("RGB", (120, 60), (200, 20, 20))
    wide.paste((20, 20, 200), (0, 0, 20, 60))  # a blue strip on the left is cropped away
    out, w, h, ow, oh, error = crop(io.BytesIO(_jpeg(wide)))
    assert error is None and (w, h, ow, oh) == (32, 32, 120, 60)
    with Image.open(io.BytesIO(out)) as img:
        assert abs(img.convert("RGB").getpixel((1, 16))[2] - 20) < 12  # red at the crop's left edge, not blue
    out, w, h, *_ = crop(io.BytesIO(_jpeg(Image.new("RGB", (30, 20), (9, 9, 9)))))
    assert (w, h) == (30, 20)  # never enlarged, never cropped when not resized


def test_refusals_are_read_from_the_header_before_any_pixel_is_decoded() -> None:
    data = _jpeg(Image.new("RGB", (400, 100), (1, 2, 3)))
    truncated = data[: len(data) // 2]  # the pixels are broken, the header is fine
    assert DECODER(io.BytesIO(truncated))[-1] == "aspect ratio too large"
    assert ImageDecoder(image_size=64)(io.BytesIO(truncated))[-1].startswith(DECODE_ERROR)
    assert ImageDecoder(image_size=64, max_image_area=39_999)(io.BytesIO(data))[-1] == "image area too large"
    header = png_header_only(8000, 6000)  # 48M pixels announced, none there: decoding it would fail
    assert ImageDecoder(image_size=64, max_image_area=10**7)(io.BytesIO(header))[-1] == "image area too large"
    assert ImageDecoder(image_size=64, max_aspect_ratio=1.2)(io.BytesIO(header))[-1] == "aspect ratio too large"
    assert ImageDecoder(image_size=64)(io.BytesIO(header))[-1].startswith(DECODE_ERROR)
    turned = Image.new("RGB", (80, 50))  # stored 80 x 50, upright 50 x 80: the per-side minimums judge 50 x 80
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = ImageDecoder(image_size=64, min_width=60)(io.BytesIO(_jpeg(turned, exif=exif.tobytes())))
    assert (
        upright[-1] == "image too small"
        and ImageDecoder(image_size=64, min_height=60)(io.BytesIO(_jpeg(turned, exif=exif.tobytes())))[-1] is None
    )


def _jpeg(img: Image.Image, **options: object) -> bytes:
    out = io.BytesIO()
    img.save(out, "JPEG", quality=95, **options)
    return out.getvalue()
