"""`pcm precompute`: the teacher's VAE latents of every prepared sample, written once so training needs no VAE.

The output is a prepared-shards folder of its own (index.json + shards with the same names, sample counts and
order as the source, so the loader's plan and a resumed position mean the same samples): each sample keeps its
caption and json and carries `latent.npy` (fp16, VAE posterior mean x scaling factor, (4, h, w)) in place of the
image. It lives under data.output_dir/precomputed/<key>, where the key hashes what the latents depend on: the
teacher's family, model reference, revision, variant and separate VAE, the VAE weights themselves for a local
directory, the resolution, and the prepared data (the sha256 of every prepared shard, from index.json). A different
teacher or resolution, or data prepared anew from other inputs, therefore never reuses them. The folder appears
whole or not at all (pcm.atomic.staged_dir).
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pcm.atomic import staged_dir, write_text
from pcm.config import Config
from pcm.data.digest import digest, model_files, prepared_digest
from pcm.data.loader import LATENT_KEY, decode_batch
from pcm.data.shards import RawSample, ShardWriter, iter_tar
from pcm.models.families import load_teacher


def teacher_key(cfg: Config) -> str:
    """16 hex digits identifying the teacher's encoding: teacher reference, VAE weights (a local directory's),
    resolution."""
    t = cfg.teacher
    files = model_files(t.vae) if t.vae else model_files(t.model, ("vae",))
    return digest([t.family, t.model, t.revision, t.variant, t.vae, cfg.data.resolution],
                  [p for p in files if p.parent == Path(t.vae or Path(t.model) / "vae")])


def latents_key(cfg: Config) -> str:
    """16 hex digits identifying the latents: the teacher's encoding (teacher_key) of the prepared data as
    data.output_dir's index.json names it now."""
    return digest([teacher_key(cfg), prepared_digest(cfg.data.output_dir)])


def precomputed_dir(cfg: Config, key: str | None = None) -> Path:
    """data.output_dir/precomputed/<key>; key: latents_key(cfg) when already computed (it hashes the VAE)."""
    return Path(cfg.data.output_dir) / "precomputed" / (key or latents_key(cfg))


def find_latents(cfg: Config) -> Path | None:
    """The folder of this teacher's latents of the current prepared data: its complete precomputed folder
    (index.json is written last), or data.output_dir itself when that holds latents; None when training reads the
    prepared images. Raises ValueError when data.output_dir holds latents of another teacher or resolution."""
    for folder in (precomputed_dir(cfg), Path(cfg.data.output_dir)):
        index = folder / "index.json"
        if not index.is_file() or not json.loads(index.read_text()).get("latents"):
            continue
        meta = json.loads((folder / "meta.json").read_text())
        key = teacher_key(cfg)
        found = meta.get("teacher_key", meta["key"])  # folders of earlier versions hold the teacher's key only
        if found != key:
            raise ValueError(
                f"{folder} holds latents of teacher {meta['teacher']['model']!r} at resolution "
                f"{meta['resolution']} (key {found}), not of teacher.model={cfg.teacher.model!r} at "
                f"data.resolution={cfg.data.resolution} (key {key}); run `pcm precompute` for this teacher, or "
                "point data.output_dir at the prepared shards")
        return folder
    return None


def _npy(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.save(out, array, allow_pickle=False)
    return out.getvalue()


@torch.no_grad()
def _latents(teacher, pixels: torch.Tensor, chunk: int) -> np.ndarray:
    """Posterior-mean latents x scaling factor, fp16: images (B, 3, H, W) -> (B, C, h, w); clips (B, F, 3, H, W) ->
    (B, C, F, h, w), chunk counting frames."""
    per_sample = pixels.shape[1] if pixels.ndim == 5 else 1
    out = []
    for part in pixels.split(max(1, chunk // per_sample)):
        out.append(teacher.encode_images(part.float() / 127.5 - 1.0, mean=True).half().cpu())
    return torch.cat(out).numpy()


def precompute(cfg: Config, progress: bool = True, chunk: int = 64) -> dict:
    """Writes data.output_dir/precomputed/<key>/ from the prepared shards; returns its meta.json content."""
    source = Path(cfg.data.output_dir)
    index_path = source / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: run `pcm prepare` for data.output_dir={source} first")
    index = json.loads(index_path.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(cfg.teacher, device, with_vae=True, with_text=False)
    key, data_digest = latents_key(cfg), prepared_digest(source)
    out = precomputed_dir(cfg, key)
    encoded, passed_through = 0, 0
    with staged_dir(out) as tmp:
        for shard in tqdm(index["shards"], desc="precompute", unit="shard", disable=not progress):
            with open(source / shard["name"], "rb") as f:
                records = list(iter_tar(f))
            batch = decode_batch(records)  # corrupt records are left out here
            latents = dict(zip(batch["key"], _latents(teacher, batch["pixels"], chunk), strict=True)) if batch else {}
            _write_shard(tmp, shard["name"], records, latents)
            encoded, passed_through = encoded + len(latents), passed_through + len(records) - len(latents)
        meta = {"key": key, "teacher_key": teacher_key(cfg), "data_digest": data_digest,
                "teacher": {"family": cfg.teacher.family, "model": cfg.teacher.model, "revision": cfg.teacher.revision,
                            "variant": cfg.teacher.variant, "vae": cfg.teacher.vae},
                "resolution": cfg.data.resolution, "scaling_factor": teacher.vae.config.scaling_factor,
                "latent_dtype": "float16", "samples": encoded, "passed_through_unreadable": passed_through}
        write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        shards = [{"name": s["name"], "samples": s["samples"]} for s in index["shards"]]  # the sources' sha256 differ
        write_text(tmp / "index.json", json.dumps({**index, "shards": shards, "latents": True}, indent=2) + "\n")
    return {**meta, "output_dir": str(out)}


def _write_shard(folder: Path, name: str, records: list[RawSample], latents: dict[str, np.ndarray]) -> None:
    """folder/name: every record in order, latents in place of the images; corrupt ones pass through (skipped at
    load), an empty source shard stays an empty (valid) tar."""
    stem = name.removesuffix(".tar")
    writer = ShardWriter(folder, shard_size=max(1, len(records)), prefix=f".{stem}")
    for record in records:
        writer.write(record.key, _latent_record(record, latents.get(record.key)))
    writer.close()
    if writer.names:
        (folder / writer.names[0]).rename(folder / name)
    else:
        tarfile.open(folder / name, "w").close()


def _latent_record(record: RawSample, latent: np.ndarray | None) -> dict[str, bytes]:
    if latent is None:
        return dict(record.files)
    files = {k: v for k, v in record.files.items() if k in ("txt", "json")}
    return {**files, LATENT_KEY: _npy(latent)}
