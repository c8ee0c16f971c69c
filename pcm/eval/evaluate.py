"""`pcm evaluate`: every model at every step count from the same noises, scored against references, reported.

Rows: the teacher's DDIM (teacher-ddim; a flow teacher's Euler, teacher-euler: the same jumps on its sigmas) at
eval.steps and at eval.reference_steps (the reference), and each LoRA at eval.steps per inference guidance scale.
Per row (all means over the samples, one sample per (prompt, seed)):
  fid               FID against the reference images (eval.features: Inception pool3, or the demo's shapes CNN)
  fid_teacher       FID against the teacher's reference-step samples of the same prompts and seeds ("FID-SD")
  trajectory_error  RMS latent distance to the teacher's reference-step result from the same x_T
  step_consistency  mean cosine similarity of the model's final latents at this step count and at each other one
  clip_score        100 * max(cos, 0) with eval.clip_model (when set)
  oracle_*          the shapes oracle's per-attribute adherence (eval.oracle, demo prompts)
Video teachers (animatediff) are scored per clip: fid over all frames, clip_score per frame averaged over the clip,
frame_consistency (CLIP similarity of consecutive frames, with eval.clip_model), frame_feature_consistency (the
same with the FID features, always) and the motion oracle's oracle_motion beside its colour / kind scores; the grids
are animated GIFs.
Every metric gets a 95 % interval <metric>/ci_low, <metric>/ci_high (eval.bootstrap_resamples > 0): a bootstrap over
prompts (pcm.eval.intervals), for which each row keeps its per-sample values and features until it is scored.
Generation is batched; features are streamed into running sums; the teacher's reference samples and the reference
images' statistics are cached under eval.cache_dir, keyed by everything they depend on.
"""

import logging
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pcm.config import Config
from pcm.eval import video
from pcm.eval.fid import FeatureStats, fid
from pcm.eval.generate import (
    Sampler,
    initial_noise,
    load_samplers,
    sample_latents,
    teacher_method,
    teacher_sampler,
    to_uint8,
    use,
)
from pcm.eval.intervals import bootstrap_fid, bootstrap_mean, cluster_labels, sampled_fid
from pcm.eval.known_world import KnownWorld, require_world
from pcm.eval.prompts import load_prompts
from pcm.eval.references import feature_function, reference_stats, teacher_reference
from pcm.eval.report import write_report
from pcm.inference import lora_sha256
from pcm.models.families import load_teacher

log = logging.getLogger(__name__)


