"""The animatediff family on a tiny AnimateDiff pipeline saved to disk: loading (pipeline dir, or SD1.5 + adapter),
5-D latents, LoRA on spatial / motion layers, export into AnimateDiffPipeline, and a few distillation steps."""

import json
import math

import pytest
import torch
from builders import VIDEO_CAPTIONS, card, save_tiny_animatediff
from diffusers import AnimateDiffPipeline, TCDScheduler, UNetMotionModel

from pcm.config import LORA_TARGETS, ConfigError, TeacherConfig, config_from_dict
from pcm.models.card import read_card
from pcm.models.families import ModelLoadError, load_teacher
from pcm.models.lora import attach_lora, export_lora, load_lora
from pcm.sampling import sample_pcm
from pcm.train.distill import distill

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

FRAMES = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_animatediff(tmp_path_factory.mktemp("animatediff"))


def _inputs(teacher):
    x = torch.randn(2, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([999, 10]), teacher.encode_prompts(VIDEO_CAPTIONS)


def test_both_layouts_load_to_the_same_motion_unet_with_per_frame_conditioning(tiny):
    from_pipeline = load_teacher(TeacherConfig(family="animatediff", model=str(tiny["pipeline"])))
    from_parts = load_teacher(TeacherConfig(family="animatediff", model=str(tiny["sd15"]),
                                            motion_adapter=str(tiny["adapter"])))
    assert isinstance(from_pipeline.backbone, UNetMotionModel) and isinstance(from_parts.backbone, UNetMotionModel)
    x, t, cond = _inputs(from_pipeline)
    assert cond["encoder_hidden_states"].shape == (2, 77, 32)  # SD1.5 conditioning, one state per clip
    eps = from_pipeline.eps_fn(x, t, cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    torch.testing.assert_close(from_parts.eps_fn(x, t, cond), eps, rtol=0, atol=1e-6)
    # the frames interact: changing one frame changes the others' eps (the motion modules mix along time)
    x2 = x.clone()
    x2[:, :, 0] += 1.0
    assert (from_pipeline.eps_fn(x2, t, cond)[:, :, 1:] - eps[:, :, 1:]).abs().max() > 1e-4
    # clips are VAE-coded frame by frame: (B, F, 3, H, W) <-> (B, C, F, h, w)
    pixels = torch.rand(2, FRAMES, 3, 16, 16) * 2 - 1
    latents = from_pipeline.encode_images(pixels, mean=True)
    assert latents.shape == (2, 4, FRAMES, 8, 8)
    torch.testing.assert_close(latents[:, :, 2], from_pipeline.encode_images(pixels[:, 2], mean=True))
    assert from_pipeline.decode_latents(latents).shape == (2, FRAMES, 3, 16, 16)
    assert from_pipeline.latent_shape(16, FRAMES) == (4, FRAMES, 8, 8)


def test_bad_animatediff_references_name_the_key(tiny, tmp_path):
    with pytest.raises(ModelLoadError, match="teacher.motion_adapter"):
        load_teacher(TeacherConfig(family="animatediff", model=str(tiny["sd15"])))  # a plain SD1.5 UNet
    with pytest.raises(ModelLoadError, match="teacher.motion_adapter=.*no such directory"):
        load_teacher(TeacherConfig(family="animatediff", model=str(tiny["sd15"]),
                                   motion_adapter=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="teacher.motion_adapter"):
        TeacherConfig(family="sd15", motion_adapter="guoyww/animatediff-motion-adapter-v1-5-2")
    with pytest.raises(ConfigError, match="lora.layers"):
        config_from_dict({"lora": {"layers": "motion"}})
    with pytest.raises(ConfigError, match="adversarial.weight"):
        config_from_dict({"teacher": {"family": "animatediff"}, "adversarial": {"weight": 0.1}})


@pytest.mark.parametrize("layers", ["all", "spatial", "motion"])
def test_lora_layers_select_spatial_or_motion_modules(tiny, layers):
    teacher = load_teacher(TeacherConfig(family="animatediff", model=str(tiny["pipeline"])))
    attach_lora(teacher.backbone, rank=2, alpha=2, target_modules=LORA_TARGETS, layers=layers)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in teacher.backbone.named_parameters() if ".lora_" in n}
    motion = {n for n in adapted if ".motion_modules." in n}
    assert motion if layers != "spatial" else not motion
    assert (adapted - motion) if layers != "motion" else adapted == motion
    if layers == "all":
        assert any(n.endswith("attn1.to_q") for n in motion) and any(n.endswith("resnets.0.conv1") for n in adapted)


def test_exported_lora_loads_into_animatediff_pipeline_and_reproduces_the_student(tiny, tmp_path):
    teacher = load_teacher(TeacherConfig(family="animatediff", model=str(tiny["pipeline"])))
    params = attach_lora(teacher.backbone, rank=4, alpha=4, target_modules=LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    x, t, cond = _inputs(teacher)
    student = teacher.eps_fn(x, t, cond)
    timesteps = [999, 499, 0]
    x_0 = sample_pcm(teacher.eps_fn, x, cond, teacher.abar, timesteps)
    export_lora(teacher.backbone, tmp_path / "lora", card("animatediff", str(tiny["pipeline"])))

    # diffusers' own pipeline, built from the SD1.5 directory and the adapter, with the exported LoRA
    pipe = AnimateDiffPipeline.from_pretrained(tiny["sd15"], motion_adapter=_adapter(tiny))
    pipe.load_lora_weights(tmp_path / "lora")
    fresh = load_teacher(TeacherConfig(family="animatediff", model=str(tiny["pipeline"])))
    fresh.backbone = pipe.unet
    torch.testing.assert_close(fresh.eps_fn(x, t, cond), student, rtol=0, atol=1e-5)
    # deterministic PCM through the pipeline: TCD with gamma 0 over the LoRA's sampling timesteps
    scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    set_timesteps = scheduler.set_timesteps
    scheduler.set_timesteps = lambda num_inference_steps=None, device=None, **_: set_timesteps(
        device=device, timesteps=timesteps[:-1])
    pipe.scheduler = scheduler
    video = pipe(prompt_embeds=cond["encoder_hidden_states"], negative_prompt_embeds=None, num_frames=FRAMES,
                 height=16, width=16, num_inference_steps=2, guidance_scale=1.0, eta=0.0, latents=x.clone(),
                 output_type="latent").frames
    torch.testing.assert_close(video, x_0, rtol=0, atol=1e-4)
    # and our own loader path (the one evaluation uses) gives the same student
    other = load_teacher(TeacherConfig(family="animatediff", model=str(tiny["pipeline"])))
    load_lora(other.backbone, tmp_path / "lora", "pcm")
    torch.testing.assert_close(other.eps_fn(x, t, cond), student, rtol=0, atol=1e-5)


def _adapter(tiny):
    from diffusers import MotionAdapter

    return MotionAdapter.from_pretrained(tiny["adapter"])


def _clip_batches(batch_size: int):
    """Endless (B, F, 3, H, W) clip batches in [-1, 1]: a bright square sliding left, with its caption."""

    class Clips:
        def __iter__(self):
            gen, batch = torch.Generator().manual_seed(0), 0
            while True:
                pixels = torch.full((batch_size, FRAMES, 3, 16, 16), -0.5)
                for f in range(FRAMES):
                    pixels[:, f, 0, 6:10, 12 - 3 * f:16 - 3 * f] = 1.0
                pixels += 0.05 * torch.randn(pixels.shape, generator=gen)
                yield {"pixels": pixels, "caption": [VIDEO_CAPTIONS[0]] * batch_size,
                       "original_size": torch.full((batch_size, 2), 16), "crop_top_left": torch.zeros(batch_size, 2),
                       "skipped": 0, "position": (0, batch)}
                batch += 1

        def next_position(self, position):
            return position[0], position[1] + 1

    return lambda micro, rank, world, start: Clips()


def test_a_few_distillation_steps_on_clips_train_and_export(tiny, tmp_path):
    cfg = config_from_dict({
        "teacher": {"family": "animatediff", "model": str(tiny["sd15"]), "motion_adapter": str(tiny["adapter"])},
        "data": {"resolution": 16, "frames": FRAMES},
        "lora": {"rank": 4, "alpha": 4.0, "layers": "motion"},
        "distill": {"num_solver_steps": 20, "num_phases": 2},
        "train": {"batch_size": 2, "max_steps": 3, "learning_rate": 1e-2, "validate_every": 3, "log_every": 1,
                  "output_dir": str(tmp_path / "run")},
        "validation": {"prompts": [VIDEO_CAPTIONS[0]], "seeds": [0]},
    })
    summary = distill(cfg, _clip_batches(2), progress=False)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert summary["steps"] == 3 and summary["nonfinite_steps"] == 0 and losses and all(map(math.isfinite, losses))
    lora = tmp_path / "run" / "lora"
    written = read_card(lora)
    assert written.frames == FRAMES and written.lora_layers == "motion" and written.family == "animatediff"
    # the trained adapter moved away from the teacher (B started at 0) on the motion modules only
    teacher = load_teacher(cfg.teacher)
    x, t, cond = _inputs(teacher)
    base = teacher.eps_fn(x, t, cond)
    load_lora(teacher.backbone, lora, "pcm")
    assert all(".motion_modules." in n for n, _ in teacher.backbone.named_parameters() if ".lora_" in n)
    assert (teacher.eps_fn(x, t, cond) - base).abs().max() > 1e-5
    assert (tmp_path / "run" / "samples" / "step-000003.png").is_file()  # validation strip of one clip
