"""Tiny SD1.5-, SDXL-, AnimateDiff-, SD3- and FLUX-shaped pipelines built from configs (no downloads), for tests and
the demo.

They use the real block types (cross-attention down/up blocks, SDXL's text_time added conditioning, two CLIP
encoders with a projection, SD3's joint-attention transformer with a T5 encoder and a 16-channel VAE, FLUX's double-
and single-stream transformer with its guidance embedding and dynamic-shift scheduler) at toy widths, and an offline
CLIP tokenizer built from a caption corpus, so `save_pretrained` followed by our loaders exercises exactly the code
that loads SD1.5 / SDXL / SD3 / FLUX.
"""

import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    MotionAdapter,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
)

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer splits letters, single digits and punctuation runs; we mirror it for ASCII text.
_WORD = re.compile(r"[a-z]+|[0-9]|[^\sa-z0-9]+")


def build_tokenizer(corpus: Iterable[str], model_max_length: int = 77,
                    base: CLIPTokenizer | None = None) -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary is the corpus's characters plus left-to-right merges of its words.

    Every word of the corpus becomes reachable by merges (most become one token); any other text made of the
    corpus's characters still tokenizes (into smaller pieces); unseen characters map to the unknown token.
    base: a tokenizer of this kind to extend: its tokens keep their ids and merges (so a text encoder trained with it
    keeps its embeddings) and the corpus's new characters and words are appended after them.
    """
    words = Counter(w for text in corpus for w in _WORD.findall(text.lower()))
    chars = sorted({c for w in words for c in w})
    vocab, merges = {BOS: 0, EOS: 1}, []
    if base is not None:
        model = json.loads(base.backend_tokenizer.to_str())["model"]
        vocab, merges = dict(model["vocab"]), [tuple(pair) for pair in model["merges"]]
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    for word, _ in sorted(words.items(), key=lambda kv: (-kv[1], kv[0])):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        prefix = pieces[0]
        for piece in pieces[1:]:
            merged = prefix + piece
            if merged not in vocab:
                vocab[merged] = len(vocab)
                merges.append((prefix, piece))
            prefix = merged
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


@dataclass(frozen=True)
class TinySizes:
    """Widths of a tiny pipeline; the defaults are test-sized (a forward pass in milliseconds)."""

    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    cross_attention_dim: int = 32  # SD1.5: text hidden size; SDXL: both encoders' hidden sizes summed
    text_hidden: int = 32
    text_layers: int = 2
    vae_channels: tuple[int, ...] = (8, 16)  # downsampling factor 2 ** (len - 1)
    norm_groups: int = 8
    sample_size: int = 8  # latent side the UNet is configured for (informational for diffusers)
    attention_from: int = 0  # first UNet level with cross-attention; 0 = SD1.5's layout, 1 = SDXL's


def _text_config(tokenizer: CLIPTokenizer, sizes: TinySizes, hidden: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=sizes.text_layers, num_attention_heads=max(1, hidden // 16),
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )


def tiny_vae(sizes: TinySizes, latent_channels: int = 4, **scaling) -> AutoencoderKL:
    """A VAE of the sizes; SD3's has 16 latent channels and a shift_factor beside its scaling_factor."""
    n = len(sizes.vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=sizes.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=sizes.norm_groups, sample_size=sizes.sample_size * 2 ** (n - 1),
        **scaling,
    )


def _unet_blocks(sizes: TinySizes) -> dict:
    """Cross-attention in the blocks from level sizes.attention_from to the last but one (0 = full latent resolution):
    from 0 is SD1.5's layout shortened, from 1 SDXL's (no attention at the highest resolution)."""
    n, first = len(sizes.unet_channels), sizes.attention_from
    if not 0 <= first < n - 1:
        raise ValueError(f"attention_from={first}: must be in [0, {n - 2}] for {n} UNet levels (the deepest has none)")
    attention = [first <= level < n - 1 for level in range(n)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention))
    return {"down_block_types": down, "up_block_types": up}


