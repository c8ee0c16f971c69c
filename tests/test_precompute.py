"""`pcm precompute`: latents and text states keyed to the teacher, and a distillation that reads them matches the
on-the-fly one."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from builders import save_tiny
from worlds import world_cfg

from pcm import stages
from pcm.config import config_from_dict
from pcm.data.digest import prepared_digest
from pcm.data.loader import loader_factory
from pcm.data.precompute import find_latents, precomputed_dir, stored_text, teacher_key, text_key
from pcm.rng import U_DROP, keyed_draws
from pcm.train.distill import Precomputed, _encode, _nets, setup

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def own_world(shapes_world, tmp_path):
    """A copy of the prepared data, so precomputed latents stay out of the shared world."""
    root, base = shapes_world
    shutil.copytree(base["data"]["output_dir"], tmp_path / "prepared")
    return {**base, "data": {**base["data"], "output_dir": str(tmp_path / "prepared")}}


def test_precomputed_latents_give_the_same_losses_and_no_vae_or_text_encoder_is_loaded(own_world, tmp_path):
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

    run = setup(pre, loader_factory(pre, folder), None, Precomputed(True, *stored_text(folder)))
    assert run.teacher.vae is None and not run.teacher.text_encoders  # validate_every=0: no grid, no prompts
    batch = next(iter(run.data))
    assert "latent" in batch and "pixels" not in batch
    assert batch["text_hidden"].dtype == torch.float16 and batch["text_hidden"].shape[0] == len(batch["key"])


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


SD3_TOKENS = {"max_sequence_length": 8}  # the tiny SD3 teacher's T5 tokens: a short joint-attention sequence


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sd3"])
def test_a_step_on_precomputed_text_equals_one_encoding_the_captions(own_world, tmp_path, family):
    """Same batch, same draws (caption dropout at 0.5, so the stored empty prompt is used): the step's loss with the
    stored text states equals the loss with the captions encoded now, and the conditions equal the encoded ones
    rounded to fp16 (what is stored). sd3's uncond is the encoded "" with its pooled projection: both stored."""
    teacher = {"family": family, "model": str(save_tiny(tmp_path / "teacher", family)),
               **(SD3_TOKENS if family == "sd3" else {})}
    cfg = world_cfg(own_world, tmp_path / "run", teacher=teacher, distill={"caption_dropout": 0.5})
    folder = Path(stages.precompute(cfg, progress=False)["output_dir"])
    assert find_latents(cfg) == folder and (folder / "empty_prompt.npy").is_file() == (family != "sdxl")
    assert (folder / "empty_pooled.npy").is_file() == (family == "sd3")
    with_text, empty = stored_text(folder)
    pre = setup(cfg, loader_factory(cfg, folder), None, Precomputed(True, with_text, empty))
    assert with_text and not pre.teacher.text_encoders
    fly = setup(cfg, loader_factory(cfg, folder), None, Precomputed(latents=True))  # encoders loaded
    batch = next(iter(pre.data))
    captions = {k: v for k, v in batch.items() if not k.startswith("text_")}
    stored, encoded = _encode(pre, cfg, batch, 0), _encode(fly, cfg, captions, 0)
    for key, value in encoded.cond.items():
        half = value.half().float() if key != "time_ids" else value  # time ids are recomputed, not stored
        torch.testing.assert_close(stored.cond[key], half, rtol=0, atol=0)
        torch.testing.assert_close(stored.uncond[key], encoded.uncond[key].half().float() if key != "time_ids"
                                   else encoded.uncond[key], rtol=0, atol=0)
    drop = keyed_draws(cfg.seed, 0, stored.ids, tuple(stored.x_0.shape[1:])).u[:, U_DROP] < 0.5
    assert drop.any() and not drop.all()  # both the captions' and the empty condition enter the loss
    losses = [run.loss(_nets(run, "g"), b, 0, "g")["loss"].item() for run, b in ((pre, stored), (fly, encoded))]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)  # fp16 storage: measured 3e-6 to 6e-6


