"""The "shapes" demo world: procedural captioned images of coloured shapes on a 3x3 grid.

Every sample is a pure function of ``(index, seed, spec)``; the caption is generated from the attributes and
parsed back by ``parse_caption``, so ``pcm.demo.oracle`` can check an image against any caption of this grammar:

    a <colour> <kind> <where>[, a <colour> <kind> <where>]* [and a <colour> <kind> <where>] on a <background> background

where ``<where>`` is one of the phrases in ``_WHERE`` ("at the top left", "on the left", "in the center", ...).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Six hues spread around the colour wheel, saturated enough to stay apart after JPEG 4:2:0 chroma subsampling and
# far from every background; orange is left out on purpose because it blurs into red and yellow.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 20, 25),
    "green": (20, 130, 40),
    "blue": (40, 70, 220),
    "yellow": (240, 215, 30),
    "purple": (130, 30, 170),
    "cyan": (60, 220, 230),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
# Reading order of the 3x3 grid: POSITIONS[3 * row + col].
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip
_WHERE: dict[str, str] = {
    "top left": "at the top left",
    "top": "at the top",
    "top right": "at the top right",
    "left": "on the left",
    "center": "in the center",
    "right": "on the right",
    "bottom left": "at the bottom left",
    "bottom": "at the bottom",
    "bottom right": "at the bottom right",
}
_POSITION_OF_WHERE = {phrase: position for position, phrase in _WHERE.items()}

# Shape extent (circle diameter, square side, triangle base and height) as a fraction of the grid cell: 7-9.6 px
# at the demo's 32 px, large enough that a circle, a square and a triangle still differ after a VAE round trip.
SIZE_RANGE: tuple[float, float] = (0.65, 0.9)
# Smallest gap between a shape and its cell border, as a fraction of the cell: keeps neighbours from touching
# even after the image is blurred down to half resolution.
_CELL_MARGIN = 0.05
_SUPERSAMPLE = 4  # draw at 4x and downsample with LANCZOS for anti-aliased edges


@dataclass(frozen=True)
class ShapesSpec:
    """What the generator draws: image side and how many shapes per image."""

    image_size: int = 64  # pixels, square images; at least 24 so the smallest shape keeps a few pixels
    min_shapes: int = 1  # fewest objects per image, 1..9
    max_shapes: int = 3  # most objects per image, min_shapes..9 (one object per grid cell)

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, int) or not 24 <= self.image_size <= 4096:
            raise ValueError(f"ShapesSpec.image_size must be an int in [24, 4096], got {self.image_size!r}")
        if not isinstance(self.min_shapes, int) or not 1 <= self.min_shapes <= 9:
            raise ValueError(f"ShapesSpec.min_shapes must be an int in [1, 9], got {self.min_shapes!r}")
        if not isinstance(self.max_shapes, int) or not self.min_shapes <= self.max_shapes <= 9:
            raise ValueError(
                f"ShapesSpec.max_shapes must be an int in [min_shapes={self.min_shapes}, 9], got {self.max_shapes!r}"
            )


@dataclass(frozen=True)
class ShapesSample:
    """One generated image with its caption and the attributes both were made from."""

    image: Image.Image  # RGB, image_size x image_size
    caption: str  # plain English, parseable by parse_caption
    attributes: dict  # {"background": str, "objects": [{"colour", "kind", "position", "size" (pixels)}, ...]}


def generate_sample(index: int, seed: int, spec: ShapesSpec) -> ShapesSample:
    """Deterministic: the same (index, seed, spec) always gives the same sample.

    The random stream is a numpy Generator seeded from ``(seed, index)`` alone, so samples can be produced in any
    order, in parallel, and reproduced one at a time.
    """
    if index < 0 or seed < 0:
        raise ValueError(f"generate_sample needs index >= 0 and seed >= 0, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, index])
    num_objects = int(rng.integers(spec.min_shapes, spec.max_shapes + 1))
    cells = sorted(int(c) for c in rng.choice(len(POSITIONS), size=num_objects, replace=False))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    colour_names, cell_px = list(COLOURS), spec.image_size / 3
    objects, placements = [], []
    for cell in cells:
        extent = float(rng.uniform(*SIZE_RANGE)) * cell_px
        # Jitter the centre only as far as the margin allows, so the shape never leaves its cell.
        slack = max(0.0, (cell_px - extent) / 2 - _CELL_MARGIN * cell_px)
        row, col = divmod(cell, 3)
        cx = (col + 0.5) * cell_px + float(rng.uniform(-slack, slack))
        cy = (row + 0.5) * cell_px + float(rng.uniform(-slack, slack))
        obj = {
            "colour": colour_names[int(rng.integers(len(colour_names)))],
            "kind": KINDS[int(rng.integers(len(KINDS)))],
            "position": POSITIONS[cell],
            "size": int(round(extent)),
        }
        objects.append(obj)
        placements.append((obj, cx, cy, extent))
    attributes = {"background": background, "objects": objects}
    image = _render(spec.image_size, background, placements)
    return ShapesSample(image=image, caption=caption_for(attributes), attributes=attributes)


def _render(image_size: int, background: str, placements: list[tuple[dict, float, float, float]]) -> Image.Image:
    """Draw each (object, centre x, centre y, extent) at 4x resolution and downsample for anti-aliasing."""
    k = _SUPERSAMPLE
    canvas = Image.new("RGB", (image_size * k, image_size * k), BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    for obj, cx, cy, extent in placements:
        x0, y0, x1, y1 = ((cx - extent / 2) * k, (cy - extent / 2) * k, (cx + extent / 2) * k, (cy + extent / 2) * k)
        fill = COLOURS[obj["colour"]]
        if obj["kind"] == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif obj["kind"] == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        elif obj["kind"] == "triangle":  # isosceles, pointing up, base = height = extent
            draw.polygon([(cx * k, y0), (x1, y1), (x0, y1)], fill=fill)
        else:
            raise ValueError(f"unknown kind {obj['kind']!r}; allowed: {', '.join(KINDS)}")
    return canvas.resize((image_size, image_size), Image.Resampling.LANCZOS)


def caption_for(attributes: dict) -> str:
    """Plain-English caption, e.g. 'a red circle at the top left and a blue square on the right on a gray background'.

    Objects are listed in the order given; ``generate_sample`` gives them in grid reading order.
    """
    phrases = [_object_phrase(obj) for obj in attributes["objects"]]
    if not phrases:
        raise ValueError("caption_for needs at least one object in attributes['objects']")
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    background = attributes["background"]
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; allowed: {', '.join(BACKGROUNDS)}")
    return f"{body} on {_article(background)} {background} background"


def _object_phrase(obj: dict) -> str:
    colour, kind, position = obj["colour"], obj["kind"], obj["position"]
    if colour not in COLOURS:
        raise ValueError(f"unknown colour {colour!r}; allowed: {', '.join(COLOURS)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; allowed: {', '.join(KINDS)}")
    if position not in _WHERE:
        raise ValueError(f"unknown position {position!r}; allowed: {', '.join(POSITIONS)}")
    return f"{_article(colour)} {colour} {kind} {_WHERE[position]}"


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


_CAPTION_RE = re.compile(r"^(?P<body>.+) on an? (?P<background>\w+) background$")
_OBJECT_RE = re.compile(r"^an? (?P<colour>\w+) (?P<kind>\w+) (?P<where>.+)$")


def parse_caption(caption: str) -> dict:
    """Inverse of caption_for: {"background": str, "objects": [{"colour", "kind", "position"}, ...]} (no size).

    Raises ValueError naming the caption when it does not follow the grammar in this module's docstring.
    """
    text = " ".join(caption.strip().lower().split())
    match = _CAPTION_RE.match(text)
    if match is None or match["background"] not in BACKGROUNDS:
        raise ValueError(
            f"cannot parse caption {caption!r}: it must end in 'on a <background> background' with background one "
            f"of {', '.join(BACKGROUNDS)}"
        )
    objects = []
    for phrase in re.split(r", | and ", match["body"]):
        part = _OBJECT_RE.match(phrase)
        if part is None or part["colour"] not in COLOURS or part["kind"] not in KINDS:
            raise ValueError(
                f"cannot parse {phrase!r} in caption {caption!r}: expected 'a <colour> <kind> <where>' with colour "
                f"in {', '.join(COLOURS)} and kind in {', '.join(KINDS)}"
            )
        if part["where"] not in _POSITION_OF_WHERE:
            raise ValueError(
                f"cannot parse position {part['where']!r} in caption {caption!r}; allowed: {', '.join(_WHERE.values())}"
            )
        objects.append({"colour": part["colour"], "kind": part["kind"], "position": _POSITION_OF_WHERE[part["where"]]})
    return {"background": match["background"], "objects": objects}
