"""`make gpu-check`: what a short GPU loan is spent on, one run of at most ~8 minutes on one GPU.

Four parts, in order, each under its own time cap and its own try/except (an error or the cap is recorded with what
the part measured so far, and the next part runs); the JSON and Markdown are rewritten after every part:
  1. unet      SDXL-architecture UNet (random weights) at 1024 px, SD1.5-architecture at 512 px; LoRA rank 64, bf16
               autocast, fp32 LoRA, gradient checkpointing, batch 10: steps/s and peak memory of PCM small-CFG,
               PCM + adversarial (joint), LCM and the reference's layout (a second UNet as teacher); the PCM step
               against its floor (its passes timed alone).
  2. overhead  the tiny teacher's step / its unavoidable passes, eager and with torch.compile (5 losses compared).
  3. precision bf16 + AdamW 8-bit and fp16 + grad scaler: a tiny `pcm distill` checkpoints, resumes ("latest") and
               must go on with finite losses; host syncs per step (benchmarks/host_syncs.py).
  4. demo      the demo chain with params.yaml, fewer steps: seconds per stage and how far it got.
Results: <out>/gpu-<card>-<date>.json and .md (a same-day rerun of some parts keeps the others' results). Without
CUDA it prints one line and exits 0; --tiny runs every part small on CPU (the rehearsal the tests run).
Usage: python benchmarks/gpu_check.py [--parts 1,3] [--out benchmarks/results] [--tiny]
"""

import argparse
import datetime
import gc
import importlib.util
import json
import math
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from pcm.models.tiny import TinySizes

sys.path.insert(0, str(Path(__file__).parent))  # the sibling benchmarks, reused by import
import host_syncs  # noqa: E402
import sdxl_gpu  # noqa: E402
import train_step  # noqa: E402

ROOT = Path(__file__).parent.parent
CAPS_S = {1: 170, 2: 100, 3: 60, 4: 120}  # 450 s: with imports and start-up, within 8 minutes
ROWS = {  # name: (full-size UNet config, --tiny's: a few channels wide at 32 px; SD1.5's four levels need 64 px)
    "sdxl": (sdxl_gpu.SDXL_UNET, {**sdxl_gpu.TINY_UNET, "sample_size": 4}),
    "sd15": (sdxl_gpu.SD15_UNET, {**sdxl_gpu.TINY_SD15_UNET, "sample_size": 8}),
}
UNET_VARIANTS = {  # name: (distill section over PCM small-CFG, adversarial, two UNets)
    "pcm small-cfg": ({}, False, False),
    "pcm + adv joint": ({}, True, False),
    "lcm": ({"method": "lcm", "num_phases": 1}, False, False),
    "pcm two-unet (reference layout)": ({}, False, True),
}
BUDGETS = {  # name: (target, where in the parts' results, how it reads)
    "overhead_ratio": (1.15, "overhead.eager.overhead_ratio", "tiny-teacher step / its passes timed alone, eager"),
    "one_over_two_unet_peak": (0.85, "unet.sdxl.one_over_two_unet_peak", "SDXL 1024 px peak memory, 1 / 2 UNets"),
    "sdxl_step_over_floor": (1.10, "unet.sdxl.floor.step_over_floor", "SDXL 1024 px PCM step / its passes alone"),
    "host_syncs_per_step": (1.0, "precision.host_syncs_per_step", "synchronizing CUDA calls per distill step"),
}


class PartTimeout(BaseException):
    """The part's time cap; a BaseException so that library code catching Exception cannot swallow it."""


@contextmanager
def time_cap(seconds: float):
    def expire(signum, frame):
        raise PartTimeout(f"time cap of {seconds:.0f} s reached")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclass
class Run:
    """What every part needs: where it runs, how big, where its scratch files go, and how to save progress."""

    device: str
    tiny: bool
    work: Path
    save: Callable[[], None]


# ---- 1. the step at full size ---------------------------------------------------------------------------------------

