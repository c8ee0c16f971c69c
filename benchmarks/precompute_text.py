"""What precomputed text states save: a distillation step's time and peak memory on the tiny SDXL teacher with and
without them, and the text encoders' parameter bytes at SDXL size (from the configs, nothing downloaded).

- step time and peak RSS: each in a child process (a clean resident set) that runs `pcm.train.distill.distill`
  on precomputed latents, once encoding the captions every step (the text encoders loaded) and once reading the
  stored text states (no text encoder loaded); step time from metrics.jsonl's it_per_s after the first record;
- SDXL's encoders: CLIPTextModel (hidden 768, 12 layers) and CLIPTextModelWithProjection (hidden 1280, 32 layers,
  projection 1280) built on the meta device, parameters x 2 bytes (fp16), SD1.5's encoder (SDXL's first) beside
  them; and the bytes each sample's stored states take against its latent.

    python benchmarks/precompute_text.py [--batch 8] [--steps 16] [--repeats 3]

The two children alternate, `repeats` times each, and the median step time is reported (a shared machine is noisy).
"""

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from pcm.config import config_from_dict

sys.path.insert(0, str(Path(__file__).parent))
from train_step import PROMPTS, SIZES  # noqa: E402  (the tiny SDXL teacher the step benchmark times)

# SDXL base 1.0's text_encoder / text_encoder_2 config.json values that set the parameter count
SDXL_ENCODERS = {
    "text_encoder": (CLIPTextModel, {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                                     "num_attention_heads": 12, "projection_dim": 768}),
    "text_encoder_2": (CLIPTextModelWithProjection, {"hidden_size": 1280, "intermediate_size": 5120,
                                                     "num_hidden_layers": 32, "num_attention_heads": 20,
                                                     "projection_dim": 1280}),
}
TOKENS = 77


def encoder_bytes() -> dict:
    """fp16 parameter bytes of SDXL's two text encoders (the first is also SD1.5's), built on the meta device."""
    out = {}
    for name, (cls, sizes) in SDXL_ENCODERS.items():
        config = CLIPTextConfig(vocab_size=49408, max_position_embeddings=TOKENS, hidden_act="gelu", **sizes)
        with torch.device("meta"):
            params = sum(p.numel() for p in cls(config).parameters())
        out[name] = {"parameters": params, "fp16_bytes": 2 * params}
    out["total_fp16_bytes"] = sum(v["fp16_bytes"] for v in out.values())
    return out


def stored_bytes() -> dict:
    """fp16 bytes per sample of the stored text states and of the latent, at each family's native resolution."""
    return {"sdxl_1024": {"text": 2 * (TOKENS * (768 + 1280) + 1280), "latent": 2 * 4 * 128 * 128},
            "sd15_512": {"text": 2 * TOKENS * 768, "latent": 2 * 4 * 64 * 64}}


def params(root: Path, batch: int, steps: int) -> dict:
    """A world: 64 shapes images at 32 px, prepared; the tiny SDXL teacher; `steps` steps, a record every 4."""
    return {"demo": {"output_dir": str(root / "shapes"), "num_images": 64, "shard_size": 16},
            "data": {"inputs": [str(root / "shapes" / "shard-{00000..00003}.tar")], "output_dir": str(root / "prep"),
                     "shard_size": 16, "resolution": 32, "min_side": 32},
            "teacher": {"family": "sdxl", "model": str(root / "teacher")},
            "lora": {"rank": 4, "alpha": 4.0}, "distill": {"num_solver_steps": 20, "num_phases": 2},
            "train": {"batch_size": batch, "max_steps": steps, "log_every": 4, "checkpoint_every": 10_000,
                      "validate_every": 0, "shuffle_buffer": 16, "output_dir": str(root / "run")}}


