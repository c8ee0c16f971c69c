"""The shapes demo world and its oracle: determinism, the caption grammar, and how well the oracle reads images back.

The oracle stands in for a CLIP score in the demo, so its accuracy is pinned on 1000 generated images: clean, after a
JPEG q90 round trip and a 64 -> 32 -> 64 resize, and at 32 px directly (what a model trained at 32 px produces).
"""

import io
import json
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pcm.demo.oracle import DetectedObject, detect, score
from pcm.demo.shapes import (
    BACKGROUNDS,
    COLOURS,
    KINDS,
    POSITIONS,
    SIZE_RANGE,
    ShapesSpec,
    caption_for,
    generate_sample,
    parse_caption,
)

SEED = 2024
NUM_ACCURACY_IMAGES = 1000  # ~2000 objects; one miss moves the figure by < 0.1%


def _jpeg_then_down_up(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)  # PIL's default 4:2:0 chroma subsampling: the harsher case
    decoded = Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")
    small = decoded.resize((32, 32), Image.Resampling.LANCZOS)
    return small.resize(image.size, Image.Resampling.BICUBIC)


def _to_32(image: Image.Image) -> Image.Image:
    return image.resize((32, 32), Image.Resampling.LANCZOS)


def _recovery(samples, transform) -> float:
    """Fraction of generated objects whose colour and kind are detected, matched one-to-one (multiset intersection)."""
    recovered = total = 0
    for sample in samples:
        truth = Counter((obj["colour"], obj["kind"]) for obj in sample.attributes["objects"])
        _, found = detect(transform(sample.image))
        recovered += sum((truth & Counter((obj.colour, obj.kind) for obj in found)).values())
        total += sum(truth.values())
    return recovered / total


@pytest.fixture(scope="module")
def samples():
    spec = ShapesSpec(image_size=64, min_shapes=1, max_shapes=3)
    return [generate_sample(index, SEED, spec) for index in range(NUM_ACCURACY_IMAGES)]


def test_generate_sample_is_deterministic_per_index_and_seed():
    spec = ShapesSpec()
    first, again = generate_sample(5, 1, spec), generate_sample(5, 1, spec)
    assert first.image.tobytes() == again.image.tobytes()
    assert first.caption == again.caption and first.attributes == again.attributes
    assert generate_sample(6, 1, spec).image.tobytes() != first.image.tobytes()
    assert generate_sample(5, 2, spec).image.tobytes() != first.image.tobytes()


@pytest.mark.parametrize(("image_size", "min_shapes", "max_shapes"), [(64, 1, 3), (32, 2, 5), (96, 9, 9)])
def test_generate_sample_respects_spec(image_size, min_shapes, max_shapes):
    spec = ShapesSpec(image_size, min_shapes, max_shapes)
    counts = set()
    for index in range(60):
        sample = generate_sample(index, SEED, spec)
        objects = sample.attributes["objects"]
        assert sample.image.mode == "RGB" and sample.image.size == (image_size, image_size)
        assert min_shapes <= len(objects) <= max_shapes
        assert len({obj["position"] for obj in objects}) == len(objects), "two objects share a grid cell"
        assert sample.attributes["background"] in BACKGROUNDS
        for obj in objects:
            assert obj["colour"] in COLOURS and obj["kind"] in KINDS and obj["position"] in POSITIONS
            cell = image_size / 3  # sizes are rounded to whole pixels
            assert SIZE_RANGE[0] * cell - 0.5 <= obj["size"] <= SIZE_RANGE[1] * cell + 0.5
        assert json.loads(json.dumps(sample.attributes)) == sample.attributes
        counts.add(len(objects))
    assert counts == set(range(min_shapes, max_shapes + 1)), "every allowed object count should occur in 60 draws"


def test_caption_phrasing():
    attributes = {
        "background": "black",
        "objects": [
            {"colour": "red", "kind": "circle", "position": "top"},
            {"colour": "blue", "kind": "square", "position": "left"},
            {"colour": "yellow", "kind": "triangle", "position": "bottom right"},
        ],
    }
    expected = (
        "a red circle at the top, a blue square on the left and a yellow triangle at the bottom right "
        "on a black background"
    )
    assert caption_for(attributes) == expected
    one = {"background": "white", "objects": [{"colour": "green", "kind": "triangle", "position": "center"}]}
    assert caption_for(one) == "a green triangle in the center on a white background"


