"""`pcm distill` beside the PCM authors' SD1.5 training script: same teacher, data, batch, precision, CPU threads.

    python benchmarks/reference_side_by_side.py [--reference CLONE] [--steps 120] [--batch-size 8] [--resolution 32]
                                                [--threads N] [--repeats 1] [--out FILE]

Their script (code/text_to_image_sd15/train_pcm_lora_sd15.py of G-U-N/Phased-Consistency-Model) is never committed
here: --reference names a local clone, else the repository is cloned at PINNED_COMMIT into --cache (`git clone`,
an argument list, no shell). Both sides run as a new user runs them, each in its own process, one after the other
(order alternating over --repeats): ours as `pcm distill KEY=VALUE ...`, theirs as `python train_pcm_lora_sd15.py
--arg ...` with these run-time adaptations and no others:
- `torchvision` is a stand-in (benchmarks/torchvision_standin: Compose, Resize, CenterCrop, ToTensor, Normalize;
  torchvision does not import beside our torch), put first on their sys.path after transformers and diffusers have
  found no torchvision (so that they keep their torchvision-free code paths, as on this machine without it);
- their dataset path is hard-coded (/mnt/data/wangfuyun/cc3m): a wrapper imports their module and subclasses
  CustomImageDataset so that it lists our folder instead, then calls their parse_args() and main() as their
  `__main__` block does. The folder holds the prepared shards' own image files and captions (KEY.png + KEY.txt),
  the bytes our loader decodes.
Both processes get the same thread count (torch.set_num_threads and OMP_NUM_THREADS) and a step clock: tqdm is
replaced by a subclass that stamps the wall clock and the process's CPU time at each update of the training bar
("Steps" theirs, "distill ..." ours). From the stamps and the process's launch and exit:
- per step: the median interval between consecutive steps (wall and CPU), so a busy machine's stalls do not count;
- start-up: launch to the end of the first step, less one median step; finish: the last step to the exit.
The shared world, made once under --work: `pcm demo-data`, `pcm prepare` at --resolution, and a teacher of the demo
teacher's architecture (pcm demo-teacher's defaults) with random weights, which step speed does not depend on, and
SD1.5's 77-token text context (their script encodes its empty prompt at 77 tokens, whatever the tokenizer says).

Equal settings (theirs -> ours): --train_batch_size / train.batch_size, --mixed_precision no / train.mixed_precision
no, --lora_rank 64 / lora.rank 64 and their peft alpha 8 / lora.alpha 8 on the same 14 target modules,
--num_ddim_timesteps 50 --multiphase 4 / distill.num_solver_steps 50 num_phases 4, w in [4, 5], Huber c = 0.001, lr
5e-6 constant, AdamW weight decay 1e-2, grad norm 1, no gradient checkpointing, 0 loader workers, no validation and
no checkpoint before the end (ours always writes one at the end). Each side keeps its own defaults otherwise: theirs
logs to tensorboard (not installed here, so accelerate logs nowhere), ours to MLflow (the embedded SQLite store).
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

PINNED_COMMIT = "b127277f641f28ad2459647a05f78133e5b3fd34"  # G-U-N/Phased-Consistency-Model, 2024-12-11
REPO_URL = "https://github.com/G-U-N/Phased-Consistency-Model"
SCRIPT = "code/text_to_image_sd15/train_pcm_lora_sd15.py"
STANDIN = Path(__file__).resolve().parent / "torchvision_standin"
OURS_BAR, THEIR_BAR = "distill", "Steps"  # the training progress bars' descriptions (prefixes)


# ---- in the child processes: the step clock, then the script ------------------------------------------------------

def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _install_step_clock(stamps_file: Path, bar_prefix: str, threads: int) -> dict:
    """tqdm's class replaced (before the script imports it) by one that stamps (wall, cpu) at every update of the
    bar whose description starts with bar_prefix; the stamps are written to stamps_file at exit, with one when the
    script returned (`returned`, set by the caller) and one in the last atexit handler (`exit`)."""
    import atexit

    import torch
    import tqdm
    import tqdm.auto

    torch.set_num_threads(threads)
    stamps: list[tuple[float, float]] = []
    clock = {"steps": stamps, "returned": None, "exit": None}

    def write():
        clock["exit"] = (time.monotonic(), _cpu())
        stamps_file.write_text(json.dumps(clock))

    class StepClock(tqdm.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.clocked = str(kwargs.get("desc") or "").startswith(bar_prefix)

        def update(self, n=1):
            if self.clocked:
                stamps.extend([(time.monotonic(), _cpu())] * int(n))
            return super().update(n)

    tqdm.tqdm = tqdm.auto.tqdm = StepClock
    atexit.register(write)  # registered first: runs after every handler the script registers
    return clock


def _hide_standin_from_libraries() -> None:
    """transformers and diffusers decide once per process whether torchvision is installed (from whether the name
    can be found, cached): asked before the stand-in is on the path, they say no, as without it, and never import
    it; only the reference script's own `from torchvision import transforms` gets the stand-in."""
    import diffusers.utils.import_utils  # noqa: F401  (computes its answer on import)
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():
        raise RuntimeError("torchvision is installed: run the reference script without the stand-in")


