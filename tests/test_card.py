"""The model card: written once from the run's grid, read back typed, old files loaded, newer ones refused; and the
one way from a card, K and gamma to a sampler call."""

import dataclasses
import json

import pytest
import torch
from builders import card

from pcm.config import config_from_dict
from pcm.eval.toy_gmm import make_eval_set, make_world, sample_model, toy_card, toy_config
from pcm.math import SolverGrid
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