def tiny_sd15_components(tokenizer: CLIPTokenizer, sizes: TinySizes = TinySizes(),
                         prediction_type: str = "epsilon") -> dict:
    """Components of a StableDiffusionPipeline (safety checker and feature extractor omitted)."""
    unet = UNet2DConditionModel(
        sample_size=sizes.sample_size, in_channels=4, out_channels=4, block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.layers_per_block, cross_attention_dim=sizes.text_hidden,
        attention_head_dim=sizes.attention_head_dim, norm_num_groups=sizes.norm_groups,
        **_unet_blocks(sizes),
    )
    return {
        "unet": unet, "vae": tiny_vae(sizes), "tokenizer": tokenizer,
        "text_encoder": CLIPTextModel(_text_config(tokenizer, sizes, sizes.text_hidden)),
        "scheduler": sd_scheduler(prediction_type),
        "safety_checker": None, "feature_extractor": None, "image_encoder": None,
    }


def tiny_sdxl_components(tokenizer: CLIPTokenizer, sizes: TinySizes = TinySizes(),
                         prediction_type: str = "epsilon") -> dict:
    """Components of a StableDiffusionXLPipeline: two encoders (the second with a projection), text_time UNet."""
    hidden_1, hidden_2 = sizes.text_hidden, sizes.text_hidden * 2
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=sizes.sample_size, in_channels=4, out_channels=4, block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.layers_per_block, cross_attention_dim=hidden_1 + hidden_2,
        attention_head_dim=sizes.attention_head_dim, norm_num_groups=sizes.norm_groups, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=hidden_2 + 6 * time_dim, **_unet_blocks(sizes),
    )
    return {
        "unet": unet, "vae": tiny_vae(sizes), "scheduler": sd_scheduler(prediction_type),
        "text_encoder": CLIPTextModel(_text_config(tokenizer, sizes, hidden_1)), "tokenizer": tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(_text_config(tokenizer, sizes, hidden_2)),
        "tokenizer_2": tokenizer, "image_encoder": None, "feature_extractor": None,
    }


def tiny_motion_adapter(sizes: TinySizes = TinySizes(), max_frames: int = 32) -> MotionAdapter:
    """An AnimateDiff MotionAdapter for a tiny UNet of the same sizes: one temporal transformer per resnet, a mid
    block module, two heads. Its output projections are drawn small but non-zero (AnimateDiff zero-initializes them
    before training), so a fresh tiny teacher already mixes frames and motion LoRAs change its output."""
    adapter = MotionAdapter(
        block_out_channels=sizes.unet_channels, motion_layers_per_block=sizes.layers_per_block,
        motion_num_attention_heads=2, motion_norm_num_groups=sizes.norm_groups, motion_max_seq_length=max_frames,
        use_motion_mid_block=True,
    )
    with torch.no_grad():
        for name, param in adapter.named_parameters():
            if "proj_out" in name and param.ndim == 2 and not param.any():
                param.normal_(0.0, 0.02)
    return adapter


def tiny_animatediff_components(tokenizer: CLIPTokenizer, sizes: TinySizes = TinySizes(),
                                prediction_type: str = "epsilon") -> dict:
    """Components of an AnimateDiffPipeline: the tiny SD1.5 parts and a motion adapter for its UNet."""
    sd15 = tiny_sd15_components(tokenizer, sizes, prediction_type)
    keep = ("unet", "vae", "tokenizer", "text_encoder", "scheduler", "feature_extractor", "image_encoder")
    return {**{k: sd15[k] for k in keep}, "motion_adapter": tiny_motion_adapter(sizes)}


