"""`pcm precompute`: latents keyed to the teacher, and a distillation that reads them matches the on-the-fly one."""

import json
import shutil
from pathlib import Path

import pytest
from worlds import world_cfg

from pcm import stages
from pcm.data.digest import prepared_digest
from pcm.data.loader import loader_factory
from pcm.data.precompute import find_latents, precomputed_dir, teacher_key
from pcm.train.distill import setup

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def own_world(shapes_world, tmp_path):
    """A copy of the prepared data, so precomputed latents stay out of the shared world."""
    root, base = shapes_world
    shutil.copytree(base["data"]["output_dir"], tmp_path / "prepared")
    return {**base, "data": {**base["data"], "output_dir": str(tmp_path / "prepared")}}


def test_precomputed_latents_give_the_same_losses_and_no_vae_is_loaded(own_world, tmp_path):
    train = {"max_steps": 5, "log_every": 1, "checkpoint_every": 100}
    fly = world_cfg(own_world, tmp_path / "fly", train=train)
    assert find_latents(fly) is None
    stages.distill(fly, progress=False)

    meta = stages.precompute(fly, progress=False)
    assert meta["samples"] == 32 and meta["passed_through_unreadable"] == 0
    assert meta["teacher_key"] == teacher_key(fly) and meta["data_digest"] == prepared_digest(fly.data.output_dir)
    folder = find_latents(fly)
    assert folder == precomputed_dir(fly) and json.loads((folder / "index.json").read_text())["latents"]
    pre = world_cfg(own_world, tmp_path / "pre", train=train)
    stages.distill(pre, progress=False)
    assert _losses(tmp_path / "pre") == pytest.approx(_losses(tmp_path / "fly"), abs=1e-4)

    run = setup(pre, loader_factory(pre, folder), None, latents=True)
    assert run.teacher.vae is None  # validate_every=0: nothing needs the decoder
    assert "latent" in next(iter(run.data)) and "pixels" not in next(iter(run.data))


def test_the_key_changes_with_resolution_and_teacher_weights(own_world, tmp_path):
    cfg = world_cfg(own_world, tmp_path / "run")
    key = teacher_key(cfg)
    assert teacher_key(world_cfg(own_world, tmp_path / "other")) == key  # the output folder does not matter
    other_res = world_cfg(own_world, tmp_path / "run", data={"resolution": 32})
    assert teacher_key(other_res) != key
    teacher = Path(tmp_path / "teacher")
    shutil.copytree(cfg.teacher.model, teacher)
    moved = world_cfg(own_world, tmp_path / "run", teacher={"model": str(teacher)})
    assert teacher_key(moved) != key  # another reference
    before = teacher_key(moved)
    weights = next((teacher / "vae").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # retrained in place
    weights.write_bytes(bytes(data))
    assert teacher_key(moved) != before


def test_latents_of_another_teacher_are_refused(own_world, tmp_path):
    cfg = world_cfg(own_world, tmp_path / "run", train={"max_steps": 1})
    folder = Path(stages.precompute(cfg, progress=False)["output_dir"])
    other_teacher = tmp_path / "teacher"
    shutil.copytree(cfg.teacher.model, other_teacher)
    wrong = world_cfg(own_world, tmp_path / "run", train={"max_steps": 1},
                 teacher={"model": str(other_teacher)}, data={"output_dir": str(folder)})
    with pytest.raises(ValueError, match="run `pcm precompute` for this teacher"):
        stages.distill(wrong, progress=False)
