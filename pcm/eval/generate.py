"""What every evaluated model is and how it samples: the teacher's DDIM (a flow teacher's Euler), PCM and LCM LoRAs,
on one backbone.

A Sampler names a row source: the teacher (adapters off, DDIM with "trailing" spacing; on a rectified-flow schedule the
same jumps are Euler steps, so its rows are teacher-euler) or one loaded LoRA adapter
(PCM: DDIM jumps over its trained edges, sub-divided or skipped for other step counts; LCM: LCMScheduler's
multistep rule). Initial noises are a function of (seed, prompt index) only, so every row starts from the same ones.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcm.config import SampleConfig
from pcm.inference import load_checked
from pcm.models.card import ModelCard, read_card
from pcm.models.families import Teacher
from pcm.sampling import DEFAULT_K_ABOVE_M, Sampling, sample

TEACHER_METHODS = {"vp": "ddim", "flow": "euler"}  # the teacher's own sampler, by its schedule's kind


@dataclass(frozen=True)
class Sampler:
    """One row source: label, adapter (None = the teacher), the LoRA's card (None = the teacher's own sampler),
    inference CFG, gamma (PCM/DDIM stochasticity, TCD's rule), a PCM LoRA's rule for K > M
    (pcm.sampling.K_ABOVE_M_RULES) and the name of the teacher's own sampler (TEACHER_METHODS)."""

    label: str
    adapter: str | None
    card: ModelCard | None
    guidance_scale: float
    gamma: float = 0.0
    k_above_m: str = DEFAULT_K_ABOVE_M
    teacher_method: str = "ddim"  # the method of a card-less row: ddim on a VP teacher, euler on a flow teacher

    def __post_init__(self):
        self.sampling(1)  # gamma out of range, or gamma with an LCM LoRA, is refused here

    @property
    def method(self) -> str:
        return self.teacher_method if self.card is None else self.card.method

    def sampling(self, K: int) -> Sampling:
        return Sampling(self.card, K, self.guidance_scale, self.gamma, self.k_above_m)


def teacher_method(teacher: Teacher) -> str:
    """What the teacher's own rows are called: 'ddim' (VP) or 'euler' (rectified flow); one sampler either way."""
    return TEACHER_METHODS[teacher.schedule.kind]


def teacher_sampler(guidance_scale: float, method: str = "ddim") -> Sampler:
    """The teacher's own sampler at an inference CFG, labelled teacher-<method> (teacher_method)."""
    if method not in TEACHER_METHODS.values():
        raise ValueError(f"teacher method {method!r}; allowed: {', '.join(TEACHER_METHODS.values())}")
    return Sampler(f"teacher-{method}", None, None, guidance_scale, teacher_method=method)


def read_lora_config(folder: str | Path) -> ModelCard:
    """The card of an exported LoRA folder; one line naming eval.loras, the path and the fix when it is missing,
    truncated or not a card."""
    return read_card(folder, "eval.loras")


def load_samplers(teacher: Teacher, folders: tuple[str, ...], guidance_scales: tuple[float, ...],
                  gammas: tuple[float, ...] = (0.0,)) -> list[Sampler]:
    """Loads every LoRA folder onto teacher.backbone as an adapter; one Sampler per (LoRA, guidance scale, gamma), LCM
    LoRAs at gamma 0 only.

    Labels: '<method>-M<phases>' ('lcm' for LCM), the folder's parent name appended when two LoRAs share one,
    '-cfg<scale>' when several scales are evaluated and '-g<gamma>' for gamma != 0 (gamma-0 labels stay as they
    were)."""
    cards = [read_lora_config(f) for f in folders]
    names = [c.label for c in cards]
    names = [n if names.count(n) == 1 else f"{n}-{Path(f).resolve().parent.name}" for n, f in zip(names, folders,
                                                                                                   strict=True)]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.loras={list(folders)}: two entries give the same row label {names}; list each once")
    samplers = []
    for i, (folder, card, name) in enumerate(zip(folders, cards, names, strict=True)):
        load_checked(teacher.backbone, folder, f"eval{i}", f"eval.loras entry {folder}",
                     f"the LoRA records a {card.family} base {card.base_model}, the teacher (teacher.model) is "
                     f"{teacher.family}")
        for g in guidance_scales:
            label = name if len(guidance_scales) == 1 else f"{name}-cfg{g:g}"
            samplers += [Sampler(label + (f"-g{gamma:g}" if gamma else ""), f"eval{i}", card, g, gamma)
                         for gamma in dict.fromkeys(gammas) if gamma == 0 or card.method != "lcm"]
    return samplers


def initial_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """x_T of sample `index` under `seed`: the same for every model, step count and batch layout."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(state))


def use(teacher: Teacher, sampler: Sampler) -> None:
    """Sets the UNet's adapter state for this sampler."""
    if sampler.adapter is None:
        if getattr(teacher.backbone, "peft_config", None):
            teacher.backbone.disable_adapters()
    else:
        teacher.backbone.set_adapters([sampler.adapter])
        teacher.backbone.enable_adapters()


def embedded_guidance(cond: dict, card: ModelCard | None) -> dict:
    """cond with the embedded guidance (FLUX.1-dev's `guidance` input, (B,)) its LoRA's card records: the student
    reads what it was distilled with. Unchanged for the teacher's own rows, a base without the input, or a card
    written before the field."""
    scale = card.embedded_guidance_scale if card is not None else None
    if scale is None or "guidance" not in cond:
        return cond
    return {**cond, "guidance": torch.full_like(cond["guidance"], scale)}


@torch.no_grad()
def sample_latents(teacher: Teacher, sampler: Sampler, x_T: torch.Tensor, cond: dict, neg: dict, K: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_0 (B, C, h, w) after K steps of the sampler from x_T (adapter state set by `use`); a LoRA's rows read its
    card's embedded guidance (embedded_guidance), in the condition and in true CFG's empty one."""
    cond, neg = embedded_guidance(cond, sampler.card), embedded_guidance(neg, sampler.card)
    return sample(teacher.eps_fn, x_T, cond, neg, teacher.schedule, sampler.sampling(K), generator)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounded (what a saved PNG holds); clips (B, F, 3, H, W)
    -> (B, F, H, W, 3)."""
    return (images.movedim(-3, -1).cpu().numpy() * 255 + 0.5).astype(np.uint8)


def png_bytes(image: np.ndarray) -> bytes:
    """An image (H, W, 3) uint8 as PNG bytes."""
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="PNG")
    return out.getvalue()


def gif_bytes(clip: np.ndarray, fps: float) -> bytes:
    """A clip (F, H, W, 3) uint8 as a looping animated GIF."""
    import io

    from PIL import Image

    out = io.BytesIO()
    frames = [Image.fromarray(frame) for frame in clip]
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps), loop=0)
    return out.getvalue()