def _child(side: str, stamps_file: str, threads: int, data_dir: str, argv: list[str]) -> None:
    if side == "ours":
        clock = _install_step_clock(Path(stamps_file), OURS_BAR, threads)
        import atexit

        from pcm.cli import main

        sys.argv = ["pcm", *argv]  # as the `pcm` console script calls it
        atexit.register(lambda: clock.update(returned=clock["returned"] or (time.monotonic(), _cpu())))
        sys.exit(main())
    script = Path(argv[0]).resolve()
    clock = _install_step_clock(Path(stamps_file), THEIR_BAR, threads)
    _hide_standin_from_libraries()
    # the stand-in, and their script's own folder (as `python script.py` has it), first on the path
    sys.path[:0] = [str(STANDIN), str(script.parent)]
    reference = __import__(script.stem)

    class OurFolder(reference.CustomImageDataset):  # their class and transforms; only the folder is ours
        def __init__(self, img_dir, sample_size):
            super().__init__(data_dir, sample_size)

    reference.CustomImageDataset = OurFolder
    sys.argv = [str(script), *argv[1:]]
    reference.main(reference.parse_args())
    clock["returned"] = (time.monotonic(), _cpu())


# ---- in the parent: the world, the reference, the runs ------------------------------------------------------------

def fetch_reference(reference: str | None, cache: Path, url: str = REPO_URL, commit: str = PINNED_COMMIT) -> Path:
    """The folder of a clone holding SCRIPT: --reference as given, else url cloned into cache with the code/ folder
    of commit checked out."""
    if reference:
        root = Path(reference)
        if not (root / SCRIPT).is_file():
            raise SystemExit(f"--reference {root}: no {SCRIPT} there; pass a clone of {REPO_URL}")
        return root
    root = cache / commit[:12]
    if not (root / SCRIPT).is_file():
        partial = cache / f"{commit[:12]}.partial"
        subprocess.run(["rm", "-rf", str(partial)], check=True)
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "--quiet", "--no-checkout", url, str(partial)], check=True)
        # only their code: the repository's images are most of its size and no script reads them
        subprocess.run(["git", "-C", str(partial), "checkout", "--quiet", commit, "--", "code"], check=True)
        partial.rename(root)
    return root


