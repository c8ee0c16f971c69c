"""Image decoding with guards, mode conversion to RGB, resize + crop, and deterministic encoding."""

import io
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
    width, height = image.size
    if width * height > max_pixels:
        raise SkipSample("too_large", f"{width}x{height} > data.max_pixels={max_pixels}")
    return image


def load_rgb(image: Image.Image, resolution: int) -> tuple[Image.Image, str | None]:
    """(decoded RGB image, source mode if converted else None). JPEGs are decoded at a reduced DCT scale
    whose shorter side stays >= 2 * resolution, so the Lanczos resize that follows keeps full quality."""
    width, height = image.size
    if image.format == "JPEG" and min(width, height) > 4 * resolution:
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
