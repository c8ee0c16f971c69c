"""The video demo teacher's learning curve: the motion oracle on held-out captions as its motion modules train.

Trains the video teacher exactly as `pcm demo-teacher --params configs/video-demo.yaml` does (the image teacher from
demo_teacher.image_teacher, the same EpsLoss, fit, learning-rate schedule and draws), and every --every steps samples
--prompts held-out captions with the current (not EMA) weights: AnimateDiffPipeline, --steps DDIM steps at
demo_teacher.eval_guidance_scale, one seed per prompt. Each point: motion direction accuracy (chance 0.25), the
share of clips whose shape does not move (the oracle's "no direction"), colour and colour + kind accuracy. The last
point is the EMA weights the stage would save. Written to --out as JSON, one line per point on stdout.

    python benchmarks/video_teacher_curve.py --every 300 --prompts 48 --steps 20 demo_teacher.unet_steps=1200

--train-all: the whole UNet and the text encoder train (not only the motion modules and the text side), for
comparison with AnimateDiff's recipe.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AnimateDiffPipeline

from pcm.config import load_config
from pcm.demo import teacher as demo
from pcm.demo import video_teacher
from pcm.demo.motion import motion_direction

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "motion_adapter", "feature_extractor",
                  "image_encoder")


def point(parts: dict, modules: list, prompts: list[str], cfg, steps: int) -> dict:
    """The oracle's reading of the prompts' clips sampled with the parts as they are now."""
    pipe = AnimateDiffPipeline(**{k: parts[k] for k in PIPELINE_PARTS})
    pipe.set_progress_bar_config(disable=True)
    for m in modules:
        m.eval()
    with torch.no_grad():
        generators = [torch.Generator().manual_seed(cfg.seed + i) for i in range(len(prompts))]
        frames = pipe(prompts, num_frames=cfg.data.frames, height=cfg.data.resolution, width=cfg.data.resolution,
                      generator=generators, num_inference_steps=steps,
                      guidance_scale=cfg.demo_teacher.eval_guidance_scale, output_type="np").frames
    for m in modules:
        m.train()
    clips = np.round(np.asarray(frames) * 255).astype(np.uint8)
    report = video_teacher.clip_report(clips, prompts)
    still = float(np.mean([motion_direction(clip) is None for clip in clips]))
    return {"motion": report["motion_acc"], "still": round(still, 4), "colour": report["main_colour_acc"],
            "kind": report["main_kind_acc"]}


def curve(cfg, every: int, n_prompts: int, steps: int, train_all: bool) -> list[dict]:
    c = cfg.demo_teacher
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    pixels, captions = demo.load_prepared(cfg.data.output_dir)
    parts = demo._build(cfg, captions + [""])
    _, _, latents = demo._vae_phase(parts, pixels, c, generator, False)
    loss = demo.EpsLoss(parts, latents, captions[:-c.holdout], c, generator)
    if train_all:
        parts["unet"].requires_grad_(True)
        loss.modules = [parts["unet"], parts["text_encoder"]]
    prompts = captions[-c.holdout:][:n_prompts]
    points, count, start = [], [0], time.perf_counter()

    def record(step: int, weights: str) -> None:
        row = {"step": step, "weights": weights, **point(parts, loss.modules, prompts, cfg, steps),
               "seconds": round(time.perf_counter() - start)}
        points.append(row)
        print(json.dumps(row), flush=True)

    def counted(idx):
        if count[0] and count[0] % every == 0:
            record(count[0], "current")
        count[0] += 1
        return loss(idx)

    ema, _ = demo.fit(counted, loss.modules, len(latents[0]), (c.learning_rate, c.unet_steps, c.unet_batch_size),
                      generator, False, c.ema_decay)
    with ema.swapped_in():
        record(count[0], "ema")
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="configs/video-demo.yaml")
    parser.add_argument("--every", type=int, default=300)
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of each point's samples")
    parser.add_argument("--train-all", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/video_teacher_curve.json"))
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides")
    args = parser.parse_args()
    cfg = load_config(args.params, args.overrides)
    points = curve(cfg, args.every, args.prompts, args.steps, args.train_all)
    results = json.loads(args.out.read_text()) if args.out.is_file() else {"what": __doc__.splitlines()[0], "runs": []}
    results["runs"].append({"overrides": args.overrides, "train_all": args.train_all, "prompts": args.prompts,
                            "ddim_steps": args.steps, "chance": {"motion": 0.25, "colour": 1 / 6}, "points": points})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
