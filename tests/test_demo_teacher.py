"""The demo-teacher stage end to end at toy widths: it saves a diffusers pipeline that loads and generates.

The quality bars (PSNR, oracle accuracies at the default config) take minutes and are measured by a full run,
not here.
"""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from worlds import prepared_shapes

from pcm.config import ConfigError, load_config
from pcm.demo.teacher import _build, _family, load_prepared, train_demo_teacher

TOY = ["demo_teacher.vae_channels=[8, 16, 16]", "demo_teacher.unet_channels=[16, 16, 32]",
       "demo_teacher.text_hidden=16",
       "demo_teacher.text_layers=1", "demo_teacher.vae_steps=3", "demo_teacher.unet_steps=3",
       "demo_teacher.vae_batch_size=8", "demo_teacher.unet_batch_size=8", "demo_teacher.holdout=8",
       "demo_teacher.eval_prompts=2", "demo_teacher.eval_steps=2"]
METRIC_KEYS = {"vae_psnr_db", "scaling_factor", "main_colour_acc", "main_kind_acc", "main_position_acc",
               "oracle_mean", "chance", "vae_recon", "steps", "seconds", "total_seconds"}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 40-image shapes world, prepared at 32 px in two shards."""
    return prepared_shapes(tmp_path_factory.mktemp("shapes"))


def _config(prepared, out, family="sd15", extra=()):
    return load_config("params.yaml", [f"data.output_dir={prepared}", f"demo_teacher.output_dir={out}",
                                       f"demo_teacher.family={family}", *TOY, *extra])


def _check_saved(out, metrics, pipeline_cls):
    assert METRIC_KEYS <= set(metrics)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert not list(out.parent.glob(f".{out.name}.*")), "the temp dir must be renamed, not left behind"
    pipe = pipeline_cls.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(metrics["scaling_factor"])
    assert pipe.vae.config.scaling_factor != 0.18215  # measured, not diffusers' default
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle in the center on a gray background", num_inference_steps=2,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def test_sd15_teacher_saves_a_loadable_pipeline_and_is_seeded(prepared, tmp_path):
    out = tmp_path / "teacher"
    metrics = train_demo_teacher(_config(prepared, out), progress=False)
    _check_saved(out, metrics, StableDiffusionPipeline)
    assert metrics["steps"] == {"vae": 3, "unet": 3, "eval_ddim": 2} and metrics["train_images"] == 32
    assert 0 <= metrics["main_colour_acc"] <= 1 and metrics["chance"]["colour"] == pytest.approx(1 / 6)
    weights = (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()

    again = train_demo_teacher(_config(prepared, out), progress=False)  # same seed, same dir: replaced in place
    assert again["final_loss"] == metrics["final_loss"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == weights


def test_sdxl_teacher_saves_a_loadable_pipeline(prepared, tmp_path):
    out = tmp_path / "teacher-xl"
    metrics = train_demo_teacher(_config(prepared, out, "sdxl"), progress=False)
    _check_saved(out, metrics, StableDiffusionXLPipeline)
    assert metrics["family"] == "sdxl"


def test_missing_prepared_data_names_the_key_and_the_fix(tmp_path):
    cfg = _config(tmp_path / "nothing", tmp_path / "teacher")
    with pytest.raises(FileNotFoundError, match=r"data.output_dir=.*run `pcm demo-data` and `pcm prepare`"):
        train_demo_teacher(cfg, progress=False)
    assert not (tmp_path / "teacher").exists()


def test_holdout_must_leave_training_data(prepared, tmp_path):
    cfg = _config(prepared, tmp_path / "teacher", extra=["demo_teacher.holdout=40"])
    with pytest.raises(ValueError, match="demo_teacher.holdout=40"):
        train_demo_teacher(cfg, progress=False)


def test_load_prepared_reads_every_sample(prepared):
    pixels, captions = load_prepared(prepared)
    assert pixels.shape == (40, 3, 32, 32) and pixels.dtype == torch.uint8 and len(captions) == 40


def test_config_and_family_errors_list_the_allowed_values(prepared, tmp_path):
    with pytest.raises(ConfigError, match="demo_teacher.eval_prompts=9"):
        _config(prepared, tmp_path, extra=["demo_teacher.eval_prompts=9"])
    with pytest.raises(ConfigError, match=r"demo_teacher.attention_from=2: must be in \[0, 1\]"):
        _config(prepared, tmp_path, extra=["demo_teacher.attention_from=2"])
    with pytest.raises(ConfigError, match="demo_teacher.device"):
        _config(prepared, tmp_path, extra=["demo_teacher.device=tpu"])
    with pytest.raises(ValueError, match="allowed: sd15, sdxl"):
        _family("sd3")


@pytest.mark.parametrize(("attention_from", "down"), [
    (0, ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
    (1, ("DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")),
])
def test_attention_from_sets_the_unet_layout(prepared, tmp_path, attention_from, down):
    cfg = _config(prepared, tmp_path, extra=[f"demo_teacher.attention_from={attention_from}"])
    unet = _build(cfg, ["a red circle in the center on a gray background"])["unet"]
    assert tuple(unet.config.down_block_types) == down
    assert tuple(unet.config.up_block_types) == tuple(b.replace("Down", "Up") for b in reversed(down))


def test_the_noise_weight_cap_weighs_each_step_by_min_inverse_abar_cap_and_cap_1_is_the_plain_loss(prepared):
    """EpsLoss at cap 1 is F.mse_loss itself; at cap c each sample's squared error counts min(1 / abar_t, c),
    divided by the weights' mean over t, replayed here draw by draw from the same generator state."""
    from pcm.demo.teacher import EpsLoss

    pixels, captions = load_prepared(prepared)
    for cap in (1.0, 20.0):
        cfg = _config(prepared, prepared.parent / "unused", extra=[f"demo_teacher.noise_weight_cap={cap}"])
        torch.manual_seed(0)
        parts = _build(cfg, captions + [""])
        latents = torch.randn(8, 4, 16, 16), torch.full((8, 4, 16, 16), 0.1), 1.0
        loss = EpsLoss(parts, latents, captions[:8], cfg.demo_teacher, torch.Generator().manual_seed(1))
        idx = torch.arange(4)
        with torch.no_grad():
            value = loss(idx)
            g = torch.Generator().manual_seed(1)  # the draws in EpsLoss's order
            noise = torch.randn(latents[0][idx].shape, generator=g)
            x_0 = latents[0][idx] + latents[1][idx] * noise
            eps = torch.randn(x_0.shape, generator=g)
            t = torch.randint(0, 1000, (4,), generator=g)
            drop = torch.rand(4, generator=g) < cfg.demo_teacher.caption_dropout
            ids = torch.where(drop[:, None], loss.empty_ids.expand_as(loss.ids[idx]), loss.ids[idx])
            eps_hat = parts["unet"](parts["scheduler"].add_noise(x_0, eps, t), t,
                                    encoder_hidden_states=parts["text_encoder"](ids)[0]).sample
            per_sample = (eps_hat - eps).square().flatten(1).mean(1)
            abar = parts["scheduler"].alphas_cumprod
            weights = (1 / abar).clamp(max=cap)
            expected = (weights[t] / weights.mean() * per_sample).mean()
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    with pytest.raises(ConfigError, match="demo_teacher.noise_weight_cap=0.5"):
        _config(prepared, prepared.parent / "unused", extra=["demo_teacher.noise_weight_cap=0.5"])
