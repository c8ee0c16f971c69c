"""`pcm demo-teacher`: a tiny SD1.5-, SDXL-, AnimateDiff- or SD3-shaped teacher trained from scratch on the prepared
shapes shards (clips for animatediff: pcm.demo.video_teacher; sd3, a rectified flow: pcm.demo.flow_teacher).

Phases, all seeded by cfg.seed:
  1. data     every prepared image and caption in memory; the last `holdout` samples are kept out of training
  2. vae      AutoencoderKL, MSE + 1e-6 KL; held-out PSNR; scaling_factor = 1 / std of the training latents (sd3:
              16 channels, shift_factor = their mean)
  3. backbone UNet (sd3: transformer) + text encoders jointly, eps (sd3: flow velocity) loss, caption dropout, EMA
  4. save     the whole pipeline with save_pretrained (EMA weights), written to a temp dir and renamed at the end
  5. eval     the saved pipeline samples the held-out captions (DDIM + CFG; sd3: Euler + CFG); the oracle reads the
              main object back
"""

import json
import math
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AnimateDiffPipeline, AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline
from tqdm import tqdm

from pcm.config import Config, DemoTeacherConfig
from pcm.data.loader import decode_batch
from pcm.data.shards import iter_tar
from pcm.demo import flow_teacher, oracle, video_teacher
from pcm.demo.shapes import COLOURS, KINDS, POSITIONS, parse_caption
from pcm.models.tiny import (
    TinySizes,
    build_tokenizer,
    tiny_animatediff_components,
    tiny_sd15_components,
    tiny_sdxl_components,
)
from pcm.train.ema import EMA
from pcm.train.optim import adamw

KL_WEIGHT = 1e-6  # SD's VAE recipe: the KL term only keeps the posterior from collapsing; quality comes from MSE
WARMUP_STEPS = 20  # linear learning-rate warmup: Adam's first steps at full lr 2e-3 can blow up fresh GroupNorm nets
FAMILIES = {"sd15": (tiny_sd15_components, StableDiffusionPipeline),  # the eps-prediction UNet families
            "sdxl": (tiny_sdxl_components, StableDiffusionXLPipeline),
            "animatediff": (tiny_animatediff_components, AnimateDiffPipeline)}


def _family(name: str) -> tuple:
    """(tiny components factory, pipeline class) of a UNet family; the flow families live in pcm.demo.flow_teacher."""
    if name not in FAMILIES:
        raise ValueError(f"demo_teacher.family {name!r} has no UNet recipe; allowed: {', '.join(FAMILIES)} (and "
                         f"{', '.join(flow_teacher.FAMILIES)}, trained as rectified flows by pcm.demo.flow_teacher)")
    return FAMILIES[name]


def load_prepared(folder: str | Path) -> tuple[torch.Tensor, list[str]]:
    """All prepared samples in index order: pixels (N, 3, H, W) uint8 and captions.

    Held in memory instead of streamed through make_loader: 4000 images of 32 px are 12 MB, and random batches
    from a tensor cost nothing, where decoding PNGs every step would take a sizeable share of a CPU step.
    """
    index = Path(folder) / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: data.output_dir={folder} holds no prepared shards; "
                                "run `pcm demo-data` and `pcm prepare` first")
    pixels, captions = [], []
    for shard in json.loads(index.read_text())["shards"]:
        with open(Path(folder) / shard["name"], "rb") as f:
            batch = decode_batch(list(iter_tar(f)))
        if batch is not None:
            pixels.append(batch["pixels"])
            captions.extend(batch["caption"])
    if not captions:
        raise ValueError(f"data.output_dir={folder}: the prepared shards hold no readable samples; re-run pcm prepare")
    return torch.cat(pixels), captions


