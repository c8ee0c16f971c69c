"""Small things on disk that several test modules build: tiny teachers (SD1.5, SDXL, AnimateDiff), an exported LoRA
with its card, webdataset shards from raw members, and the demo pipeline's params at toy sizes.

pytest puts tests/ on sys.path (pyproject's `pythonpath`), so a test module imports these as `from builders import
...`; test modules never import one another."""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AnimateDiffPipeline,
    FluxPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from pcm.config import LORA_TARGETS
from pcm.models.card import ModelCard
from pcm.models.lora import attach_lora, export_lora
from pcm.models.tiny import (
    build_tokenizer,
    tiny_animatediff_components,
    tiny_flux_components,
    tiny_sd3_components,
    tiny_sd15_components,
    tiny_sdxl_components,
)

# ---- tiny teachers -------------------------------------------------------------------------------------------------

CAPTIONS = ["a red circle at the top left on a gray background", "a blue square in the center on a white background"]
VIDEO_CAPTIONS = ["a red circle moving left on a gray background", "a blue square moving up on a white background"]


def save_tiny(path, family, prediction_type="epsilon"):
    torch.manual_seed(0)
    tokenizer = build_tokenizer(CAPTIONS)
    if family == "sd3":
        pipe = StableDiffusion3Pipeline(**tiny_sd3_components(tokenizer))
    elif family == "flux":  # FLUX.1-dev's layout: guidance embedding, dynamic-shift scheduler
        pipe = FluxPipeline(**tiny_flux_components(tokenizer))
    elif family == "sd15":
        pipe = StableDiffusionPipeline(**tiny_sd15_components(tokenizer, prediction_type=prediction_type),
                                       requires_safety_checker=False)
    else:
        pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(tokenizer, prediction_type=prediction_type))
    pipe.save_pretrained(path)
    return path


def save_tiny_animatediff(root, captions=VIDEO_CAPTIONS) -> dict:
    """An AnimateDiffPipeline directory, and the same weights as an SD1.5 directory plus a MotionAdapter directory."""
    torch.manual_seed(0)
    components = tiny_animatediff_components(build_tokenizer(captions))
    adapter = components["motion_adapter"]
    sd15 = {**{k: components[k] for k in ("unet", "vae", "tokenizer", "text_encoder", "scheduler")},
            "safety_checker": None, "feature_extractor": None, "image_encoder": None}
    StableDiffusionPipeline(**sd15, requires_safety_checker=False).save_pretrained(root / "sd15")
    adapter.save_pretrained(root / "adapter")
    AnimateDiffPipeline(**components).save_pretrained(root / "animatediff")
    return {"pipeline": root / "animatediff", "sd15": root / "sd15", "adapter": root / "adapter"}


# ---- LoRAs ---------------------------------------------------------------------------------------------------------

def card(family: str, base: str) -> ModelCard:
    """The card of a 2-phase PCM LoRA over a 20-step grid at 16 px (what pcm distill writes)."""
    return ModelCard(method="pcm", family=family, base_model=base, num_train_timesteps=1000, num_solver_steps=20,
                     num_phases=2, edges=(0, 499), guidance="small_cfg", w_min=4.0, w_max=5.0, resolution=16,
                     recommended_steps=2, recommended_guidance_scale=1.0, lora_rank=4, lora_alpha=4.0)


def make_lora(teacher: Path, family: str, out: Path, seed: int = 0) -> Path:
    """An exported LoRA of the tiny teacher's UNet with random B (no distillation: only its shapes and card
    matter here); another seed, another file."""
    unet = UNet2DConditionModel.from_pretrained(teacher, subfolder="unet")
    attach_lora(unet, 4, 4.0, LORA_TARGETS)
    generator = torch.Generator().manual_seed(seed)
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data = 0.01 * torch.randn(p.shape, generator=generator)
    export_lora(unet, out, card(family, str(teacher)))
    return out


# ---- webdataset shards ---------------------------------------------------------------------------------------------

def image_bytes(mode: str, size=(64, 48), fmt="PNG", **kw) -> bytes:
    rng = np.random.default_rng(sum(map(ord, mode)) + size[0])
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, size[::-1], dtype=np.uint16))
    elif mode == "P":
        image = Image.fromarray(rng.integers(0, 255, (*size[::-1], 3), dtype=np.uint8)).convert("P")
    else:
        channels = {"RGB": 3, "RGBA": 4, "L": 1, "CMYK": 4}[mode]
        array = rng.integers(0, 255, (*size[::-1], channels), dtype=np.uint8)
        image = Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **kw)
    return out.getvalue()


RGB_JPG = image_bytes("RGB", fmt="JPEG", quality=90)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def sample_members(key, image=None, ext="jpg", caption=b"a photo of a thing", meta=None):
    """The (name, bytes) tar members of one raw sample: image (when given), caption (when given) and json."""
    members = []
    if image is not None:
        members.append((f"{key}.{ext}", image))
    if caption is not None:
        members.append((f"{key}.txt", caption))
    members.append((f"{key}.json", json.dumps(meta or {"status": "success"}).encode()))
    return members


def written_samples(out: Path) -> dict[str, dict]:
    """The prepared shards' files under out, by sample key and extension."""
    samples = {}
    for shard in sorted(out.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = archive.extractfile(member).read()
    return samples


# ---- params --------------------------------------------------------------------------------------------------------

TINY = {  # the demo pipeline at toy sizes: every stage runs in seconds
    "demo": {"num_images": 40, "shard_size": 20},
    "data": {"shard_size": 20, "inputs": ["data/shapes/shard-{00000..00001}.tar"]},
    "demo_teacher": {"vae_channels": [8, 16], "unet_channels": [16, 32], "attention_from": 0, "text_hidden": 16,
                     "vae_steps": 2, "unet_steps": 2, "holdout": 8, "eval_prompts": 2, "eval_steps": 2,
                     "vae_batch_size": 4, "unet_batch_size": 4},
    "distill": {"num_solver_steps": 20},
    "train": {"batch_size": 4, "max_steps": 2, "lr_warmup_steps": 0, "checkpoint_every": 2, "validate_every": 0,
              "log_every": 1, "shuffle_buffer": 8},
    "lora": {"rank": 2, "alpha": 2},
    "eval": {"num_prompts": 3, "steps": [1, 2], "reference_steps": 2, "num_reference": 8, "shapes_net_steps": 5,
             "batch_size": 4, "grid_prompts": 2},
    "register": {"gate_metric": "pcm-M4/k2/fid_teacher", "gate_threshold": 1.0e9},
}


def merge(base: dict, extra: dict) -> dict:
    """base with extra's keys laid over it, nested dicts merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return out


# Two distillations instead of the demo's four: the M = 4 PCM LoRA the pipeline registers, and the LCM baseline. Each
# run the end-to-end tests drop saves a `pcm distill` process (and its LoRA's rows in the evaluation).
TINY_RUNS = {"pcm-m4": {"method": "pcm", "num_phases": 4}, "lcm": {"method": "lcm", "num_phases": 1}}


def tiny_params(params: dict) -> dict:
    """params.yaml's tree at TINY's sizes, distilling (and evaluating) only TINY_RUNS' LoRAs. The runs replace the
    file's: merge would keep its other runs."""
    out = merge(params, TINY)
    out["pipeline"] = {**out["pipeline"], "distill_runs": TINY_RUNS}
    out["eval"] = {**out["eval"], "loras": [f"models/{name}/lora" for name in TINY_RUNS]}
    out["register"] = {**out["register"], "lora": "models/pcm-m4/lora"}
    return out
