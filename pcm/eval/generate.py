"""What every evaluated model is and how it samples: the teacher's DDIM, PCM and LCM LoRAs, on one UNet.

A Sampler names a row source: the teacher (adapters off, DDIM with "trailing" spacing) or one loaded LoRA adapter
(PCM: DDIM jumps over its trained edges, sub-divided or skipped for other step counts; LCM: LCMScheduler's
multistep rule). Initial noises are a function of (seed, prompt index) only, so every row starts from the same ones.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pcm.config import SampleConfig
from pcm.inference import load_checked
from pcm.math import SolverGrid
from pcm.models.families import Teacher
from pcm.models.lora import read_card
from pcm.sampling import ddim_timesteps, lcm_timesteps, pcm_timesteps, sample_lcm, sample_pcm


@dataclass(frozen=True)
class Sampler:
    """One row source: label, adapter (None = the teacher), method and its grid, inference CFG."""

    label: str
    adapter: str | None
    method: str  # ddim | pcm | lcm
    guidance_scale: float
    num_solver_steps: int = 0  # N of a LoRA (pcm, lcm)
    num_phases: int = 0  # M of a PCM LoRA
    sigma_data: float = 0.5  # LCM boundary scalings
    timestep_scaling: float = 10.0
    gamma: float = 0.0  # PCM/DDIM stochasticity (TCD's rule); LCM's multistep rule re-noises fully already

    def __post_init__(self):
        if self.gamma != 0 and self.method == "lcm":
            raise ValueError(f"gamma={self.gamma:g} with an LCM LoRA: its multistep sampler already re-noises with "
                             "fresh noise at every step; use gamma 0 (or a PCM LoRA)")

    def timesteps(self, T: int, K: int) -> list[int]:
        if self.method == "ddim":
            return ddim_timesteps(T, K)
        if self.method == "pcm":
            return pcm_timesteps(SolverGrid(T, self.num_solver_steps, self.num_phases), K)
        if self.method == "lcm":
            return lcm_timesteps(T, self.num_solver_steps, K)
        raise ValueError(f"unknown sampling method {self.method!r}; allowed: ddim, pcm, lcm")


def teacher_sampler(guidance_scale: float) -> Sampler:
    return Sampler("teacher-ddim", None, "ddim", guidance_scale)


def lora_sampler(meta: dict, adapter: str, guidance_scale: float, label: str, gamma: float = 0.0) -> Sampler:
    """A LoRA's sampler from its exported metadata (pcm_config.json)."""
    return Sampler(label, adapter, meta["method"], guidance_scale, meta["num_solver_steps"], meta["num_phases"],
                   meta.get("lcm_sigma_data", 0.5), meta.get("lcm_timestep_scaling", 10.0), gamma)


def read_lora_config(folder: str | Path) -> dict:
    """pcm_config.json of an exported LoRA folder; one line naming eval.loras, the path and the fix when it is
    missing, truncated or not a JSON object."""
    return read_card(folder, "eval.loras")