def step_floor(run: Run, unet, pooled: int, batch: int) -> dict:
    """The PCM small-CFG step's unavoidable passes at this size, each timed alone (train_step.floor, under the same
    bf16 autocast as the step)."""
    eps = sdxl_gpu.eps_of(unet)

    def eps_fn(x, t, c):
        with torch.autocast(run.device, dtype=torch.bfloat16, enabled=run.device == "cuda"):
            return eps(x, t, c)

    cond, uncond = sdxl_gpu.conditions(batch, unet, pooled, run.device)
    side = unet.config.sample_size
    data = SimpleNamespace(x_0=torch.randn(batch, 4, side, side, device=run.device), cond=cond, uncond=uncond)
    return train_step.floor(SimpleNamespace(eps_fn=eps_fn, backbone=unet), data, {}, None, 2 if run.tiny else 3)


def part_unet(run: Run, out: dict) -> None:
    batch, steps = (2, 2) if run.tiny else (10, 5)
    for name, (config, tiny) in ROWS.items():
        unet, params, pooled = sdxl_gpu.build(run.tiny, run.device, 4 if run.tiny else 64, tiny if run.tiny else config)
        row = out[name] = {"pixels": unet.config.sample_size * 8, "batch": batch, "timed_steps": steps, "variants": {}}
        for variant, (distill, adversarial, two_unets) in UNET_VARIANTS.items():
            torch.cuda.empty_cache()  # a no-op without CUDA
            r = sdxl_gpu.measure(unet, params, pooled, batch, steps, adversarial, run.device, distill, two_unets)
            row["variants"][variant] = r | {"step_s": 1 / r["steps_per_s"]}
            run.save()
        passes = step_floor(run, unet, pooled, batch)
        pcm, reference = row["variants"]["pcm small-cfg"], row["variants"]["pcm two-unet (reference layout)"]
        row["floor"] = {"passes_s": passes, "floor_s": sum(passes.values()),
                        "step_over_floor": pcm["step_s"] / sum(passes.values())}
        row["one_over_two_unet_peak"] = pcm["peak_gib"] / reference["peak_gib"]
        row["one_unet_speedup"] = pcm["steps_per_s"] / reference["steps_per_s"]
        del unet, params
        gc.collect()


# ---- 2. overhead, eager and compiled --------------------------------------------------------------------------------

def losses_and_time(step, repeats: int) -> tuple[list[float], float, float]:
    """(losses of 5 steps, seconds of the first one: compilation when compiled, median step seconds after)."""
    start = time.perf_counter()
    losses = [float(step())]
    first_s = time.perf_counter() - start
    losses += [float(step()) for _ in range(4)]
    return losses, first_s, train_step.timed(step, repeats)


def part_overhead(run: Run, out: dict) -> None:
    batch, repeats = (2, 2) if run.tiny else (8, 5)
    distill = train_step.VARIANTS["pcm small-cfg"][0]
    # --tiny: two UNet levels, not three: torch.compile's tracing time grows with the module count
    sizes = TinySizes() if run.tiny else train_step.SIZES
    teacher, params, data = train_step.build(run.work / "overhead-teacher", batch, sizes)
    start = [p.detach().clone() for p in params]
    step, _ = train_step.make_step(teacher, params, data, distill, None)
    eager, first_s, step_s = losses_and_time(step, repeats)
    floor_s = sum(train_step.floor(teacher, data, distill, None, repeats).values())
    out["eager"] = {"step_s": step_s, "floor_s": floor_s, "overhead_ratio": step_s / floor_s, "losses": eager}
    run.save()
    with torch.no_grad():  # the compiled run starts from the same LoRA weights, so its losses are comparable
        for p, p0 in zip(params, start, strict=True):
            p.copy_(p0)
    # CPU rehearsal: the same torch.compile call, dynamo's eager backend (inductor's C++ build: minutes on 2 cores)
    backend = "eager" if run.tiny else "inductor"
    teacher.backbone.compile(backend=backend)
    step, _ = train_step.make_step(teacher, params, data, distill, None)
    compiled, compile_s, step_c = losses_and_time(step, repeats)
    gap = max(abs(a - b) for a, b in zip(eager, compiled, strict=True))
    out["compiled"] = {"backend": backend, "first_step_s": compile_s, "step_s": step_c,
                       "overhead_ratio": step_c / floor_s, "speedup": step_s / step_c, "losses": compiled,
                       "max_loss_gap": gap, "loss_matches_1e-3": gap <= 1e-3}


