"""Image decoding and ImageBind's resize + centre crop, with PIL and numpy only (no torch: CPU readers use it)."""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageOps

from model.errors import ModelInputError

IMAGE_SIZE = 224
EXIF_ORIENTATION = 0x0112
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")

ImageSource = str | os.PathLike | bytes


class TooManyPixels(ModelInputError):
    """An image whose header gives more pixels than the limit it is decoded under; none of its pixels was decoded."""


def check_pixels(what: str, width: int, height: int, max_pixels: int | None) -> None:
    """Refuse a picture of `width` x `height` above `max_pixels` (None: no limit), naming `what` and both sizes."""
    if max_pixels is not None and width * height > max_pixels:
        raise TooManyPixels(
            f"{what} is {width}x{height} ({width * height:,} pixels), above the limit of {max_pixels:,} pixels"
        )


def _describe(source: ImageSource) -> str:
    return f"<{len(source)} bytes>" if isinstance(source, bytes | bytearray) else os.fspath(source)


def _orientation(img: Image.Image) -> int:
    """The EXIF orientation tag, 1 (upright) when absent or when the EXIF block is unreadable."""
    try:
        return int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a broken EXIF block must not make a decodable image fail
        return 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) once the EXIF orientation is applied: orientations 5-8 turn the picture by 90 degrees.

    Reads the header only, so it is cheap on an image whose pixels have not been loaded.
    """
    width, height = img.size
    return (height, width) if _orientation(img) in (5, 6, 7, 8) else (width, height)


def to_rgb(img: Image.Image, exif_transpose: bool = False) -> Image.Image:
    """Applies the EXIF orientation (optional) and converts to 8-bit RGB the way `Image.convert("RGB")` does.

    Alpha is dropped, not composited, and palette images take their palette colours, exactly as the reference's
    `.convert("RGB")`. The one deviation: 16-bit greyscale is scaled to 8 bits (round(v * 255 / 65535)) where
    PIL would clip every value above 255 to white.

    Args:
        img: any PIL image.
        exif_transpose: rotate/flip by the EXIF orientation tag first (`load_image` does; the reference does not).

    Returns:
        An RGB image (the input itself when it is already RGB and upright).
    """
    if exif_transpose and _orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.uint32)  # (H, W)
        img = Image.fromarray(((wide * 255 + 32767) // 65535).astype(np.uint8), mode="L")
    return img if img.mode == "RGB" else img.convert("RGB")


def load_image(source: ImageSource, exif_transpose: bool = True, max_pixels: int | None = None) -> Image.Image:
    """Decodes an image file or its bytes into an upright RGB PIL image.

    Args:
        source: a path or the encoded bytes.
        exif_transpose: apply the EXIF orientation (the reference does not; a photo's pixels then lie on their side).
        max_pixels: refuse an image with more pixels, from its header, before any pixel is decoded (None: PIL's own
            decompression-bomb guard only, which refuses above twice `Image.MAX_IMAGE_PIXELS` whatever this says).

    Returns:
        The decoded RGB image.

    Raises:
        FileNotFoundError: the path does not exist.
        TooManyPixels: the image is larger than `max_pixels` (or than PIL's own limit); nothing was decoded.
        ValueError: the input cannot be decoded; the message names the file (or the byte count).
    """
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source) as img:
            check_pixels(f"image {_describe(source)}", *img.size, max_pixels)  # the header's size: nothing decoded
            img.load()
            rgb = to_rgb(img, exif_transpose)
            return rgb.copy() if rgb is img else rgb  # the original is closed on leaving the block
    except (FileNotFoundError, TooManyPixels):
        raise
    except Image.DecompressionBombError as err:  # PIL's limit, at twice its warning size, holds whatever ours is
        raise TooManyPixels(f"image {_describe(source)} is too large to decode: {err}") from err
    except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, struct.error, ...)
        raise ValueError(f"cannot decode image {_describe(source)}: {err}") from err


def resized_size(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int]:
    """The (width, height) after torchvision's `Resize(size)`: short side `size`, long side `int(size*long/short)`."""
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def center_crop_box(width: int, height: int, size: int = IMAGE_SIZE) -> tuple[int, int, int, int]:
    """PIL crop box (left, top, right, bottom) of torchvision's `CenterCrop(size)`: offsets `int(round((L-size)/2))`."""
    top = round((height - size) / 2.0)
    left = round((width - size) / 2.0)
    return left, top, left + size, top + size


def resize_crop(img: Image.Image) -> Image.Image:
    """Any-mode image -> RGB, bicubic short-side resize to 224, centre crop: the 224 x 224 picture the model sees."""
    img = to_rgb(img)
    new_size = resized_size(*img.size)
    if new_size != img.size:
        img = img.resize(new_size, Image.Resampling.BICUBIC)
    return img.crop(center_crop_box(*img.size))
