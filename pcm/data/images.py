"""Image decoding with guards, mode conversion to RGB, EXIF orientation, resize + crop, and deterministic encoding."""

import io
import struct
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError


class SkipSample(Exception):
    """A sample that is skipped; reason is the counter it is filed under in stats.json."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# Modes turned into RGB, and how: the alpha ones are composited on white, 16/32-bit ones rescaled to 8 bits.
CONVERTIBLE_MODES = ("RGB", "L", "1", "P", "PA", "LA", "RGBA", "RGBa", "La", "CMYK", "YCbCr", "LAB", "HSV",
                     "I", "I;16", "I;16B", "I;16L", "I;16N")
# Formats we train on, as PIL names them (MPO: the multi-picture JPEG many phones write). Others (GIF: 256 colours
# and animation; TIFF, BMP: scans and screenshots, often 16-bit or layered) are skipped as unsupported_format, also
# when they hide behind a .jpg name.
TRAINED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP")
UNSUPPORTED_EXTENSIONS = ("gif", "tif", "tiff", "bmp", "heic", "heif", "avif", "jxl", "jp2", "ico", "svg", "psd")
EXIF_ORIENTATION = 0x0112
# EXIF orientation -> the transpose that makes the pixels upright (ImageOps.exif_transpose's table); 5..8 swap sides
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """The image with only its header read (size and mode known, pixels not decoded); SkipSample on failure."""
    if not data:
        raise SkipSample("empty_image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:  # PIL's own guard (2x its MAX_IMAGE_PIXELS) fires at open
        raise SkipSample("too_large", str(err)) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise SkipSample("unreadable_image", str(err)) from err
    if image.format not in TRAINED_FORMATS:
        raise SkipSample("unsupported_format", f"{image.format}; allowed: {', '.join(TRAINED_FORMATS)}")
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample("too_large", f"{width}x{height} > data.max_pixels={max_pixels}")
    return image


def load_rgb(image: Image.Image, resolution: int) -> tuple[Image.Image, str | None]:
    """(decoded RGB image, source mode if converted else None). JPEGs are decoded at a reduced DCT scale
    whose shorter side stays >= 2 * resolution, so the Lanczos resize that follows keeps full quality."""
    width, height = image.size
    if image.format in ("JPEG", "MPO") and min(width, height) > 4 * resolution:
        factor = 2 * resolution / min(width, height)
        image.draft(image.mode, (int(width * factor) + 1, int(height * factor) + 1))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise SkipSample("unreadable_image", str(err)) from err
    mode = image.mode
    if mode == "RGB":
        return image, None
    if mode not in CONVERTIBLE_MODES:
        raise SkipSample("unsupported_mode", mode)
    return to_rgb(image), mode


def orientation(image: Image.Image) -> int:
    """The EXIF orientation (1..8) of an opened image; 1 (as stored) when absent, out of range or unreadable:
    a broken EXIF block must not cost the picture."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, struct.error, KeyError, TypeError):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def upright_size(size: tuple[int, int], turn: int) -> tuple[int, int]:
    """(width, height) of the image as it is meant to be seen: orientations 5..8 turn it by 90 degrees."""
    return (size[1], size[0]) if turn >= 5 else size


def upright(image: Image.Image, turn: int) -> Image.Image:
    """The pixels as the camera meant them (a phone stores portraits sideways with orientation 6 or 8)."""
    return image.transpose(_UPRIGHT[turn]) if turn in _UPRIGHT else image


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any convertible mode: transparency composited on white, high bit depths scaled to 8 bits."""
    if image.mode.startswith("I"):
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if values.max(initial=0) > 255 else 255.0
        image = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


@dataclass(frozen=True)
class Crop:
    top: int  # crop box in the resized image's pixels (SDXL's crop_coords_top_left)
    left: int


def resize_and_crop(image: Image.Image, resolution: int, crop: str, unit: float) -> tuple[Image.Image, Crop]:
    """Shorter side to resolution (Lanczos), then a square crop of resolution x resolution.

    unit in [0, 1) positions a 'random' crop (a keyed draw, so reruns are identical); 'center' ignores it.
    """
    width, height = image.size
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    resized = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    spare_w, spare_h = size[0] - resolution, size[1] - resolution
    if crop == "center":
        box = Crop(spare_h // 2, spare_w // 2)
    elif crop == "random":
        box = Crop(int(unit * (spare_h + 1)), int(unit * (spare_w + 1)))
    else:
        raise ValueError(f"unknown data.crop {crop!r}; allowed: center, random")
    return resized.crop((box.left, box.top, box.left + resolution, box.top + resolution)), box


def encode_image(image: Image.Image, image_format: str, jpeg_quality: int) -> bytes:
    """Deterministic bytes of an RGB image (no metadata, no timestamps)."""
    out = io.BytesIO()
    if image_format == "jpg":
        image.save(out, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    elif image_format == "png":
        image.save(out, format="PNG", optimize=False, compress_level=6)
    else:
        raise ValueError(f"unknown data.image_format {image_format!r}; allowed: jpg, png")
    return out.getvalue()
