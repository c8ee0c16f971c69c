"""Teacher families: load a diffusers SD1.5 / SDXL pipeline's parts, encode prompts, wrap the UNet as eps_fn.

Conditioning (docs/method.md §9):
  sd15  encoder_hidden_states = CLIP last hidden state; uncond = the encoded empty prompt
  animatediff  sd15's conditioning on a UNetMotionModel (SD1.5 UNet + motion adapter); latents are 5-D
        (B, C, F, H, W), and the text states are repeated per frame when the UNet is called
  sdxl  encoder_hidden_states = both encoders' penultimate hidden states, concatenated; text_embeds = encoder 2's
        pooled (projected) output; time_ids = (orig h, orig w, crop top, crop left, target h, target w);
        uncond = zeros (force_zeros_for_empty_prompt)
A condition is a dict of batch-first tensors, so the training step can batch [cond; uncond] in one forward.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, MotionAdapter, UNet2DConditionModel, UNetMotionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pcm.math import abar_at, schedule_from_scheduler_config, to_eps

FAMILIES = ("sd15", "sdxl", "animatediff")
SD15_CONDITIONING = ("sd15", "animatediff")  # one CLIP encoder, last hidden state, uncond = encoded ""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ModelLoadError(OSError):
    """A teacher that cannot be loaded; the message names the config key."""



def check_model_reference(model: str, key: str = "teacher.model") -> None:
    """Fails early for a local path that does not exist (a hub id is checked when it loads)."""
    if not model:
        raise ModelLoadError(f"{key} is empty: give a local diffusers pipeline directory or a hub id")
    first = Path(model).parts[0] if Path(model).parts else ""
    if (model.startswith(("/", "./", "../", "~")) or (first and Path(first).is_dir())) and not Path(model).exists():
        raise ModelLoadError(f"{key}={model}: no such directory (for the demo, run `pcm demo-teacher` first)")


@dataclass
class Teacher:
    """The frozen parts of a teacher pipeline and the family's conditioning rules."""

    family: str
    unet: UNet2DConditionModel | UNetMotionModel
    scheduler_config: dict
    vae: AutoencoderKL | None = None
    tokenizers: list[CLIPTokenizer] = field(default_factory=list)
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    _empty: dict | None = field(default=None, repr=False)  # sd15's encoded "": computed once, or stored

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown teacher.family {self.family!r}; allowed: {', '.join(FAMILIES)}")
        self.abar, self.prediction_type = schedule_from_scheduler_config(dict(self.scheduler_config))

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def eps_fn(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
               unet: torch.nn.Module | None = None) -> torch.Tensor:
        """eps_hat of the UNet in its current adapter state (v-prediction converted), in x_t's dtype.

        unet: the module to call instead of self.unet (the DDP-wrapped student, same weights)."""
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        dtype = self.unet.dtype
        states = cond["encoder_hidden_states"]
        if x_t.ndim == 5:  # video: the motion UNet folds frames into the batch, one text state per frame
            states = states.repeat_interleave(x_t.shape[2], dim=0)
        out = (unet or self.unet)(x_t.to(dtype), t, encoder_hidden_states=states.to(dtype),
                        added_cond_kwargs={k: v.to(dtype) for k, v in added.items()} or None).sample
        return to_eps(out.to(x_t.dtype), x_t, abar_at(self.abar, t, x_t), self.prediction_type)

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], original_size: torch.Tensor | None = None,
                       crop_top_left: torch.Tensor | None = None, target_size: int | None = None) -> dict:
        """The family's condition for a batch of prompts (sizes are SDXL's micro-conditioning, (B, 2) each)."""
        return self.condition(*self.text_states(prompts), original_size, crop_top_left, target_size)

    @torch.no_grad()
    def text_states(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What the text encoders give for a batch of prompts, float32: (hidden states (B, L, D), pooled (B, P) or
        None); sd15: the last hidden state; sdxl: both encoders' penultimate states concatenated and encoder 2's
        pooled (projected) output. `pcm precompute` stores exactly these."""
        if not self.text_encoders:
            raise RuntimeError("this teacher was loaded without text encoders (the batches carry precomputed text "
                               "embeddings); load it with with_text=True to encode prompts")
        if self.family in SD15_CONDITIONING:
            return self._hidden(0, prompts, penultimate=False)[0], None
        states, pooled = zip(*(self._hidden(i, prompts, penultimate=True) for i in range(2)), strict=True)
        return torch.cat(states, dim=-1), pooled[1]

    def condition(self, states: torch.Tensor, pooled: torch.Tensor | None = None,
                  original_size: torch.Tensor | None = None, crop_top_left: torch.Tensor | None = None,
                  target_size: int | None = None) -> dict:
        """The family's condition from text states (text_states' output, encoded now or precomputed): sdxl adds
        time_ids = (original size, crop top-left, target size), each (B, 2), defaults: the target size, no crop."""
        states = states.to(self.device, torch.float32)
        if self.family in SD15_CONDITIONING:
            return {"encoder_hidden_states": states}
        batch = len(states)
        side = target_size or self.unet.config.sample_size * self.vae_factor
        size = original_size if original_size is not None else torch.full((batch, 2), side)
        crop = crop_top_left if crop_top_left is not None else torch.zeros(batch, 2, dtype=torch.int64)
        time_ids = torch.cat([size, crop, torch.full((batch, 2), side)], dim=1).to(self.device, torch.float32)
        return {"encoder_hidden_states": states, "text_embeds": pooled.to(self.device, torch.float32),
                "time_ids": time_ids}

    def _hidden(self, i: int, prompts: list[str], penultimate: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokenizer, encoder = self.tokenizers[i], self.text_encoders[i]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
        pooled = out.text_embeds if isinstance(encoder, CLIPTextModelWithProjection) else None
        return hidden.float(), (pooled.float() if pooled is not None else None)

    def set_empty_prompt(self, states: torch.Tensor) -> None:
        """sd15 / animatediff: uncond's encoded "" from stored states (1, L, D), for a teacher without text encoders
        (`pcm precompute` stores it once per folder); sdxl's uncond is zeros and needs none."""
        if self.family not in SD15_CONDITIONING:
            raise ValueError(f"teacher.family={self.family!r} has an all-zeros empty condition; only "
                             f"{', '.join(SD15_CONDITIONING)} store the encoded empty prompt")
        self._empty = self.condition(states)

    def uncond(self, batch_size: int, like: dict | None = None) -> dict:
        """The empty condition: sd15 encodes "" (or takes the stored one, set_empty_prompt), sdxl uses zeros (time
        ids kept from `like` when given)."""
        if self.family in SD15_CONDITIONING:
            if self._empty is None:
                self._empty = self.encode_prompts([""])
            return {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._empty.items()}
        if like is None:
            like = self.encode_prompts([""] * batch_size)
        return {"encoder_hidden_states": torch.zeros_like(like["encoder_hidden_states"]),
                "text_embeds": torch.zeros_like(like["text_embeds"]), "time_ids": like["time_ids"]}

    @property
    def vae_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8

    @property
    def is_video(self) -> bool:
        return self.family == "animatediff"

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None,
                      mean: bool = False) -> torch.Tensor:
        """Images in [-1, 1] (B, 3, H, W) -> latents x_0 = a sample (or the mean) of the VAE posterior x scaling
        factor. Clips (B, F, 3, H, W) are encoded frame by frame into (B, C, F, h, w)."""
        if pixels.ndim == 5:
            batch, frames = pixels.shape[:2]
            flat = self.encode_images(pixels.flatten(0, 1), generator, mean)
            return flat.unflatten(0, (batch, frames)).transpose(1, 2)
        dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
        return (dist.mean if mean else dist.sample(generator)).float() * self.vae.config.scaling_factor

    def latent_shape(self, resolution: int, frames: int = 1) -> tuple[int, ...]:
        """Shape of one sample's latent: (C, h, w), or (C, F, h, w) for a video family."""
        side = resolution // self.vae_factor
        channels = self.unet.config.in_channels
        return (channels, frames, side, side) if self.is_video else (channels, side, side)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (B, 3, H, W), float32; (B, C, F, h, w) -> clips (B, F, 3, H, W)."""
        if latents.ndim == 5:
            batch, frames = latents.shape[0], latents.shape[2]
            return self.decode_latents(latents.transpose(1, 2).flatten(0, 1)).unflatten(0, (batch, frames))
        images = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def _kwargs(cfg, dtype: torch.dtype) -> dict:
    kwargs = {"torch_dtype": dtype}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    return kwargs


def _load_unet(cfg, kwargs: dict) -> UNet2DConditionModel | UNetMotionModel:
    """The family's UNet. animatediff: teacher.model's UNetMotionModel (an AnimateDiff pipeline), or its SD1.5 UNet
    turned into one (AnimateDiffPipeline's rule); teacher.motion_adapter, when set, supplies the motion modules."""
    if cfg.family != "animatediff":
        return UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet", **kwargs)
    unet_class = UNet2DConditionModel.load_config(cfg.model, subfolder="unet").get("_class_name")
    adapter = None
    if cfg.motion_adapter:
        check_model_reference(cfg.motion_adapter, "teacher.motion_adapter")
        adapter = MotionAdapter.from_pretrained(cfg.motion_adapter, torch_dtype=kwargs["torch_dtype"])
    if unet_class == "UNetMotionModel":
        unet = UNetMotionModel.from_pretrained(cfg.model, subfolder="unet", **kwargs)
        if adapter is not None:
            unet.load_motion_modules(adapter)
        return unet
    if adapter is None:
        raise ModelLoadError(f"teacher.model={cfg.model}: its unet is a {unet_class}, not an AnimateDiff "
                             "UNetMotionModel; set teacher.motion_adapter to a MotionAdapter directory or hub id")
    unet = UNet2DConditionModel.from_pretrained(cfg.model, subfolder="unet", **kwargs)
    return UNetMotionModel.from_unet2d(unet, adapter)


def load_teacher(cfg, device: str | torch.device = "cpu", with_vae: bool = True, with_text: bool = True) -> Teacher:
    """A Teacher from cfg (pcm.config.TeacherConfig): a local diffusers directory or a hub id, with the real
    from_pretrained code (revision, variant, dtype, an optional separate VAE)."""
    check_model_reference(cfg.model)
    dtype = DTYPES[cfg.dtype]
    kwargs = _kwargs(cfg, dtype)
    try:
        unet = _load_unet(cfg, kwargs)
        scheduler_config = dict(DDIMScheduler.load_config(cfg.model, subfolder="scheduler",
                                                          **{k: v for k, v in kwargs.items() if k == "revision"}))
        vae = None
        if with_vae:
            vae = (AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=dtype) if cfg.vae
                   else AutoencoderKL.from_pretrained(cfg.model, subfolder="vae", **kwargs))
        tokenizers, encoders = [], []
        if with_text:
            names = [("tokenizer", "text_encoder", CLIPTextModel)]
            if cfg.family == "sdxl":
                names.append(("tokenizer_2", "text_encoder_2", CLIPTextModelWithProjection))
            for tok_dir, enc_dir, cls in names:
                tokenizers.append(CLIPTokenizer.from_pretrained(cfg.model, subfolder=tok_dir,
                                                                **{k: v for k, v in kwargs.items() if k == "revision"}))
                encoders.append(cls.from_pretrained(cfg.model, subfolder=enc_dir, **kwargs))
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"teacher.model={cfg.model}: cannot load a {cfg.family} pipeline from it ({err})") from err
    teacher = Teacher(cfg.family, unet, scheduler_config, vae, tokenizers, encoders)
    for module in [unet, vae, *encoders]:
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return teacher
