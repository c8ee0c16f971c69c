"""Evaluation knows a world through pcm.eval.known_world, not pcm.demo: what it plugs in is what scores the rows."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pcm import stages
from pcm.config import load_config
from pcm.eval.evaluate import Row, Scorers
from pcm.eval.known_world import KnownWorld

ROOT = Path(__file__).resolve().parents[1]


def _world(calls: list) -> KnownWorld:
    def features(cfg, progress):
        calls.append(("features", cfg.eval.features))
        return lambda images: torch.ones(len(images), 3, dtype=torch.float64) * images.mean()

    def oracle(image, prompt):
        calls.append(("oracle", prompt))
        return dict.fromkeys(Scorers.ORACLE, float(prompt == "right"))

    def motion_oracle(clip, prompt):
        calls.append(("motion", clip.shape))
        return dict.fromkeys(("colour", "kind", "count", "background", "motion", "overall"), 0.5)

    return KnownWorld(oracle=oracle, motion_oracle=motion_oracle, features=features)


def test_the_plugged_in_oracle_and_feature_net_score_images_and_clips():
    cfg = load_config(ROOT / "params.yaml", ["eval.clip_model=''", "eval.features=shapes", "eval.oracle=true"])
    calls = []
    scorers = Scorers(cfg, torch.device("cpu"), False, _world(calls))
    row = Row("m", "pcm", 2, 1.0)
    scorers.score(row, np.zeros((2, 8, 8, 3), dtype=np.uint8), ["right", "wrong"])
    scorers.score(row, np.zeros((1, 4, 8, 8, 3), dtype=np.uint8), ["moving"])
    assert calls == [("features", "shapes"), ("oracle", "right"), ("oracle", "wrong"), ("motion", (4, 8, 8, 3))]
    assert row.samples == 3 and row.features.count == 2 + 4  # two images, then a clip's four frames
    assert row.sums["oracle_position"] == (1.0, 2) and row.sums["oracle_motion"] == (0.5, 1)
    assert row.sums["oracle_overall"] == (1.5, 3)


@pytest.mark.parametrize("overrides, what", [(["eval.oracle=true", "eval.features=inception"], "eval.oracle"),
                                             (["eval.oracle=false", "eval.features=shapes"], "eval.features=shapes")])
def test_without_a_world_the_oracle_and_the_shapes_features_fail_naming_the_setting(overrides, what, tmp_path):
    weights = tmp_path / "inception.safetensors"  # never read: the oracle is checked first
    cfg = load_config(ROOT / "params.yaml", ["eval.clip_model=''", f"eval.inception_weights={weights}", *overrides])
    with pytest.raises(ValueError, match=f"{what} needs a known world.*pcm.stages.evaluate"):
        Scorers(cfg, torch.device("cpu"), False)


def test_stages_plugs_in_the_demo_shapes_world():
    from pcm.demo import motion, oracle

    world = stages._shapes_world()
    assert world.oracle is oracle.score and world.motion_oracle is motion.score_clip
