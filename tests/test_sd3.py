"""The sd3 family on a tiny SD3-shaped pipeline saved to disk: conditioning and backbone calls equal diffusers', the
VAE's shift, LoRA export that StableDiffusion3Pipeline.load_lora_weights reads as is, and the pipeline with
FlowMatchEulerDiscreteScheduler reproducing our sampler's latents (fp32)."""

import dataclasses
from pathlib import Path

import pytest
import torch
from builders import CAPTIONS, card, save_tiny
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from worlds import flow_distill_cfg, loader_factory

from pcm.config import LORA_TARGETS, TeacherConfig
from pcm.math import flow_sigmas
from pcm.models.card import CONFIG_FILE
from pcm.models.families import load_teacher
from pcm.models.lora import DIFFUSERS_FILE, KOHYA_FILE, attach_lora, export_lora, read_metadata
from pcm.sampling import Sampling, sample
from pcm.train.distill import distill

TOKENS = 8  # T5 tokens per prompt: short, so the tiny transformer's sequence stays small


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("sd3") / "pipe", "sd3")


def _teacher(path, **kw):
    return load_teacher(TeacherConfig(family="sd3", model=str(path), max_sequence_length=TOKENS, **kw))


def _embeds(pipe, prompts):
    """diffusers' own encoding: (prompt_embeds, negative, pooled, negative pooled), negative prompt ""."""
    return pipe.encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=True, negative_prompt="",
                              negative_prompt_2="", negative_prompt_3="", max_sequence_length=TOKENS)


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
def test_sd3_conditioning_schedule_and_transformer_call_equal_diffusers(tiny, t5):
    without = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}  # diffusers' way to drop T5
    teacher, pipe = _teacher(tiny, t5=t5), StableDiffusion3Pipeline.from_pretrained(tiny, **without)
    embeds, negative, pooled, negative_pooled = _embeds(pipe, CAPTIONS)
    cond = teacher.encode_prompts(CAPTIONS)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=1e-5)
    uncond = teacher.uncond(2)
    torch.testing.assert_close(uncond["encoder_hidden_states"], negative, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncond["pooled_projections"], negative_pooled, rtol=0, atol=1e-5)
    # SD3's shifted rectified flow (shift 3), and the transformer reading timestep = 1000 sigma
    assert teacher.schedule.kind == "flow" and teacher.schedule.prediction == "flow" and teacher.abar is None
    assert torch.equal(teacher.schedule.table, flow_sigmas(1000, 3.0))
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 300])
    with torch.no_grad():
        theirs = pipe.transformer(hidden_states=x, timestep=teacher.schedule.table[t] * 1000,
                                  encoder_hidden_states=embeds, pooled_projections=pooled).sample
    torch.testing.assert_close(teacher.eps_fn(x, t, cond), theirs, rtol=0, atol=1e-5)
    states = cond["encoder_hidden_states"]
    assert len(teacher.text_encoders) == (3 if t5 else 2) and states.shape == (2, 77 + TOKENS, 192)
    assert states[:, 77:].any() == t5  # without T5 its part of the states is zeros


def test_vae_latents_carry_sd3s_shift_and_scaling(tiny):
    teacher = _teacher(tiny)
    pixels = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = teacher.encode_images(pixels, mean=True)
    with torch.no_grad():
        z = teacher.vae.encode(pixels).latent_dist.mean
        expected = (teacher.vae.decode(latents / 1.5305 + 0.0609).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(latents, (z - 0.0609) * 1.5305)
    torch.testing.assert_close(teacher.decode_latents(latents), expected)


def test_lora_loads_with_load_lora_weights_and_the_pipeline_reproduces_our_samplers(tiny, tmp_path):
    teacher, x_T = _teacher(tiny), torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    prompt = CAPTIONS[:1]
    cond, neg = teacher.encode_prompts(prompt), teacher.uncond(1)
    params = attach_lora(teacher.backbone, rank=4, alpha=8, target_modules=LORA_TARGETS)
    adapted = {n.rsplit(".lora_", 1)[0].split(".")[-1] for n, _ in teacher.backbone.named_parameters() if "lora_" in n}
    assert adapted == {"to_q", "to_k", "to_v", "0", "proj_out", "proj", "2"}  # the reference's SD3 modules
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    written = dataclasses.replace(card("sd3", str(tiny)), num_phases=4, edges=(0, 239, 499, 739), num_solver_steps=50)
    files = export_lora(teacher.backbone, tmp_path / "lora", written)
    assert set(files) == {"diffusers", "config"} and read_metadata(files["diffusers"]) == written
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == sorted([DIFFUSERS_FILE, CONFIG_FILE])
    assert not (tmp_path / "lora" / KOHYA_FILE).exists()

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny)
    pipe.load_lora_weights(tmp_path / "lora")  # no conversion step
    # the pipeline on our path: its Euler steps over the sigmas we visit (unshifted: ours are shifted already)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0)
    embeds, negative, pooled, negative_pooled = _embeds(pipe, prompt)

    def theirs(how: Sampling) -> torch.Tensor:
        path = how.timesteps(1000)
        assert path[-1] == 0
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=negative,
                    negative_pooled_prompt_embeds=negative_pooled, guidance_scale=how.guidance_scale,
                    sigmas=[float(teacher.schedule.table[t]) for t in path[:-1]], latents=x_T.clone(), height=16,
                    width=16, output_type="latent").images

    for how in (Sampling(written, steps=4), Sampling(written, steps=2)):  # PCM at its edges, and skipping edges
        ours = sample(teacher.eps_fn, x_T, cond, neg, teacher.schedule, how)
        torch.testing.assert_close(ours, theirs(how), rtol=0, atol=2e-5)
    pipe.disable_lora()
    with torch.no_grad():
        teacher.backbone.disable_adapters()
    euler = Sampling(None, steps=4, guidance_scale=3.0)  # the teacher's own Euler with CFG over the encoded ""
    torch.testing.assert_close(sample(teacher.eps_fn, x_T, cond, neg, teacher.schedule, euler), theirs(euler),
                               rtol=0, atol=2e-5)


def test_pcm_distill_trains_and_exports_an_sd3_lora(tmp_path):
    root = tmp_path
    cfg = flow_distill_cfg(root, "sd3", 16, TOKENS)
    summary = distill(cfg, loader_factory(cfg), progress=False)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0 and Path(summary["validation_grid"]).is_file()
    written = read_metadata(summary["lora"])
    assert written.family == "sd3" and written.edges == (0, 499) and written.sampling_timesteps == [999, 499, 0]
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "teacher")
    pipe.load_lora_weights(Path(summary["lora"]).parent)
    assert any("lora" in n for n, _ in pipe.transformer.named_parameters())