@dataclass
class Row:
    """Running sums of one (model, step count) row."""

    label: str
    method: str
    steps: int
    guidance_scale: float
    features: FeatureStats = field(default_factory=FeatureStats)  # over images, or over all frames of clips
    sums: dict = field(default_factory=dict)  # metric -> (sum, count)
    samples: int = 0  # images or clips scored
    keep: bool = False  # keep per-sample values and features for the bootstrap (in sample order: prompt-major)
    kept: dict = field(default_factory=dict)  # metric -> [(B,) float64]; "features" -> [(B, D) float32]

    def add(self, metric: str, values: torch.Tensor | np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        total, count = self.sums.get(metric, (0.0, 0))
        self.sums[metric] = (total + values.sum(), count + values.size)
        if self.keep:
            self.kept.setdefault(metric, []).append(values)

    def add_features(self, features: torch.Tensor | np.ndarray) -> None:
        self.features.update(features)
        if self.keep:  # float32: at 30 000 Inception features a row keeps 245 MB, not 490
            features = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else features
            self.kept.setdefault("features", []).append(np.asarray(features, dtype=np.float32))

    def result(self, reference: FeatureStats, teacher: "Row", bootstrap: "Bootstrap") -> dict:
        nfe = self.steps * (2 if self.guidance_scale != 1.0 else 1)
        out = {"model": self.label, "method": self.method, "steps": self.steps, "guidance_scale": self.guidance_scale,
               "nfe": nfe, "samples": self.samples, **self.fids(reference, teacher)}
        means = {k: total / count for k, (total, count) in self.sums.items()}
        return out | means | bootstrap.intervals(self, reference, teacher)

    def fids(self, reference: FeatureStats, teacher: "Row") -> dict[str, float]:
        """fid and fid_teacher: from the kept samples when there are fewer than feature dimensions (n x n algebra),
        otherwise from the running statistics."""
        if self.keep and teacher.keep:
            features = np.concatenate(self.kept["features"])
            found = sampled_fid(features, reference.mean_cov())
            if found is not None:
                return {"fid": found, "fid_teacher": sampled_fid(features, np.concatenate(teacher.kept["features"]))}
        return {"fid": fid(self.features, reference), "fid_teacher": fid(self.features, teacher.features)}


@dataclass
class Bootstrap:
    """The step table's 95 % intervals (pcm.eval.intervals): prompts resampled with replacement."""

    resamples: int  # eval.bootstrap_resamples; 0 = no intervals
    seed: int  # from eval.seeds: the same prompt draws for every row and metric, run after run
    prompts: int  # P: the unit resampled (a prompt's seeds and frames move together)
    seconds: float = 0.0  # time spent resampling, reported in info.json (what the intervals cost)

    @classmethod
    def of(cls, resamples: int, seeds: tuple[int, ...], prompts: int) -> "Bootstrap":
        return cls(resamples, zlib.crc32(repr(tuple(seeds)).encode()), prompts)

    def intervals(self, row: Row, reference: FeatureStats, teacher: Row) -> dict[str, float]:
        """{'<metric>/ci_low': low, '<metric>/ci_high': high} for every metric of row ({} when off)."""
        if self.resamples == 0:
            return {}
        start = time.perf_counter()
        features = np.concatenate(row.kept["features"])
        groups = cluster_labels(len(features), self.prompts)
        paired = np.concatenate(teacher.kept["features"])  # the teacher's samples of the same prompts and seeds
        found = {"fid": bootstrap_fid(features, groups, reference.mean_cov(), self.resamples, self.seed),
                 "fid_teacher": bootstrap_fid(features, groups, paired, self.resamples, self.seed)}
        for metric, parts in row.kept.items():
            if metric != "features":
                values = np.concatenate(parts)
                found[metric] = bootstrap_mean(values, cluster_labels(len(values), self.prompts), self.resamples,
                                               self.seed)
        self.seconds += time.perf_counter() - start
        return {f"{m}/ci_{end}": float(getattr(interval, end)) for m, interval in found.items()
                for end in ("low", "high")}


class Scorers:
    """Everything computed from a batch of images: features for FID, CLIP score, oracle adherence."""

    ORACLE = ("colour", "kind", "position", "background", "overall")

    def __init__(self, cfg: Config, device: torch.device, progress: bool, world: KnownWorld | None = None):
        e = cfg.eval
        self.world = require_world(world, "eval.oracle") if e.oracle else None
        self.features = feature_function(cfg, device, progress, world)
        self.clip = None
        if e.clip_model:
            from pcm.eval.clip_score import ClipScorer
            self.clip = ClipScorer(e.clip_model, device)
        self.keep = e.bootstrap_resamples > 0  # the intervals need every sample, not only running sums

    def new_row(self, label: str, method: str, steps: int, guidance_scale: float) -> Row:
        return Row(label, method, steps, guidance_scale, keep=self.keep)

    def score(self, row: Row, images: np.ndarray, prompts: list[str]) -> None:
        """images (B, H, W, 3) uint8, or clips (B, F, H, W, 3)."""
        row.samples += len(images)
        if images.ndim == 5:
            self.score_clips(row, images, prompts)
            return
        row.add_features(self.features(images))
        if self.clip is not None:
            row.add("clip_score", self.clip(images, prompts))
        if self.world is not None:
            scores = [self.world.oracle(image, prompt) for image, prompt in zip(images, prompts, strict=True)]
            for k in self.ORACLE:
                row.add(f"oracle_{k}", [s[k] for s in scores])


    def score_clips(self, row: Row, clips: np.ndarray, prompts: list[str]) -> None:
        features = self.features(video.frames_of(clips))
        row.add_features(features)
        row.add("frame_feature_consistency", video.frame_feature_consistency(features, clips.shape[1]))
        if self.clip is not None:
            row.add("clip_score", video.clip_score_per_frame(self.clip, clips, prompts))
            row.add("frame_consistency", video.frame_consistency(self.clip, clips))
        if self.world is not None:
            for k, values in video.motion_oracle(self.world.motion_oracle, clips, prompts).items():
                row.add(f"oracle_{k}", values)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("eval.device=cuda but torch sees no CUDA device; use cpu or auto")
    return torch.device(name)


def check_lora_meets_teacher(cfg: Config, folder: str, meta: dict) -> None:
    """Teacher-relative metrics need the LoRA's own teacher: another family is refused before any work (it would
    not even load), another base model of the family is warned about (a fine-tune may be what is measured)."""
    from pcm.inference import meet_teacher

    meet_teacher(meta, folder, cfg.teacher, f"eval.loras entry {folder}", "set teacher.family={family} "
                 "teacher.model={base} to evaluate it against its own base, or drop it from eval.loras")


def check_inputs(cfg: Config) -> None:
    """Fails before any work when a file or directory the evaluation needs is missing, naming the key to set."""
    from pcm.eval.clip_score import check_clip_dir
    from pcm.eval.generate import read_lora_config
    from pcm.models.families import check_model_reference

    e = cfg.eval
    check_model_reference(cfg.teacher.model)
    if not e.loras:
        raise ValueError("eval.loras is empty: list the LoRA folders to evaluate (pcm distill writes "
                         "train.output_dir/lora)")
    for folder in e.loras:
        check_lora_meets_teacher(cfg, folder, read_lora_config(folder))
    if e.features == "inception" and not Path(e.inception_weights).is_file():
        raise FileNotFoundError(f"eval.inception_weights={e.inception_weights}: no such file (pytorch-fid's "
                                "weights converted with `pcm convert-inception`)")
    if e.clip_model:
        check_clip_dir(e.clip_model)
    if e.prompts and not Path(e.prompts).is_file():
        raise FileNotFoundError(f"eval.prompts={e.prompts}: no such file")


class Batches:
    """The samples (prompt index, seed), prompt-major, in batches with their x_T and conditions."""

    def __init__(self, teacher, prompts: list[str], seeds: tuple[int, ...], batch_size: int, resolution: int,
                 frames: int = 1):
        self.teacher, self.prompts, self.batch_size, self.resolution = teacher, prompts, batch_size, resolution
        self.samples = [(p, s) for p in range(len(prompts)) for s in seeds]
        self.shape = teacher.latent_shape(resolution, frames)  # (C, h, w), or (C, F, h, w) for video

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.samples), self.batch_size):
            part = self.samples[start:start + self.batch_size]
            prompts = [self.prompts[p] for p, _ in part]
            x_T = torch.stack([initial_noise(self.shape, s, p) for p, s in part]).to(self.teacher.device)
            cond = self.teacher.encode_prompts(prompts, target_size=self.resolution)
            yield start, prompts, x_T, cond, self.teacher.uncond(len(prompts), like=cond)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