def build_world(root: Path, batch: int, steps: int) -> Path:
    """The tiny SDXL teacher saved, the shapes data prepared and precomputed (latents + text); the params file."""
    from diffusers import StableDiffusionXLPipeline

    from pcm import stages
    from pcm.models.tiny import build_tokenizer, tiny_sdxl_components

    torch.manual_seed(0)
    StableDiffusionXLPipeline(**tiny_sdxl_components(build_tokenizer(PROMPTS), SIZES)).save_pretrained(root / "teacher")
    p = params(root, batch, steps)
    stages.demo_data(config_from_dict(p), progress=False)
    stages.prepare(config_from_dict(p), progress=False)
    stages.precompute(config_from_dict(p), progress=False)
    path = root / "params.json"
    path.write_text(json.dumps(p))
    return path


def child(params_path: Path, text: bool) -> None:
    """Distills on the precomputed folder, the text read from it (text) or encoded from the captions; prints a
    JSON line: peak RSS (MB), seconds per step, whether text encoders were loaded."""
    from pcm.data.loader import loader_factory
    from pcm.data.precompute import find_latents, stored_text
    from pcm.train import distill as d

    p = json.loads(params_path.read_text())
    p["train"]["output_dir"] += "-text" if text else "-captions"
    cfg = config_from_dict(p)
    folder = find_latents(cfg)
    stored = d.Precomputed(True, *stored_text(folder)) if text else d.Precomputed(latents=True)
    loaded = {}
    real_setup = d.setup

    def setup(*args, **kwargs):  # to report what the run loaded
        run = real_setup(*args, **kwargs)
        loaded["text_encoders"] = len(run.teacher.text_encoders)
        return run

    d.setup = setup
    d.distill(cfg, loader_factory(cfg, folder), progress=False, precomputed=stored)
    rates = [json.loads(line)["it_per_s"] for line in (Path(cfg.train.output_dir) / "metrics.jsonl").open()][1:]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"peak_rss_mb": rss, "step_s": sum(1 / r for r in rates) / len(rates), **loaded}))


def run_child(params_path: Path, text: bool) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(params_path), "--text", str(int(text))],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _summary(runs: list[dict]) -> dict:
    return {"step_s": statistics.median(r["step_s"] for r in runs), "step_s_runs": [r["step_s"] for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "text_encoders": runs[0]["text_encoders"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--text", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="benchmarks/results/precompute_text.json")
    args = ap.parse_args()
    if args.child is not None:
        child(Path(args.child), bool(args.text))
        return
    results = {"batch": args.batch, "steps": args.steps, "device": "cuda" if torch.cuda.is_available() else "cpu",
               "torch_threads": torch.get_num_threads(), "platform": platform.processor() or platform.machine(),
               "sdxl_text_encoders": encoder_bytes(), "stored_bytes_per_sample": stored_bytes()}
    with tempfile.TemporaryDirectory() as tmp:
        params_path = build_world(Path(tmp), args.batch, args.steps)
        runs = {False: [], True: []}
        for _ in range(args.repeats):
            for text in runs:
                runs[text].append(run_child(params_path, text))
        results["tiny_sdxl"] = {name: _summary(runs[text]) for name, text in
                                (("captions_encoded", False), ("text_precomputed", True))}
    fly, pre = results["tiny_sdxl"]["captions_encoded"], results["tiny_sdxl"]["text_precomputed"]
    enc = results["sdxl_text_encoders"]
    print(f"tiny SDXL, batch {args.batch}: step {fly['step_s']:.3f} s encoding captions, {pre['step_s']:.3f} s on "
          f"stored text ({pre['step_s'] / fly['step_s']:.2f}); peak RSS {fly['peak_rss_mb']:.0f} MB vs "
          f"{pre['peak_rss_mb']:.0f} MB")
    print(f"SDXL text encoders: {enc['text_encoder']['parameters'] / 1e6:.1f} M + "
          f"{enc['text_encoder_2']['parameters'] / 1e6:.1f} M parameters, {enc['total_fp16_bytes'] / 2**30:.2f} GiB "
          "in fp16 not loaded by a distillation on precomputed text")
    for name, b in results["stored_bytes_per_sample"].items():
        print(f"{name}: stored text {b['text'] / 1024:.0f} KiB per sample beside a {b['latent'] / 1024:.0f} KiB latent")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
