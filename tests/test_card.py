"""The model card: written once from the run's grid, read back typed, old files loaded, newer ones refused; and the
one way from a card, K and gamma to a sampler call."""

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from builders import card

from pcm.config import config_from_dict
from pcm.eval.generate import Sampler, sample_latents
from pcm.eval.toy_gmm import make_eval_set, make_world, sample_model, toy_card, toy_config
from pcm.math import SolverGrid, flow_schedule
from pcm.models.card import CARD_VERSION, CONFIG_FILE, LoraFileError, card_from_json, card_of_run, read_card
from pcm.sampling import Sampling, ddim_timesteps, lcm_timesteps, pcm_timesteps, sample, sample_lcm, sample_pcm


def test_a_run_s_card_carries_its_grid_s_edges_and_the_sampling_it_was_trained_for():
    cfg = config_from_dict({"distill": {"num_solver_steps": 50, "num_phases": 4, "guidance": "normal_cfg",
                                        "w_min": 0.0, "w_max": 0.0, "caption_dropout": 0.1},
                           "lora": {"rank": 8, "alpha": 4}})
    grid = SolverGrid(1000, 50, 4)
    made = card_of_run(cfg, grid)
    assert made.edges == (0, 239, 499, 739) and made.sampling_timesteps == grid.sampling_timesteps()
    assert (made.num_train_timesteps, made.num_solver_steps, made.num_phases) == (1000, 50, 4)
    assert made.recommended_steps == 4 and made.recommended_guidance_scale == 5.0 and made.recommended_gamma == 0
    assert (made.lora_rank, made.lora_alpha, made.frames, made.motion_adapter) == (8, 4, 1, "")
    lcm = card_of_run(config_from_dict({"distill": {"method": "lcm", "num_phases": 1}}), SolverGrid(1000, 50, 1))
    assert lcm.label == "lcm" and lcm.recommended_steps == 4 and lcm.recommended_scheduler == "LCMScheduler"


def test_the_json_round_trips_and_carries_its_version_and_derived_fields(tmp_path):
    written = card("sdxl", "stabilityai/stable-diffusion-xl-base-1.0")
    data = written.to_json()
    assert data["card_version"] == CARD_VERSION and data["sampling_timesteps"] == [999, 499, 0]
    assert card_from_json(json.loads(json.dumps(data)), "here") == written
    (tmp_path / CONFIG_FILE).write_text(json.dumps(data))
    assert read_card(tmp_path) == written


def test_a_version_0_file_still_loads_with_t_from_its_path():
    """What pcm distill wrote before card_version existed: no T, no version, a recommended_scheduler string."""
    old = {"method": "pcm", "family": "sd15", "base_model": "b", "num_solver_steps": 20, "num_phases": 2,
           "edges": [0, 499], "sampling_timesteps": [999, 499, 0], "guidance": "small_cfg", "w_min": 4.0,
           "w_max": 5.0, "recommended_steps": 2, "recommended_guidance_scale": 1.0,
           "recommended_scheduler": "TCDScheduler", "resolution": 16, "lcm_sigma_data": 0.5,
           "lcm_timestep_scaling": 10.0, "lora_rank": 4, "lora_alpha": 4}
    loaded = card_from_json(old, "old")
    assert loaded == card("sd15", "b") and loaded.card_version == CARD_VERSION


def test_a_version_1_file_loads_without_embedded_guidance():
    """What pcm distill wrote before embedded_guidance_scale existed (card_version 1): the field is None, so FLUX.1-dev
    LoRAs of then sample at the teacher's own embedded guidance, the one they were distilled at."""
    old = {k: v for k, v in card("flux", "b").to_json().items() if k != "embedded_guidance_scale"}
    loaded = card_from_json({**old, "card_version": 1}, "old")
    assert loaded == card("flux", "b") and loaded.embedded_guidance_scale is None
    assert loaded.card_version == CARD_VERSION


@pytest.mark.parametrize("family,t5,tokens", [("sd3", False, 77), ("flux", True, 512), ("sd15", True, 256)])
def test_a_flow_card_records_the_t5_states_its_student_read_and_pcm_sample_encodes_with_them(family, t5, tokens):
    """A LoRA sampled from its folder (`pcm sample --lora`, teacher from the card) encodes prompts as in distillation,
    whatever the sample-time params say; a UNet family's card has no T5 settings and leaves the config alone."""
    from pcm.inference import base_for

    teacher = {"family": family, "model": "m", "t5": t5, "max_sequence_length": tokens}
    made = card_of_run(config_from_dict({"teacher": teacher, "data": {"resolution": 16},
                                         "distill": {"w_min": 0.0, "w_max": 0.0}}), SolverGrid(1000, 20, 2))
    flow = family != "sd15"
    assert (made.t5, made.max_sequence_length) == ((t5, tokens) if flow else (None, None))
    assert card_from_json(made.to_json(), "x") == made
    defaults = config_from_dict({"teacher": {"family": family, "model": "m"}})  # t5 on, 256 tokens
    chosen = base_for(defaults, "lora", made, "lora")
    assert (chosen.t5, chosen.max_sequence_length) == ((t5, tokens) if flow else (True, 256))


