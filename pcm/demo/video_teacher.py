"""The demo teacher for video (`demo_teacher.family: animatediff`), built the way AnimateDiff is: the trained image
demo teacher (`demo_teacher.image_teacher`, what `pcm demo-teacher` saves for the image demo) gets motion modules,
and only those train on the moving-shapes clips, together with the text encoder, whose tokenizer is extended with
the clips' new words (moving, up, down) while every image word keeps its id and embedding.

The image teacher's spatial layers and VAE stay as they are: the clips' frames are shapes images, so the VAE's
latents and scaling factor carry over. The motion modules start as the identity (their output projections are zero,
as in AnimateDiff), so before training the video teacher draws each frame as the image teacher would.
The saved pipeline is an AnimateDiffPipeline whose motion_adapter/ holds the trained motion modules too (the
pipeline directory with teacher.motion_adapter pointing there loads the same teacher).
"""

from pathlib import Path

import numpy as np
import torch
from diffusers import AnimateDiffPipeline, MotionAdapter, StableDiffusionPipeline, UNetMotionModel
from tqdm import tqdm

from pcm.demo.motion import score_clip
from pcm.models.tiny import build_tokenizer

MOTION = "motion_modules"
TEXT_SIDE = ("attn2.to_k", "attn2.to_v")  # the spatial layers' projections of the text states
MOTION_HEADS = 2  # heads of each temporal attention; few, wide heads are fast on CPU


def frames_of(pixels: torch.Tensor) -> torch.Tensor:
    """Clips (N, F, 3, H, W) -> frames (N * F, 3, H, W); images pass through."""
    return pixels.flatten(0, 1) if pixels.ndim == 5 else pixels


def to_clips(latents: torch.Tensor, frames: int) -> torch.Tensor:
    """Frame latents (N * F, C, h, w) -> clip latents (N, C, F, h, w)."""
    return latents.unflatten(0, (-1, frames)).transpose(1, 2)


def with_motion(parts: dict) -> dict:
    """The tiny components with the UNet turned into a UNetMotionModel carrying the adapter's motion modules."""
    return {**parts, "unet": UNetMotionModel.from_unet2d(parts["unet"], parts["motion_adapter"])}


def from_image_teacher(image_dir: str | Path, captions: list[str], frames: int) -> dict:
    """AnimateDiffPipeline components from the image demo teacher saved in image_dir (from_pretrained): its VAE,
    spatial UNet, text encoder and scheduler; a tokenizer extended with the captions' new words and the text
    encoder's embedding table grown to match (new rows start at the mean of the trained ones); a fresh MotionAdapter
    with zero output projections. Only the motion modules and the text encoder require gradients."""
    folder = Path(image_dir)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"demo_teacher.image_teacher={image_dir}: no saved pipeline there (model_index.json); "
                                "train the image demo teacher first (`pcm demo-teacher --params params.yaml`, or "
                                "`dvc repro demo-teacher`)")
    image = StableDiffusionPipeline.from_pretrained(folder)
    if image.unet.config.in_channels != 4 or image.text_encoder is None:
        raise ValueError(f"demo_teacher.image_teacher={image_dir}: not an SD1.5-shaped demo teacher")
    length = image.tokenizer.model_max_length
    tokenizer = build_tokenizer(captions, length, base=image.tokenizer)
    longest = max(len(ids) for ids in tokenizer(captions).input_ids)
    if longest > length:
        raise ValueError(f"the clip captions need {longest} tokens; the image teacher's text encoder reads {length}")
    text_encoder, known = image.text_encoder, len(image.tokenizer)
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        table = text_encoder.get_input_embeddings().weight
        table[known:] = table[:known].mean(0)
    unet = image.unet.config
    adapter = MotionAdapter(block_out_channels=unet.block_out_channels, motion_layers_per_block=unet.layers_per_block,
                            motion_num_attention_heads=MOTION_HEADS, motion_norm_num_groups=unet.norm_num_groups,
                            motion_max_seq_length=max(frames, 8), use_motion_mid_block=True)
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "proj_out" in name:
                param.zero_()
    parts = with_motion({"unet": image.unet, "vae": image.vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
                         "scheduler": image.scheduler, "feature_extractor": None, "image_encoder": None,
                         "motion_adapter": adapter})
    parts["unet"].requires_grad_(False)
    for module in trained_modules(parts):
        module.requires_grad_(True)
    parts["vae"].requires_grad_(False)
    return parts


def trained_modules(parts: dict) -> list[torch.nn.Module]:
    """What the video teacher trains: every motion module of the UNet; the text side: the text encoder and the
    cross-attention's key and value projections, through which alone the caption reaches the UNet."""
    unet = parts["unet"]
    motion = [m for name, m in unet.named_modules() if name.endswith(MOTION)]
    text_side = [m for name, m in unet.named_modules() if name.endswith(TEXT_SIDE) and f".{MOTION}." not in name]
    return motion + text_side + [parts["text_encoder"]]


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