def _rms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double() - b.double()).pow(2).flatten(1).mean(1).sqrt()


def evaluate_sampler(teacher, sampler: Sampler, batches: Batches, reference: torch.Tensor, scorers: Scorers,
                     steps: tuple[int, ...], grid_rows: list[int], progress: bool) -> tuple[list[Row], dict]:
    """Rows of one sampler at every step count, and its grid tiles {(sample index, K): image uint8}."""
    use(teacher, sampler)
    rows = {K: scorers.new_row(sampler.label, sampler.method, K, sampler.guidance_scale) for K in steps}
    tiles = {}
    for start, prompts, x_T, cond, neg in tqdm(batches, desc=f"evaluate {sampler.label}", disable=not progress):
        latents = {}
        for K in steps:
            generator = torch.Generator().manual_seed(start)  # LCM's re-noising draws
            x_0 = sample_latents(teacher, sampler, x_T, cond, neg, K, generator).float()
            latents[K] = x_0.cpu()
            images = to_uint8(teacher.decode_latents(x_0))
            scorers.score(rows[K], images, prompts)
            rows[K].add("trajectory_error", _rms(latents[K], reference[start:start + len(prompts)]))
            tiles |= {(i, K): images[i - start] for i in grid_rows if start <= i < start + len(prompts)}
        for K in steps:
            others = [_cosine(latents[K], latents[J]) for J in steps if J != K]
            if others:
                rows[K].add("step_consistency", torch.stack(others).mean(0))
    return list(rows.values()), tiles


def _lora_files(samplers: list[Sampler], folders: tuple[str, ...]) -> dict[str, str]:
    """{row label: sha256 of the LoRA file the row sampled}: `pcm register` gates only on its own file's metrics.
    Adapter eval<i> is folders[i] (pcm.eval.generate.load_samplers)."""
    shas = [lora_sha256(folder) for folder in folders]
    return {s.label: shas[int(s.adapter.removeprefix("eval"))] for s in samplers if s.adapter is not None}