def world_params(work: Path, resolution: int, images: int) -> dict:
    """The shared world's params: shapes images prepared at resolution (PNG, as the demo) and the teacher's
    folder."""
    shard = max(images // 2, 1)
    return {"seed": 0,
            "demo": {"output_dir": str(work / "shapes"), "num_images": images, "shard_size": shard},
            "data": {"inputs": [str(work / "shapes" / "shard-{00000..00001}.tar")],
                     "output_dir": str(work / "prepared"), "shard_size": shard, "resolution": resolution,
                     "min_side": resolution, "image_format": "png"},
            "teacher": {"family": "sd15", "model": str(work / "teacher")},
            "tracking": {"uri": f"sqlite:///{(work / 'mlflow' / 'mlflow.db').as_posix()}"}}


def make_world(work: Path, resolution: int, images: int = 256) -> dict:
    """Shapes shards, prepared shards, the teacher and the reference's image folder under work (kept between runs:
    made once per resolution and size)."""
    params = world_params(work, resolution, images)
    stamp = work / "world.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == params:
        return params
    from pcm import stages
    from pcm.config import config_from_dict

    (work / "mlflow").mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(params)
    stages.demo_data(cfg, progress=False)
    stages.prepare(cfg, progress=False)
    export_folder(work / "prepared", work / "images")
    save_teacher(cfg, sorted(p.read_text() for p in (work / "images").glob("*.txt")))
    stamp.write_text(json.dumps(params))
    return params


def save_teacher(cfg, captions: list[str]) -> None:
    """The demo teacher's architecture (pcm demo-teacher's widths, attention layout and text encoder) with random
    weights, seeded, and a text context of 77 tokens as SD1.5's: their script encodes the empty prompt at length 77
    whatever the tokenizer says (the demo teacher's context fits the demo captions, 16 tokens here)."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pcm.models.tiny import TinySizes, build_tokenizer, tiny_sd15_components

    c = cfg.demo_teacher
    factor = 2 ** (len(c.vae_channels) - 1)
    sizes = TinySizes(unet_channels=c.unet_channels, attention_head_dim=c.attention_heads,
                      attention_from=c.attention_from, cross_attention_dim=c.text_hidden, text_hidden=c.text_hidden,
                      text_layers=c.text_layers, vae_channels=c.vae_channels, norm_groups=8,
                      sample_size=cfg.data.resolution // factor)
    torch.manual_seed(cfg.seed)
    parts = tiny_sd15_components(build_tokenizer(captions + [""], model_max_length=77), sizes)
    StableDiffusionPipeline(**parts, requires_safety_checker=False).save_pretrained(cfg.teacher.model)


def export_folder(prepared: Path, folder: Path) -> int:
    """The prepared shards' images and captions as KEY.<ext> + KEY.txt files in folder (their dataset's layout);
    returns the number of samples."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for shard in sorted(prepared.glob("shard-*.tar")):
        with tarfile.open(shard) as archive:
            for member in archive.getmembers():
                key, _, ext = member.name.partition(".")
                if ext in ("png", "jpg", "txt"):
                    (folder / f"{key}.{ext}").write_bytes(archive.extractfile(member).read())
                    count += ext != "txt"
    return count


def our_command(params_file: Path, params: dict, out: Path, steps: int, batch: int) -> list[str]:
    overrides = {"teacher.model": params["teacher"]["model"], "data.output_dir": params["data"]["output_dir"],
                 "data.resolution": params["data"]["resolution"], "tracking.uri": params["tracking"]["uri"],
                 "train.output_dir": str(out), "train.batch_size": batch, "train.max_steps": steps,
                 "train.mixed_precision": "'no'", "train.learning_rate": 5e-6, "train.weight_decay": 1e-2,
                 "train.lr_schedule": "constant", "train.lr_warmup_steps": 0, "train.max_grad_norm": 1.0,
                 "train.num_workers": 0, "train.validate_every": 0, "train.checkpoint_every": steps,
                 "train.gradient_checkpointing": "false", "lora.rank": 64, "lora.alpha": 8,
                 "distill.method": "pcm", "distill.num_solver_steps": 50, "distill.num_phases": 4,
                 "distill.guidance": "small_cfg", "distill.w_min": 4.0, "distill.w_max": 5.0, "distill.loss": "huber",
                 "distill.huber_c": 0.001, "adversarial.weight": 0.0, "seed": 0}
    return ["distill", "--params", str(params_file),
            *[f"{k}={v}" for k, v in overrides.items()]]