def test_caption_round_trips_through_parse_caption():
    spec = ShapesSpec(image_size=32, min_shapes=1, max_shapes=9)
    for index in range(300):
        sample = generate_sample(index, SEED, spec)
        parsed = parse_caption(sample.caption)
        without_size = [{k: v for k, v in obj.items() if k != "size"} for obj in sample.attributes["objects"]]
        assert parsed == {"background": sample.attributes["background"], "objects": without_size}
        assert caption_for(parsed) == sample.caption


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "a cat on a mat",
        "a red circle at the top left",  # no background
        "a red circle at the top left on a pink background",
        "a magenta circle at the top left on a gray background",
        "a red hexagon at the top left on a gray background",
        "a red circle somewhere on a gray background",
        "a red circle at the top left and on a gray background",
    ],
)
def test_parse_caption_rejects_garbage_naming_the_caption(caption):
    with pytest.raises(ValueError, match=re.escape(repr(caption))):
        parse_caption(caption)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"image_size": 8}, "image_size"),
        ({"image_size": 64.0}, "image_size"),
        ({"min_shapes": 0}, "min_shapes"),
        ({"min_shapes": 10, "max_shapes": 10}, "min_shapes"),
        ({"max_shapes": 10}, "max_shapes"),
        ({"min_shapes": 3, "max_shapes": 2}, "max_shapes"),
    ],
)
def test_shapes_spec_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"ShapesSpec.{field} must be"):
        ShapesSpec(**kwargs)


@pytest.mark.slow
def test_oracle_recovers_clean_images(samples):
    assert _recovery(samples, lambda image: image) >= 0.99  # measured 1.000


@pytest.mark.slow
def test_oracle_recovers_after_jpeg_and_down_up_resize(samples):
    assert _recovery(samples, _jpeg_then_down_up) >= 0.95  # measured 1.000


@pytest.mark.slow
def test_oracle_recovers_at_32_px(samples):
    assert _recovery(samples, _to_32) >= 0.95  # measured 1.000


def test_detect_reads_positions_areas_and_background(samples):
    for sample in samples[:100]:
        background, found = detect(np.asarray(sample.image))  # the array path, not PIL
        assert background == sample.attributes["background"]
        truth = sorted((o["colour"], o["kind"], o["position"]) for o in sample.attributes["objects"])
        assert sorted((o.colour, o.kind, o.position) for o in found) == truth
        for obj in found:
            assert isinstance(obj, DetectedObject)
            # Soft area against the drawn extent: circle pi/4, square 1, triangle 1/2 of extent^2.
            extent = next(o["size"] for o in sample.attributes["objects"] if o["position"] == obj.position)
            expected = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}[obj.kind] * extent**2
            assert obj.area == pytest.approx(expected, rel=0.3)


def test_detect_works_on_large_images_and_rejects_non_rgb():
    spec = ShapesSpec(image_size=192, min_shapes=4, max_shapes=9)
    for index in range(5):
        sample = generate_sample(index, SEED, spec)
        _, found = detect(sample.image)
        truth = sorted((o["colour"], o["kind"], o["position"]) for o in sample.attributes["objects"])
        assert sorted((o.colour, o.kind, o.position) for o in found) == truth
    with pytest.raises(ValueError, match="RGB"):
        detect(np.zeros((32, 32)))


def test_score_is_perfect_for_own_caption(samples):
    scores = [score(sample.image, sample.caption) for sample in samples[:200]]
    assert all(set(s) == {"colour", "kind", "position", "count", "background", "overall"} for s in scores)
    assert all(0.0 <= value <= 1.0 for s in scores for value in s.values())
    assert np.mean([s["overall"] == 1.0 for s in scores]) >= 0.98


def _recaption(sample, change) -> str:
    attributes = {
        "background": sample.attributes["background"],
        "objects": [change(obj, sample.attributes["objects"]) for obj in sample.attributes["objects"]],
    }
    return caption_for(attributes)


def _other_colour(obj, objects):
    # A colour absent from the image, so no detected object can match it.
    present = {o["colour"] for o in objects}
    return {**obj, "colour": next(c for c in COLOURS if c not in present)}


def _other_kind(obj, objects):
    return {**obj, "kind": KINDS[(KINDS.index(obj["kind"]) + 1) % len(KINDS)]}


def test_score_penalises_wrong_colour_and_kind(samples):
    wrong_colour = [score(s.image, _recaption(s, _other_colour)) for s in samples[:100]]
    assert max(s["colour"] for s in wrong_colour) == 0.0
    assert max(s["kind"] for s in wrong_colour) == 0.0
    assert np.mean([s["count"] for s in wrong_colour]) >= 0.98  # the objects are still all there
    wrong_kind = [score(s.image, _recaption(s, _other_kind)) for s in samples[:100]]
    assert np.mean([s["colour"] for s in wrong_kind]) >= 0.98
    # Two same-coloured objects can swap kinds into a partial match, so this is a mean, not a max.
    assert np.mean([s["kind"] for s in wrong_kind]) <= 0.1
    assert np.mean([s["position"] for s in wrong_kind]) <= 0.1
    assert all(s["overall"] < 0.9 for s in wrong_kind)