def score_reference(teacher, reference: torch.Tensor, batches: Batches, scorers: Scorers, row: Row,
                    grid_rows: list[int]) -> dict:
    """Scores the teacher's cached reference samples into row; returns their grid tiles."""
    tiles = {}
    for b_start, b_prompts, *_ in batches:
        x_0 = reference[b_start:b_start + len(b_prompts)].to(teacher.device)
        images = to_uint8(teacher.decode_latents(x_0))
        scorers.score(row, images, b_prompts)
        row.add("trajectory_error", np.zeros(len(b_prompts)))  # the reference itself
        tiles |= {(row.label, i, row.steps): images[i - b_start] for i in grid_rows
                  if b_start <= i < b_start + len(b_prompts)}
    return tiles


def evaluate(cfg: Config, progress: bool = True, world: KnownWorld | None = None) -> dict:
    """Runs the whole evaluation and writes the report under eval.output_dir; returns the summary. world: the
    oracles and feature net that eval.oracle and eval.features=shapes need (pcm.stages passes the demo's)."""
    e, start = cfg.eval, time.perf_counter()
    check_inputs(cfg)
    device = _device(e.device)
    prompts, skipped = load_prompts(e.prompts, cfg.data.output_dir, e.num_prompts)
    if len(prompts) * len(e.seeds) < 2:
        raise ValueError(f"{len(prompts)} prompt(s) x {len(e.seeds)} seed(s): FID needs at least 2 samples")
    teacher = load_teacher(cfg.teacher, device, resolution=cfg.data.resolution)
    own = teacher_sampler(e.teacher_guidance_scale, teacher_method(teacher))
    samplers = [own, *load_samplers(teacher, e.loras, e.guidance_scales, e.gammas)]
    lora_files = _lora_files(samplers, e.loras)  # hashed as loaded, not after a long run
    scorers = Scorers(cfg, device, progress, world)
    reference_images = reference_stats(cfg, scorers.features, progress)
    batches = Batches(teacher, prompts, e.seeds, e.batch_size, cfg.data.resolution, cfg.data.frames)
    use(teacher, samplers[0])
    reference, cache_hit = teacher_reference(teacher, cfg, batches, progress)

    ref_row = scorers.new_row(own.label, own.method, e.reference_steps, e.teacher_guidance_scale)
    grid_rows = [p * len(e.seeds) for p in range(min(e.grid_prompts, len(prompts)))]
    tiles = score_reference(teacher, reference, batches, scorers, ref_row, grid_rows)
    bootstrap, results = Bootstrap.of(e.bootstrap_resamples, e.seeds, len(prompts)), []
    for sampler in samplers:
        sampler_rows, sampler_tiles = evaluate_sampler(teacher, sampler, batches, reference, scorers, e.steps,
                                                       grid_rows, progress)
        # scored at once, so one sampler's kept samples at a time are in memory
        results += [row.result(reference_images, ref_row, bootstrap) for row in sampler_rows]
        tiles |= {(sampler.label, i, K): image for (i, K), image in sampler_tiles.items()}
    results.append(ref_row.result(reference_images, ref_row, bootstrap))
    info = {"prompts": len(prompts), "seeds": list(e.seeds), "samples": len(batches.samples),
            "skipped_prompt_lines": skipped, "teacher_reference_cached": cache_hit, "features": scorers.features.name,
            "reference_images": reference_images.count, "teacher": cfg.teacher.model, "loras": list(e.loras),
            "lora_sha256": lora_files,
            "teacher_guidance_scale": e.teacher_guidance_scale, "reference_steps": e.reference_steps,
            "teacher_family": cfg.teacher.family, "bootstrap_resamples": e.bootstrap_resamples,
            "bootstrap_seconds": round(bootstrap.seconds, 2), **({"note": e.note} if e.note else {}),
            **({"frames": cfg.data.frames, "motion_adapter": cfg.teacher.motion_adapter} if teacher.is_video else {}),
            "seconds": round(time.perf_counter() - start, 1)}
    grid_prompts = [prompts[i // len(e.seeds)] for i in grid_rows]
    return write_report(Path(e.output_dir), results, info, tiles, grid_prompts, e.plot_x)