@torch.no_grad()
def generate(teacher: Teacher, sampler: Sampler, prompt: str, negative_prompt: str, steps: int, seed: int,
             resolution: int, frames: int = 1) -> np.ndarray:
    """One image (H, W, 3) uint8, or one clip (F, H, W, 3) for a video teacher: x_T from
    torch.Generator().manual_seed(seed), `steps` steps of the sampler (its guidance_scale; the negative prompt replaces
    the empty condition). What `pcm sample` and the registered MLflow model both call, one prompt at a time, so an
    image does not depend on what else was asked for."""
    use(teacher, sampler)
    x_T = torch.randn(1, *teacher.latent_shape(resolution, frames),
                      generator=torch.Generator().manual_seed(seed)).to(teacher.device)
    cond = teacher.encode_prompts([prompt], target_size=resolution)
    neg = teacher.encode_prompts([negative_prompt], target_size=resolution) if negative_prompt else \
        teacher.uncond(1, like=cond)
    x_0 = sample_latents(teacher, sampler, x_T, cond, neg, steps, torch.Generator().manual_seed(seed))
    return to_uint8(teacher.decode_latents(x_0.float()))[0]


def _first(*values):
    """The first value given: not None and not NaN (a DataFrame's missing cell); the last is the fallback."""
    return next((v for v in values if not (v is None or (isinstance(v, float) and np.isnan(v)))), values[-1])


def generate_pngs(teacher: Teacher, card: ModelCard, adapter: str, rows: list[dict],
                  defaults: SampleConfig | None = None) -> list[bytes]:
    """PNG bytes (a video LoRA: looping GIF bytes at the card's fps) for rows {prompt, negative_prompt?, steps?,
    guidance_scale?, gamma?, seed?} with the LoRA loaded as `adapter`; a missing (None / NaN) value takes defaults'
    when set, else the card's recommended steps, CFG and gamma, no negative prompt, seed 0."""
    images = []
    for row in rows:
        r = row_settings(row, card, defaults)
        image = generate(teacher, Sampler("generate", adapter, card, r["guidance_scale"], r["gamma"]), r["prompt"],
                         r["negative_prompt"], r["steps"], r["seed"], card.resolution, card.frames)
        images.append(gif_bytes(image, card.fps) if image.ndim == 4 else png_bytes(image))
    return images


def row_settings(row: dict, card: ModelCard, defaults: SampleConfig | None = None) -> dict:
    """The values a row {prompt, negative_prompt?, steps?, guidance_scale?, gamma?, seed?} samples with: a missing
    (None / NaN) value takes defaults' when set, else the card's recommended steps, CFG and gamma, no negative prompt,
    seed 0."""
    d = defaults or SampleConfig()
    return {"prompt": str(row["prompt"]), "negative_prompt": str(_first(row.get("negative_prompt"), "")),
            "steps": int(_first(row.get("steps"), d.num_steps, card.recommended_steps)),
            "guidance_scale": float(_first(row.get("guidance_scale"), d.guidance_scale,
                                           card.recommended_guidance_scale)),
            "gamma": float(_first(row.get("gamma"), d.gamma, card.recommended_gamma)),
            "seed": int(_first(row.get("seed"), 0))}
