"""The demo teacher of a flow-matching family (`demo_teacher.family: sd3`): a tiny SD3-shaped pipeline trained from
scratch as a rectified flow on the prepared shapes; pcm.demo.teacher runs the phases (data, VAE, training loop, save,
oracle) and asks this module for what differs from the UNet families.

Widths from the demo config: the transformer is tiny_sd3_components' (2 joint-attention layers, 2 heads, 2x2 patches
of a 16-channel latent) with width unet_channels[-1], the UNet's deepest (head dim unet_channels[-1] / 2; the other
UNet fields are unused); CLIP-L- and CLIP-G-shaped encoders of text_hidden and 2 text_hidden, a T5 of twice their
sum reading demo_teacher.max_sequence_length tokens; the VAE of vae_channels with 16 latent channels, whose
shift_factor and scaling_factor pcm.demo.teacher sets from the training latents (SD3: latents = (z - shift) x scale).

Training (FlowLoss): x_t = (1 - sigma_t) x_0 + sigma_t eps on the teacher's own schedule (SD3's shifted flow,
shift 3), the transformer's velocity against u = eps - x_0, t uniform over the schedule's timesteps, captions
dropped to "" (SD3's uncond, the encoded empty prompt) for CFG. Evaluation (sample_heldout): the saved pipeline
loaded as the sd3 family and sampled by the teacher's own Euler with CFG, pcm.sampling.sample: the code of
`pcm evaluate`'s teacher rows, so the demo's numbers and the evaluation's describe one sampler.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline
from tqdm import tqdm

from pcm.config import Config, DemoTeacherConfig, TeacherConfig
from pcm.math import add_noise
from pcm.models.families import Teacher, load_teacher
from pcm.models.tiny import TinySizes, tiny_sd3_components
from pcm.sampling import Sampling, sample

FAMILIES = ("sd3",)  # the demo families this module trains (FLUX, guidance-distilled, has no demo teacher)
PIPELINE = StableDiffusion3Pipeline  # what the teacher is saved as
HEADS = 2  # tiny_sd3_components' attention heads: the width unet_channels[-1] is split over them


def components(cfg: Config, tokenizer) -> dict:
    """Fresh StableDiffusion3Pipeline components at the demo config's widths (see the module docstring)."""
    c = cfg.demo_teacher
    factor = 2 ** (len(c.vae_channels) - 1)
    sizes = TinySizes(attention_head_dim=c.unet_channels[-1] // HEADS, text_hidden=c.text_hidden,
                      text_layers=c.text_layers, vae_channels=c.vae_channels, norm_groups=8,
                      sample_size=cfg.data.resolution // factor)
    return tiny_sd3_components(tokenizer, sizes)


def token_ids(tokenizer, captions: list[str], c: DemoTeacherConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP ids (N, L), T5 ids (N, max_sequence_length)): the tiny pipeline's encoders share one tokenizer; T5 reads
    its own length, as Teacher.text_states tokenizes it."""
    def ids(length: int) -> torch.Tensor:
        return tokenizer(captions, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
    return ids(tokenizer.model_max_length), ids(c.max_sequence_length)


def text_condition(encoders: list, width: int, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> dict:
    """SD3's condition of token ids, with gradients (Teacher.text_states' layout, which runs without): both CLIP
    encoders' penultimate states concatenated and zero-padded to T5's width, T5's last states after them along the
    sequence; pooled_projections = both CLIP pooled outputs concatenated."""
    out = [encoder(clip_ids, output_hidden_states=True) for encoder in encoders[:2]]
    clip = torch.cat([o.hidden_states[-2] for o in out], dim=-1)
    t5 = encoders[2](t5_ids).last_hidden_state
    return {"encoder_hidden_states": torch.cat([F.pad(clip, (0, width - clip.shape[-1])), t5], dim=1),
            "pooled_projections": torch.cat([o.text_embeds for o in out], dim=-1)}


class FlowLoss:
    """The rectified-flow loss of one batch: mean ||u_hat(x_t, t, c) - (eps - x_0)||^2, x_t = (1 - sigma_t) x_0 +
    sigma_t eps; x_0 (B, 16, h, w) a fresh posterior sample, t ~ U{1..T-1}, c the caption or "" (caption dropout).
    latents = (posterior means - shift_factor, stds, scaling_factor) of the training set; captions: the training ones.

    Why t uniform over the schedule's timesteps (sigma_t = shift((t + 1) / T), shift 3): every point the teacher is
    ever asked about is one of them (the Euler sampler's path, the distillation's solver grid, drawn uniformly by
    index), and the shift already spends most draws at high noise, where the colour and kind of a shape are decided.
    SD3's own recipe, a logit-normal u before the shift, puts little mass near sigma = 1, where a few-step sampler
    takes its largest step. t = 0 (sigma = 0) is the clean end: no sampler evaluates the model there.
    """

    def __init__(self, parts: dict, latents: tuple, captions: list[str], cfg: DemoTeacherConfig,
                 generator: torch.Generator):
        self.teacher = Teacher("sd3", parts["transformer"], dict(parts["scheduler"].config))
        self.encoders = [parts[k] for k in ("text_encoder", "text_encoder_2", "text_encoder_3")]
        self.modules = [self.teacher.backbone, *self.encoders]  # what trains
        self.width = parts["transformer"].config.joint_attention_dim
        self.mean, self.std, self.scaling = latents  # posteriors, the shift already subtracted from the mean
        self.clip_ids, self.t5_ids = token_ids(parts["tokenizer"], captions, cfg)
        self.empty = token_ids(parts["tokenizer"], [""], cfg)
        self.dropout, self.generator = cfg.caption_dropout, generator

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        g, device, b = self.generator, self.teacher.device, len(idx)
        # Every draw comes from the CPU generator and is then moved: the same sequence on every device.
        noise = torch.randn(self.mean[idx].shape, generator=g).to(device)
        x_0 = (self.mean[idx] + self.std[idx] * noise) * self.scaling
        eps = torch.randn(x_0.shape, generator=g).to(device)
        t = torch.randint(1, len(self.teacher.schedule), (b,), generator=g).to(device)
        drop = (torch.rand(b, generator=g) < self.dropout).to(device)
        clip_ids, t5_ids = (torch.where(drop[:, None], empty.to(device), ids[idx].to(device))
                            for empty, ids in zip(self.empty, (self.clip_ids, self.t5_ids), strict=True))
        cond = text_condition(self.encoders, self.width, clip_ids, t5_ids)
        u_hat = self.teacher.eps_fn(add_noise(x_0, eps, self.teacher.schedule, t), t, cond)
        return F.mse_loss(u_hat, eps - x_0)


@torch.no_grad()
def sample_heldout(pipeline_dir: Path, captions: list[str], cfg: Config, device: torch.device, progress: bool,
                   chunk: int = 50) -> np.ndarray:
    """Images (N, H, W, 3) uint8 of the captions: the saved pipeline as the sd3 family, demo_teacher.eval_steps of
    its Euler with CFG demo_teacher.eval_guidance_scale over the encoded "", x_T seeded by cfg.seed + caption index."""
    c = cfg.demo_teacher
    teacher = load_teacher(TeacherConfig(family="sd3", model=str(pipeline_dir),
                                         max_sequence_length=c.max_sequence_length), device,
                           resolution=cfg.data.resolution)
    how, shape = Sampling(None, c.eval_steps, c.eval_guidance_scale), teacher.latent_shape(cfg.data.resolution)
    images = []
    for start in tqdm(range(0, len(captions), chunk), desc="demo-teacher eval (euler)", disable=not progress):
        prompts = captions[start:start + chunk]
        x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed + start + i))
                           for i in range(len(prompts))]).to(device)
        x_0 = sample(teacher.eps_fn, x_T, teacher.encode_prompts(prompts), teacher.uncond(len(prompts)),
                     teacher.schedule, how)
        out = teacher.decode_latents(x_0).permute(0, 2, 3, 1).cpu().numpy()
        images.append(np.round(out * 255).astype(np.uint8))
    return np.concatenate(images)
