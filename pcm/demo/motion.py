"""The moving-shapes demo world for text-to-video: one shape crossing the frame, and an oracle for its motion.

Every clip is a pure function of ``(index, seed, size, frames)``: one shape of the shapes world (same colours, kinds,
backgrounds and sizes) starts near the centre and travels a quarter of the frame in a straight line, left, right, up
or down, and is captioned in the shapes style:

    a <colour> <kind> moving <direction> on a <background> background

``motion_direction`` reads the direction back from pixels (the shape's centroid in the first and last frames) and
``score_clip`` scores a clip against a caption: colour, kind, count and background per frame with
``pcm.demo.oracle.score``, motion from the centroids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pcm.demo.oracle import detect, score, unmix
from pcm.demo.shapes import BACKGROUNDS, COLOURS, KINDS, SIZE_RANGE, _article, _render, caption_for

# Unit steps in image axes (x right, y down) of each captioned direction.
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# The shape's centre starts within a twelfth of the side of the frame's centre, whatever the direction, and moves a
# quarter of the side (16 px at 64, 8 at 32). Where a shape starts says nothing of where it goes: a model can only
# learn the direction from the caption. (Clips from one third of the frame to the other, as before, gave every
# direction its own start, and a teacher learnt "a shape on the left moves right" from the pixels and ignored the
# word: its direction was a coin toss decided by where it first drew the shape.)
_JITTER = 1 / 12
_TRAVEL = 1 / 4
# A centroid shift below this fraction of the side is no motion: a third of the generated travel, far above the
# sub-pixel wobble codecs and resizing give a still shape.
MIN_SHIFT = 0.1


@dataclass(frozen=True)
class MotionSample:
    """One generated clip with its caption and the attributes both were made from."""

    frames: np.ndarray  # (F, size, size, 3) uint8
    caption: str  # parseable by parse_motion_caption
    attributes: dict  # {"background", "colour", "kind", "direction", "size" (pixels), "start", "end" ([x, y] px)}


def generate_clip(index: int, seed: int, size: int = 64, frames: int = 8) -> MotionSample:
    """Deterministic: the same (index, seed, size, frames) always gives the same clip (numpy stream of
    (seed, index), so clips can be made in any order and in parallel)."""
    if index < 0 or seed < 0:
        raise ValueError(f"generate_clip needs index >= 0 and seed >= 0, got index={index}, seed={seed}")
    if frames < 2 or size < 24:
        raise ValueError(f"generate_clip needs frames >= 2 and size >= 24, got frames={frames}, size={size}")
    rng = np.random.default_rng([seed, index])
    colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
    kind = KINDS[int(rng.integers(len(KINDS)))]
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    direction = list(DIRECTIONS)[int(rng.integers(len(DIRECTIONS)))]
    extent = float(rng.uniform(*SIZE_RANGE)) * size / 3
    dx, dy = DIRECTIONS[direction]
    start = tuple(size / 2 + float(rng.uniform(-1, 1)) * size * _JITTER for _ in range(2))
    end = (start[0] + dx * size * _TRAVEL, start[1] + dy * size * _TRAVEL)
    obj = {"colour": colour, "kind": kind}
    clip = []
    for i in range(frames):
        t = i / (frames - 1)
        cx, cy = start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])
        clip.append(np.asarray(_render(size, background, [(obj, cx, cy, extent)]), dtype=np.uint8))
    attributes = {"background": background, "colour": colour, "kind": kind, "direction": direction,
                  "size": int(round(extent)), "start": [round(v, 2) for v in start], "end": [round(v, 2) for v in end]}
    return MotionSample(np.stack(clip), motion_caption(attributes), attributes)


def motion_caption(attributes: dict) -> str:
    """'a red circle moving left on a gray background' from colour, kind, direction and background."""
    colour, kind, direction, background = (attributes[k] for k in ("colour", "kind", "direction", "background"))
    for name, value, allowed in (("colour", colour, COLOURS), ("kind", kind, KINDS),
                                 ("direction", direction, DIRECTIONS), ("background", background, BACKGROUNDS)):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
    return f"{_article(colour)} {colour} {kind} moving {direction} on {_article(background)} {background} background"


_MOTION_RE = re.compile(r"^an? (?P<colour>\w+) (?P<kind>\w+) moving (?P<direction>\w+) on an? (?P<background>\w+) "
                        r"background$")


def parse_motion_caption(caption: str) -> dict:
    """Inverse of motion_caption: {"colour", "kind", "direction", "background"}; ValueError naming the caption
    when it does not follow the grammar in this module's docstring (a still-image caption, say)."""
    text = " ".join(caption.strip().lower().split())
    match = _MOTION_RE.match(text)
    if match is None:
        raise ValueError(f"cannot parse motion caption {caption!r}: expected 'a <colour> <kind> moving <direction> "
                         "on a <background> background'")
    parsed = match.groupdict()
    for name, allowed in (("colour", COLOURS), ("kind", KINDS), ("direction", DIRECTIONS),
                          ("background", BACKGROUNDS)):
        if parsed[name] not in allowed:
            raise ValueError(f"cannot parse motion caption {caption!r}: {name} {parsed[name]!r} is not one of "
                             f"{', '.join(allowed)}")
    return parsed


def shape_centroid(frame: np.ndarray) -> tuple[float, float] | None:
    """(x, y) in pixels of the foreground's alpha-weighted centre in an (H, W, 3) frame; None when the oracle
    detects no object. The foreground is the oracle's: each pixel unmixed against the detected background."""
    background, objects = detect(frame)
    if not objects:
        return None
    alpha, best = unmix(np.asarray(frame, dtype=np.float64), background)
    soft = np.take_along_axis(alpha, best[..., None], axis=-1)[..., 0]
    weights = np.where(soft >= 0.5, soft, 0.0)
    ys, xs = np.indices(weights.shape)
    total = weights.sum()
    return float((xs * weights).sum() / total + 0.5), float((ys * weights).sum() / total + 0.5)


def motion_direction(frames: np.ndarray, min_shift: float = MIN_SHIFT) -> str | None:
    """The dominant direction ('left', 'right', 'up', 'down') of the shape's displacement from the first to the
    last frame of a (F, H, W, 3) clip; None when no shape is detected in either, or it moves less than min_shift
    of the frame side."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 2:
        raise ValueError(f"motion_direction expects a clip of shape (F >= 2, H, W, 3), got {frames.shape}")
    first, last = shape_centroid(frames[0]), shape_centroid(frames[-1])
    if first is None or last is None:
        return None
    height, width = frames.shape[1:3]
    dx, dy = (last[0] - first[0]) / width, (last[1] - first[1]) / height
    if max(abs(dx), abs(dy)) < min_shift:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def score_clip(frames: np.ndarray, caption: str) -> dict[str, float]:
    """Per-attribute match of a (F, H, W, 3) clip against a motion caption, each in [0, 1].

    colour, kind (colour + kind), count and background are oracle.score's, averaged over the frames (scored against
    the still caption of the same shape; its position is not scored); motion is 1.0 when motion_direction reads
    the captioned direction; overall is the mean of the five.
    """
    wanted = parse_motion_caption(caption)
    still = caption_for({"background": wanted["background"],
                         "objects": [{"colour": wanted["colour"], "kind": wanted["kind"], "position": "center"}]})
    per_frame = [score(frame, still) for frame in np.asarray(frames)]
    result = {name: float(np.mean([s[name] for s in per_frame])) for name in ("colour", "kind", "count", "background")}
    result["motion"] = float(motion_direction(frames) == wanted["direction"])
    result["overall"] = sum(result.values()) / 5
    return result