def load_samplers(teacher: Teacher, folders: tuple[str, ...], guidance_scales: tuple[float, ...],
                  gammas: tuple[float, ...] = (0.0,)) -> list[Sampler]:
    """Loads every LoRA folder onto teacher.unet as an adapter; one Sampler per (LoRA, guidance scale, gamma), LCM
    LoRAs at gamma 0 only.

    Labels: '<method>-M<phases>' ('lcm' for LCM), the folder's parent name appended when two LoRAs share one,
    '-cfg<scale>' when several scales are evaluated and '-g<gamma>' for gamma != 0 (gamma-0 labels stay as they
    were)."""
    metas = [read_lora_config(f) for f in folders]
    names = [m["method"] if m["method"] == "lcm" else f"pcm-M{m['num_phases']}" for m in metas]
    names = [n if names.count(n) == 1 else f"{n}-{Path(f).resolve().parent.name}" for n, f in zip(names, folders,
                                                                                                   strict=True)]
    if len(set(names)) != len(names):
        raise ValueError(f"eval.loras={list(folders)}: two entries give the same row label {names}; list each once")
    samplers = []
    for i, (folder, meta, name) in enumerate(zip(folders, metas, names, strict=True)):
        load_checked(teacher.unet, folder, f"eval{i}", f"eval.loras entry {folder}",
                     f"the LoRA records a {meta.get('family')} base {meta.get('base_model')}, the teacher "
                     f"(teacher.model) is {teacher.family}")
        for g in guidance_scales:
            label = name if len(guidance_scales) == 1 else f"{name}-cfg{g:g}"
            samplers += [lora_sampler(meta, f"eval{i}", g, label + (f"-g{gamma:g}" if gamma else ""), gamma)
                         for gamma in dict.fromkeys(gammas) if gamma == 0 or meta["method"] != "lcm"]
    return samplers


def initial_noise(shape: tuple[int, ...], seed: int, index: int) -> torch.Tensor:
    """x_T of sample `index` under `seed`: the same for every model, step count and batch layout."""
    state = int(np.random.SeedSequence([seed, index]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(state))


def use(teacher: Teacher, sampler: Sampler) -> None:
    """Sets the UNet's adapter state for this sampler."""
    if sampler.adapter is None:
        if getattr(teacher.unet, "peft_config", None):
            teacher.unet.disable_adapters()
    else:
        teacher.unet.set_adapters([sampler.adapter])
        teacher.unet.enable_adapters()


@torch.no_grad()
def sample_latents(teacher: Teacher, sampler: Sampler, x_T: torch.Tensor, cond: dict, neg: dict, K: int,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """x_0 (B, 4, h, w) after K steps of the sampler from x_T (adapter state set by `use`)."""
    path = sampler.timesteps(len(teacher.abar), K)
    if sampler.method == "lcm":
        return sample_lcm(teacher.eps_fn, x_T, cond, teacher.abar, path, sigma_data=sampler.sigma_data,
                          timestep_scaling=sampler.timestep_scaling, guidance_scale=sampler.guidance_scale,
                          neg_cond=neg, generator=generator)
    return sample_pcm(teacher.eps_fn, x_T, cond, teacher.abar, path, guidance_scale=sampler.guidance_scale,
                      neg_cond=neg, gamma=sampler.gamma, generator=generator)


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


def generate_pngs(teacher: Teacher, meta: dict, adapter: str, rows: list[dict],
                  defaults: SampleConfig | None = None) -> list[bytes]:
    """PNG bytes (a video LoRA: looping GIF bytes at meta's fps, default 8) for rows {prompt, negative_prompt?,
    steps?, guidance_scale?, gamma?, seed?} with the LoRA loaded as `adapter`; a missing (None / NaN) value takes
    defaults' when set, else the LoRA's recommended steps and CFG, gamma 0, no negative prompt, seed 0."""
    defaults, images = defaults or SampleConfig(), []
    for row in rows:
        scale = float(_first(row.get("guidance_scale"), defaults.guidance_scale, meta["recommended_guidance_scale"]))
        gamma = float(_first(row.get("gamma"), defaults.gamma, 0.0))
        if not 0 <= gamma <= 1:
            raise ValueError(f"gamma={gamma:g}: must be in [0, 1] (0 = deterministic PCM, 1 = fully re-noised)")
        steps = int(_first(row.get("steps"), defaults.num_steps, meta["recommended_steps"]))
        image = generate(teacher, lora_sampler(meta, adapter, scale, "generate", gamma), str(row["prompt"]),
                         str(_first(row.get("negative_prompt"), "")), steps, int(_first(row.get("seed"), 0)),
                         meta["resolution"], meta.get("frames", 1))
        images.append(gif_bytes(image, meta.get("fps", 8)) if image.ndim == 4 else png_bytes(image))
    return images
