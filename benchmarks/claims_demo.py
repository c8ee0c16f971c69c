"""The PCM paper's claims on the demo world (issue 17 §5), over several distillation seeds.

    python benchmarks/claims_demo.py [--root .] [--seeds 3] [--prompts 100] [--out-dir benchmarks/results]

Needs a demo project after `make demo` (its params.yaml, prepared shards and teacher). Per seed s it distills, with
the project's own train settings and `seed=s`: PCM M = 1, 2, 4 and LCM as the demo does (small CFG), and a
normal-CFG PCM M = 4 (no guidance in the solver, caption dropout 0.1), into <root>/models/claims-demo/seed<s>/<run>/.
A finished run with the same run manifest and step count anywhere under <root>/models/ is reused: `make demo`'s own
LoRAs serve as seed 0 of its runs, and a killed benchmark continues where it stopped. Then every model samples the
held-out captions from the same noises (pcm.eval's), and:

(a) trajectory error (RMS latent distance to the teacher's 50-step DDIM): PCM M = K against teacher DDIM-K, K = 1, 2, 4
(b) step consistency at K = 4 (mean cosine of its latents with those at 1, 2, 8, 16 steps): PCM M = 4 against LCM
(c) inference CFG 1 -> 3 at K = 4: the oracle's overall adherence of the normal-CFG and the small-CFG student, and
    saturation at CFG 3 (mean HSV saturation, latent RMS) above the teacher's own 50-step DDIM at CFG 3
(d) a negative prompt (the caption with its colour word swapped) at CFG 3, K = 4: how far it moves the normal-CFG
    student's images (pixel RMS, 0..255) and the oracle's adherence; the small-CFG student at its CFG 1 never reads
    the negative condition, so its change is exactly 0
(e) K > M: PCM M = 4's trajectory error at K = 4, 8, 16 under each rule of pcm.sampling.K_ABOVE_M_RULES

Intervals: benchmarks/claims.py's two-level bootstrap (seeds, then prompts within a seed); teacher rows have one seed.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from claims import fmt, stat  # noqa: E402

RUNS = {  # run name -> the overrides of the project's params that make it
    "pcm-M1": ["distill.method=pcm", "distill.num_phases=1"],
    "pcm-M2": ["distill.method=pcm", "distill.num_phases=2"],
    "pcm-M4": ["distill.method=pcm", "distill.num_phases=4"],
    "lcm": ["distill.method=lcm", "distill.num_phases=1"],
    "pcm-M4-normal-cfg": ["distill.method=pcm", "distill.num_phases=4", "distill.guidance=normal_cfg",
                          "distill.caption_dropout=0.1", "distill.w_min=0", "distill.w_max=0"],
}
STEPS = (1, 2, 4, 8, 16)
CFG_HIGH = 3.0


def finished_run(cfg, search: Path) -> Path | None:
    """The LoRA of a finished run under search (e.g. the demo's own models/pcm-m4) with exactly cfg's run manifest and
    its train.max_steps, if any: `make demo` already distilled seed 0 of the demo's runs."""
    from pcm.data.precompute import find_latents
    from pcm.train.manifest import RunManifest, RunMismatch

    wanted = RunManifest.of(cfg, find_latents(cfg) or cfg.data.output_dir)
    for path in sorted(search.glob("**/manifest.json")):
        try:
            same = not wanted.differences(RunManifest.read(path))
        except RunMismatch:
            continue
        last = path.parent / "checkpoints" / f"step-{cfg.train.max_steps:06d}"
        if same and last.is_dir() and (path.parent / "lora" / "pcm_config.json").is_file():
            return path.parent / "lora"
    return None


def distill_seed(params: Path, work: Path, seed: int, progress: bool) -> dict[str, Path]:
    """{run name: LoRA folder} of one seed: a finished run with the same manifest is reused (under models/, the
    benchmark's own work folder included, so a killed benchmark continues), the rest is distilled into work."""
    from accelerate.state import AcceleratorState

    from pcm import stages
    from pcm.config import load_config

    loras = {}
    for name, overrides in RUNS.items():
        out = work / f"seed{seed}" / name
        cfg = load_config(params, [*overrides, f"seed={seed}", f"train.output_dir={out}", "train.validate_every=0",
                                   "tracking.experiment=claims-demo"])
        found = finished_run(cfg, params.parent / "models")
        if found is not None:
            loras[name] = found
            continue
        AcceleratorState._reset_state(reset_partial_state=True)
        start = time.perf_counter()
        stages.distill(cfg, resume="latest" if (out / "manifest.json").is_file() else None, overwrite=False,
                       progress=progress)
        loras[name] = out / "lora"
        print(f"distilled {name} seed {seed} in {time.perf_counter() - start:.0f} s", flush=True)
    return loras


class Bench:
    """The teacher with every LoRA loaded, the prompts' noises and conditions, and the teacher's reference."""

    def __init__(self, cfg, prompts: list[str], progress: bool):
        from pcm.eval.evaluate import Batches
        from pcm.eval.generate import teacher_sampler, use
        from pcm.eval.references import teacher_reference
        from pcm.models.families import load_teacher

        self.cfg, self.prompts = cfg, prompts
        self.teacher = load_teacher(cfg.teacher, torch.device("cpu"), resolution=cfg.data.resolution)
        self.batches = Batches(self.teacher, prompts, (0,), cfg.eval.batch_size, cfg.data.resolution)
        use(self.teacher, teacher_sampler(cfg.eval.teacher_guidance_scale))
        self.reference, _ = teacher_reference(self.teacher, cfg, self.batches, progress)
        self.adapters = 0

    def sampler(self, lora: Path | None, guidance_scale: float, rule: str | None = None):
        from pcm.eval.generate import Sampler, read_lora_config, teacher_sampler
        from pcm.inference import load_checked
        from pcm.sampling import DEFAULT_K_ABOVE_M

        if lora is None:
            return teacher_sampler(guidance_scale)
        card, adapter = read_lora_config(lora), f"claims{self.adapters}"
        load_checked(self.teacher.backbone, str(lora), adapter, str(lora), "the claims benchmark's own LoRA")
        self.adapters += 1
        return Sampler(card.label, adapter, card, guidance_scale, k_above_m=rule or DEFAULT_K_ABOVE_M)

    @torch.no_grad()
    def run(self, sampler, steps: tuple[int, ...], negatives: list[str] | None = None) -> dict[int, dict]:
        """{K: {'latents': (B, C, h, w), 'images': (B, H, W, 3) uint8}} over every prompt, in prompt order."""
        from pcm.eval.generate import sample_latents, to_uint8, use

        use(self.teacher, sampler)
        out = {K: {"latents": [], "images": []} for K in steps}
        for start, prompts, x_T, cond, neg in self.batches:
            if negatives is not None:
                neg = self.teacher.encode_prompts(negatives[start:start + len(prompts)],
                                                  target_size=self.cfg.data.resolution)
            for K in steps:
                x_0 = sample_latents(self.teacher, sampler, x_T, cond, neg, K, torch.Generator().manual_seed(start))
                out[K]["latents"].append(x_0.float().cpu())
                out[K]["images"].append(to_uint8(self.teacher.decode_latents(x_0.float())))
        return {K: {"latents": torch.cat(v["latents"]), "images": np.concatenate(v["images"])} for K, v in out.items()}


def rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def saturation(images: np.ndarray) -> torch.Tensor:
    """Mean HSV saturation (max - min) / max of each image (B, H, W, 3) uint8."""
    rgb = images.astype(np.float64)
    top, low = rgb.max(-1), rgb.min(-1)
    return torch.from_numpy(np.where(top > 0, (top - low) / np.maximum(top, 1e-9), 0.0).mean((1, 2)))


def overall(oracle, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
    return torch.tensor([oracle(image, p)["overall"] for image, p in zip(images, prompts, strict=True)])


def swap_colour(caption: str) -> str:
    """The caption with its first colour word replaced by the next colour of the palette."""
    from pcm.demo.shapes import COLOURS

    names = list(COLOURS)
    for i, name in enumerate(names):
        if f" {name} " in f" {caption} ":
            return f" {caption} ".replace(f" {name} ", f" {names[(i + 1) % len(names)]} ", 1).strip()
    raise ValueError(f"no colour word of {names} in the caption {caption!r}")


def measure(bench: Bench, loras: list[dict[str, Path]], oracle) -> dict:
    """Every claim's statistic (claims.stat: mean and 95 % interval) from the seeds' LoRAs."""
    from pcm.sampling import K_ABOVE_M_RULES

    ref, prompts = bench.reference, bench.prompts
    g_teacher = bench.cfg.eval.teacher_guidance_scale
    teacher = bench.run(bench.sampler(None, g_teacher), (1, 2, 4, 16))
    teacher_cfg3 = bench.run(bench.sampler(None, CFG_HIGH), (50,))[50]
    per = {}  # statistic name -> [per-seed (P,) tensors]

    def add(name: str, values: torch.Tensor) -> None:
        per.setdefault(name, []).append(values)

    for seed_loras in loras:
        rows = {name: bench.run(bench.sampler(seed_loras[name], 1.0), STEPS) for name in ("pcm-M1", "pcm-M2",
                                                                                          "pcm-M4", "lcm")}
        for K in (1, 2, 4):
            add(f"(a) K={K}: teacher DDIM - PCM M={K}", rms(teacher[K]["latents"], ref)
                - rms(rows[f"pcm-M{K}"][K]["latents"], ref))
            add(f"(a) K={K}: PCM M={K}", rms(rows[f"pcm-M{K}"][K]["latents"], ref))
        for name in ("pcm-M4", "lcm"):
            lat = rows[name]
            add(f"(b) step consistency at K=4: {name}",
                torch.stack([cosine(lat[4]["latents"], lat[J]["latents"]) for J in STEPS if J != 4]).mean(0))
        for rule in K_ABOVE_M_RULES:
            sampled = rows["pcm-M4"] if rule == "substeps" else \
                bench.run(bench.sampler(seed_loras["pcm-M4"], 1.0, rule), (8, 16))
            for K in (8, 16):
                add(f"(e) PCM M=4, {rule}: K={K}", rms(sampled[K]["latents"], ref))
        add("(e) PCM M=4: K=4", rms(rows["pcm-M4"][4]["latents"], ref))
        for name, label in (("pcm-M4-normal-cfg", "normal-CFG"), ("pcm-M4", "small-CFG")):
            low = rows[name][4] if name in rows else bench.run(bench.sampler(seed_loras[name], 1.0), (4,))[4]
            high_sampler = bench.sampler(seed_loras[name], CFG_HIGH)
            high = bench.run(high_sampler, (4,))[4]
            add(f"(c) {label}: oracle overall, CFG 3 - CFG 1",
                overall(oracle, high["images"], prompts) - overall(oracle, low["images"], prompts))
            add(f"(c) {label} at CFG 3: saturation - teacher DDIM-50 at CFG 3",
                saturation(high["images"]) - saturation(teacher_cfg3["images"]))
            add(f"(c) {label} at CFG 3: latent RMS - teacher DDIM-50 at CFG 3",
                rms(high["latents"], 0 * high["latents"]) - rms(teacher_cfg3["latents"], 0 * high["latents"]))
            negatives = [swap_colour(p) for p in prompts]
            neg_scale = CFG_HIGH if label == "normal-CFG" else 1.0
            plain = high if label == "normal-CFG" else low
            moved = bench.run(bench.sampler(seed_loras[name], neg_scale), (4,), negatives)[4]
            add(f"(d) {label} at CFG {neg_scale:g}: pixel RMS moved by the negative prompt",
                rms(torch.from_numpy(moved["images"]), torch.from_numpy(plain["images"])))
            add(f"(d) {label} at CFG {neg_scale:g}: oracle overall with - without the negative prompt",
                overall(oracle, moved["images"], prompts) - overall(oracle, plain["images"], prompts))
    result = {name: stat(values) for name, values in per.items()}
    for K in (1, 2, 4, 16):
        result[f"teacher DDIM-{K}"] = stat([rms(teacher[K]["latents"], ref)])
    return result


def markdown(result: dict, info: dict) -> str:
    lines = [f"Demo world: {info['prompts']} held-out captions x {info['seeds']} distillation seeds; "
             "mean [95 % interval: seeds, then prompts, resampled]", "", "| statistic | mean [95 % CI] |", "|---|---|"]
    lines += [f"| {name} | {fmt(st)} |" for name, st in result.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=".", help="a demo project after `make demo` (default: here)")
    parser.add_argument("--seeds", type=int, default=3, help="distillation seeds per model (default 3)")
    parser.add_argument("--prompts", type=int, default=100, help="held-out captions sampled (default 100)")
    parser.add_argument("--out-dir", default="benchmarks/results", help="where claims-demo.json/.md go")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).resolve()
    os.chdir(args.root)  # the project's params hold paths relative to it
    from pcm import stages
    from pcm.config import load_config
    from pcm.eval.prompts import load_prompts

    start, params = time.perf_counter(), Path("params.yaml")
    cfg = load_config(params)
    loras = [distill_seed(params, Path("models/claims-demo"), seed, not args.quiet) for seed in range(args.seeds)]
    prompts, _ = load_prompts(cfg.eval.prompts, cfg.data.output_dir, args.prompts)
    oracle = stages._shapes_world().oracle
    result = measure(Bench(cfg, prompts, not args.quiet), loras, oracle)
    info = {"prompts": len(prompts), "seeds": args.seeds, "teacher": cfg.teacher.model,
            "train_steps": cfg.train.max_steps, "machine": platform.processor() or platform.machine(),
            "seconds": round(time.perf_counter() - start, 1)}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "claims-demo.json").write_text(json.dumps({"info": info, "claims": result}, indent=1))
    (out_dir / "claims-demo.md").write_text(markdown(result, info))
    print(markdown(result, info))
    print(f"written: {out_dir / 'claims-demo.json'} and .md ({info['seconds']} s)")
    return {"info": info, "claims": result}


if __name__ == "__main__":
    main()
