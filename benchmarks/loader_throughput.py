"""Does the data path keep up with 8 GPUs? Loader samples/s per worker against what the training steps consume.

Prepared shards at 512 and 1024 px in each prepared format (PNG, JPEG quality 95, and `pcm precompute` latents)
are read by the training loader (`pcm.data.loader.make_loader`) with 0 (in the training process), 1 and 2 worker
processes; reported: samples/s, and per worker. Inputs are generated photos-like JPEGs (smooth colour fields plus
texture) prepared by `pcm prepare` itself, so the prepared files are what a real run reads.

The consumption side is the cost floor of one PCM small-CFG training sample on one GPU (nothing measured on a GPU
here yet): FLOPs of the UNet passes a step cannot avoid (teacher on cond + uncond, target, student forward and
backward, gradient checkpointing's recomputed forward: 7 forward-equivalents), counted with torch's FLOP counter on
the real SDXL (1024 px) and SD1.5 (512 px) UNet configurations built on the meta device, at a stated fraction of an
H200's dense bf16 peak. When `make gpu-check` has measured steps/s, that figure replaces the estimate.

    python benchmarks/loader_throughput.py [--images 64] [--batch 8]
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pcm.config import config_from_dict
from pcm.data.loader import LATENT_KEY, make_loader
from pcm.data.prepare import prepare
from pcm.data.shards import ShardWriter

PEAK_BF16_TFLOPS = 989.0  # H200 SXM dense bf16 (the card the project's GPU checks run on)
UTILIZATION = (1.0, 0.4)  # the peak itself (an upper bound on consumption), and a typical 40 % of it
FORWARDS_PER_SAMPLE = 7  # teacher x2 (cond + uncond), target x1, student forward + backward (x3), recompute x1
SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8,
             "block_out_channels": (320, 640, 1280, 1280)}  # runwayml/stable-diffusion-v1-5 unet/config.json
# the SD1.5 UNet keeps diffusers' defaults otherwise (4 blocks, 2 layers per block, CrossAttn down/up blocks)


def make_inputs(folder: Path, images: int, side: int, per_shard: int = 16) -> None:
    """img2dataset-layout shards of generated JPEGs about 1.1x side (so preparing resizes, as it would)."""
    from PIL import Image

    rng = np.random.default_rng(side)
    writer = ShardWriter(folder, per_shard, prefix="in")
    for i in range(images):
        w, h = (int(v) for v in rng.integers(int(1.05 * side), int(1.2 * side), size=2))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        out = __import__("io").BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        writer.write(f"{i:06d}", {"jpg": out.getvalue(), "txt": f"a generated picture number {i}".encode(),
                                  "json": b'{"status": "success"}'})
    writer.close()


def prepared(inputs: Path, out: Path, side: int, image_format: str) -> Path:
    shards = sorted(inputs.glob("in-*.tar"))
    cfg = config_from_dict({"data": {"inputs": [str(s) for s in shards], "output_dir": str(out), "resolution": side,
                                     "min_side": 64, "shard_size": 16, "image_format": image_format}})
    prepare(cfg.data, cfg.seed, progress=False)
    return out


def latents(out: Path, images: int, side: int, per_shard: int = 16) -> Path:
    """A precomputed-latents folder as `pcm precompute` writes it: fp16 (4, side/8, side/8) per sample."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(out, per_shard, prefix="shard")
    for i in range(images):
        buffer = __import__("io").BytesIO()
        np.save(buffer, rng.standard_normal((4, side // 8, side // 8)).astype(np.float16), allow_pickle=False)
        meta = {"original_height": side, "original_width": side, "crop_top": 0, "crop_left": 0}
        writer.write(f"{i:06d}", {LATENT_KEY: buffer.getvalue(), "txt": f"picture {i}".encode(),
                                  "json": json.dumps(meta).encode()})
    writer.close()
    shards = [{"name": name, "samples": min(per_shard, images - k * per_shard)} for k, name in enumerate(writer.names)]
    (out / "index.json").write_text(json.dumps({"shards": shards, "latents": True, "resolution": side}))
    return out


def loader_rate(folder: Path, workers: int, batch: int, seconds: float = 6.0) -> float:
    """Samples/s of the training loader over about `seconds` (worker start-up and the first batch excluded)."""
    loader = iter(make_loader(folder, batch, seed=0, num_workers=workers, shuffle_buffer=64))
    next(loader)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += len(next(loader)["key"])
    return count / (time.perf_counter() - start)


def _unet(side: int) -> str:
    return "sdxl" if side >= 1024 else "sd15"  # the model trained at that size


def unet_tflops(side: int) -> float:
    """TFLOPs of one UNet forward of one sample at side px (SDXL from 1024, SD1.5 below), counted on meta tensors."""
    import sys

    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(Path(__file__).parent))
    from sdxl_gpu import SDXL_UNET

    config, width = (SDXL_UNET, 2048) if _unet(side) == "sdxl" else (SD15_UNET, 768)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
        x, t = torch.empty(1, 4, side // 8, side // 8), torch.full((1,), 500)
        states = torch.empty(1, 77, width)
        added = {"text_embeds": torch.empty(1, 1280), "time_ids": torch.empty(1, 6)} if width == 2048 else None
        with FlopCounterMode(display=False) as counter:
            unet(x, t, encoder_hidden_states=states, added_cond_kwargs=added)
    return counter.get_total_flops() / 1e12


def consumption(side: int, gpus: int = 8) -> dict:
    """Samples/s that `gpus` GPUs consume at the cost floor, at each assumed utilization of the bf16 peak."""
    per_sample = FORWARDS_PER_SAMPLE * unet_tflops(side)
    return {"unet": _unet(side), "tflop_per_sample": per_sample,
            **{f"samples_per_s_{gpus}gpu_at_{int(u * 100)}pct": gpus * u * PEAK_BF16_TFLOPS / per_sample
               for u in UTILIZATION}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sides", default="512,1024")
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--seconds", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loader_throughput.json"))
    args = parser.parse_args()
    sides, worker_counts = [int(s) for s in args.sides.split(",")], [int(w) for w in args.workers.split(",")]
    results = {"settings": {k: str(v) for k, v in vars(args).items()}, "cpu": platform.machine(),
               "cpus": torch.get_num_threads(), "loader": {}, "consumption": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for side in sides:
            make_inputs(tmp / f"in{side}", args.images, side)
            folders = {fmt: prepared(tmp / f"in{side}", tmp / f"{fmt}{side}", side, fmt) for fmt in ("png", "jpg")}
            folders["latents"] = latents(tmp / f"lat{side}", args.images, side)
            for fmt, folder in folders.items():
                rates = {w: loader_rate(folder, w, args.batch, args.seconds) for w in worker_counts}
                results["loader"][f"{fmt}@{side}"] = {f"workers_{w}": r for w, r in rates.items()}
                print(f"{fmt:8s} {side:5d} px  " + "  ".join(f"{w} workers {r:8.1f}/s" for w, r in rates.items()))
            results["consumption"][str(side)] = consumption(side)
            print(f"8 GPUs consume ({_unet(side)} {side} px): " + ", ".join(
                f"{v:.0f}/s" for k, v in results["consumption"][str(side)].items() if k.startswith("samples")))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
