"""The demo teacher for video (`demo_teacher.family: animatediff`): the tiny SD1.5-shaped teacher's recipe on the
moving-shapes clips, with AnimateDiff motion modules in the UNet.

The VAE trains on every frame as an image; the UNetMotionModel (spatial layers, motion modules) and the text encoder
train jointly from scratch on clip latents (N, C, F, h, w), so the caption's direction word can steer the motion.
The saved pipeline is an AnimateDiffPipeline whose motion_adapter/ holds the trained motion modules too (the
pipeline directory with teacher.motion_adapter pointing there loads the same teacher).
"""

import numpy as np
import torch
from diffusers import AnimateDiffPipeline, UNetMotionModel
from tqdm import tqdm

from pcm.demo.motion import score_clip


def frames_of(pixels: torch.Tensor) -> torch.Tensor:
    """Clips (N, F, 3, H, W) -> frames (N * F, 3, H, W); images pass through."""
    return pixels.flatten(0, 1) if pixels.ndim == 5 else pixels


def to_clips(latents: torch.Tensor, frames: int) -> torch.Tensor:
    """Frame latents (N * F, C, h, w) -> clip latents (N, C, F, h, w)."""
    return latents.unflatten(0, (-1, frames)).transpose(1, 2)


def with_motion(parts: dict) -> dict:
    """The tiny components with the UNet turned into a UNetMotionModel carrying the adapter's motion modules."""
    return {**parts, "unet": UNetMotionModel.from_unet2d(parts["unet"], parts["motion_adapter"])}


def refresh_adapter(parts: dict) -> None:
    """Copies the trained motion modules of parts['unet'] into parts['motion_adapter'] (same parameter names)."""
    motion = {k: v for k, v in parts["unet"].state_dict().items() if "motion_modules" in k}
    parts["motion_adapter"].load_state_dict(motion)


def clip_report(clips: np.ndarray, captions: list[str]) -> dict:
    """Motion-oracle accuracies of clips (N, F, H, W, 3) uint8 against their captions."""
    scores = [score_clip(clip, caption) for clip, caption in zip(clips, captions, strict=True)]
    mean = {k: round(float(np.mean([s[k] for s in scores])), 4) for k in scores[0]}
    return {"main_colour_acc": mean["colour"], "main_kind_acc": mean["kind"], "motion_acc": mean["motion"],
            "oracle_mean": mean}


@torch.no_grad()
def evaluate_clips(pipeline_dir, captions: list[str], cfg, device: torch.device, progress: bool,
                   chunk: int = 25) -> dict:
    """Samples the captions with the saved AnimateDiffPipeline (DDIM + CFG, one seed per prompt) and scores them."""
    pipe = AnimateDiffPipeline.from_pretrained(pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    clips = []
    for start in tqdm(range(0, len(captions), chunk), desc="demo-teacher eval (clips)", disable=not progress):
        prompts = captions[start:start + chunk]
        generators = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(len(prompts))]
        out = pipe(prompts, num_frames=cfg.data.frames, height=cfg.data.resolution, width=cfg.data.resolution,
                   generator=generators, num_inference_steps=cfg.demo_teacher.eval_steps,
                   guidance_scale=cfg.demo_teacher.eval_guidance_scale, output_type="np").frames
        clips.append(np.round(np.asarray(out) * 255).astype(np.uint8))
    return clip_report(np.concatenate(clips), captions)

