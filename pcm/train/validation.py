"""Validation grids during distillation: fixed prompts x fixed seeds, sampled as the run's model card recommends."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pcm.config import ValidationConfig
from pcm.models.card import ModelCard
from pcm.models.families import Teacher
from pcm.sampling import Sampling, sample


@torch.no_grad()
def sample_student(teacher: Teacher, card: ModelCard, prompts: list[str], seeds: list[int],
                   guidance_scale: float) -> torch.Tensor:
    """Images (P * S, 3, H, W) in [0, 1] (clips: (P * S, F, 3, H, W)) of the LoRA being trained, sampled as its
    card recommends: prompt-major, one initial noise per seed (the same for every prompt)."""
    shape = teacher.latent_shape(card.resolution, card.frames)
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x_T = noise.repeat(len(prompts), *[1] * len(shape)).to(teacher.device)
    repeated = [p for p in prompts for _ in seeds]
    cond = teacher.encode_prompts(repeated, target_size=card.resolution)
    neg = teacher.uncond(len(repeated), like=cond)
    how = Sampling(card, card.recommended_steps, guidance_scale, card.recommended_gamma)
    x_0 = sample(teacher.eps_fn, x_T, cond, neg, teacher.schedule, how, torch.Generator().manual_seed(0))
    return teacher.decode_latents(x_0)


MIN_TILE = 128  # small tiles (the 32 px demo) are enlarged, pixel for pixel, to at least this side


def save_grid(images: torch.Tensor, rows: int, path: Path) -> Path:
    """images (R * C, 3, H, W) in [0, 1] -> one PNG with R rows and C columns, 2-pixel gaps; tiles smaller than
    MIN_TILE are scaled up by a whole factor with nearest-neighbour sampling, so every pixel stays visible."""
    n, _, h, w = images.shape
    cols = n // rows
    canvas = np.full((rows * (h + 2), cols * (w + 2), 3), 255, dtype=np.uint8)
    pixels = (images.permute(0, 2, 3, 1).cpu().numpy() * 255 + 0.5).astype(np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[r * (h + 2):r * (h + 2) + h, c * (w + 2):c * (w + 2) + w] = pixels[i]
    path.parent.mkdir(parents=True, exist_ok=True)
    scale = max(1, -(-MIN_TILE // max(h, w)))
    grid = Image.fromarray(canvas)
    if scale > 1:
        grid = grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)
    grid.save(path)
    return path


def write_validation_grid(teacher: Teacher, card: ModelCard, v: ValidationConfig, step: int, out_dir: Path) -> Path:
    images = sample_student(teacher, card, list(v.prompts), list(v.seeds), v.guidance_scale)
    rows = len(v.prompts)
    if images.ndim == 5:  # clips: one row per prompt and seed, its frames left to right
        rows = images.shape[0]
        images = images.flatten(0, 1)
    return save_grid(images, rows, out_dir / "samples" / f"step-{step:06d}.png")
