"""Reads the shapes world back from pixels: the demo's stand-in for a CLIP score, with no learned model.

Every pixel is explained as a blend ``bg + alpha * (c - bg)`` of the background and one palette colour ``c`` (that is
what anti-aliasing, resizing and JPEG do to a flat shape on a flat background). The colour whose blend line passes
closest to the pixel wins; pixels with ``alpha >= 0.5`` are foreground. Unmixing this way keeps the pink fringe of a
red shape on white red, where nearest-palette-colour assignment would call it purple. Connected components of each
colour's foreground are the objects; their kind comes from the soft ``alpha`` map, which keeps sub-pixel detail that
a thresholded mask loses at 32 px.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from pcm.demo.shapes import BACKGROUNDS, COLOURS, POSITIONS, parse_caption

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float64)  # (K, 3)
# Smallest object, as a fraction of the image area: the smallest generated triangle covers ~1.7%, JPEG specks well
# under 0.5%.
_MIN_AREA_FRACTION = 0.006
# Soft alpha below this is compression noise on the background, not shape.
_ALPHA_FLOOR = 0.08


@dataclass(frozen=True)
class DetectedObject:
    """One object read from an image."""

    colour: str  # a key of shapes.COLOURS
    kind: str  # one of shapes.KINDS
    position: str  # one of shapes.POSITIONS, the 3x3 cell holding the centroid
    area: int  # pixels (soft area: sum of the object's alpha)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in 0..255 from a PIL image or an array of 0..255 values."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"detect expects an RGB image of shape (H, W, 3) with values in 0..255, got {array.shape}")
    return array


def detect_background(pixels: np.ndarray) -> str:
    """Name of the palette background nearest the per-channel median of the border pixels."""
    border = np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]])
    median = np.median(border, axis=0)
    names = list(BACKGROUNDS)
    dists = [np.linalg.norm(median - np.array(BACKGROUNDS[name], dtype=np.float64)) for name in names]
    return names[int(np.argmin(dists))]


def unmix(pixels: np.ndarray, background: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel blend fractions onto each colour's line from the background, and the best colour.

    pixels (H, W, 3) -> alpha (H, W, K) in [0, 1], best (H, W) int index into COLOURS.
    """
    bg = np.array(BACKGROUNDS[background], dtype=np.float64)
    direction = _PALETTE - bg  # (K, 3)
    offset = pixels - bg  # (H, W, 3)
    alpha = np.clip(offset @ direction.T / np.sum(direction**2, axis=1), 0.0, 1.0)  # (H, W, K)
    residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * direction, axis=-1)  # (H, W, K)
    return alpha, np.argmin(residual, axis=-1)


def classify_kind(soft: np.ndarray) -> str:
    """Kind of one object from its soft alpha map (H, W), zero outside the object.

    Two scale-free features: the fill of the soft bounding box (area / (widest row * tallest column): square 1,
    circle pi/4, triangle 1/2) and the skewness of the vertical mass profile (an up-pointing triangle holds 3/4 of
    its mass in its lower half: skew -0.57; circles and squares are symmetric: 0).
    """
    rows, cols = soft.sum(axis=1), soft.sum(axis=0)
    area = soft.sum()
    fill = area / max(rows.max() * cols.max(), 1e-9)
    y = np.arange(rows.size, dtype=np.float64)
    mean = (rows * y).sum() / area
    var = (rows * (y - mean) ** 2).sum() / area
    skew = (rows * (y - mean) ** 3).sum() / area / max(var, 1e-9) ** 1.5
    # Thresholds sit mid-gap in 1000 images after JPEG q90 + 64->32->64 and at 32 px: triangle skew <= -0.41 vs
    # |skew| <= 0.06 for the others; fill: triangle <= 0.76, circle 0.77..0.83, square >= 0.95.
    if skew < -0.3 or fill < 0.64:
        return "triangle"
    return "square" if fill > 0.9 else "circle"


def detect(image: Image.Image | np.ndarray) -> tuple[str, list[DetectedObject]]:
    """(background name, objects in grid reading order) read from an RGB image of any size.

    Background from the border; each pixel unmixed against the background (module docstring); connected components
    (4-connected) of each colour's foreground above 0.6% of the image area are objects, measured by _measure.
    """
    pixels = _as_array(image)
    height, width = pixels.shape[:2]
    background = detect_background(pixels)
    alpha, best = unmix(pixels, background)
    foreground = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0] >= 0.5
    min_area = _MIN_AREA_FRACTION * height * width
    objects = []
    for k, name in enumerate(_COLOUR_NAMES):
        labels, count = ndimage.label(foreground & (best == k))
        for index in range(1, count + 1):
            component = labels == index
            if component.sum() >= min_area:
                objects.append(_measure(name, component, foreground, alpha[..., k]))
    objects.sort(key=lambda obj: (POSITIONS.index(obj.position), obj.colour, obj.kind))
    return background, objects


def _measure(colour: str, component: np.ndarray, foreground: np.ndarray, alpha: np.ndarray) -> DetectedObject:
    """Kind, position and area of one component, from its colour's alpha (H, W) over the component and its fringe.

    Fringe pixels just outside the thresholded component still carry part of the shape, so the component is grown
    by about one pixel per 32 of image side, but never into another object's foreground.
    """
    height, width = component.shape
    grow = max(1, round(min(height, width) / 32))
    grown = ndimage.binary_dilation(component, iterations=grow) & ~(foreground & ~component)
    soft = np.clip((np.where(grown, alpha, 0.0) - _ALPHA_FLOOR) / (1 - _ALPHA_FLOOR), 0.0, 1.0)
    ys, xs = np.nonzero(soft)
    weights = soft[ys, xs]
    # Pixel i covers [i, i + 1), so its centre is i + 0.5.
    cy, cx = (ys * weights).sum() / weights.sum() + 0.5, (xs * weights).sum() / weights.sum() + 0.5
    row, col = min(2, int(3 * cy / height)), min(2, int(3 * cx / width))
    kind = classify_kind(soft[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1])
    return DetectedObject(colour, kind, POSITIONS[3 * row + col], int(round(weights.sum())))


def score(image: Image.Image | np.ndarray, caption: str) -> dict[str, float]:
    """Per-attribute match of an image against a caption, each in [0, 1].

    Captioned objects are matched one-to-one to detected objects on a key: colour; colour+kind; colour+kind+position.
    For exact-equality keys the optimal one-to-one matching has size sum over keys of min(captioned, detected), the
    multiset intersection, which is what is counted. 'count' is 1.0 when as many objects are detected as captioned,
    'background' 1.0 when the background matches, and 'overall' is the mean of the five.
    """
    wanted = parse_caption(caption)
    background, found = detect(image)
    keys = {
        "colour": lambda o: (o["colour"],),
        "kind": lambda o: (o["colour"], o["kind"]),
        "position": lambda o: (o["colour"], o["kind"], o["position"]),
    }
    found_dicts = [{"colour": o.colour, "kind": o.kind, "position": o.position} for o in found]
    result = {}
    for attribute, key in keys.items():
        matched = Counter(map(key, wanted["objects"])) & Counter(map(key, found_dicts))
        result[attribute] = sum(matched.values()) / len(wanted["objects"])
    result["count"] = float(len(found) == len(wanted["objects"]))
    result["background"] = float(background == wanted["background"])
    result["overall"] = sum(result.values()) / 5
    return result