@pytest.mark.parametrize("family,mode,expected", [
    ("flux", None, 3.5), ("flux", "embedded", 3.5), ("flux", "none", None), ("sd3", "cfg", None),
    ("sd15", None, None)])
def test_a_flux_dev_run_s_card_records_the_embedded_guidance_its_student_read(family, mode, expected, tmp_path):
    """FluxPipeline's guidance_scale is that input, not CFG: the card says what it was (FLUX.1-schnell has none)."""
    cfg = config_from_dict({"teacher": {"family": family, "model": "m"}, "data": {"resolution": 16},
                            "distill": {"w_min": 0.0, "w_max": 0.0}})
    made = card_of_run(cfg, SolverGrid(1000, 20, 2), guidance_mode=mode)
    assert made.embedded_guidance_scale == expected
    (tmp_path / CONFIG_FILE).write_text(json.dumps(made.to_json()))
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["embedded_guidance_scale"] == expected
    assert read_card(tmp_path) == made


def test_a_flow_card_recommends_its_pipeline_s_flow_scheduler_and_the_call_that_follows_the_trained_path():
    """pcm_config.json of an sd3 or flux LoRA names the pipeline's flow scheduler over the unshifted sigmas (never
    TCD); the call sets the training side and, for FLUX.1-dev, its embedded guidance apart from true CFG."""
    flux = dataclasses.replace(card("flux", "b"), embedded_guidance_scale=3.5)
    assert flux.flow_sigmas == [1.0, 0.5] and "sigmas=[1.0, 0.5]" in flux.to_json()["recommended_scheduler"]
    assert "TCD" not in card("sd3", "b").recommended_scheduler and "TCD" in card("sdxl", "b").recommended_scheduler
    assert flux.diffusers_kwargs(512) == {"sigmas": [1.0, 0.5], "guidance_scale": 3.5, "max_sequence_length": 512,
                                          "height": 16, "width": 16}
    normal = dataclasses.replace(flux, guidance="normal_cfg", recommended_guidance_scale=5.0)
    true_cfg = normal.diffusers_kwargs(512)
    assert (true_cfg["true_cfg_scale"], true_cfg["guidance_scale"]) == (5.0, 3.5)
    assert true_cfg["negative_prompt"] == ""  # FluxPipeline runs true CFG only when given a negative prompt
    assert "guidance_scale" not in card("flux", "b").diffusers_kwargs(512)  # a version-1 card: the pipeline's 3.5
    assert card("sd3", "b").diffusers_kwargs(77)["guidance_scale"] == 1.0  # SD3's is CFG: the card's
    lcm = dataclasses.replace(flux, method="lcm", num_phases=1, edges=(0,))
    assert lcm.recommended_scheduler.startswith("no diffusers flow scheduler re-noises like LCM")


def test_a_lora_s_rows_read_the_embedded_guidance_its_card_records():
    """Every LoRA row (evaluation, pcm sample, the registered model) goes through sample_latents: the student reads
    the guidance it was distilled at in both passes of true CFG; the teacher's own rows keep the condition's."""
    seen = []

    def eps_fn(x_t, t, cond):
        seen.append(cond["guidance"].tolist())
        return 0.1 * x_t

    teacher = SimpleNamespace(eps_fn=eps_fn, schedule=flow_schedule(1000))
    x_T, cond = torch.randn(2, 4, generator=torch.Generator().manual_seed(0)), {"guidance": torch.full((2,), 3.5)}
    flux = dataclasses.replace(card("flux", "b"), embedded_guidance_scale=2.0)
    sample_latents(teacher, Sampler("pcm-M2", "eval0", flux, 2.0), x_T, cond, cond, 2)
    assert seen == [[2.0] * 4] * 2  # 2 steps, each one call on [cond; uncond]
    seen.clear()
    sample_latents(teacher, Sampler("teacher-euler", None, None, 1.0, teacher_method="euler"), x_T, cond, cond, 2)
    sample_latents(teacher, Sampler("pcm-M2", "eval0", card("flux", "b"), 1.0), x_T, cond, cond, 2)  # version 1
    assert seen == [[3.5, 3.5]] * 4 and cond["guidance"].tolist() == [3.5, 3.5]


