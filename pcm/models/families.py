"""Teacher families: load a diffusers pipeline's parts, encode prompts, wrap the backbone (a UNet, or SD3's or FLUX's
transformer) as eps_fn.

Conditioning (docs/method.md §9):
  sd15  encoder_hidden_states = CLIP last hidden state; uncond = the encoded empty prompt
  animatediff  sd15's conditioning on a UNetMotionModel (SD1.5 UNet + motion adapter); latents are 5-D
        (B, C, F, H, W), and the text states are repeated per frame when the UNet is called
  sdxl  encoder_hidden_states = both encoders' penultimate hidden states, concatenated; text_embeds = encoder 2's
        pooled (projected) output; time_ids = (orig h, orig w, crop top, crop left, target h, target w);
        uncond = zeros (force_zeros_for_empty_prompt)
  sd3   a rectified flow: encoder_hidden_states = [both CLIP encoders' penultimate states concatenated and zero-padded
        to T5's width; T5's last hidden state (zeros without T5)] along the sequence; pooled_projections = both CLIP
        encoders' pooled (projected) outputs concatenated; uncond = the encoded empty prompt (as diffusers and the
        reference encode it); the transformer reads timestep = T sigma_t and returns the flow velocity
  flux  a rectified flow shifted by the resolution: encoder_hidden_states = T5's last hidden state; pooled_projections
        = CLIP-L's pooler output; guidance = the embedded guidance scale (B,) of FLUX.1-dev (schnell has none);
        latents stay (B, 16, h, w), packed into 2x2 patches around the call as FluxPipeline packs them; the
        transformer reads timestep = sigma_t; uncond = the encoded empty prompt
A condition is a dict of batch-first tensors, so the training step can batch [cond; uncond] in one forward.
"""

from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    FluxTransformer2DModel,
    MotionAdapter,
    SD3Transformer2DModel,
    UNet2DConditionModel,
    UNetMotionModel,
)
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

from pcm.config import FLOW_FAMILIES  # re-exported: the families' code reads it from here
from pcm.math import NoiseSchedule, abar_at, noise_schedule_from_scheduler_config, to_eps, vp_schedule
from pcm.models.flux import FLUX_PATCH, flux_velocity

