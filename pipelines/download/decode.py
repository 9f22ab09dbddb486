"""Download-time decoding: our PIL decoder (model/imagebind/decode.py) in the slot of img2dataset's OpenCV resizer."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import BinaryIO, Literal

from PIL import Image, UnidentifiedImageError

from model.imagebind.decode import center_crop_box, oriented_size, resized_size, to_rgb
from pipelines.config import Config

DECODER_ID = "pil-1"  # part of the download settings: shards cut by another decoder are not mixed with these
ENCODERS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
# img2dataset's own refusal messages, so that the catalog names the reasons alike for either decoder.
TOO_SMALL = "image too small"
TOO_LARGE = "image area too large"
TOO_ELONGATED = "aspect ratio too large"
DECODE_ERROR = "cannot decode image"

# (encoded image, width, height, original width, original height, error): img2dataset's resizer contract.
Decoded = tuple[bytes | None, int | None, int | None, int | None, int | None, str | None]


class Refused(Exception):
    """An image that decodes but is not kept; the message is the refusal."""


@dataclass(frozen=True)
class ImageDecoder:
    """Decodes one downloaded image as the extraction decoder does, checks its real size, resizes and encodes it.

    The first frame of an animation, the EXIF orientation applied, 16-bit scaled to 8 bits, CMYK, palette and alpha
    converted by `to_rgb`. The checks that do not depend on which way up the picture is (area, short side, aspect
    ratio) read the file's header, so such a refused image, a decompression bomb above all, is never decoded; the
    per-side minimums wait for the orientation. Larger images shrink to `image_size` on the short side
    (JPEGs are first decoded at a reduced scale where that still leaves the short side at least `image_size`);
    smaller ones are kept as they are.

    Attributes:
        image_size: the short side of a stored image that was larger.
        resize_mode: keep_ratio, or center_crop to a square.
        min_image_size: refuse (`image too small`) when the short side is smaller.
        min_width: refuse when the real width is smaller (the source's filter, judged on the real image).
        min_height: the same for the height.
        max_image_area: refuse (`image area too large`) above this many pixels.
        max_aspect_ratio: refuse (`aspect ratio too large`) when long / short side is above it.
        encode_format: jpg, png or webp.
        encode_quality: the JPEG/WebP quality.
    """

    image_size: int
    resize_mode: Literal["keep_ratio", "center_crop"] = "keep_ratio"
    min_image_size: int = 0
    min_width: int = 0
    min_height: int = 0
    max_image_area: float = math.inf
    max_aspect_ratio: float = math.inf
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: int = 95

    def refusal(self, width: int, height: int, upright: bool = True) -> str | None:
        """Why an image of this real size is not kept, or None.

        Args:
            width: the real width.
            height: the real height.
            upright: the size is the upright one (else the per-side minimums, the only checks that depend on
                which way up the picture is, are left out).
        """
        if width * height > self.max_image_area:
            return TOO_LARGE
        if min(width, height) < max(self.min_image_size, 1):
            return TOO_SMALL
        if upright and (width < self.min_width or height < self.min_height):
            return TOO_SMALL
        if max(width, height) / min(width, height) > self.max_aspect_ratio:
            return TOO_ELONGATED
        return None

    def stored_size(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an upright image of this size is stored at, before a centre crop."""
        if min(width, height) <= self.image_size:
            return width, height
        return resized_size(width, height, self.image_size)

    def decode(self, data: BinaryIO) -> tuple[Image.Image, int, int]:
        """The upright RGB picture, at a reduced scale where that is free, and its real (width, height).

        Raises:
            Refused: the image is not kept; the message says why.
            Image.DecompressionBombError, OSError, ...: PIL cannot decode it.
        """
        img = Image.open(data)  # the header only: nothing is decoded yet (an in-memory stream: nothing to close)
        raw = img.size  # before the EXIF orientation, which a PNG may only give after its pixels
        refusal = self.refusal(*raw, upright=False)
        if refusal:
            raise Refused(refusal)
        target = self.stored_size(*raw)
        if target != raw:
            scale = min(target) / min(raw)
            img.draft(None, (math.ceil(raw[0] * scale), math.ceil(raw[1] * scale)))
        img.load()  # the first frame of an animation
        width, height = raw[::-1] if oriented_size(img) != img.size else raw
        refusal = self.refusal(width, height)
        if refusal:
            raise Refused(refusal)
        return to_rgb(img, exif_transpose=True), width, height

    def shrink(self, img: Image.Image, width: int, height: int) -> Image.Image:
        """The stored picture of a decoded one whose real size is (width, height)."""
        target = self.stored_size(width, height)
        if img.size != target:  # area averaging, as img2dataset's INTER_AREA (and faster than bicubic in PIL)
            img = img.resize(target, Image.Resampling.BOX)
        if self.resize_mode == "center_crop" and min(width, height) > self.image_size:
            img = img.crop(center_crop_box(*img.size, self.image_size))
        return img

    def __call__(self, stream: BinaryIO, blurring_bbox_list: object = None) -> Decoded:
        """img2dataset's resizer call: the stored bytes, their size and the original's, or an error message."""
        if blurring_bbox_list is not None:
            return None, None, None, None, None, "blurring is not supported by the ibllm decoder"
        try:
            stream.seek(0)
            img, width, height = self.decode(stream)
            img = self.shrink(img, width, height)
            out = io.BytesIO()
            img.save(out, ENCODERS[self.encode_format], quality=self.encode_quality)
        except Refused as refused:
            return None, None, None, None, None, str(refused)
        except Image.DecompressionBombError:
            return None, None, None, None, None, TOO_LARGE
        except Exception as err:  # PIL raises many types for corrupt data (OSError, SyntaxError, struct.error)
            return None, None, None, None, None, _decode_error(err)
        return out.getvalue(), img.width, img.height, width, height, None


def _decode_error(err: Exception) -> str:
    if isinstance(err, UnidentifiedImageError):
        return f"{DECODE_ERROR}: not a known image format"
    text = str(err).strip().splitlines()
    return f"{DECODE_ERROR}: {text[0][:200] if text else type(err).__name__}"


def decoder_for(cfg: Config, source: str) -> ImageDecoder:
    """The decoder of a source: the download's sizes, and the source's size and aspect filters on real images."""
    d = cfg.download
    filters = next((s.filters for s in cfg.sources if s.name == source), None)
    return ImageDecoder(
        image_size=d.image_size,
        resize_mode=d.resize_mode,
        min_image_size=d.min_image_size,
        min_width=filters.min_width if filters else 0,
        min_height=filters.min_height if filters else 0,
        max_image_area=d.max_image_area or math.inf,
        max_aspect_ratio=(filters.max_aspect_ratio if filters else None) or math.inf,
    )