def _to_float(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches of `steps` steps: shuffled epochs, so every sample is seen once per epoch."""
    order = torch.empty(0, dtype=torch.int64)
    for _ in range(steps):
        if len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def _lr_lambda(steps: int):
    """Linear warmup, then cosine decay to 10%: a fixed step budget ends on small, low-noise updates."""
    def factor(step: int) -> float:
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _optimizer(params, lr: float, steps: int):
    # beta2 = 0.99: the second-moment average spans ~100 steps instead of ~1000, so in runs of a few hundred steps
    # the step size follows the fast-shrinking gradients (the VAE learns the shape colours about twice as early).
    opt = adamw(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))


def fit(loss: Callable[[torch.Tensor], torch.Tensor], modules: list[torch.nn.Module], n: int,
        budget: tuple[float, int, int], generator: torch.Generator, progress: bool,
        ema_decay: float | None = None) -> tuple[EMA | None, float]:
    """Trains modules in place on loss(batch indices) over n samples, budget = (learning rate, steps, batch size) of
    AdamW with warmup and cosine decay; returns (an EMA of their weights when ema_decay is given, the last loss)."""
    lr, steps, batch_size = budget
    params = [p for m in modules for p in m.parameters()]
    opt, sched = _optimizer(params, lr, steps)
    ema = EMA(params, ema_decay) if ema_decay is not None else None
    bar = tqdm(_batches(n, batch_size, steps, generator), total=steps, disable=not progress,
               desc=f"demo-teacher {type(modules[0]).__name__}")
    for m in modules:
        m.train()
    for step, idx in enumerate(bar):
        value = loss(idx)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        sched.step()
        if ema is not None:
            # Warm the EMA up like diffusers' EMAModel: a fixed 0.995 would still hold 0.7% of the random init after
            # 1000 steps, and most of it in the short test runs.
            ema.decay = min(ema_decay, (1 + step) / (10 + step))
            ema.update()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{value.item():.4f}")
    for m in modules:
        m.eval()
    return ema, value.item()


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, cfg: DemoTeacherConfig, generator: torch.Generator,
              progress: bool) -> float:
    """Trains vae in place on pixels (N, 3, H, W) uint8, MSE + KL_WEIGHT x KL; returns the last loss."""
    def loss(idx: torch.Tensor) -> torch.Tensor:
        x = _to_float(pixels[idx].to(vae.device))
        posterior = vae.encode(x).latent_dist
        return F.mse_loss(vae.decode(posterior.sample(generator)).sample, x) + KL_WEIGHT * posterior.kl().mean()

    budget = (cfg.vae_learning_rate, cfg.vae_steps, cfg.vae_batch_size)
    return fit(loss, [vae], len(pixels), budget, generator, progress)[1]


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, pixels: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    """Posterior-mean reconstructions of pixels (N, 3, H, W) uint8, as (N, 3, H, W) float in [0, 1]."""
    out = [vae.decode(vae.encode(_to_float(p.to(vae.device))).latent_dist.mode()).sample.cpu()
           for p in pixels.split(chunk)]
    return (torch.cat(out) / 2 + 0.5).clamp(0, 1)


def psnr_db(images: torch.Tensor, pixels: torch.Tensor) -> float:
    """PSNR over a set, images (N, 3, H, W) in [0, 1] against pixels uint8: 10 log10(1 / MSE)."""
    mse = F.mse_loss(images, pixels.float() / 255).item()
    return 10 * math.log10(1 / max(mse, 1e-12))


@torch.no_grad()
def encode_posteriors(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator,
                      chunk: int = 250) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(mean, std, scaling_factor) of the VAE posterior of every image, latents (N, 4, h, w).

    The UNet trains on fresh posterior samples mean + std * noise, as SD does with latent_dist.sample(): encoding
    once and sampling per step costs nothing and keeps the decoder-tolerated noise in the training data. The
    scaling factor is SD's: 1 / std of posterior samples over the training set, so latents have unit variance.
    """
    dists = [vae.encode(_to_float(p.to(vae.device))).latent_dist for p in pixels.split(chunk)]
    mean, std = torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])
    sample = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
    return mean, std, 1.0 / sample.std().item()


def _conditions(family: str, encoders: list, ids: torch.Tensor, drop: torch.Tensor, empty_ids: torch.Tensor,
                side: int) -> dict:
    """UNet keyword arguments for token ids (B, L); rows where drop is True get the family's uncond.

    sd15: the last hidden state, uncond = the encoded empty prompt (what the pipeline feeds for CFG).
    sdxl: both encoders' penultimate states concatenated + encoder 2's pooled output, uncond = zeros
    (force_zeros_for_empty_prompt); time ids are the pipeline's defaults (side, side, 0, 0, side, side): every
    demo image has one original size, so the real ones would carry nothing and only differ from sampling time.
    """
    if family in ("sd15", "animatediff"):
        ids = torch.where(drop[:, None], empty_ids.expand_as(ids), ids)
        return {"encoder_hidden_states": encoders[0](ids)[0]}
    keep = (~drop).float()
    out_1 = encoders[0](ids, output_hidden_states=True)
    out_2 = encoders[1](ids, output_hidden_states=True)
    states = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1) * keep[:, None, None]
    time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32, device=ids.device)
    time_ids = time_ids.expand(len(ids), 6)
    return {"encoder_hidden_states": states,
            "added_cond_kwargs": {"text_embeds": out_2.text_embeds * keep[:, None], "time_ids": time_ids}}


