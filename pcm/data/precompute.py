"""`pcm precompute`: the teacher's VAE latents of every prepared sample, written once so training needs no VAE.

The output is a prepared-shards folder of its own (index.json + shards with the same names, sample counts and
order as the source, so the loader's plan and a resumed position mean the same samples): each sample keeps its
caption and json and carries `latent.npy` (fp16, VAE posterior mean x scaling factor, (4, h, w)) in place of the
image. It lives under data.output_dir/precomputed/<key>, where the key hashes what the latents depend on: the
teacher's family, model reference, revision, variant and separate VAE, the VAE weights themselves for a local
directory, and the resolution. A different teacher or resolution therefore never reuses them.
"""

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pcm.config import Config
from pcm.data.digest import digest, model_files
from pcm.data.loader import LATENT_KEY, decode_batch
from pcm.data.shards import RawSample, ShardWriter, iter_tar
from pcm.models.families import load_teacher


def teacher_key(cfg: Config) -> str:
    """16 hex digits identifying the latents: teacher reference, VAE weights (a local directory's), resolution."""
    t = cfg.teacher
    files = model_files(t.vae) if t.vae else model_files(t.model, ("vae",))
    return digest([t.family, t.model, t.revision, t.variant, t.vae, cfg.data.resolution],
                  [p for p in files if p.parent == Path(t.vae or Path(t.model) / "vae")])


def precomputed_dir(cfg: Config, key: str | None = None) -> Path:
    """data.output_dir/precomputed/<key>; key: teacher_key(cfg) when already computed (it hashes the VAE)."""
    return Path(cfg.data.output_dir) / "precomputed" / (key or teacher_key(cfg))


def find_latents(cfg: Config) -> Path | None:
    """The folder of this teacher's latents: its complete precomputed folder (index.json is written last), or
    data.output_dir itself when that holds latents; None when training reads the prepared images.
    Raises ValueError when data.output_dir holds latents of another teacher or resolution."""
    key = teacher_key(cfg)
    for folder in (precomputed_dir(cfg, key), Path(cfg.data.output_dir)):
        index = folder / "index.json"
        if not index.is_file() or not json.loads(index.read_text()).get("latents"):
            continue
        meta = json.loads((folder / "meta.json").read_text())
        if meta["key"] != key:
            raise ValueError(
                f"{folder} holds latents of teacher {meta['teacher']['model']!r} at resolution "
                f"{meta['resolution']} (key {meta['key']}), not of teacher.model={cfg.teacher.model!r} at "
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
    key = teacher_key(cfg)
    out = precomputed_dir(cfg, key)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    encoded, passed_through = 0, 0
    for shard in tqdm(index["shards"], desc="precompute", unit="shard", disable=not progress):
        with open(source / shard["name"], "rb") as f:
            records = list(iter_tar(f))
        batch = decode_batch(records)  # corrupt records are left out here
        latents = dict(zip(batch["key"], _latents(teacher, batch["pixels"], chunk), strict=True)) if batch else {}
        stem = shard["name"].removesuffix(".tar")
        writer = ShardWriter(tmp, shard_size=max(1, len(records)), prefix=f".{stem}")
        for record in records:  # every record, in order: corrupt ones pass through and are skipped at load
            writer.write(record.key, _latent_record(record, latents.get(record.key)))
        writer.close()
        encoded, passed_through = encoded + len(latents), passed_through + len(records) - len(latents)
        part = tmp / writer.names[0] if writer.names else None
        if part is None:  # an empty source shard stays an empty (valid) tar
            tmp.mkdir(parents=True, exist_ok=True)
            tarfile.open(tmp / shard["name"], "w").close()
        else:
            part.rename(tmp / shard["name"])
    meta = {"key": key, "teacher": {"family": cfg.teacher.family, "model": cfg.teacher.model,
                                                  "revision": cfg.teacher.revision, "variant": cfg.teacher.variant,
                                                  "vae": cfg.teacher.vae},
            "resolution": cfg.data.resolution, "scaling_factor": teacher.vae.config.scaling_factor,
            "latent_dtype": "float16", "samples": encoded, "passed_through_unreadable": passed_through}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    (tmp / "index.json").write_text(json.dumps({**index, "latents": True}, indent=2) + "\n")  # last: complete
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return {**meta, "output_dir": str(out)}


def _latent_record(record: RawSample, latent: np.ndarray | None) -> dict[str, bytes]:
    if latent is None:
        return dict(record.files)
    files = {k: v for k, v in record.files.items() if k in ("txt", "json")}
    return {**files, LATENT_KEY: _npy(latent)}
