"""`make bench-gpu`: PCM training steps on an SDXL-architecture UNet and an SD3-architecture transformer at full
size, on a GPU.

The UNet is built from SDXL's own configuration with random weights (nothing is downloaded): 1024×1024 images
(128×128 latents), LoRA rank 64 on the reference target modules, bf16 autocast with fp32 LoRA weights, gradient
checkpointing, SDPA attention, batch 10. Reported: steps/s and peak GPU memory of PCM (small CFG, batched
cond + uncond teacher pass) with and without the adversarial loss (joint schedule). Text conditions are random
tensors of SDXL's shapes (precomputed embeddings would look the same to the UNet). The SD3 row is the same PCM step
on SD3-medium's transformer (random weights from its config, 1024 px: 128×128×16 latents, 77 CLIP + 256 T5 text
tokens) over SD3's shifted rectified flow; no adversarial variant (its discriminator reads UNet features).

Without CUDA it says so and exits 0. `--tiny` runs the same code on a small UNet (CPU allowed): the smoke test.

    python benchmarks/sdxl_gpu.py [--batch 10] [--steps 10] [--tiny]
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel

from pcm.config import LORA_TARGETS, config_from_dict
from pcm.math import SolverGrid, flow_schedule
from pcm.models.discriminator import Discriminator
from pcm.models.lora import adapters_off, attach_lora
from pcm.models.tiny import sd_scheduler
from pcm.train.step import Batch, Nets, make_loss

SDXL_UNET = {  # stabilityai/stable-diffusion-xl-base-1.0, unet/config.json
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
TINY_UNET = {**SDXL_UNET, "sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 64, 64),
             "transformer_layers_per_block": (1, 1, 1), "attention_head_dim": (2, 4, 4), "cross_attention_dim": 64,
             "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 32 + 6 * 8, "norm_num_groups": 8}

SD15_UNET = {  # stable-diffusion-v1-5/stable-diffusion-v1-5, unet/config.json (make gpu-check's second row)
    "sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280), "attention_head_dim": 8, "cross_attention_dim": 768,
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
}
TINY_SD15_UNET = {**SD15_UNET, "sample_size": 16, "layers_per_block": 1, "block_out_channels": (32, 32, 64, 64),
                  "attention_head_dim": 2, "cross_attention_dim": 64, "norm_num_groups": 8}


SD3_TRANSFORMER = {  # stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json
    "sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
    "attention_head_dim": 64, "num_attention_heads": 24, "joint_attention_dim": 4096, "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048, "pos_embed_max_size": 192,
}
TINY_SD3 = {**SD3_TRANSFORMER, "sample_size": 16, "num_layers": 2, "attention_head_dim": 8, "num_attention_heads": 2,
            "joint_attention_dim": 32, "caption_projection_dim": 16, "pooled_projection_dim": 32,
            "pos_embed_max_size": 16}
SD3_TEXT_TOKENS = 77 + 256  # both CLIP encoders' states, then T5's (diffusers' max_sequence_length)
SD3_SHIFT = 3.0  # the scheduler's shift in SD3-medium's scheduler_config.json


def build(tiny: bool, device: str, rank: int, config: dict | None = None):
    """(UNet with LoRA, LoRA params, pooled text width: 0 for a UNet without SDXL's added conditions)."""
    config = config or (TINY_UNET if tiny else SDXL_UNET)
    # SDXL: 2816 = 1280 (pooled text embedding) + 6 time ids x 256
    pooled = (config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
              if config.get("addition_embed_type") == "text_time" else 0)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # initialised where it runs: 2.6 B random weights are slow to draw on a CPU
        unet = UNet2DConditionModel(**config).to(device, dtype)  # frozen weights in the compute dtype
    params = attach_lora(unet, rank, rank, LORA_TARGETS)
    unet.enable_gradient_checkpointing()
    unet.train()
    return unet, params, pooled


def build_sd3(tiny: bool, device: str, rank: int):
    """(SD3 transformer with LoRA on the reference's SD3 modules, LoRA params)."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = SD3Transformer2DModel(**(TINY_SD3 if tiny else SD3_TRANSFORMER)).to(device, dtype)
    params = attach_lora(model, rank, rank, LORA_TARGETS)
    model.enable_gradient_checkpointing()
    model.train()
    return model, params


def sd3_conditions(batch: int, model, device: str) -> tuple[dict, dict]:
    """Random text states and pooled projections of SD3's shapes; uncond the encoded "" (one condition, expanded)."""
    c = model.config
    cond = {"encoder_hidden_states": torch.randn(batch, SD3_TEXT_TOKENS, c.joint_attention_dim, device=device),
            "pooled_projections": torch.randn(batch, c.pooled_projection_dim, device=device)}
    return cond, {k: v[:1].expand_as(v).clone() for k, v in cond.items()}


def sd3_eps_of(model, schedule):
    """The transformer as the flow-velocity denoiser of pcm's sd3 family: timestep = T sigma_t, output fp32."""
    sigmas = schedule.table

    def velocity(x, t, c):
        return model(hidden_states=x, timestep=sigmas.to(x.device)[t] * len(sigmas),
                     encoder_hidden_states=c["encoder_hidden_states"],
                     pooled_projections=c["pooled_projections"]).sample.float()

    return velocity


def conditions(batch: int, unet, pooled: int, device: str) -> tuple[dict, dict]:
    side = unet.config.sample_size * 8
    cond = {"encoder_hidden_states": torch.randn(batch, 77, unet.config.cross_attention_dim, device=device)}
    if pooled:  # SDXL's added conditions
        cond |= {"text_embeds": torch.randn(batch, pooled, device=device),
                 "time_ids": torch.tensor([side, side, 0, 0, side, side], device=device,
                                          dtype=torch.float32).repeat(batch, 1)}
    uncond = {k: torch.zeros_like(v) if k != "time_ids" else v for k, v in cond.items()}  # SDXL: zeros
    return cond, uncond


def eps_of(unet):
    """The UNet as eps_fn(x_t, t, cond) -> eps_hat in fp32; SDXL's added conditions when cond has them."""
    def eps(x, t, c):
        added = {k: c[k] for k in ("text_embeds", "time_ids") if k in c}
        return unet(x, t, encoder_hidden_states=c["encoder_hidden_states"], added_cond_kwargs=added).sample.float()

    return eps


def measure(unet, params, pooled: int, batch: int, steps: int, adversarial: bool, device: str,
            distill: dict | None = None, two_unets: bool = False) -> dict:
    """Steps/s and peak memory of the distillation step; distill overrides the PCM small-CFG section (e.g. LCM);
    two_unets: the reference's layout, a second full copy (no LoRA) as the teacher. An SD3 transformer (for `unet`,
    pooled unused) runs on SD3's flow schedule with SD3's conditions."""
    sd3 = isinstance(unet, SD3Transformer2DModel)
    schedule = flow_schedule(1000, SD3_SHIFT) if sd3 else sd_scheduler().alphas_cumprod.to(device)
    section = {"num_solver_steps": 40, "num_phases": 4, "w_min": 6.0, "w_max": 7.0, **(distill or {})}
    cfg = config_from_dict({"distill": section})
    grid = SolverGrid(len(schedule), 40, cfg.distill.num_phases)
    cond, uncond = sd3_conditions(batch, unet, device) if sd3 else conditions(batch, unet, pooled, device)
    side = unet.config.sample_size
    latents = torch.randn(batch, unet.config.in_channels, side, side, device=device)
    data = Batch(latents, cond, uncond, torch.arange(batch))
    opt = torch.optim.AdamW(params, lr=1e-6)
    disc = Discriminator(unet, 1).to(device) if adversarial else None
    d_opt = torch.optim.AdamW(disc.parameters(), lr=1e-5, betas=(0.0, 0.999), weight_decay=1e-3) if disc else None
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")

    def denoiser(model):
        return sd3_eps_of(model, schedule) if sd3 else eps_of(model)

    eps = denoiser(unet)
    # the copy is made from the config, in the frozen weights' dtype, before any step: what the reference holds
    with torch.device(device):
        copy_eps = denoiser(type(unet).from_config(unet.config).to(device, unet.dtype)) if two_unets else None

    def teacher(x, t, c):
        if copy_eps is not None:
            return copy_eps(x, t, c)
        with adapters_off(unet):
            return eps(x, t, c)

    def disc_fn(x, r, c, train_heads, fake=None):
        return disc(x, r, c, train_heads=train_heads, fake=fake)

    loss = make_loss(cfg.distill, grid, schedule, 0, adversarial_weight=0.1)
    nets = Nets(eps, teacher, eps, disc_fn if disc else None)

    def step(k: int) -> float:
        with autocast:
            total = loss(nets, data, k)["total"]
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if d_opt:
            d_opt.step()
            d_opt.zero_grad(set_to_none=True)
        return total.detach()

    for k in range(2):  # warm-up: kernels chosen, allocator grown
        step(k)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    losses = [step(k) for k in range(2, 2 + steps)]
    last = float(losses[-1])  # the one host sync of the timed loop
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    return {"steps_per_s": steps / seconds, "samples_per_s": steps * batch / seconds, "peak_gib": peak,
            "last_loss": last}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--tiny", action="store_true", help="a small UNet; runs on CPU too (smoke test)")
    ap.add_argument("--out", default="benchmarks/results/sdxl_gpu.json")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.tiny:
        print("bench-gpu: no CUDA device here; it measures an SDXL-size UNet on a GPU. Nothing was run "
              "(`python benchmarks/sdxl_gpu.py --tiny` runs the same code small on CPU).")
        return
    unet, params, pooled = build(args.tiny, device, args.rank)
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "batch": args.batch,
               "lora_rank": args.rank, "tiny": args.tiny, "latent_side": unet.config.sample_size, "runs": {}}
    print(f"{'variant':18s} {'steps/s':>8s} {'samples/s':>10s} {'peak GiB':>9s}")
    for name, adversarial in (("pcm", False), ("pcm + adv joint", True)):
        r = measure(unet, params, pooled, args.batch, args.steps, adversarial, device)
        results["runs"][name] = r
        print(f"{name:18s} {r['steps_per_s']:8.3f} {r['samples_per_s']:10.2f} {r['peak_gib']:9.2f}")
    del unet, params
    sd3, params = build_sd3(args.tiny, device, args.rank)
    r = results["runs"]["sd3 pcm"] = measure(sd3, params, 0, args.batch, args.steps, False, device)
    print(f"{'sd3 pcm':18s} {r['steps_per_s']:8.3f} {r['samples_per_s']:10.2f} {r['peak_gib']:9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out} ({results['device']})")


if __name__ == "__main__":
    main()