class EpsLoss:
    """The UNet's eps-prediction loss of one batch: mean ||eps_hat(x_t, t, c) - eps||^2 on the scheduler's VP path,
    x_0 a fresh posterior sample x scaling_factor, t ~ U{0..T-1}, c the caption or the family's uncond (dropout).

    latents = (mean, std, scaling_factor) of the training posteriors; captions: the training ones, in their order."""

    def __init__(self, parts: dict, latents: tuple, captions: list[str], cfg: DemoTeacherConfig,
                 generator: torch.Generator):
        self.unet, self.scheduler, self.family = parts["unet"], parts["scheduler"], cfg.family
        self.encoders = [parts[k] for k in ("text_encoder", "text_encoder_2") if parts.get(k) is not None]
        # what trains: the video teacher trains only its motion modules and text encoder on the image teacher's UNet
        self.modules = (video_teacher.trained_modules(parts) if cfg.family == "animatediff"
                        else [self.unet, *self.encoders])
        tokenizer = parts["tokenizer"]
        self.ids, self.empty_ids = (tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                                              truncation=True, return_tensors="pt").input_ids
                                    for texts in (captions, [""]))
        self.mean, self.std, self.scaling = latents
        self.side = self.mean.shape[-1] * 2 ** (len(parts["vae"].config.block_out_channels) - 1)
        self.dropout, self.generator = cfg.caption_dropout, generator
        # the loss of step t weighted by min(1 / abar_t, cap) / its mean over t: cap 1 is the plain eps loss
        abar = self.scheduler.alphas_cumprod
        weights = (1 / abar).clamp(max=cfg.noise_weight_cap)
        self.weights = weights / weights.mean()

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        g, device, b = self.generator, self.unet.device, len(idx)
        # Every draw comes from the CPU generator and is then moved: the same sequence on every device.
        noise = torch.randn(self.mean[idx].shape, generator=g).to(device)
        x_0 = (self.mean[idx] + self.std[idx] * noise) * self.scaling
        eps = torch.randn(x_0.shape, generator=g).to(device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=g).to(device)
        drop = (torch.rand(b, generator=g) < self.dropout).to(device)
        cond = _conditions(self.family, self.encoders, self.ids[idx].to(device), drop, self.empty_ids.to(device),
                           self.side)
        if x_0.ndim == 5:  # clips (B, C, F, h, w): the motion UNet reads one text state per frame
            cond["encoder_hidden_states"] = cond["encoder_hidden_states"].repeat_interleave(x_0.shape[2], dim=0)
        eps_hat = self.unet(self.scheduler.add_noise(x_0, eps, t), t, **cond).sample
        if self.weights.max() == 1:  # the plain loss
            return F.mse_loss(eps_hat, eps)
        per_sample = (eps_hat - eps).square().flatten(1).mean(1)
        return (self.weights.to(device)[t] * per_sample).mean()


def main_object_hits(image: np.ndarray, caption: str) -> dict[str, float]:
    """Whether the oracle finds the caption's first (main) object: its colour; colour and kind; and position."""
    main = parse_caption(caption)["objects"][0]
    _, found = oracle.detect(image)
    same_colour = [o for o in found if o.colour == main["colour"]]
    same_kind = [o for o in same_colour if o.kind == main["kind"]]
    return {"colour": float(bool(same_colour)), "kind": float(bool(same_kind)),
            "position": float(any(o.position == main["position"] for o in same_kind))}


def _mean_dicts(rows: list[dict]) -> dict[str, float]:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in rows[0]}


def oracle_report(images: np.ndarray, captions: list[str]) -> dict:
    """Main-object accuracies and mean oracle scores of images (N, H, W, 3) uint8 against their captions."""
    hits = _mean_dicts([main_object_hits(im, c) for im, c in zip(images, captions, strict=True)])
    return {"main_colour_acc": hits["colour"], "main_kind_acc": hits["kind"], "main_position_acc": hits["position"],
            "oracle_mean": _mean_dicts([oracle.score(im, c) for im, c in zip(images, captions, strict=True)])}