def test_sd3_distills_on_precomputed_latents_and_text_without_its_encoders_at_the_same_loss(own_world, tmp_path):
    """The tiny SD3 teacher: `pcm distill` on precomputed latents and text (T5's states and the pooled projections
    included) loads no VAE and no text encoder, and its first steps' losses are those of the run encoding images and
    captions on the fly (fp16 storage apart)."""
    teacher = {"family": "sd3", "model": str(save_tiny(tmp_path / "teacher", "sd3")), **SD3_TOKENS}
    train = {"max_steps": 2, "log_every": 1, "checkpoint_every": 100}
    fly = world_cfg(own_world, tmp_path / "fly", teacher=teacher, train=train, distill={"caption_dropout": 0.5})
    stages.distill(fly, progress=False)
    meta = stages.precompute(fly, progress=False)
    folder = Path(meta["output_dir"])
    assert meta["text"]["pooled"] == "text_pooled.npy" and meta["text"]["empty_pooled"] == "empty_pooled.npy"
    with_text, (states, pooled) = stored_text(folder)
    assert with_text and states.shape == (1, 77 + 8, 192) and pooled.shape == (1, 96)  # tiny: CLIP 77 + T5 8 tokens
    pre = world_cfg(own_world, tmp_path / "pre", teacher=teacher, train=train, distill={"caption_dropout": 0.5})
    run = setup(pre, loader_factory(pre, folder), None, Precomputed(True, with_text, (states, pooled)))
    assert run.teacher.vae is None and not run.teacher.text_encoders
    torch.testing.assert_close(run.teacher.uncond(1)["pooled_projections"], pooled.float())  # the stored ""
    stages.distill(pre, progress=False)
    losses = _losses(tmp_path / "fly")
    assert len(losses) == 2 and _losses(tmp_path / "pre") == pytest.approx(losses, rel=1e-3)


def test_a_changed_t5_setting_is_another_text_key():
    """sd3's text states depend on teacher.t5 and teacher.max_sequence_length; other families' keys ignore them."""
    def key(family: str, **teacher) -> str:
        return text_key(config_from_dict({"teacher": {"family": family, "model": "org/hub-model", **teacher}}))

    assert len({key("sd3"), key("sd3", t5=False), key("sd3", max_sequence_length=77)}) == 3
    assert key("sd15") == key("sd15", t5=False) == key("sd15", max_sequence_length=77)


def test_the_folder_key_covers_the_text_encoders_and_old_folders_still_train(own_world, tmp_path):
    cfg = world_cfg(own_world, tmp_path / "run")
    teacher = Path(tmp_path / "teacher")
    shutil.copytree(cfg.teacher.model, teacher)
    moved = world_cfg(own_world, tmp_path / "run", teacher={"model": str(teacher)})
    image_key, txt_key, folder = teacher_key(moved), text_key(moved), precomputed_dir(moved)
    weights = next((teacher / "text_encoder").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # the text encoder retrained in place: the same latents, other text states
    weights.write_bytes(bytes(data))
    assert teacher_key(moved) == image_key and text_key(moved) != txt_key and precomputed_dir(moved) != folder

    # a folder written before text was stored: found under its latents-only key, read, text encoded on the fly
    old = Path(stages.precompute(moved, progress=False)["output_dir"])
    legacy = old.parent / _legacy_key(moved)
    _strip_text(old, legacy)
    assert find_latents(moved) == legacy and stored_text(legacy) == (False, None)
    run = setup(moved, loader_factory(moved, legacy), None, Precomputed(True, *stored_text(legacy)))
    assert run.teacher.text_encoders and "text_hidden" not in next(iter(run.data))
    train = {"max_steps": 1, "log_every": 1, "checkpoint_every": 100}
    assert stages.distill(world_cfg(own_world, tmp_path / "old", teacher={"model": str(teacher)}, train=train),
                          progress=False)["steps"] == 1


def _legacy_key(cfg) -> str:
    """The folder key `pcm precompute` used before it stored text (teacher_key and the prepared data)."""
    from pcm.data.digest import digest

    return digest([teacher_key(cfg), prepared_digest(cfg.data.output_dir)])


def _strip_text(folder: Path, out: Path) -> None:
    """A copy of a precomputed folder as written before text was stored: latents only, no text in meta.json."""
    import io
    import tarfile

    out.mkdir()
    for path in folder.iterdir():
        if path.suffix == ".tar":
            with tarfile.open(path) as src, tarfile.open(out / path.name, "w") as dst:
                for member in src.getmembers():
                    if ".text_" not in member.name:
                        dst.addfile(member, io.BytesIO(src.extractfile(member).read()))
        elif path.name == "meta.json":
            meta = json.loads(path.read_text())
            meta.pop("text")
            (out / path.name).write_text(json.dumps(meta))
        elif path.name != "empty_prompt.npy":
            shutil.copy(path, out / path.name)
    shutil.rmtree(folder)