@pytest.mark.parametrize("change,message", [
    ({"card_version": CARD_VERSION + 1}, "newer than this pcm reads .* upgrade pcm-pipelines"),
    ({"tempo": 3}, "unknown key.* tempo; allowed: .*base_model"),
    ({"method": "cm"}, "method 'cm'; allowed: pcm, lcm"),
])
def test_a_card_this_pcm_cannot_read_is_one_line_with_the_fix(change, message):
    with pytest.raises(LoraFileError, match=f"where.*{message}"):
        card_from_json({**card("sd15", "b").to_json(), **change}, "where")


def test_a_card_without_t_and_without_its_path_names_what_it_lacks():
    data = {k: v for k, v in card("sd15", "b").to_json().items() if k not in ("num_train_timesteps", "edges")}
    with pytest.raises(LoraFileError, match="lacks edges, num_train_timesteps"):
        card_from_json(data, "where")


def _eps(x_t, t, cond):  # a fixed denoiser: eps depends on x, t and the condition
    return 0.3 * x_t + 1e-3 * t.float().reshape(-1, *[1] * (x_t.ndim - 1)) + 0.1 * cond.reshape(-1, 1)


def test_sample_maps_card_k_and_gamma_to_the_samplers_they_name():
    abar = torch.linspace(0.999, 0.01, 1000)
    x_T, cond, neg = torch.randn(3, 2, generator=torch.Generator().manual_seed(0)), torch.ones(3), torch.zeros(3)
    pcm = card("sd15", "b")
    lcm = dataclasses.replace(pcm, method="lcm", num_phases=1, edges=(0,))

    def ours(c, K, scale=1.0, gamma=0.0):
        return sample(_eps, x_T, cond, neg, abar, Sampling(c, K, scale, gamma), torch.Generator().manual_seed(1))

    direct = {
        (None, 4): sample_pcm(_eps, x_T, cond, abar, ddim_timesteps(1000, 4), guidance_scale=2.0, neg_cond=neg),
        (pcm, 3): sample_pcm(_eps, x_T, cond, abar, pcm_timesteps([999, 499, 0], 3), gamma=0.5,
                             generator=torch.Generator().manual_seed(1)),
        (lcm, 2): sample_lcm(_eps, x_T, cond, abar, lcm_timesteps(1000, 20, 2),
                             generator=torch.Generator().manual_seed(1)),
    }
    assert torch.equal(ours(None, 4, 2.0), direct[(None, 4)])
    assert torch.equal(ours(pcm, 3, gamma=0.5), direct[(pcm, 3)])
    assert torch.equal(ours(lcm, 2), direct[(lcm, 2)])
    assert not torch.equal(ours(pcm, 3), direct[(pcm, 3)])  # gamma reaches the sampler
    with pytest.raises(ValueError, match="trained on 1000 timesteps, the teacher has 500"):
        sample(_eps, x_T, cond, neg, abar[:500], Sampling(pcm, 2))


def test_the_toy_benchmark_samples_a_student_through_its_card():
    cfg = toy_config("pcm", 2, guided=True, steps=1)
    world = make_world(cfg)
    ev = make_eval_set(world, 8, w=1.0)
    assert toy_card(cfg).sampling_timesteps == [999, 499, 0]
    expected = sample_pcm(world.teacher, ev.x_T, ev.labels, world.abar, [999, 499, 0],
                          neg_cond=torch.full_like(ev.labels, -1))
    torch.testing.assert_close(sample_model(world, world.teacher, cfg, ev, 2, "pcm"), expected)
    with pytest.raises(ValueError, match="model kind 'lcm' but the config distills with 'pcm'"):
        sample_model(world, world.teacher, cfg, ev, 2, "lcm")


def test_a_pipeline_registers_the_lora_its_card_names(tmp_path):
    from pcm.stages import lora_with

    folders = []
    for name, made in {"m2": card("sd15", "b"), "m4": dataclasses.replace(card("sd15", "b"), num_phases=4,
                                                                          edges=(0, 249, 499, 749))}.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / CONFIG_FILE).write_text(json.dumps(made.to_json()))
        folders.append(str(tmp_path / name))
    assert lora_with(folders, "pcm", 4) == str(tmp_path / "m4")
    with pytest.raises(ValueError, match=r"method=lcm num_phases=1 \(the pipeline's LoRAs: pcm M=2, pcm M=4\)"):
        lora_with(folders, "lcm", 1)
