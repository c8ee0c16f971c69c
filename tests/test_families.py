"""Teacher families on tiny SD1.5- and SDXL-shaped pipelines saved to disk, and LoRA attach/export/reload."""

import dataclasses

import pytest
import torch
from builders import CAPTIONS, card, save_tiny
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from pcm.config import LORA_TARGETS, TeacherConfig
from pcm.math import alphas_cumprod, eps_from_v
from pcm.models.card import read_card
from pcm.models.families import ModelLoadError, load_teacher
from pcm.models.lora import adapters_off, attach_lora, export_lora, read_metadata, wrapped_layers


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def tiny(request, tmp_path_factory):
    family = request.param
    return family, save_tiny(tmp_path_factory.mktemp(family) / "pipe", family)


def _inputs(teacher, batch=2):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, 8, 8, generator=gen)
    return x, torch.tensor([999, 10][:batch]), teacher.encode_prompts(CAPTIONS[:batch])


def test_family_loads_from_disk_and_calls_the_unet_with_the_right_conditioning(tiny):
    family, path = tiny
    teacher = load_teacher(TeacherConfig(family=family, model=str(path)))
    seen = {}
    original = teacher.backbone.forward

    def spy(sample, timestep, encoder_hidden_states, added_cond_kwargs=None, **kw):
        seen.update(ehs=encoder_hidden_states.shape, added={k: v.shape for k, v in (added_cond_kwargs or {}).items()})
        return original(sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kw)

    teacher.backbone.forward = spy
    x, t, cond = _inputs(teacher)
    eps = teacher.eps_fn(x, t, cond)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    if family == "sd15":
        assert seen == {"ehs": (2, 77, 32), "added": {}}
        uncond = teacher.uncond(2)
        empty = teacher.encode_prompts([""])["encoder_hidden_states"][0]
        torch.testing.assert_close(uncond["encoder_hidden_states"][1], empty)
    else:
        # penultimate states of both encoders (32 + 64), encoder 2's pooled embedding, six time ids
        assert seen == {"ehs": (2, 77, 96), "added": {"text_embeds": (2, 64), "time_ids": (2, 6)}}
        assert cond["time_ids"][0].tolist() == [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
        uncond = teacher.uncond(2, like=cond)
        assert not uncond["encoder_hidden_states"].any() and not uncond["text_embeds"].any()
        assert torch.equal(uncond["time_ids"], cond["time_ids"])
    assert torch.equal(teacher.abar, alphas_cumprod("scaled_linear", 0.00085, 0.012, 1000))


def test_v_prediction_teacher_is_converted_to_eps(tmp_path):
    path = save_tiny(tmp_path / "v", "sd15", prediction_type="v_prediction")
    teacher = load_teacher(TeacherConfig(family="sd15", model=str(path)))
    assert teacher.prediction_type == "v_prediction"
    x, t, cond = _inputs(teacher)
    v = teacher.backbone(x, t, encoder_hidden_states=cond["encoder_hidden_states"]).sample
    abar_t = teacher.abar[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(teacher.eps_fn(x, t, cond), eps_from_v(x, v, abar_t))


def test_adapters_off_swaps_in_the_plain_layers_and_restores_them_even_on_error(tiny):
    """adapters_off equals peft's disable_adapters bit for bit, runs no LoRA layer, puts every wrapper back (also
    when the block raises), sees adapters added later, and falls back to peft for merged weights."""
    family, path = tiny
    teacher = load_teacher(TeacherConfig(family=family, model=str(path)))
    unet = teacher.backbone
    x, t, cond = _inputs(teacher)
    params = attach_lora(unet, rank=4, alpha=8, target_modules=LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    before = dict(unet.named_modules())
    unet.disable_adapters()
    peft_off = teacher.eps_fn(x, t, cond)
    unet.enable_adapters()
    student = teacher.eps_fn(x, t, cond)
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for n, m in before.items() if "lora_" in n]
    with adapters_off(unet):
        assert torch.equal(teacher.eps_fn(x, t, cond), peft_off)
        assert not any("lora_" in n for n, _ in unet.named_modules())
    assert not calls  # no adapter layer ran
    with pytest.raises(RuntimeError, match="inside"), adapters_off(unet):
        raise RuntimeError("inside")
    assert dict(unet.named_modules()) == before
    assert torch.equal(teacher.eps_fn(x, t, cond), student)
    assert calls  # the adapters are live again
    for hook in hooks:
        hook.remove()
    unet.add_adapter(dataclasses.replace(unet.peft_config["default"]), adapter_name="second")
    with adapters_off(unet):
        assert not any("lora_" in n for n, _ in unet.named_modules())
    unet.delete_adapters("second")
    unet.set_adapters(["default"])
    unet.fuse_lora()  # merged: the base layers hold W + BA, so only peft's unmerge gives the teacher back
    assert all(layer.merged for _, _, layer in wrapped_layers(unet))
    with adapters_off(unet):
        torch.testing.assert_close(teacher.eps_fn(x, t, cond), peft_off, rtol=0, atol=1e-5)
    torch.testing.assert_close(teacher.eps_fn(x, t, cond), student, rtol=0, atol=1e-5)


def test_missing_local_model_dir_names_the_key(tmp_path):
    with pytest.raises(ModelLoadError, match="teacher.model=.*no such directory"):
        load_teacher(TeacherConfig(model=str(tmp_path / "nope")))


def test_lora_trains_only_adapters_toggles_exactly_and_round_trips_through_load_lora_weights(tiny, tmp_path):
    family, path = tiny
    teacher = load_teacher(TeacherConfig(family=family, model=str(path)))
    x, t, cond = _inputs(teacher)
    base = teacher.eps_fn(x, t, cond)
    params = attach_lora(teacher.backbone, rank=4, alpha=8, target_modules=LORA_TARGETS)
    trainable = [n for n, p in teacher.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable) and len(trainable) == len(params)
    torch.testing.assert_close(teacher.eps_fn(x, t, cond), base)  # B = 0 at init: student == teacher
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    student = teacher.eps_fn(x, t, cond)
    assert (student - base).abs().max() > 1e-3
    with adapters_off(teacher.backbone):
        assert torch.equal(teacher.eps_fn(x, t, cond), base)  # adapters off is exactly the base UNet
    student.sum().backward()
    assert all(p.grad is not None for p in params)
    written = dataclasses.replace(card(family, str(path)), num_phases=4, edges=(0, 239, 499, 739), num_solver_steps=50)
    files = export_lora(teacher.backbone, tmp_path / "lora", written)
    assert read_metadata(files["diffusers"]) == written and read_metadata(files["kohya"]) == written
    assert read_card(tmp_path / "lora") == written
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    pipe = cls.from_pretrained(path)
    pipe.load_lora_weights(tmp_path / "lora")
    fresh = load_teacher(TeacherConfig(family=family, model=str(path)))
    fresh.backbone = pipe.unet
    torch.testing.assert_close(fresh.eps_fn(x, t, cond), student.detach(), rtol=0, atol=1e-5)