def tiny_sd3_components(tokenizer: CLIPTokenizer, sizes: TinySizes = TinySizes(), with_t5: bool = True,
                        shift: float = 3.0) -> dict:
    """Components of a StableDiffusion3Pipeline: a joint-attention transformer over 2x2 patches of a 16-channel latent,
    CLIP-L- and CLIP-G-shaped encoders (both with projections; their pooled outputs concatenated are the pooled
    projection), a T5 encoder (optional, as in diffusers; it reads the same offline tokenizer) and SD3's shifted
    flow-matching scheduler. The VAE's shift and scaling factors are SD3's own."""
    hidden_1, hidden_2 = sizes.text_hidden, sizes.text_hidden * 2
    joint = 2 * (hidden_1 + hidden_2)  # T5's width; the CLIP states (hidden_1 + hidden_2) are zero-padded to it
    heads = 2
    transformer = SD3Transformer2DModel(
        sample_size=sizes.sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
        attention_head_dim=sizes.attention_head_dim, num_attention_heads=heads, joint_attention_dim=joint,
        caption_projection_dim=heads * sizes.attention_head_dim, pooled_projection_dim=hidden_1 + hidden_2,
        pos_embed_max_size=max(16, sizes.sample_size),
    )
    t5 = _tiny_t5(tokenizer, joint) if with_t5 else None
    return {
        "transformer": transformer, "vae": tiny_vae(sizes, 16, scaling_factor=1.5305, shift_factor=0.0609),
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        "text_encoder": CLIPTextModelWithProjection(_text_config(tokenizer, sizes, hidden_1)), "tokenizer": tokenizer,
        "text_encoder_2": CLIPTextModelWithProjection(_text_config(tokenizer, sizes, hidden_2)),
        "tokenizer_2": tokenizer, "text_encoder_3": t5, "tokenizer_3": tokenizer if with_t5 else None,
        "image_encoder": None, "feature_extractor": None,
    }


def _tiny_t5(tokenizer: CLIPTokenizer, width: int) -> T5EncoderModel:
    """A two-layer T5 encoder of the given width reading the offline tokenizer's ids."""
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2,
                                   num_heads=2, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id))


def flux_scheduler(guidance_embeds: bool = True) -> FlowMatchEulerDiscreteScheduler:
    """FLUX.1-dev's scheduler config (shift by resolution: mu from 0.5 at 256 latent tokens to 1.15 at 4096), or
    schnell's (no shift) for a transformer without the guidance embedding."""
    if not guidance_embeds:
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
                                           base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                                           max_image_seq_len=4096)


def tiny_flux_components(tokenizer: CLIPTokenizer, sizes: TinySizes = TinySizes(),
                         guidance_embeds: bool = True) -> dict:
    """Components of a FluxPipeline: one double- and one single-stream block over packed 2x2 patches of a 16-channel
    latent (in_channels 64), CLIP-L-shaped CLIPTextModel (its pooler output is the pooled projection), a T5 encoder
    reading the same offline tokenizer, the VAE's FLUX shift and scaling factors, and FLUX.1-dev's guidance
    embedding and dynamic-shift scheduler (guidance_embeds=False: schnell's layout and unshifted scheduler)."""
    hidden, heads, head_dim = sizes.text_hidden, 2, 16
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=hidden, pooled_projection_dim=hidden,
        guidance_embeds=guidance_embeds, axes_dims_rope=(4, 6, 6),  # rotary dims per id axis sum to head_dim
    )
    return {
        "transformer": transformer, "vae": tiny_vae(sizes, 16, scaling_factor=0.3611, shift_factor=0.1159),
        "scheduler": flux_scheduler(guidance_embeds), "tokenizer": tokenizer, "tokenizer_2": tokenizer,
        "text_encoder": CLIPTextModel(_text_config(tokenizer, sizes, hidden)),
        "text_encoder_2": _tiny_t5(tokenizer, hidden), "image_encoder": None, "feature_extractor": None,
    }


def sd_scheduler(prediction_type: str = "epsilon") -> DDIMScheduler:
    """SD's training schedule (scaled_linear 0.00085..0.012, T = 1000) as a DDIM scheduler config."""
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)


def save_tiny_clip(path: str | Path, corpus: Iterable[str], image_size: int = 32, hidden: int = 32) -> Path:
    """A random CLIP model (text + vision towers, projections), its tokenizer and PIL image processor saved to a
    directory that `transformers` loads like openai/clip-vit-*: what tests use for eval.clip_model."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = build_tokenizer(corpus)
    text = _text_config(tokenizer, TinySizes(), hidden)
    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=2, image_size=image_size, patch_size=image_size // 4)
    model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": image_size},
                          crop_size={"height": image_size, "width": image_size}).save_pretrained(path)
    return Path(path)