# ---- 3. precision, 8-bit AdamW, checkpoint and resume ---------------------------------------------------------------

def tiny_world(root: Path) -> dict:
    """Params (a dict) of a tiny distillation world: 16 shapes images prepared at 16 px and a tiny SD1.5 teacher."""
    from diffusers import StableDiffusionPipeline

    from pcm import stages
    from pcm.config import config_from_dict
    from pcm.models.tiny import build_tokenizer, tiny_sd15_components

    torch.manual_seed(0)
    tokenizer = build_tokenizer(["a red circle at the top left on a gray background"])
    StableDiffusionPipeline(**tiny_sd15_components(tokenizer), requires_safety_checker=False).save_pretrained(
        root / "teacher")
    base = {"demo": {"output_dir": str(root / "shapes"), "num_images": 16, "shard_size": 8},
            "data": {"inputs": [str(root / "shapes" / "shard-{00000..00001}.tar")],
                     "output_dir": str(root / "prepared"), "shard_size": 8, "resolution": 16, "min_side": 16},
            "teacher": {"model": str(root / "teacher")}, "lora": {"rank": 4, "alpha": 4.0},
            "distill": {"num_solver_steps": 20, "num_phases": 2}, "tracking": {"enabled": False},
            "train": {"batch_size": 4, "learning_rate": 1e-3, "log_every": 1, "validate_every": 0,
                      "shuffle_buffer": 8, "checkpoint_every": 2}}
    stages.demo_data(config_from_dict(base), progress=False)
    stages.prepare(config_from_dict(base), progress=False)
    return base


def checkpoint_and_resume(base: dict, out_dir: Path, precision: str, optimizer: str) -> dict:
    """2 steps that checkpoint, then a resume from it to step 4: where it resumed and the losses it logged."""
    from accelerate.state import AcceleratorState

    from pcm.config import config_from_dict
    from pcm.data.loader import loader_factory
    from pcm.train.distill import distill

    def run(max_steps: int, resume: str | None) -> dict:
        AcceleratorState._reset_state(reset_partial_state=True)  # each run its own precision, as in a new process
        train = {**base["train"], "max_steps": max_steps, "mixed_precision": precision, "optimizer": optimizer,
                 "output_dir": str(out_dir)}
        cfg = config_from_dict({**base, "train": train})
        return distill(cfg, loader_factory(cfg), resume=resume, progress=False)

    first = run(2, None)
    saved = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
    resumed = run(4, "latest")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    after = [r for r in records if r.get("step", 0) > 2]
    losses = [v for r in after for k, v in r.items() if "loss" in k and isinstance(v, float)]
    ok = resumed.get("steps") == 4 and bool(after) and min(r["step"] for r in after) == 3 and bool(losses) \
        and all(math.isfinite(v) for v in losses)
    return {"first_steps": first.get("steps"), "checkpoints": saved, "resumed_steps": resumed.get("steps"),
            "steps_logged_after_resume": [r["step"] for r in after], "losses_after_resume": losses,
            "resumed_ok": ok}


def part_precision(run: Run, out: dict) -> None:
    base = tiny_world(run.work / "precision-world")
    eight_bit = run.device == "cuda" and importlib.util.find_spec("bitsandbytes") is not None  # GPU hosts only
    out["adamw8bit"] = "used" if eight_bit else "skipped: bitsandbytes not installed or no CUDA; bf16 ran plain AdamW"
    run.save()
    out["bf16"] = checkpoint_and_resume(base, run.work / "bf16", "bf16", "adamw8bit" if eight_bit else "adamw")
    run.save()
    if run.device != "cuda":
        out["fp16"] = out["host_syncs_per_step"] = "skipped: needs CUDA"
        return
    out["fp16"] = checkpoint_and_resume(base, run.work / "fp16", "fp16", "adamw")
    out["host_syncs_per_step"] = host_syncs.per_step(host_syncs.distill_runner(base, run.work / "syncs"))


# ---- 4. the demo chain ----------------------------------------------------------------------------------------------

