"""Image preprocessing: modes, orientation, resize/crop arithmetic, normalisation and the training crop."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from model.errors import ModelInputError
from model.imagebind.image import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    TooManyPixels,
    center_crop_box,
    load_image,
    preprocess_image,
    preprocess_images,
    random_resized_crop_params,
    resized_size,
    to_normalized_tensor,
    train_transform,
)
from tests.hostile_media import png_claiming


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Seeded random pixels: any misplaced pixel in a resize or crop shows."""
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    return Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode=mode)


def by_hand(img: Image.Image, resized: tuple[int, int], box: tuple[int, int, int, int]) -> torch.Tensor:
    """The reference pipeline with the sizes given explicitly."""
    return to_normalized_tensor(img.convert("RGB").resize(resized, Image.Resampling.BICUBIC).crop(box))


def test_solid_colour_gives_the_normalised_colour() -> None:
    colour = (200, 100, 50)
    out = preprocess_image(Image.new("RGB", (500, 333), colour))
    assert out.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and out.dtype == torch.float32
    exact = (torch.tensor(colour, dtype=torch.float32).div(255) - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.equal(out, exact[:, None, None].expand_as(out))
    as_float64 = (np.array(colour) / 255 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(out[:, 0, 0].numpy(), as_float64, atol=1e-6)


@pytest.mark.parametrize(
    ("size", "resized", "box"),
    [
        ((500, 333), (336, 224), (56, 0, 280, 224)),  # 224 * 500 / 333 = 336.3 -> 336; (336 - 224) / 2 = 56
        ((333, 500), (224, 336), (0, 56, 224, 280)),
        ((447, 224), (447, 224), (112, 0, 336, 224)),  # no resize; round(111.5) = 112
        ((449, 224), (449, 224), (112, 0, 336, 224)),  # round(112.5) = 112: Python rounds half to even
        ((224, 225), (224, 225), (0, 0, 224, 224)),  # round(0.5) = 0
        ((1000, 3), (74666, 224), (37221, 0, 37445, 224)),  # int(224 * 1000 / 3) = int(74666.67)
        ((300, 300), (224, 224), (0, 0, 224, 224)),
    ],
)
def test_resize_and_crop_arithmetic(size, resized, box) -> None:
    assert resized_size(*size) == resized
    assert center_crop_box(*resized) == box
    if resized[0] * resized[1] < 1_000_000:
        img = noise_image(*size)
        assert torch.equal(preprocess_image(img), by_hand(img, resized, box))


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK"])
def test_modes_convert_like_pil(mode: str) -> None:
    img = noise_image(260, 230, seed=1, mode=mode)
    assert torch.equal(preprocess_image(img), preprocess_image(img.convert("RGB")))


def test_palette_with_transparency(tmp_path: Path) -> None:
    indices = np.random.default_rng(2).integers(0, 4, (240, 300), dtype=np.uint8)
    img = Image.fromarray(indices, mode="P")
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9])
    img.save(tmp_path / "p.png", transparency=3)
    loaded = load_image(tmp_path / "p.png")
    assert loaded.mode == "RGB"
    # The transparent index keeps its palette colour (no compositing), as `.convert("RGB")` does.
    assert np.array_equal(np.asarray(loaded)[indices == 3], np.full(((indices == 3).sum(), 3), 9))
    assert torch.equal(preprocess_image(loaded), by_hand(img, (280, 224), (28, 0, 252, 224)))


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.random.default_rng(3).integers(0, 65536, (240, 250), dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    with Image.open(tmp_path / "deep.png") as raw:
        assert raw.mode.startswith("I;16")
    loaded = load_image(tmp_path / "deep.png")
    expected = np.round(values / 65535 * 255).astype(np.uint8)
    assert np.array_equal(np.asarray(loaded)[..., 0], expected)
    assert torch.equal(preprocess_image(loaded), preprocess_image(Image.fromarray(expected, mode="L")))


def test_cmyk_jpeg(tmp_path: Path) -> None:
    noise_image(320, 256, seed=4, mode="CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    with Image.open(tmp_path / "cmyk.jpg") as raw:
        assert raw.mode == "CMYK"
        expected = preprocess_image(raw.convert("RGB"))
    assert torch.equal(preprocess_images([tmp_path / "cmyk.jpg"])[0], expected)


def test_exif_rotated_jpeg_equals_the_upright_image(tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # stored on its side: rotate 90 degrees clockwise to display
    noise_image(300, 240, seed=5).save(tmp_path / "rotated.jpg", exif=exif, quality=90)
    with Image.open(tmp_path / "rotated.jpg") as raw:
        upright = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (240, 300)
    assert np.array_equal(np.asarray(loaded), np.asarray(upright))
    assert torch.equal(preprocess_image(loaded), preprocess_image(upright))
    assert load_image(tmp_path / "rotated.jpg", exif_transpose=False).size == (300, 240)


def test_paths_bytes_and_images_batch_alike(tmp_path: Path) -> None:
    img = noise_image(333, 500, seed=6)
    img.save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    batch = preprocess_images([str(tmp_path / "a.png"), data, img])
    assert batch.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert torch.equal(batch[0], batch[1]) and torch.equal(batch[1], batch[2])
    assert torch.equal(batch, preprocess_images([str(tmp_path / "a.png"), data, img]))  # deterministic
    assert preprocess_images([]).shape == (0, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_undecodable_input_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        load_image(tmp_path / "broken.jpg")
    buf = io.BytesIO()
    noise_image(64, 64).save(buf, format="JPEG")
    with pytest.raises(ValueError, match="bytes"):
        load_image(buf.getvalue()[:200])
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "absent.jpg")


def test_images_above_the_pixel_limit_are_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "small.png").write_bytes(png_claiming(10_000, 10_000))  # a few dozen bytes on disk
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(TooManyPixels) as caught:
        load_image(tmp_path / "small.png", max_pixels=89_478_485)
    assert str(caught.value) == (
        f"image {tmp_path / 'small.png'} is 10000x10000 (100,000,000 pixels), above the limit of 89,478,485 pixels"
    )
    assert isinstance(caught.value, ModelInputError)
    with pytest.raises(TooManyPixels, match=r"image <\d+ bytes> is too large to decode: .*400000000 pixels"):
        load_image(png_claiming(20_000, 20_000))  # above PIL's own limit, whatever ours is

    def no_decoding(self: ImageFile.ImageFile) -> None:
        raise AssertionError("pixels were decoded")

    data = io.BytesIO()
    noise_image(40, 30).save(data, "PNG")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(TooManyPixels, match=r"40x30 \(1,200 pixels\), above the limit of 1,199 pixels"):
        preprocess_images([data.getvalue()], max_pixels=1199)
    monkeypatch.undo()
    assert load_image(data.getvalue(), max_pixels=1200).size == (40, 30)  # the limit itself is allowed


def test_training_crop_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    areas, ratios = [], []
    for _ in range(300):
        top, left, h, w = random_resized_crop_params(400, 380, gen)
        assert 0 <= top <= 380 - h and 0 <= left <= 400 - w
        areas.append(h * w / (400 * 380))
        ratios.append(w / h)
    # Rounding w and h to whole pixels moves the sampled area and ratio by well under 1%.
    assert min(areas) > 0.89 and max(areas) <= 1.0 and np.ptp(areas) > 0.05
    assert min(ratios) > 0.74 and max(ratios) < 1.34 and len(set(ratios)) > 50


def test_training_crop_fallback_is_the_clamped_centre() -> None:
    # 500x333 (ratio 1.5) cannot hold 90% of its area at a ratio <= 1.3333: always the fallback.
    for seed in range(5):
        assert random_resized_crop_params(500, 333, torch.Generator().manual_seed(seed)) == (0, 28, 333, 444)
    assert random_resized_crop_params(200, 400, torch.Generator().manual_seed(0)) == (66, 0, 267, 200)


def test_train_transform_is_seeded_and_crops_what_the_params_say() -> None:
    img = noise_image(400, 380, seed=7)
    top, left, h, w = random_resized_crop_params(400, 380, torch.Generator().manual_seed(11))
    expected = to_normalized_tensor(img.crop((left, top, left + w, top + h)).resize((224, 224), Image.BICUBIC))
    out = train_transform(img, 11)
    assert out.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and torch.equal(out, expected)
    assert torch.equal(out, train_transform(img, torch.Generator().manual_seed(11)))
    gen = torch.Generator().manual_seed(11)
    first, second = train_transform(img, gen), train_transform(img, gen)
    assert torch.equal(first, out) and not torch.equal(first, second)  # the generator advances
