"""One image in, one validated JPEG out (or, to keep the originals, the file as it is, validated).

:func:`prepare_image` is what the ingest job runs on every file: it rejects what
cannot be decoded (raising :class:`BadImage` with a short reason the manifest
keeps), converts every colour mode to RGB, applies the EXIF orientation, shrinks
the longer side and re-encodes as JPEG, so that everything downstream can assume
"RGB JPEG, longer side <= max_side".

:func:`validate_image` is what the ingest runs instead with ``--max-side 0``
(:data:`KEEP_ORIGINAL`): the same checks, the whole image decoded, but the file's own
bytes are kept, never re-encoded or shrunk (a PNG stays a PNG): the images the
published training reads.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["BadImage", "prepare_image", "validate_image", "decode_image", "to_rgb", "DEFAULT_MAX_PIXELS",
           "JPEG_QUALITY", "KEEP_ORIGINAL"]

DEFAULT_MAX_PIXELS = 64_000_000  # header-declared width * height above this is a bomb
JPEG_QUALITY = 90
KEEP_ORIGINAL = 0                # the ingest's max_side that keeps each file's own bytes (validate_image)
_WHITE = (255, 255, 255)
# Modes that carry an alpha channel (or palette transparency, handled separately).
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Modes whose samples are wider than 8 bits and must be rescaled, not clipped.
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


class BadImage(Exception):
    """A file that cannot become a training image; ``reason`` is short and groupable.

    ``reason`` is one of ``empty file``, ``not an image``, ``truncated``, ``corrupt``,
    ``decompression bomb`` or ``unsupported mode``, optionally followed by
    ``: detail`` (the part before the colon is what summaries count).
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def prepare_image(data: bytes, max_side: int = 512, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Validate, orient, convert to RGB and shrink one encoded image; return JPEG bytes.

    The pixel bound is checked from the header before any pixel is decoded, and the
    whole image is then decoded (``load()``) so truncated files fail here rather than
    during training. The longer side is reduced to ``max_side`` (never enlarged).

    Raises:
        BadImage: the file is empty, not an image, truncated, corrupt, a
            decompression bomb, or in a mode that cannot be converted to RGB.
    """
    if max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    img = _open_checked(data, max_pixels)
    target = _fit_size(img.size, max_side)
    if img.format == "JPEG" and target != img.size:
        img.draft(None, target)  # DCT-domain downscale: decodes large JPEGs much faster
    _decode_fully(img)
    ImageOps.exif_transpose(img, in_place=True)
    img = to_rgb(img)
    target = _fit_size(img.size, max_side)
    if target != img.size:
        img = img.resize(target, Image.Resampling.BICUBIC, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def validate_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """Check one encoded image as :func:`prepare_image` does and return ``data`` itself, unchanged.

    The header's pixel bound, a full decode and the conversion to RGB must all succeed, so a
    file kept as it is fails here, not in training.

    Raises:
        BadImage: as :func:`prepare_image`.
    """
    img = _open_checked(data, max_pixels)
    _decode_fully(img)
    to_rgb(img)
    return data


def decode_image(jpeg_bytes: bytes) -> np.ndarray:
    """Decode image bytes (as written by :func:`prepare_image`) to an HxWx3 uint8 array."""
    with Image.open(io.BytesIO(jpeg_bytes)) as img:
        return np.asarray(img.convert("RGB"))


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, wide samples rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        # Palette transparency (tRNS) becomes a real alpha channel first.
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        return to_rgb(img)
    if img.mode in _ALPHA_MODES:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in _WIDE_MODES:
        return Image.fromarray(_wide_to_uint8(np.asarray(img))).convert("RGB")
    try:
        return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV, ...
    except (ValueError, OSError) as err:
        raise BadImage(f"unsupported mode: {img.mode}") from err


def _wide_to_uint8(samples: np.ndarray) -> np.ndarray:
    """Map 16-bit / 32-bit int / float samples to 0..255.

    Data already within 0..255 is kept; 0..65535 (16-bit) is divided by 257; floats
    within 0..1 are multiplied by 255; anything else is stretched min..max.
    """
    values = samples.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if samples.dtype.kind == "f" and low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low >= 0 and high <= 255 and samples.dtype.itemsize > 2:
        pass  # 32-bit container holding 8-bit data
    elif low >= 0 and high <= 65535:
        values = values / 257.0
    elif high > low:
        values = (values - low) * (255.0 / (high - low))
    else:
        values = np.zeros_like(values)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    """Open the header only; reject empty files, non-images and images above ``max_pixels``."""
    if not data:
        raise BadImage("empty file")
    with warnings.catch_warnings():
        # Pillow's own bound (Image.MAX_IMAGE_PIXELS) also applies: a warning is an error here.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise BadImage(f"decompression bomb: {err}") from err
        except UnidentifiedImageError as err:
            raise BadImage("not an image") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise _classify(err) from err
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(f"decompression bomb: {width}x{height} exceeds {max_pixels} pixels")
    return img


def _decode_fully(img: Image.Image) -> None:
    """Decode every pixel now; truncated data raises instead of being padded grey."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombWarning,
                Image.DecompressionBombError) as err:
            raise _classify(err) from err


def _classify(err: BaseException) -> BadImage:
    """Turn a Pillow decoding error into a groupable reason."""
    message = str(err)
    if isinstance(err, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return BadImage(f"decompression bomb: {message}")
    if isinstance(err, EOFError) or "truncated" in message.lower():
        return BadImage("truncated")
    return BadImage(f"corrupt: {message}" if message else "corrupt")


def _fit_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size with the longer side reduced to ``max_side``, aspect kept; never larger."""
    width, height = size
    longer = max(width, height)
    if longer <= max_side:
        return size
    scale = max_side / longer
    if width >= height:
        return max_side, max(1, round(height * scale))
    return max(1, round(width * scale)), max_side