@torch.no_grad()
def sample_heldout(pipeline_dir: Path, captions: list[str], cfg: Config, device: torch.device, progress: bool,
                   chunk: int = 50) -> np.ndarray:
    """Images (N, H, W, 3) uint8 of the captions from the saved UNet pipeline (DDIM + CFG, one seed per prompt)."""
    pipe = _family(cfg.demo_teacher.family)[1].from_pretrained(pipeline_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in tqdm(range(0, len(captions), chunk), desc="demo-teacher eval", disable=not progress):
        prompts = captions[start:start + chunk]
        generators = [torch.Generator().manual_seed(cfg.seed + start + i) for i in range(len(prompts))]
        out = pipe(prompts, height=cfg.data.resolution, width=cfg.data.resolution, generator=generators,
                   num_inference_steps=cfg.demo_teacher.eval_steps,
                   guidance_scale=cfg.demo_teacher.eval_guidance_scale, output_type="np").images
        images.append(np.round(out * 255).astype(np.uint8))
    return np.concatenate(images)


def _device(c: DemoTeacherConfig) -> torch.device:
    if c.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if c.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("demo_teacher.device=cuda but torch sees no CUDA device; use cpu or auto")
    return torch.device(c.device)


def _replace_dir(tmp: Path, out: Path) -> None:
    """Moves tmp to out, replacing any previous out only once the new one is complete."""
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _build(cfg: Config, captions: list[str]) -> dict:
    """Fresh pipeline components, with a tokenizer whose context is just long enough for every caption."""
    c = cfg.demo_teacher
    longest = max(len(ids) for ids in build_tokenizer(captions)(captions).input_ids)
    # Captions need ~25 tokens where CLIP's 77 would be mostly padding that every cross-attention reads.
    tokenizer = build_tokenizer(captions, model_max_length=8 * math.ceil(longest / 8))
    if c.family in flow_teacher.FAMILIES:
        return flow_teacher.components(cfg, tokenizer)
    if c.family == "animatediff":  # AnimateDiff's recipe: motion modules on the trained image teacher
        return video_teacher.from_image_teacher(c.image_teacher, captions, cfg.data.frames)
    factor = 2 ** (len(c.vae_channels) - 1)
    sizes = TinySizes(unet_channels=c.unet_channels, attention_head_dim=c.attention_heads,
                      attention_from=c.attention_from, cross_attention_dim=c.text_hidden, text_hidden=c.text_hidden,
                      text_layers=c.text_layers,
                      vae_channels=c.vae_channels, norm_groups=8, sample_size=cfg.data.resolution // factor)
    return _family(c.family)[0](tokenizer, sizes)


def _vae_phase(parts: dict, pixels: torch.Tensor, c: DemoTeacherConfig, generator: torch.Generator,
               progress: bool) -> tuple[float, torch.Tensor, tuple]:
    """Trains the VAE on the training pixels and sets its factors from their latents; returns (last loss,
    held-out reconstructions, (posterior means, stds, scaling_factor) of the training set, the mean shifted)."""
    frames = video_teacher.frames_of  # clips are encoded frame by frame
    train_px, held_px = frames(pixels[:-c.holdout]), frames(pixels[-c.holdout:])
    # the video teacher keeps the image teacher's VAE and scaling factor: the clips' frames are shapes images
    video = c.family == "animatediff"
    loss = None if video else train_vae(parts["vae"], train_px, c, generator, progress)
    recon = reconstruct(parts["vae"], held_px)
    mean, std, scaling = encode_posteriors(parts["vae"], train_px, generator)
    if video:
        scaling = parts["vae"].config.scaling_factor
        mean, std = (video_teacher.to_clips(m, pixels.shape[1]) for m in (mean, std))
    # SD3's VAE centres its latents as well as scaling them: latents = (z - shift_factor) x scaling_factor
    shift = mean.mean().item() if c.family in flow_teacher.FAMILIES else None
    parts["vae"].register_to_config(scaling_factor=scaling, **({} if shift is None else {"shift_factor": shift}))
    return loss, recon, (mean - (shift or 0.0), std, scaling)


def _save(parts: dict, ema: EMA, family: str, folder: Path) -> None:
    """The whole pipeline with the EMA weights, save_pretrained into folder."""
    with ema.swapped_in():
        extra = {"requires_safety_checker": False} if family == "sd15" else {}
        if family == "animatediff":
            video_teacher.refresh_adapter(parts)
        pipe_cls = flow_teacher.PIPELINE if family in flow_teacher.FAMILIES else _family(family)[1]
        pipe_cls(**parts, **extra).save_pretrained(folder, safe_serialization=True)


def _oracle_reports(folder: Path, prompts: list[str], recon: torch.Tensor, pixels: torch.Tensor, cfg: Config,
                    device: torch.device, progress: bool) -> tuple[dict, dict]:
    """(the saved teacher's samples of the prompts, the held-out VAE reconstructions), each read by the oracle."""
    recon_u8 = (recon * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    if pixels.ndim == 5:
        clips = recon_u8.reshape(-1, pixels.shape[1], *recon_u8.shape[1:])  # frames back into clips
        return (video_teacher.evaluate_clips(folder, prompts, cfg, device, progress),
                video_teacher.clip_report(clips[:len(prompts)], prompts))
    flow = cfg.demo_teacher.family in flow_teacher.FAMILIES
    images = (flow_teacher.sample_heldout if flow else sample_heldout)(folder, prompts, cfg, device, progress)
    return oracle_report(images, prompts), oracle_report(recon_u8[:len(prompts)], prompts)


def train_demo_teacher(cfg: Config, progress: bool = True) -> dict:
    """Trains, saves (cfg.demo_teacher.output_dir) and evaluates the demo teacher; returns metrics.json's content."""
    c, seconds, start = cfg.demo_teacher, {}, time.perf_counter()
    tick = time.perf_counter
    pixels, captions = load_prepared(cfg.data.output_dir)
    if len(captions) <= c.holdout:
        raise ValueError(f"{len(captions)} prepared samples leave none for training after demo_teacher.holdout="
                         f"{c.holdout}; lower it or prepare more (demo.num_images)")
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    parts = _build(cfg, captions + [""])
    device = _device(c)
    for part in parts.values():
        if isinstance(part, torch.nn.Module):
            part.to(device)
    flow = c.family in flow_teacher.FAMILIES
    backbone, sampler = ("transformer", "euler") if flow else ("unet", "ddim")
    seconds["data"], t0 = tick() - start, tick()
    vae_loss, recon, latents = _vae_phase(parts, pixels, c, generator, progress)
    seconds["vae"], t0 = tick() - t0, tick()
    loss = (flow_teacher.FlowLoss if flow else EpsLoss)(parts, latents, captions[:-c.holdout], c, generator)
    budget = (c.learning_rate, c.unet_steps, c.unet_batch_size)
    ema, backbone_loss = fit(loss, loss.modules, len(latents[0]), budget, generator, progress, c.ema_decay)
    seconds[backbone], t0 = tick() - t0, tick()
    out = Path(c.output_dir)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save(parts, ema, c.family, tmp)
    seconds["save"], t0 = tick() - t0, tick()
    prompts = captions[-c.holdout:][:c.eval_prompts]
    report, recon_report = _oracle_reports(tmp, prompts, recon, pixels, cfg, device, progress)
    seconds["eval"] = tick() - t0
    vae = parts["vae"].config
    metrics = {
        "family": c.family, "vae_psnr_db": round(psnr_db(recon, video_teacher.frames_of(pixels[-c.holdout:])), 3),
        "scaling_factor": vae.scaling_factor, **({"shift_factor": vae.shift_factor} if flow else {}), **report,
        "chance": {"colour": 1 / len(COLOURS), "kind": 1 / len(KINDS), "position": 1 / len(POSITIONS)},
        # The same oracle on VAE reconstructions of the held-out images: the ceiling the VAE leaves the backbone.
        "vae_recon": {k: v for k, v in recon_report.items() if k.endswith("_acc")},
        "final_loss": {"vae": vae_loss, backbone: backbone_loss},
        "steps": {"vae": 0 if vae_loss is None else c.vae_steps, backbone: c.unet_steps,
                  f"eval_{sampler}": c.eval_steps},
        **({"image_teacher": c.image_teacher} if c.family == "animatediff" else {}),
        "eval_prompts": len(prompts), "eval_guidance_scale": c.eval_guidance_scale,
        **({"max_sequence_length": c.max_sequence_length} if flow else {}),
        "train_images": len(pixels) - c.holdout, "heldout_images": c.holdout,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "total_seconds": round(tick() - start, 1),
    }
    (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    _replace_dir(tmp, out)
    return metrics
