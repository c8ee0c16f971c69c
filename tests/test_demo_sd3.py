"""The demo's flow teacher (`demo_teacher.family: sd3`) at toy widths: the rectified-flow loss, a conditioning that is
the sd3 family's, a saved StableDiffusion3Pipeline with SD3's latent factors measured from the data, and the demo
variant config (configs/demo-sd3.yaml). The oracle figures of the real budget are measured by a full run, not here."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from worlds import prepared_shapes

from pcm.config import TeacherConfig, load_config
from pcm.demo import flow_teacher
from pcm.demo.teacher import _build, train_demo_teacher
from pcm.math import flow_sigmas
from pcm.models.families import load_teacher

ROOT = Path(__file__).resolve().parents[1]
TOY = ["demo_teacher.family=sd3", "demo_teacher.vae_channels=[8, 16]", "demo_teacher.unet_channels=[16, 16, 32]",
       "demo_teacher.text_hidden=16", "demo_teacher.text_layers=1", "demo_teacher.max_sequence_length=8",
       "demo_teacher.vae_steps=3", "demo_teacher.unet_steps=3", "demo_teacher.vae_batch_size=8",
       "demo_teacher.unet_batch_size=8", "demo_teacher.holdout=8", "demo_teacher.eval_prompts=2",
       "demo_teacher.eval_steps=2"]
CAPTIONS = ["a red circle at the top left on a gray background", "a blue square in the center on a white background",
            ""]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A 40-image shapes world, prepared at 32 px in two shards."""
    return prepared_shapes(tmp_path_factory.mktemp("shapes"))


def _config(prepared, out, extra=()):
    return load_config("params.yaml", [f"data.output_dir={prepared}", f"demo_teacher.output_dir={out}", *TOY, *extra])


def test_the_flow_teacher_saves_an_sd3_pipeline_with_measured_latent_factors(prepared, tmp_path):
    out = tmp_path / "teacher"
    metrics = train_demo_teacher(_config(prepared, out), progress=False)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["steps"] == {"vae": 3, "transformer": 3, "eval_euler": 2} and metrics["max_sequence_length"] == 8
    assert 0 <= metrics["main_colour_acc"] <= 1 and set(metrics["final_loss"]) == {"vae", "transformer"}
    pipe = StableDiffusion3Pipeline.from_pretrained(out)
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and pipe.transformer.config.in_channels == 16
    assert (vae.scaling_factor, vae.shift_factor) == pytest.approx((metrics["scaling_factor"],
                                                                    metrics["shift_factor"]))
    assert (vae.scaling_factor, vae.shift_factor) != (1.5305, 0.0609)  # measured, not SD3's own
    assert pipe.transformer.config.num_attention_heads * pipe.transformer.config.attention_head_dim == 32
    teacher = load_teacher(TeacherConfig(family="sd3", model=str(out), max_sequence_length=8))
    assert len(teacher.text_encoders) == 3 and teacher.schedule.kind == "flow"
    assert torch.equal(teacher.schedule.table, flow_sigmas(1000, 3.0))  # SD3's shift
    again = train_demo_teacher(_config(prepared, out), progress=False)  # same seed, same dir: replaced in place
    assert again["final_loss"] == metrics["final_loss"]


def _parts(prepared, tmp_path):
    cfg = _config(prepared, tmp_path / "unused")
    torch.manual_seed(0)
    return cfg, _build(cfg, CAPTIONS)


def test_the_training_condition_is_the_sd3_familys(prepared, tmp_path):
    """What the transformer trains on (with gradients) is what Teacher.text_states gives the saved pipeline, the
    encoded "" included: distillation and evaluation see the condition the teacher learned."""
    cfg, parts = _parts(prepared, tmp_path)
    StableDiffusion3Pipeline(**parts).save_pretrained(tmp_path / "pipe")
    teacher = load_teacher(TeacherConfig(family="sd3", model=str(tmp_path / "pipe"), max_sequence_length=8))
    encoders = [parts[k].eval() for k in ("text_encoder", "text_encoder_2", "text_encoder_3")]  # T5 drops out in train
    ids = flow_teacher.token_ids(parts["tokenizer"], CAPTIONS, cfg.demo_teacher)
    cond = flow_teacher.text_condition(encoders, parts["transformer"].config.joint_attention_dim, *ids)
    assert cond["encoder_hidden_states"].requires_grad
    expected = teacher.encode_prompts(CAPTIONS)
    for key in ("encoder_hidden_states", "pooled_projections"):
        torch.testing.assert_close(cond[key].detach(), expected[key], rtol=0, atol=1e-5)


def test_the_loss_is_the_rectified_flows_velocity_on_the_teachers_sigmas(prepared, tmp_path):
    """x_t = (1 - sigma_t) x_0 + sigma_t eps with sigma_t SD3's shifted sigmas, t in 1..T-1, against u = eps - x_0:
    replayed draw for draw from the generator's seed."""
    cfg, parts = _parts(prepared, tmp_path)
    mean, std = torch.randn(6, 16, 16, 16), torch.rand(6, 16, 16, 16)
    loss = flow_teacher.FlowLoss(parts, (mean, std, 0.7), CAPTIONS[:2] * 3, cfg.demo_teacher,
                                 torch.Generator().manual_seed(4))
    seen = {}

    def zero_velocity(x_t, t, cond):
        seen.update(x_t=x_t, t=t, cond=cond)
        return torch.zeros_like(x_t)

    loss.teacher.eps_fn = zero_velocity
    idx = torch.tensor([0, 3, 5])
    value = loss(idx)
    g = torch.Generator().manual_seed(4)
    x_0 = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=g)) * 0.7
    eps = torch.randn(x_0.shape, generator=g)
    t = torch.randint(1, 1000, (3,), generator=g)
    sigma = flow_sigmas(1000, 3.0)[t][:, None, None, None]
    assert torch.equal(seen["t"], t) and t.min() >= 1
    torch.testing.assert_close(seen["x_t"], (1 - sigma) * x_0 + sigma * eps)
    torch.testing.assert_close(value, F.mse_loss(torch.zeros_like(x_0), eps - x_0))
    assert set(seen["cond"]) == {"encoder_hidden_states", "pooled_projections"}


def test_the_demo_sd3_config_distills_its_own_flow_teacher():
    """configs/demo-sd3.yaml: the demo teacher is sd3 and the distilled teacher is that pipeline, read with the T5
    length it was trained with; the teacher rows' CFG is the ODE the students learn (1 + w)."""
    cfg = load_config(ROOT / "configs" / "demo-sd3.yaml")
    assert cfg.demo_teacher.family == cfg.teacher.family == "sd3"
    assert cfg.teacher.model == cfg.demo_teacher.output_dir
    assert cfg.teacher.max_sequence_length == cfg.demo_teacher.max_sequence_length
    assert cfg.eval.teacher_guidance_scale == 1 + (cfg.distill.w_min + cfg.distill.w_max) / 2
    assert cfg.adversarial.weight == 0 and set(cfg.pipeline.distill_runs) == {"pcm-m1", "pcm-m2", "pcm-m4", "lcm"}
