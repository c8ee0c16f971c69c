"""The discriminator on the shared UNet: its gradients equal those of a separate frozen copy of the teacher.

The student pass (adapters on) and the discriminator pass (adapters off) share one UNet with gradient
checkpointing on: a recompute under the wrong adapter state would change the generator's gradient.
"""

import copy

import pytest
import torch

from pcm.math.losses import hinge_d_loss, hinge_g_loss
from pcm.models.discriminator import Discriminator, Head, encoder_features, head_channels
from pcm.models.lora import attach_lora
from pcm.models.tiny import TinySizes, build_tokenizer, tiny_sd15_components, tiny_sdxl_components

TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
SIZES = TinySizes(unet_channels=(32, 64), attention_head_dim=4, cross_attention_dim=32, text_hidden=32)


def _setup(family: str, kernel_size: int):
    torch.manual_seed(0)
    factory = tiny_sd15_components if family == "sd15" else tiny_sdxl_components
    unet = factory(build_tokenizer(["a red circle"]), SIZES)["unet"]
    reference = copy.deepcopy(unet).requires_grad_(False)  # the teacher as a second, frozen copy
    lora = attach_lora(unet, rank=4, alpha=4, target_modules=TARGETS)
    with torch.no_grad():
        for p in lora:  # B = 0 at init would make adapters on and off identical; make the student differ
            p.normal_(std=0.05)
    unet.enable_gradient_checkpointing()
    unet.train()
    disc = Discriminator(unet, kernel_size)
    return unet, reference, lora, disc


def _cond(family: str, batch: int) -> dict:
    g = torch.Generator().manual_seed(1)
    hidden = SIZES.text_hidden  # sdxl: encoder 1 of this width, encoder 2 (pooled) of twice it
    cond = {"encoder_hidden_states": torch.randn(batch, 7, hidden if family == "sd15" else 3 * hidden, generator=g)}
    if family == "sdxl":
        cond |= {"text_embeds": torch.randn(batch, 2 * hidden, generator=g),
                 "time_ids": torch.rand(batch, 6, generator=g) * 64}
    return cond


def _generator_grads(unet, disc, lora, features_fn, family):
    """Student forward (adapters on, checkpointed) -> re-noised fake -> G hinge loss; grads of LoRA and heads."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = _cond(family, 2)
    t, r = torch.tensor([500, 700]), torch.tensor([600, 800])
    added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond} or None
    fake = unet(x, t, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
    logits = features_fn(fake, r, cond)
    loss = hinge_g_loss(logits)
    params = [*lora, *disc.heads.parameters()]
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize(("family", "kernel_size"), [("sd15", 3), ("sdxl", 1)])
def test_generator_gradient_equals_a_separate_frozen_copy(family, kernel_size):
    unet, reference, lora, disc = _setup(family, kernel_size)

    def reference_d(x_r, r, cond):
        feats = encoder_features(reference, x_r, r, cond)
        return torch.stack([h(f).float().mean(dim=(1, 2, 3)) for h, f in zip(disc.heads, feats, strict=True)]).mean(0)

    loss, grads = _generator_grads(unet, disc, lora, disc, family)
    ref_loss, ref_grads = _generator_grads(unet, disc, lora, reference_d, family)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    worst = max((a - b).abs().max().item() for a, b in zip(grads, ref_grads, strict=True))
    assert worst < 1e-5, f"generator gradient differs from the separate-copy reference by {worst:.2e}"
    assert any(a.abs().max() > 0 for a in grads[: len(lora)]), "the LoRA must receive gradient through D"
    assert unet.down_blocks[0].gradient_checkpointing, "the discriminator must restore the checkpointing flags"


def test_discriminator_holds_only_the_heads_and_the_d_loss_trains_them():
    unet, _, lora, disc = _setup("sd15", 3)
    names = [n for n, _ in disc.named_parameters()]
    assert names and all(n.startswith("heads.") for n in names), "the UNet must not be registered in D"
    assert [h.out.in_channels for h in disc.heads] == head_channels(unet) == [32, 64, 64]
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g) * 2
    r, cond = torch.tensor([300, 900]), _cond("sd15", 2)
    loss = hinge_d_loss(disc(real, r, cond), disc(fake.requires_grad_(), r, cond))
    loss.backward()
    assert all(p.grad is not None for p in disc.heads.parameters())
    assert all(p.grad is None for p in lora), "the D loss must not reach the student's LoRA"


def test_head_rejects_other_kernel_sizes():
    with pytest.raises(ValueError, match="kernel_size=5"):
        Head(32, 5)