def their_command(script: Path, params: dict, out: Path, steps: int, batch: int) -> list[str]:
    never = str(steps + 1)  # no validation pipeline and no accelerate checkpoint inside the run
    return [str(script), "--pretrained_teacher_model", params["teacher"]["model"], "--output_dir", str(out),
            "--mixed_precision", "no", "--resolution", str(params["data"]["resolution"]),
            "--train_batch_size", str(batch), "--max_train_steps", str(steps), "--dataloader_num_workers", "0",
            "--lora_rank", "64", "--learning_rate", "5e-6", "--lr_scheduler", "constant", "--loss_type", "huber",
            "--huber_c", "0.001", "--adam_weight_decay", "1e-2", "--max_grad_norm", "1.0", "--w_min", "4",
            "--w_max", "5", "--num_ddim_timesteps", "50", "--multiphase", "4", "--seed", "0",
            "--validation_steps", never, "--checkpointing_steps", never]


def run_side(side: str, argv: list[str], threads: int, data_dir: Path, log: Path) -> dict:
    """One process of one side; its wall time and CPU time (parent side), its step stamps (child side)."""
    stamps_file = log.with_suffix(".stamps.json")
    stamps_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", side, str(stamps_file), str(threads),
               str(data_dir), "--", *argv]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.monotonic()
    with open(log, "w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=data_dir.parent).returncode
    end = time.monotonic()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        raise RuntimeError(f"the {side} run exited {code}; its output is in {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-15:]))
    clock = json.loads(stamps_file.read_text())
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return summarize(start, end, cpu, clock)


def summarize(start: float, end: float, cpu_total: float, clock: dict) -> dict:
    """Per-step wall and CPU seconds (median interval), start-up and finish, from a process's launch, exit, total
    CPU time and its (wall, cpu) stamps: at the end of every step (at least 2), when the script returned, in the
    last atexit handler. The finish splits into the script's own work after the last step (`after_steps`) and the
    interpreter's exit (`exit`: atexit handlers, threads, module teardown)."""
    stamps = clock["steps"]
    if len(stamps) < 2:
        raise RuntimeError(f"the step clock saw {len(stamps)} step(s); need at least 2")
    walls, cpus = [s[0] for s in stamps], [s[1] for s in stamps]
    step_wall = statistics.median(b - a for a, b in zip(walls, walls[1:], strict=False))
    step_cpu = statistics.median(b - a for a, b in zip(cpus, cpus[1:], strict=False))
    startup_wall, finish_wall = walls[0] - start - step_wall, end - walls[-1]
    startup_cpu, finish_cpu = cpus[0] - step_cpu, max(cpu_total - cpus[-1], 0.0)
    returned = clock.get("returned") or stamps[-1]
    return {"steps": len(stamps), "total_s": end - start, "cpu_total_s": cpu_total,
            "after_steps_s": returned[0] - walls[-1], "exit_s": end - returned[0],
            "step_s": step_wall, "step_cpu_s": step_cpu, "steps_per_s": 1 / step_wall,
            "startup_s": startup_wall, "finish_s": finish_wall, "overhead_s": startup_wall + finish_wall,
            "startup_cpu_s": startup_cpu, "finish_cpu_s": finish_cpu, "overhead_cpu_s": startup_cpu + finish_cpu}


def compare(ours: list[dict], theirs: list[dict]) -> dict:
    """Medians over the repeats and the ratios the README reports (> 1: ours is faster / ours takes longer)."""
    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    keys = ("total_s", "cpu_total_s", "step_s", "step_cpu_s", "startup_s", "finish_s", "after_steps_s", "exit_s",
            "overhead_s", "startup_cpu_s", "finish_cpu_s", "overhead_cpu_s")
    summary = {"ours": {k: med(ours, k) for k in keys}, "reference": {k: med(theirs, k) for k in keys}}
    o, r = summary["ours"], summary["reference"]
    summary["ratios"] = {"per_step_speedup_wall": r["step_s"] / o["step_s"],
                         "per_step_speedup_cpu": r["step_cpu_s"] / o["step_cpu_s"],
                         "whole_run_time_ratio": o["total_s"] / r["total_s"],
                         "overhead_minus_reference_s": o["overhead_s"] - r["overhead_s"],
                         "overhead_cpu_minus_reference_s": o["overhead_cpu_s"] - r["overhead_cpu_s"]}
    return summary


def table(summary: dict) -> str:
    rows = [("whole run, s", "total_s"), ("CPU, s", "cpu_total_s"), ("per step, s", "step_s"),
            ("per step CPU, s", "step_cpu_s"), ("start-up, s", "startup_s"), ("finish, s", "finish_s"),
            ("  of which after the last step, s", "after_steps_s"), ("  of which the interpreter's exit, s", "exit_s"),
            ("start-up + finish, s", "overhead_s"), ("start-up + finish CPU, s", "overhead_cpu_s")]
    lines = ["| | pcm distill | reference script |", "|---|---:|---:|"]
    lines += [f"| {name} | {summary['ours'][k]:.2f} | {summary['reference'][k]:.2f} |" for name, k in rows]
    ratios = summary["ratios"]
    lines.append(f"\nper step: ours {ratios['per_step_speedup_wall']:.2f}x the reference's steps/s (wall), "
                 f"{ratios['per_step_speedup_cpu']:.2f}x (CPU); whole run {ratios['whole_run_time_ratio']:.2f}x "
                 f"the reference's time; start-up + finish {ratios['overhead_minus_reference_s']:+.1f} s (wall), "
                 f"{ratios['overhead_cpu_minus_reference_s']:+.1f} s (CPU) against the reference's")
    return "\n".join(lines)


def run(args) -> dict:
    work = args.work.resolve()
    script = fetch_reference(args.reference, args.cache, args.url, args.commit) / SCRIPT
    params = make_world(work, args.resolution, args.images)
    from pcm.config import config_from_dict, config_to_yaml

    params_file = work / "world.yaml"
    params_file.write_text(config_to_yaml(config_from_dict(params)))
    ours, theirs = [], []
    for i in range(args.repeats):
        order = ("ours", "reference") if i % 2 == 0 else ("reference", "ours")
        for side in order:
            out = work / "runs" / f"{side}-{i}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            out.mkdir(parents=True)
            argv = (our_command(params_file, params, out, args.steps, args.batch_size) if side == "ours"
                    else their_command(script, params, out, args.steps, args.batch_size))
            result = run_side(side, argv, args.threads, work / "images", out / "run.log")
            (ours if side == "ours" else theirs).append(result)
            print(f"repeat {i} {side}: {result['total_s']:.1f} s, {result['step_s']:.3f} s/step, start-up + finish "
                  f"{result['overhead_s']:.1f} s", flush=True)
    summary = compare(ours, theirs)
    settings = {"steps": args.steps, "batch_size": args.batch_size, "resolution": args.resolution,
                "threads": args.threads, "repeats": args.repeats, "images": args.images,
                "reference_commit": None if args.reference else args.commit, "reference": str(script)}
    return {"settings": settings, "machine": {"cpu": platform.machine(), "cores": os.cpu_count()},
            "runs": {"ours": ours, "reference": theirs}, **summary}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", help="a local clone of G-U-N/Phased-Consistency-Model (default: clone "
                        f"{REPO_URL} at {PINNED_COMMIT[:12]} into --cache)")
    parser.add_argument("--url", default=REPO_URL, help="where to clone from when --reference is not given")
    parser.add_argument("--commit", default=PINNED_COMMIT, help="the commit of theirs to check out (default: the "
                        "one this benchmark was written against)")
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "pcm-pipelines" / "reference")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "pcm-pipelines" / "bench-reference",
                        help="the world and the runs' "
                        "outputs (kept: the world is made once)")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--images", type=int, default=256, help="prepared images in the world")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of both sides")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, the order alternating")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/reference_side_by_side.json"))
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    results = run(args)
    print(table(results))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written: {args.out}")
    return results


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":  # side, stamps file, threads, data folder, --, argv
        _child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[7:])
    else:
        main()