def demo_params(run: Run) -> dict:
    """params.yaml with every path under the scratch folder, tracking off, the GPU used, and fewer steps (the
    figures are times per stage, not quality)."""
    from pcm.config import read_params

    p, w = read_params(ROOT / "params.yaml"), run.work / "demo"
    shards = math.ceil(p["demo"]["num_images"] / p["demo"]["shard_size"])
    on = "cuda" if run.device == "cuda" else "cpu"
    p["demo"]["output_dir"], p["data"]["output_dir"] = str(w / "shapes"), str(w / "prepared")
    p["data"]["inputs"] = [str(w / "shapes" / f"shard-{{00000..{shards - 1:05d}}}.tar")]
    p["demo_teacher"] |= {"output_dir": str(w / "teacher"), "device": on, "vae_steps": 200, "unet_steps": 600}
    p["teacher"]["model"] = str(w / "teacher")
    p["train"] |= {"output_dir": str(w / "pcm"), "max_steps": 100, "lr_warmup_steps": 10}
    p["eval"] |= {"loras": [str(w / "pcm" / "lora")], "output_dir": str(w / "eval"), "cache_dir": str(w / "cache"),
                  "device": on, "num_prompts": 100, "bootstrap_resamples": 50}
    p["tracking"] = {"enabled": False}
    if run.tiny:  # the same stages, a few steps each
        p["demo"] |= {"num_images": 24, "shard_size": 8}
        p["data"] |= {"inputs": [str(w / "shapes" / "shard-{00000..00002}.tar")], "shard_size": 8}
        p["demo_teacher"] |= {"vae_steps": 2, "unet_steps": 2, "vae_batch_size": 4, "unet_batch_size": 4,
                              "holdout": 8, "eval_prompts": 2, "eval_steps": 2}
        p["train"] |= {"max_steps": 2, "batch_size": 4, "lr_warmup_steps": 0, "validate_every": 0,
                       "shuffle_buffer": 8}
        p["eval"] |= {"num_prompts": 4, "steps": [1], "reference_steps": 2, "shapes_net_steps": 2,
                      "bootstrap_resamples": 0, "batch_size": 4, "num_reference": 8, "grid_prompts": 2}
    return p


def part_demo(run: Run, out: dict) -> None:
    from accelerate.state import AcceleratorState

    from pcm import stages
    from pcm.config import config_from_dict

    AcceleratorState._reset_state(reset_partial_state=True)  # part 3 left its precision; `pcm distill` is a process
    params = demo_params(run)
    cfg = config_from_dict(params)
    out |= {"overrides": {k: params[k] for k in ("demo_teacher", "train", "eval")}, "stages_s": {}, "completed": []}
    for name, stage in (("demo_data", stages.demo_data), ("prepare", stages.prepare),
                        ("demo_teacher", stages.demo_teacher), ("distill", stages.distill),
                        ("evaluate", stages.evaluate)):
        start = time.perf_counter()
        stage(cfg, progress=False)
        out["stages_s"][name] = time.perf_counter() - start
        out["completed"].append(name)
        run.save()


# ---- the run --------------------------------------------------------------------------------------------------------

PARTS = {1: ("unet", part_unet), 2: ("overhead", part_overhead), 3: ("precision", part_precision),
         4: ("demo", part_demo)}


def budgets(parts: dict) -> dict:
    """Each budget target: measured value, and pass / fail, or 'not measured' (a part not run, or CPU memory)."""
    result = {}
    for name, (target, where, meaning) in BUDGETS.items():
        value = parts
        for key in where.split("."):
            value = value.get(key, {}) if isinstance(value, dict) else None
        known = isinstance(value, float) and math.isfinite(value)
        result[name] = {"target": f"<= {target}", "measured": value if known else None, "meaning": meaning,
                        "verdict": ("pass" if value <= target else "fail") if known else "not measured"}
    return result


