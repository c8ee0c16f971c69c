"""The flux family on tiny FLUX-shaped pipelines saved to disk: conditioning, packing and transformer calls equal
FluxPipeline's, the schedule is FLUX.1-dev's dynamic shift at the training resolution, the guidance is embedded (dev)
or absent (schnell), the LoRA export loads with FluxPipeline.load_lora_weights as is, and FluxPipeline reproduces our
samplers' latents (fp32)."""

import dataclasses
from pathlib import Path

import pytest
import torch
from builders import CAPTIONS, card, save_tiny
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from worlds import flow_distill_cfg, loader_factory

from pcm.config import FLUX_LORA_TARGETS, LORA_TARGETS, ConfigError, TeacherConfig, config_from_dict
from pcm.math import flow_sigmas
from pcm.models.card import CONFIG_FILE
from pcm.models.families import FLUX_GUIDANCE_SCALE, ModelLoadError, load_teacher
from pcm.models.flux import latent_image_ids, pack_latents, unpack_latents
from pcm.models.lora import DIFFUSERS_FILE, attach_lora, export_lora, read_metadata
from pcm.models.tiny import build_tokenizer, tiny_flux_components
from pcm.sampling import Sampling, sample
from pcm.train.distill import distill
from pcm.train.step import TEACHER_GUIDANCE, make_loss

TOKENS = 8  # T5 tokens per prompt: short, so the tiny transformer's sequence stays small
SIDE = 16  # pixels; the tiny VAE's factor is 2, so latents are 8 x 8 and FLUX packs them into 4 x 4 = 16 tokens


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("flux") / "pipe", "flux")


def _teacher(path, **kw):
    return load_teacher(TeacherConfig(family="flux", model=str(path), max_sequence_length=TOKENS), resolution=SIDE,
                        **kw)


def _their_call(pipe, x, sigma, embeds, pooled, guidance):
    """FluxPipeline's transformer call on our unpacked latents (its packing, ids and timestep = t / 1000 = sigma)."""
    batch, channels, h, w = x.shape
    ids = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, x.device, x.dtype)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=FluxPipeline._pack_latents(x, batch, channels, h, w), timestep=sigma,
                               guidance=guidance, pooled_projections=pooled, encoder_hidden_states=embeds,
                               txt_ids=torch.zeros(embeds.shape[1], 3), img_ids=ids).sample
    return FluxPipeline._unpack_latents(out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor,
                                        pipe.vae_scale_factor)


