"""What evaluation rows are compared with, computed once and cached under eval.cache_dir.

  feature_function   the FID feature network (Inception from eval.inception_weights, or the known world's net)
  reference_stats    mean and covariance of the reference images' features, keyed by the feature network and the
                     reference shards' index
  teacher_reference  the teacher's eval.reference_steps-step DDIM (flow teacher: Euler) latents of every (prompt,
                     seed), keyed by the teacher's files, the prompts, seeds, resolution, step count and guidance
                     scale (sd3, flux: and the T5 settings)
Cache files are written to a temporary name and renamed, so a killed run never leaves a half-written one.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pcm.config import Config
from pcm.data.digest import digest, model_files
from pcm.data.loader import decode_batch
from pcm.data.shards import iter_tar
from pcm.eval.fid import FeatureStats, load_stats
from pcm.eval.generate import sample_latents, teacher_method, teacher_sampler
from pcm.eval.known_world import KnownWorld, require_world
from pcm.models.families import FLOW_FAMILIES


def feature_function(cfg: Config, device: torch.device, progress: bool, world: KnownWorld | None = None):
    """images uint8 (B, H, W, 3) -> features (B, D), with .name and .key (what its features depend on)."""
    e = cfg.eval
    if e.features == "inception":
        from pcm.eval.inception import InceptionFeatures

        features = InceptionFeatures(e.inception_weights, device)
        features.key = digest(["inception"], [Path(e.inception_weights)])
        return features
    if e.features == "shapes":
        return require_world(world, "eval.features=shapes").features(cfg, progress)
    raise ValueError(f"eval.features={e.features!r}; allowed: inception, shapes")


def _atomic_save(save, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save(tmp)
    tmp.rename(path)


def _record_chunks(folder: Path, batch_size: int):
    """Lists of at most batch_size records of the prepared shards in folder, in index order."""
    index = folder / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: set eval.reference_images to a prepared-shards folder "
                                "(empty = data.output_dir; `pcm prepare` writes one)")
    for shard in json.loads(index.read_text())["shards"]:
        with open(folder / shard["name"], "rb") as f:
            records = []
            for record in iter_tar(f):
                records.append(record)
                if len(records) == batch_size:
                    yield records
                    records = []
            if records:
                yield records


def _reference_images(folder: Path, limit: int, batch_size: int):
    """Batches of uint8 images (B, H, W, 3): the first `limit` readable ones in index order."""
    seen = 0
    for records in _record_chunks(folder, batch_size):
        batch = decode_batch(records)
        if batch is None or "pixels" not in batch:
            continue
        pixels = batch["pixels"]
        if pixels.ndim == 5:  # clips (B, F, 3, H, W): every frame is a reference image (frame FID)
            pixels = pixels.flatten(0, 1)
        take = pixels[:limit - seen].permute(0, 2, 3, 1).numpy()
        seen += len(take)
        yield take
        if seen >= limit:
            return


def reference_stats(cfg: Config, features, progress: bool) -> FeatureStats:
    """Feature statistics of the reference images (cached)."""
    e = cfg.eval
    folder = Path(e.reference_images or cfg.data.output_dir)
    index = folder / "index.json"
    key = digest([features.key, index.read_text() if index.is_file() else str(folder), e.num_reference])
    path = Path(e.cache_dir) / f"reference-stats-{key}.safetensors"
    if path.is_file():
        mu, sigma, count = load_stats(path)
        return _from_moments(mu, sigma, count)
    stats = FeatureStats()
    for images in tqdm(_reference_images(folder, e.num_reference, e.batch_size), desc="reference features",
                       disable=not progress):
        stats.update(features(images))
    if stats.count < 2:
        raise ValueError(f"{folder}: fewer than 2 readable reference images; check eval.reference_images")
    _atomic_save(stats.save, path)
    return stats


def _from_moments(mu, sigma, count: int) -> FeatureStats:
    """FeatureStats holding exactly (mu, sigma, count): the sums are rebuilt from the moments."""
    stats = FeatureStats(count=count, total=mu * count)
    stats.outer = sigma * (count - 1) + count * (mu[:, None] * mu[None, :])
    return stats


def teacher_key(cfg: Config, prompts: list[str], samples: list) -> str:
    t, e = cfg.teacher, cfg.eval
    values = [t.family, t.model, t.revision, t.variant, t.vae, cfg.data.resolution, prompts, samples,
              e.reference_steps, e.teacher_guidance_scale]
    files = model_files(t.model) + model_files(t.vae)
    if t.family == "animatediff":
        values += [t.motion_adapter, cfg.data.frames]
        files += model_files(t.motion_adapter)
    if t.family in FLOW_FAMILIES:  # T5's states (or their zeros) shape the condition: other lengths, other samples
        values += [t.t5, t.max_sequence_length]
    return digest(values, files)


def teacher_reference(teacher, cfg: Config, batches, progress: bool) -> tuple[torch.Tensor, bool]:
    """(the teacher's reference latents of every sample (S, C, h, w) float32 on the CPU, whether they were cached).
    The teacher's adapter state must be off (generate.use with the teacher sampler)."""
    e = cfg.eval
    key = teacher_key(cfg, batches.prompts, batches.samples)
    path = Path(e.cache_dir) / f"teacher-reference-{key}.safetensors"
    if path.is_file():
        return load_file(path)["latents"], True
    sampler = teacher_sampler(e.teacher_guidance_scale, teacher_method(teacher))
    out = []
    for _, _, x_T, cond, neg in tqdm(batches, desc=f"teacher reference ({e.reference_steps} steps)",
                                     disable=not progress):
        out.append(sample_latents(teacher, sampler, x_T, cond, neg, e.reference_steps).float().cpu())
    latents = torch.cat(out)
    _atomic_save(lambda p: save_file({"latents": latents.contiguous()}, str(p),
                                     metadata={"teacher": cfg.teacher.model, "key": key}), path)
    return latents, False

