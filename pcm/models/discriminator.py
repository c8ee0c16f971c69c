"""The adversarial consistency loss's discriminator (docs/method.md §6): the frozen teacher UNet's encoder
features at (x_r, r, c) with small trainable heads.

The backbone is the teacher's own UNet with adapters off, so no second UNet is held. Its down blocks and mid
block run here with gradient checkpointing switched off: a checkpointed block recomputes its forward during
backward under whatever adapter state is current then (adapters on, for the student), which would give the
generator wrong gradients (docs/method.md §11). Only the encoder half is stored, and only for this pass.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from pcm.models.lora import adapters_off

NEGATIVE_SLOPE = 0.2  # LeakyReLU of the heads


class Head(nn.Module):
    """conv k×k → GroupNorm → LeakyReLU, added to its input, then a 1×1 conv to one logit per position."""

    def __init__(self, channels: int, kernel_size: int, groups: int = 32):
        super().__init__()
        if kernel_size not in (1, 3):
            raise ValueError(f"discriminator head kernel_size={kernel_size}: must be 1 (SDXL reference) or 3 (SD1.5)")
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.norm = nn.GroupNorm(_groups(channels, groups), channels)
        self.act = nn.LeakyReLU(NEGATIVE_SLOPE)
        self.out = nn.Conv2d(channels, 1, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.conv.weight.dtype)
        return self.out(h + self.act(self.norm(self.conv(h))))


def _groups(channels: int, most: int) -> int:
    return next(g for g in range(min(most, channels), 0, -1) if channels % g == 0)


def head_channels(unet: nn.Module) -> list[int]:
    """Channels of each feature map: every down block's output, then the mid block's."""
    widths = list(unet.config.block_out_channels)
    return [*widths, widths[-1]]


@contextmanager
def _no_checkpointing(unet: nn.Module) -> Iterator[None]:
    """Within the block no UNet submodule checkpoints; the previous flags are restored afterwards."""
    flagged = [m for m in unet.modules() if getattr(m, "gradient_checkpointing", False)]
    for m in flagged:
        m.gradient_checkpointing = False
    try:
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True


def encoder_features(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> list[torch.Tensor]:
    """The UNet's down-block outputs and mid-block output at (x, t, cond), in the UNet's current adapter state.

    cond is a family condition (pcm.models.families): encoder_hidden_states, and for SDXL text_embeds + time_ids.
    """
    dtype = unet.dtype
    states = cond["encoder_hidden_states"].to(dtype)
    t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
    emb = unet.time_embedding(unet.time_proj(t).to(dtype))
    added = {k: cond[k].to(dtype) for k in ("text_embeds", "time_ids") if k in cond}
    aug = unet.get_aug_embed(emb=emb, encoder_hidden_states=states, added_cond_kwargs=added)
    if aug is not None:
        emb = emb + aug
    h = unet.conv_in(x.to(dtype))
    features = []
    for block in unet.down_blocks:
        if getattr(block, "has_cross_attention", False):
            h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=states)
        else:
            h, _ = block(hidden_states=h, temb=emb)
        features.append(h)
    features.append(unet.mid_block(h, emb, encoder_hidden_states=states))
    return features


class Discriminator(nn.Module):
    """D(x_r, r, c): one logit per position of each trainable head over the frozen teacher's encoder features.

    Only the heads are parameters of this module; the UNet is referenced, not registered, so optimizers,
    checkpoints and DDP see the heads alone.
    """

    def __init__(self, unet: nn.Module, kernel_size: int = 1):
        super().__init__()
        self.heads = nn.ModuleList(Head(c, kernel_size) for c in head_channels(unet))
        self._unet = [unet]  # a list hides it from nn.Module registration

    @property
    def unet(self) -> nn.Module:
        return self._unet[0]

    def forward(self, x_r: torch.Tensor, r: torch.Tensor, cond: dict, train_heads: bool = True,
                fake: torch.Tensor | None = None) -> list[torch.Tensor] | tuple[list, list, list]:
        """Per head h, its logit map flattened to (B, P_h), P_h the positions of feature map h, in float32.

        Left unreduced because the hinge losses (pcm.math.losses) act per position and per head before averaging
        (docs/method.md §6). train_heads=False: the heads take part as constants, so the generator's loss sends no
        gradient to them.

        fake given (the joint turn; x_r is then the real batch): (D's logits on real, D's on fake, G's on fake) from
        one backbone pass per batch. The fake's features are computed once, with their graph to the student: the
        trainable heads read them detached (D), the frozen heads live (G); before, the fake went through the
        backbone twice."""
        if fake is None:
            return self._heads(self._features(x_r, r, cond), train_heads)
        with torch.no_grad():
            real = self._features(x_r, r, cond)
        live = self._features(fake, r, cond)
        d_real, d_fake = self._heads(real, True), self._heads([f.detach() for f in live], True)
        return d_real, d_fake, self._heads(live, False)

    def _features(self, x_r: torch.Tensor, r: torch.Tensor, cond: dict) -> list[torch.Tensor]:
        with adapters_off(self.unet), _no_checkpointing(self.unet):
            return encoder_features(self.unet, x_r, r, cond)

    def _heads(self, features: list[torch.Tensor], train_heads: bool) -> list[torch.Tensor]:
        with _frozen(self.heads, not train_heads):
            return [head(f).float().flatten(1) for head, f in zip(self.heads, features, strict=True)]


@contextmanager
def _frozen(module: nn.Module, frozen: bool) -> Iterator[None]:
    """Within the block the module's parameters do not require grad (when frozen); restored afterwards."""
    flags = [p.requires_grad for p in module.parameters()]
    if frozen:
        module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags, strict=True):
            p.requires_grad_(flag)