def _scalars(data, prefix: str = ""):
    """(dotted key, value) of every number, string and bool in nested dicts; lists of numbers as a summary."""
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _scalars(value, name + ".")
        elif isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
            yield name, f"{len(value)} values, median {statistics.median(value):.4g}"
        elif isinstance(value, float):
            yield name, f"{value:.4g}"
        else:
            yield name, json.dumps(value) if isinstance(value, list) else str(value)


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['card']}, {report['date']}", "",
             f"torch {report['torch']}, CUDA {report['cuda']}, commit {report['commit']}, tiny: {report['tiny']}",
             "", "| budget | target | measured | verdict |", "|---|---|---|---|"]
    for name, b in report["budgets"].items():
        value = "—" if b["measured"] is None else f"{b['measured']:.3f}"
        lines.append(f"| {name}: {b['meaning']} | {b['target']} | {value} | {b['verdict']} |")
    for name, part in report["parts"].items():
        lines += ["", f"## {name}: {part['status']} in {part['seconds']:.1f} s (cap {part['cap_s']} s)"]
        lines += [f"- error: `{part['error']}`"] if part.get("error") else []
        lines += [f"- {k}: {v}" for k, v in _scalars(part.get("results", {}))]
    return "\n".join(lines) + "\n"


def run_part(run: Run, entry: dict, number: int, cap_s: float) -> None:
    """One part under its cap; what it measured before an error or the cap stays in entry['results']."""
    name, fn = PARTS[number]
    entry |= {"status": "running", "cap_s": cap_s, "seconds": 0.0, "results": {}, "error": None}
    start = time.perf_counter()
    try:
        with time_cap(cap_s):
            fn(run, entry["results"])
        entry["status"] = "ok"
    except PartTimeout as err:
        entry |= {"status": "capped", "error": str(err)}
    except Exception as err:  # recorded with where it came from (a rare GPU run is debugged from this file alone)
        entry |= {"status": "error", "error": f"{type(err).__name__}: {err}"[:2000],
                  "traceback": traceback.format_exc()[-4000:]}
    entry["seconds"] = time.perf_counter() - start
    gc.collect()
    torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="1,2,3,4", help="comma-separated part numbers, e.g. 1,3 (a rerun)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder of the JSON and Markdown")
    ap.add_argument("--tiny", action="store_true", help="every part on tiny models on CPU: the rehearsal")
    args = ap.parse_args(argv)
    numbers = [int(n) for n in args.parts.split(",") if n.strip()]
    if not set(numbers) <= set(PARTS):
        ap.error(f"--parts {args.parts}: choose among {sorted(PARTS)}")
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    if args.tiny:  # tiny kernels on busy shared cores: one thread is ~10x faster than threads spinning for each other
        torch.set_num_threads(1)
    train_step.DEVICE = device  # its tiny teacher goes where the rest runs (--tiny: the CPU, even beside a GPU)
    if device == "cpu" and not args.tiny:
        print("gpu-check: no CUDA device here; nothing was run (`python benchmarks/gpu_check.py --tiny` rehearses "
              "every part on CPU).")
        return 0
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    report = {"card": card + (" (tiny)" if args.tiny else ""), "date": datetime.date.today().isoformat(),
              "torch": torch.__version__, "cuda": torch.version.cuda, "commit": commit.stdout.strip() or "unknown",
              "tiny": args.tiny, "torch_threads": torch.get_num_threads(), "parts": {}}
    slug = re.sub(r"[^a-z0-9]+", "-", report["card"].lower()).strip("-")
    path = Path(args.out) / f"gpu-{slug}-{report['date']}.json"
    if path.exists():  # a rerun of some parts keeps the others' results
        report["parts"] = json.loads(path.read_text()).get("parts", {})

    def save() -> None:
        report["budgets"] = budgets({k: v.get("results", {}) for k, v in report["parts"].items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        path.with_suffix(".md").write_text(markdown(report))

    with tempfile.TemporaryDirectory() as work:
        run = Run(device, args.tiny, Path(work), save)
        for number in sorted(numbers):
            name = PARTS[number][0]
            report["parts"][name] = entry = {}
            run_part(run, entry, number, CAPS_S[number])
            save()
            print(f"part {number} {name}: {entry['status']} in {entry['seconds']:.1f} s"
                  + (f" ({entry['error'].splitlines()[0]})" if entry["error"] else ""), flush=True)
    print(f"wrote {path} and {path.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