FAMILIES = ("sd15", "sdxl", "animatediff", "sd3", "flux")
SD15_CONDITIONING = ("sd15", "animatediff")  # one CLIP encoder, last hidden state, uncond = encoded ""
ENCODED_EMPTY = ("sd15", "animatediff", "sd3", "flux")  # uncond = the encoded ""; sdxl's is zeros
T5_MAX_LENGTH = 256  # diffusers' default max_sequence_length for SD3's T5 tokens
FLUX_GUIDANCE_SCALE = 3.5  # FLUX.1-dev conditions' embedded guidance: FluxPipeline's default (docs/flow-matching.md)
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
    backbone: UNet2DConditionModel | UNetMotionModel | SD3Transformer2DModel | FluxTransformer2DModel
    scheduler_config: dict
    vae: AutoencoderKL | None = None
    tokenizers: list = field(default_factory=list)  # CLIP tokenizers, then T5's (sd3, flux)
    text_encoders: list[torch.nn.Module] = field(default_factory=list)
    max_sequence_length: int = T5_MAX_LENGTH  # sd3, flux: T5 tokens per prompt
    image_seq_len: int | None = None  # latent tokens at the training resolution: a dynamic-shift schedule's input
    _empty: dict | None = field(default=None, repr=False)  # the encoded "" (ENCODED_EMPTY): computed once, or stored

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown teacher.family {self.family!r}; allowed: {', '.join(FAMILIES)}")
        schedule = noise_schedule_from_scheduler_config(dict(self.scheduler_config), self.image_seq_len)
        if (schedule.kind == "flow") != self.is_flow:
            raise ValueError(f"teacher.family={self.family} with a {schedule.kind} scheduler "
                             f"({self.scheduler_config.get('_class_name', 'unnamed')}): "
                             f"{', '.join(FLOW_FAMILIES)} are rectified flows, the others DDPM-family schedules")
        self.prediction_type = schedule.prediction
        # what eps_fn returns: eps for a VP teacher (v-prediction converted), the flow velocity for a flow teacher
        self.schedule: NoiseSchedule = vp_schedule(schedule.table) if schedule.kind == "vp" else schedule
        self.abar = schedule.table if schedule.kind == "vp" else None

    @property
    def is_flow(self) -> bool:
        return self.family in FLOW_FAMILIES

    @property
    def guidance_mode(self) -> str:
        """How the solver guides this teacher (pcm.train.step.TEACHER_GUIDANCE): 'cfg' (cond and uncond mixed by w),
        'embedded' (one call, guidance 1 + w in the condition: FLUX.1-dev) or 'none' (one plain call: schnell)."""
        if self.family != "flux":
            return "cfg"
        return "embedded" if self.backbone.config.guidance_embeds else "none"

    @property
    def device(self) -> torch.device:
        return first_weight(self.backbone).device

    def eps_fn(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
               backbone: torch.nn.Module | None = None) -> torch.Tensor:
        """The backbone's prediction in its current adapter state, in x_t's dtype and in the parametrization of
        self.schedule: eps_hat for a VP teacher (v-prediction converted), the flow velocity u = eps - x_0 for a flow
        teacher (sd3, flux).

        backbone: the module to call instead of self.backbone (the DDP-wrapped student, same weights)."""
        net, dtype = backbone or self.backbone, first_weight(self.backbone).dtype
        if self.is_flow:
            sigma = self.schedule.table.to(x_t.device)[t.to(x_t.device)]
            if self.family == "flux":
                return flux_velocity(net, x_t.to(dtype), sigma.to(dtype), cond).to(x_t.dtype)
            return net(hidden_states=x_t.to(dtype), timestep=(sigma * len(self.schedule)).to(dtype),
                       encoder_hidden_states=cond["encoder_hidden_states"].to(dtype),
                       pooled_projections=cond["pooled_projections"].to(dtype)).sample.to(x_t.dtype)
        added = {k: cond[k] for k in ("text_embeds", "time_ids") if k in cond}
        states = cond["encoder_hidden_states"]
        if x_t.ndim == 5:  # video: the motion UNet folds frames into the batch, one text state per frame
            states = states.repeat_interleave(x_t.shape[2], dim=0)
        out = net(x_t.to(dtype), t, encoder_hidden_states=states.to(dtype),
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
        pooled (projected) output; sd3: the CLIP states zero-padded to T5's width, then T5's states along the
        sequence, and both CLIP pooled outputs concatenated; flux: T5's states and CLIP-L's pooler output.
        `pcm precompute` stores exactly these."""
        if not self.text_encoders:
            raise RuntimeError("this teacher was loaded without text encoders (the batches carry precomputed text "
                               "embeddings); load it with with_text=True to encode prompts")
        if self.family in SD15_CONDITIONING:
            return self._hidden(0, prompts, penultimate=False)[0], None
        if self.family == "flux":
            pooled = self._hidden(0, prompts, penultimate=False)[1]
            return self._hidden(1, prompts, penultimate=False, max_length=self.max_sequence_length)[0], pooled
        states, pooled = zip(*(self._hidden(i, prompts, penultimate=True) for i in range(2)), strict=True)
        if self.family == "sdxl":
            return torch.cat(states, dim=-1), pooled[1]
        clip, width = torch.cat(states, dim=-1), self.backbone.config.joint_attention_dim
        if len(self.text_encoders) > 2:
            t5 = self._hidden(2, prompts, penultimate=False, max_length=self.max_sequence_length)[0]
        else:  # no T5 (dropped to save memory, as diffusers allows): its states are zeros
            t5 = clip.new_zeros(len(prompts), self.max_sequence_length, width)
        return torch.cat([torch.nn.functional.pad(clip, (0, width - clip.shape[-1])), t5], dim=1), torch.cat(pooled, -1)

    def condition(self, states: torch.Tensor, pooled: torch.Tensor | None = None,
                  original_size: torch.Tensor | None = None, crop_top_left: torch.Tensor | None = None,
                  target_size: int | None = None) -> dict:
        """The family's condition from text states (text_states' output, encoded now or precomputed): sdxl adds
        time_ids = (original size, crop top-left, target size), each (B, 2), defaults: the target size, no crop;
        FLUX.1-dev adds its embedded guidance (B,) at FLUX_GUIDANCE_SCALE."""
        states = states.to(self.device, torch.float32)
        if self.family in SD15_CONDITIONING:
            return {"encoder_hidden_states": states}
        if self.is_flow:
            embedded = {"guidance": torch.full((len(states),), FLUX_GUIDANCE_SCALE, device=self.device)}
            return {"encoder_hidden_states": states, "pooled_projections": pooled.to(self.device, torch.float32),
                    **(embedded if self.guidance_mode == "embedded" else {})}
        batch = len(states)
        side = target_size or self.backbone.config.sample_size * self.vae_factor
        size = original_size if original_size is not None else torch.full((batch, 2), side)
        crop = crop_top_left if crop_top_left is not None else torch.zeros(batch, 2, dtype=torch.int64)
        time_ids = torch.cat([size, crop, torch.full((batch, 2), side)], dim=1).to(self.device, torch.float32)
        return {"encoder_hidden_states": states, "text_embeds": pooled.to(self.device, torch.float32),
                "time_ids": time_ids}

    def _hidden(self, i: int, prompts: list[str], penultimate: bool,
                max_length: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokenizer, encoder = self.tokenizers[i], self.text_encoders[i]
        ids = tokenizer(prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(self.device)
        out = encoder(ids, output_hidden_states=True)
        hidden = out.hidden_states[-2] if penultimate else out.last_hidden_state
        # CLIP-G/L with a projection: the projected text_embeds; FLUX's plain CLIP-L: its pooler output; T5: none
        pooled = out.text_embeds if isinstance(encoder, CLIPTextModelWithProjection) else out.get("pooler_output")
        return hidden.float(), (pooled.float() if pooled is not None else None)

    def set_empty_prompt(self, states: torch.Tensor, pooled: torch.Tensor | None = None) -> None:
        """sd15 / animatediff / sd3 / flux: uncond's encoded "" from stored states (1, L, D) (flows: and pooled
        (1, P)), for a teacher without text encoders (`pcm precompute` stores it once per folder); sdxl's is zeros."""
        if self.family not in ENCODED_EMPTY:
            raise ValueError(f"teacher.family={self.family!r} has an all-zeros empty condition; only "
                             f"{', '.join(ENCODED_EMPTY)} store the encoded empty prompt")
        if self.is_flow and pooled is None:
            raise ValueError(f"teacher.family={self.family}: the stored empty prompt needs its pooled projection too")
        self._empty = self.condition(states, pooled)

    def uncond(self, batch_size: int, like: dict | None = None) -> dict:
        """The empty condition: sd15, sd3 and flux encode "" (or take the stored one, set_empty_prompt), sdxl uses zeros
        (time ids kept from `like` when given)."""
        if self.family in ENCODED_EMPTY:
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
        dist = self.vae.encode(pixels.to(self.device, first_weight(self.vae).dtype)).latent_dist
        z = (dist.mean if mean else dist.sample(generator)).float()
        return (z - self._vae_shift) * self.vae.config.scaling_factor

    @property
    def _vae_shift(self) -> float:
        """SD3's and FLUX's VAE shift factor (latents = (z - shift) x scaling); 0 for the SD1.5 / SDXL VAEs."""
        return self.vae.config.get("shift_factor") or 0.0

    def latent_shape(self, resolution: int, frames: int = 1) -> tuple[int, ...]:
        """Shape of one sample's latent: (C, h, w), or (C, F, h, w) for a video family."""
        side = resolution // self.vae_factor
        channels = self.backbone.config.in_channels // (FLUX_PATCH ** 2 if self.family == "flux" else 1)
        return (channels, frames, side, side) if self.is_video else (channels, side, side)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1] (B, 3, H, W), float32; (B, C, F, h, w) -> clips (B, F, 3, H, W)."""
        if latents.ndim == 5:
            batch, frames = latents.shape[0], latents.shape[2]
            return self.decode_latents(latents.transpose(1, 2).flatten(0, 1)).unflatten(0, (batch, frames))
        z = latents / self.vae.config.scaling_factor + self._vae_shift
        images = self.vae.decode(z.to(first_weight(self.vae).dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)


def _revision(cfg) -> dict:
    return {"revision": cfg.revision} if cfg.revision else {}


def first_weight(module: torch.nn.Module) -> torch.Tensor:
    """The module's first parameter, whose device and dtype are the module's (the base weights come before any
    LoRA's). diffusers' `.device` / `.dtype` also look for offloading and casting hooks over every submodule: about
    a millisecond per call on a LoRA-wrapped UNet, several times per training step."""
    return next(module.parameters())


def _kwargs(cfg, dtype: torch.dtype) -> dict:
    kwargs = {"torch_dtype": dtype}
    if cfg.revision:
        kwargs["revision"] = cfg.revision
    if cfg.variant:
        kwargs["variant"] = cfg.variant
    return kwargs


def _load_backbone(cfg, kwargs: dict) -> torch.nn.Module:
    """The family's backbone: sd3's or flux's transformer, else the UNet. animatediff: teacher.model's UNetMotionModel
    (an AnimateDiff pipeline), or its SD1.5 UNet turned into one (AnimateDiffPipeline's rule); teacher.motion_adapter,
    when set, supplies the motion modules."""
    if cfg.family in FLOW_FAMILIES:
        transformer = FluxTransformer2DModel if cfg.family == "flux" else SD3Transformer2DModel
        return transformer.from_pretrained(cfg.model, subfolder="transformer", **kwargs)
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


def _text_parts(cfg) -> list[tuple[str, type, str, type]]:
    """(tokenizer folder, tokenizer class, encoder folder, encoder class) of the family's text encoders, in
    Teacher.text_states' order; T5 with its tokenizer of the class the pipeline's model_index.json names, as
    diffusers loads it: sd3's third encoder when the pipeline has one and teacher.t5 keeps it, flux's second."""
    if cfg.family in SD15_CONDITIONING:
        return [("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModel)]
    if cfg.family == "sdxl":
        return [("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModel),
                ("tokenizer_2", CLIPTokenizer, "text_encoder_2", CLIPTextModelWithProjection)]
    parts = [("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModel)]  # FLUX: CLIP-L's pooler output
    if cfg.family == "sd3":
        parts = [("tokenizer", CLIPTokenizer, "text_encoder", CLIPTextModelWithProjection),
                 ("tokenizer_2", CLIPTokenizer, "text_encoder_2", CLIPTextModelWithProjection)]
    n = len(parts) + 1  # T5 comes next (teacher.t5 is always true for flux)
    index = DiffusionPipeline.load_config(cfg.model, **_revision(cfg))
    library, tokenizer_class = index.get(f"tokenizer_{n}") or [None, None]
    if cfg.t5 and tokenizer_class is not None:
        parts.append((f"tokenizer_{n}", getattr(transformers, tokenizer_class), f"text_encoder_{n}", T5EncoderModel))
    return parts


def _image_seq_len(cfg, scheduler_config: dict, backbone: torch.nn.Module, vae: AutoencoderKL | None,
                   resolution: int | None) -> int | None:
    """Latent tokens per image at `resolution` when the scheduler shifts with it (use_dynamic_shifting: FLUX.1-dev),
    else None: (resolution / (VAE factor x patch side))^2, as FluxPipeline counts them (its packed 2x2 patches)."""
    if not scheduler_config.get("use_dynamic_shifting"):
        return None
    if resolution is None:
        raise ModelLoadError(f"teacher.model={cfg.model}: its scheduler shifts the noise levels with the image size "
                             "(use_dynamic_shifting, as FLUX.1-dev's); call load_teacher with resolution= the side "
                             "it is distilled or sampled at (data.resolution, or the LoRA card's resolution)")
    vae_config = vae.config if vae is not None else AutoencoderKL.load_config(  # the VAE not loaded: its config
        cfg.vae or cfg.model, subfolder=None if cfg.vae else "vae", **({} if cfg.vae else _revision(cfg)))
    patch = FLUX_PATCH if cfg.family == "flux" else backbone.config.get("patch_size", 1)
    return (resolution // (2 ** (len(vae_config["block_out_channels"]) - 1) * patch)) ** 2


def load_teacher(cfg, device: str | torch.device = "cpu", with_vae: bool = True, with_text: bool = True,
                 resolution: int | None = None) -> Teacher:
    """A Teacher from cfg (pcm.config.TeacherConfig): a local diffusers directory or a hub id, with the real
    from_pretrained code (revision, variant, dtype, an optional separate VAE). resolution: the image side it is
    distilled or sampled at (data.resolution, a LoRA's card.resolution), which FLUX.1-dev's dynamic shift needs."""
    check_model_reference(cfg.model)
    dtype = DTYPES[cfg.dtype]
    kwargs = _kwargs(cfg, dtype)
    try:
        backbone = _load_backbone(cfg, kwargs)
        scheduler_config = dict(DDIMScheduler.load_config(cfg.model, subfolder="scheduler", **_revision(cfg)))
        vae = None
        if with_vae:
            vae = (AutoencoderKL.from_pretrained(cfg.vae, torch_dtype=dtype) if cfg.vae
                   else AutoencoderKL.from_pretrained(cfg.model, subfolder="vae", **kwargs))
        tokenizers, encoders = [], []
        if with_text:
            for tok_dir, tok_cls, enc_dir, enc_cls in _text_parts(cfg):
                tokenizers.append(tok_cls.from_pretrained(cfg.model, subfolder=tok_dir, **_revision(cfg)))
                encoders.append(enc_cls.from_pretrained(cfg.model, subfolder=enc_dir, **kwargs))
        image_seq_len = _image_seq_len(cfg, scheduler_config, backbone, vae, resolution)
    except ModelLoadError:
        raise
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"teacher.model={cfg.model}: cannot load a {cfg.family} pipeline from it ({err})") from err
    teacher = Teacher(cfg.family, backbone, scheduler_config, vae, tokenizers, encoders, cfg.max_sequence_length,
                      image_seq_len)
    for module in [backbone, vae, *encoders]:
        if module is not None:
            module.requires_grad_(False).eval().to(device)
    return teacher