def test_flux_conditioning_schedule_vae_and_transformer_call_equal_fluxpipelines(tiny):
    teacher, pipe = _teacher(tiny), FluxPipeline.from_pretrained(tiny)
    embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, max_sequence_length=TOKENS)
    cond = teacher.encode_prompts(CAPTIONS)
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds, rtol=0, atol=1e-5)  # T5's states
    torch.testing.assert_close(cond["pooled_projections"], pooled, rtol=0, atol=1e-5)  # CLIP-L's pooler output
    assert torch.equal(cond["guidance"], torch.full((2,), FLUX_GUIDANCE_SCALE)) and teacher.guidance_mode == "embedded"
    empty, empty_pooled, _ = pipe.encode_prompt([""] * 2, max_sequence_length=TOKENS)
    uncond = teacher.uncond(2)
    torch.testing.assert_close(uncond["encoder_hidden_states"], empty, rtol=0, atol=1e-5)
    torch.testing.assert_close(uncond["pooled_projections"], empty_pooled, rtol=0, atol=1e-5)
    # FLUX.1-dev's dynamic shift at 16 px: what its scheduler makes of our unshifted grid with the pipeline's mu
    config = pipe.scheduler.config
    seq_len = (SIDE // (pipe.vae_scale_factor * 2)) ** 2
    mu = calculate_shift(seq_len, config.base_image_seq_len, config.max_image_seq_len, config.base_shift,
                         config.max_shift)
    theirs = FlowMatchEulerDiscreteScheduler.from_config(config)
    theirs.set_timesteps(sigmas=(torch.arange(1000, 0, -1) / 1000).tolist(), mu=mu)
    assert teacher.schedule.kind == "flow" and teacher.image_seq_len == seq_len == 16
    torch.testing.assert_close(teacher.schedule.table[1:], theirs.sigmas[:-1].flip(0)[1:], rtol=0, atol=1e-6)
    assert teacher.schedule.table[0] == 0 and not torch.equal(teacher.schedule.table, flow_sigmas(1000))
    # packing and ids exactly as FluxPipeline's; the velocity equals its transformer call with the embedded guidance
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 300])
    assert torch.equal(pack_latents(x), FluxPipeline._pack_latents(x, 2, 16, 8, 8))
    assert torch.equal(unpack_latents(pack_latents(x), 8, 8), x)
    assert torch.equal(latent_image_ids(4, 4), FluxPipeline._prepare_latent_image_ids(2, 4, 4, "cpu", torch.float32))
    sigma = teacher.schedule.table[t]
    expected = _their_call(pipe, x, sigma, embeds, pooled, torch.full((2,), FLUX_GUIDANCE_SCALE))
    torch.testing.assert_close(teacher.eps_fn(x, t, cond), expected, rtol=0, atol=1e-5)
    assert teacher.latent_shape(SIDE) == (16, 8, 8)
    # the VAE's FLUX shift and scaling
    pixels = torch.rand(1, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        z = teacher.vae.encode(pixels).latent_dist.mean
    torch.testing.assert_close(teacher.encode_images(pixels, mean=True), (z - 0.1159) * 0.3611)


def test_schnell_has_no_guidance_input_and_an_unshifted_schedule(tmp_path):
    torch.manual_seed(0)
    FluxPipeline(**tiny_flux_components(build_tokenizer(CAPTIONS), guidance_embeds=False)).save_pretrained(tmp_path)
    teacher, pipe = _teacher(tmp_path, with_vae=False), FluxPipeline.from_pretrained(tmp_path)
    cond = teacher.encode_prompts(CAPTIONS)
    assert "guidance" not in cond and teacher.guidance_mode == "none" and teacher.image_seq_len is None
    assert torch.equal(teacher.schedule.table, flow_sigmas(1000, 1.0))
    x, t = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([999, 300])
    embeds, pooled, _ = pipe.encode_prompt(CAPTIONS, max_sequence_length=TOKENS)
    expected = _their_call(pipe, x, teacher.schedule.table[t], embeds, pooled, None)
    torch.testing.assert_close(teacher.eps_fn(x, t, cond), expected, rtol=0, atol=1e-5)
    # the solver calls schnell once, unguided: a w range would be silently unused, so it is refused
    cfg = config_from_dict({"teacher": {"family": "flux", "model": str(tmp_path)}, "data": {"resolution": SIDE}})
    assert set(TEACHER_GUIDANCE) == {"cfg", "embedded", "none"}
    with pytest.raises(ValueError, match="distill.w_max=0"):
        make_loss(cfg.distill, None, teacher.schedule, 0, 0.0, teacher.guidance_mode)
    unguided = dataclasses.replace(cfg.distill, w_min=0.0, w_max=0.0)
    assert make_loss(unguided, None, teacher.schedule, 0, 0.0, teacher.guidance_mode).teacher_guidance == "none"


def test_flux_config_defaults_and_refusals(tiny):
    base = {"teacher": {"family": "flux", "model": str(tiny)}, "data": {"resolution": SIDE}}
    assert config_from_dict(base).lora.target_modules == FLUX_LORA_TARGETS  # the UNet list left as is: FLUX's
    assert config_from_dict(base, ["lora.target_modules=[to_q]"]).lora.target_modules == ("to_q",)
    assert config_from_dict({}).lora.target_modules == LORA_TARGETS  # other families keep theirs
    for override, key in [("adversarial.weight=0.1", "adversarial.weight"), ("teacher.t5=false", "teacher.t5"),
                          ("data.resolution=24", "data.resolution")]:
        with pytest.raises(ConfigError, match=key):
            config_from_dict(base, [override])
    with pytest.raises(ModelLoadError, match="resolution="):  # the dynamic shift needs the training side
        load_teacher(TeacherConfig(family="flux", model=str(tiny)), with_vae=False, with_text=False)


def test_lora_loads_with_load_lora_weights_and_fluxpipeline_reproduces_our_samplers(tiny, tmp_path):
    teacher, x_T = _teacher(tiny), torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    prompt = CAPTIONS[:1]
    cond, neg = teacher.encode_prompts(prompt), teacher.uncond(1)
    params = attach_lora(teacher.backbone, rank=4, alpha=8, target_modules=FLUX_LORA_TARGETS)
    adapted = {n.rsplit(".lora_", 1)[0] for n, _ in teacher.backbone.named_parameters() if "lora_" in n}
    double = {f"transformer_blocks.0.{m}" for m in FLUX_LORA_TARGETS}
    single = {f"single_transformer_blocks.0.attn.{m}" for m in ("to_q", "to_k", "to_v")}
    assert adapted == double | single  # diffusers' train_dreambooth_lora_flux.py layout
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    written = dataclasses.replace(card("flux", str(tiny)), num_phases=4, edges=(0, 239, 499, 739), num_solver_steps=50)
    files = export_lora(teacher.backbone, tmp_path / "lora", written)
    assert set(files) == {"diffusers", "config"} and read_metadata(files["diffusers"]) == written
    assert sorted(p.name for p in (tmp_path / "lora").iterdir()) == sorted([DIFFUSERS_FILE, CONFIG_FILE])

    pipe = FluxPipeline.from_pretrained(tiny)
    pipe.load_lora_weights(tmp_path / "lora")  # no conversion step
    embeds, pooled, _ = pipe.encode_prompt(prompt, max_sequence_length=TOKENS)
    empty, empty_pooled, _ = pipe.encode_prompt([""], max_sequence_length=TOKENS)

    def theirs(how: Sampling, sigmas: bool = True) -> torch.Tensor:
        """FluxPipeline as its users run it: its own dynamic shift of the unshifted sigmas of our path (or its
        default linspace(1, 1/K, K)), the embedded guidance at its default, true CFG as our guidance_scale."""
        path = how.timesteps(1000)
        assert path[-1] == 0
        latents = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=empty,
                       negative_pooled_prompt_embeds=empty_pooled, true_cfg_scale=how.guidance_scale,
                       guidance_scale=FLUX_GUIDANCE_SCALE, latents=pack_latents(x_T), height=SIDE, width=SIDE,
                       sigmas=[(t + 1) / 1000 for t in path[:-1]] if sigmas else None, num_inference_steps=how.steps,
                       max_sequence_length=TOKENS, output_type="latent").images
        return unpack_latents(latents, 8, 8)

    for how in (Sampling(written, steps=4), Sampling(written, steps=2)):  # PCM at its edges, and skipping edges
        torch.testing.assert_close(sample(teacher.eps_fn, x_T, cond, neg, teacher.schedule, how), theirs(how),
                                   rtol=0, atol=2e-5)
    pipe.disable_lora()
    with torch.no_grad():
        teacher.backbone.disable_adapters()
    for scale in (1.0, 2.0):  # the teacher's own Euler: FLUX's default sigmas; 2 = true CFG over the encoded ""
        euler = Sampling(None, steps=4, guidance_scale=scale)
        torch.testing.assert_close(sample(teacher.eps_fn, x_T, cond, neg, teacher.schedule, euler),
                                   theirs(euler, sigmas=False), rtol=0, atol=2e-5)


def test_pcm_distill_trains_and_exports_a_flux_lora(tmp_path):
    root = tmp_path
    cfg = flow_distill_cfg(root, "flux", SIDE, TOKENS)
    summary = distill(cfg, loader_factory(cfg), progress=False)
    assert summary["steps"] == 2 and summary["nonfinite_steps"] == 0 and Path(summary["validation_grid"]).is_file()
    written = read_metadata(summary["lora"])
    assert written.family == "flux" and written.edges == (0, 499) and written.sampling_timesteps == [999, 499, 0]
    pipe = FluxPipeline.from_pretrained(root / "teacher")
    pipe.load_lora_weights(Path(summary["lora"]).parent)
    trained = {n for n, _ in pipe.transformer.named_parameters() if "lora" in n}
    assert trained and not any("proj_mlp" in n or "single_transformer_blocks.0.proj_out" in n for n in trained)
