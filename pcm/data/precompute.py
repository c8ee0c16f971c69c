"""`pcm precompute`: the teacher's VAE latents and text states of every prepared sample, written once so training
needs neither the VAE nor the text encoders.

The output is a prepared-shards folder of its own (index.json + shards with the same names, sample counts and
order as the source, so the loader's plan and a resumed position mean the same samples): each sample keeps its
caption and json and carries, in place of the image, `latent.npy` (fp16, VAE posterior mean x scaling factor,
(4, h, w)) and the text encoders' output for its caption (Teacher.text_states, fp16): `text_hidden.npy` (L, D) and,
for sdxl and sd3, `text_pooled.npy` (P,). SDXL's time ids are not stored: the loader's original size and crop and
data.resolution give them, by the same Teacher.condition the on-the-fly path uses. The empty prompt's states, the
unconditional condition of sd15 / animatediff / sd3, are stored once as `empty_prompt.npy` (1, L, D), with sd3's
pooled projection of "" as `empty_pooled.npy` (1, P); sdxl's uncond is zeros.

It lives under data.output_dir/precomputed/<key>, where the key hashes what the contents depend on: the teacher's
family, model reference, revision, variant and separate VAE, the VAE weights and the text encoders' and
tokenizers' files for a local directory (sd3: T5's too, and teacher.t5 and teacher.max_sequence_length, which shape
its states), the resolution, and the prepared data (the sha256 of every prepared shard,
from index.json). A different teacher or resolution, retrained encoders, or data prepared anew from other inputs
therefore never reuse them. Folders written before text was stored (latents only) are still found and read; the
text is then encoded on the fly. The folder appears whole or not at all (pcm.atomic.staged_dir).
"""

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pcm.atomic import staged_dir, write_bytes, write_text
from pcm.config import FLOW_FAMILIES, Config
from pcm.data.digest import digest, model_files, prepared_digest
from pcm.data.loader import LATENT_KEY, TEXT_KEYS, decode_batch
from pcm.data.shards import RawSample, ShardWriter, iter_tar

# a diffusers pipeline's text parts (sd3's T5 third; the folders a pipeline lacks contribute nothing to a key)
TEXT_FOLDERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
EMPTY_PROMPT = "empty_prompt.npy"
EMPTY_POOLED = "empty_pooled.npy"


def teacher_key(cfg: Config) -> str:
    """16 hex digits identifying the teacher's image encoding: teacher reference, VAE weights (a local
    directory's), resolution."""
    t = cfg.teacher
    files = model_files(t.vae) if t.vae else model_files(t.model, ("vae",))
    return digest([t.family, t.model, t.revision, t.variant, t.vae, cfg.data.resolution],
                  [p for p in files if p.parent == Path(t.vae or Path(t.model) / "vae")])


def text_key(cfg: Config) -> str:
    """16 hex digits identifying the teacher's text encoding: teacher reference, the text encoders' and tokenizers'
    files (a local directory's)."""
    t = cfg.teacher
    t5 = [t.t5, t.max_sequence_length] if t.family in FLOW_FAMILIES else []  # other families' keys stay as they were
    return digest(["text", t.family, t.model, t.revision, t.variant, *t5], model_files(t.model, TEXT_FOLDERS))


def latents_key(cfg: Config) -> str:
    """16 hex digits identifying a precomputed folder: the teacher's image and text encodings (teacher_key,
    text_key) of the prepared data as data.output_dir's index.json names it now."""
    return digest([teacher_key(cfg), text_key(cfg), prepared_digest(cfg.data.output_dir)])


def precomputed_dir(cfg: Config, key: str | None = None) -> Path:
    """data.output_dir/precomputed/<key>; key: latents_key(cfg) when already computed (it hashes the VAE and
    the text encoders)."""
    return Path(cfg.data.output_dir) / "precomputed" / (key or latents_key(cfg))


def find_latents(cfg: Config) -> Path | None:
    """The folder of this teacher's latents of the current prepared data: its complete precomputed folder
    (index.json is written last; one with text first, then one of latents only, as written before text was), or
    data.output_dir itself when that holds latents; None when training reads the prepared images. Raises ValueError
    when data.output_dir holds latents of another teacher or resolution, or text of other text encoders."""
    prepared = Path(cfg.data.output_dir)
    if not (prepared / "precomputed").is_dir() and not _holds_latents(prepared):
        return None  # nothing precomputed: the keys would hash the VAE and text encoders (GBs at SDXL size) for naught
    image_key, txt_key, data = teacher_key(cfg), text_key(cfg), prepared_digest(cfg.data.output_dir)
    for folder in (precomputed_dir(cfg, digest([image_key, txt_key, data])),
                   precomputed_dir(cfg, digest([image_key, data])), Path(cfg.data.output_dir)):
        index = folder / "index.json"
        if not index.is_file() or not json.loads(index.read_text()).get("latents"):
            continue
        meta = json.loads((folder / "meta.json").read_text())
        found = meta.get("teacher_key", meta["key"])  # folders of earlier versions hold the teacher's key only
        stored_text = (meta.get("text") or {}).get("key", txt_key)  # latents-only folders: nothing to compare
        if found != image_key or stored_text != txt_key:
            raise ValueError(
                f"{folder} holds latents of teacher {meta['teacher']['model']!r} at resolution "
                f"{meta['resolution']} (key {found}, text key {stored_text}), not of teacher.model="
                f"{cfg.teacher.model!r} at data.resolution={cfg.data.resolution} (key {image_key}, text key "
                f"{txt_key}); run `pcm precompute` for this teacher, or point data.output_dir at the prepared shards")
        return folder
    return None


def _holds_latents(folder: Path) -> bool:
    index = folder / "index.json"
    return index.is_file() and bool(json.loads(index.read_text()).get("latents"))


def stored_text(folder: str | Path) -> tuple[bool, tuple[torch.Tensor, torch.Tensor | None] | None]:
    """(whether the folder's records carry text states, the stored empty prompt as Teacher.text_states gives it, fp16:
    states (1, L, D) and sd3's pooled (1, P), else None; or None: sdxl's empty condition is zeros, and a latents-only
    folder stores no text)."""
    text = json.loads((Path(folder) / "meta.json").read_text()).get("text")
    if not text:
        return False, None
    if not text.get("empty_prompt"):
        return True, None

    def load(name: str | None) -> torch.Tensor | None:
        return torch.from_numpy(np.load(Path(folder) / name, allow_pickle=False)) if name else None

    return True, (load(text["empty_prompt"]), load(text.get("empty_pooled")))


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


@torch.no_grad()
def _text(teacher, captions: list[str], chunk: int) -> dict[str, np.ndarray]:
    """Teacher.text_states of the captions, fp16, by record file: hidden states (B, L, D), sdxl's pooled (B, P)."""
    parts = [teacher.text_states(captions[i:i + chunk]) for i in range(0, len(captions), chunk)]
    out = {TEXT_KEYS["text_hidden"]: torch.cat([h for h, _ in parts]).half().cpu().numpy()}
    if parts[0][1] is not None:
        out[TEXT_KEYS["text_pooled"]] = torch.cat([p for _, p in parts]).half().cpu().numpy()
    return out


def _encode_shard(teacher, records: list[RawSample], chunk: int) -> dict[str, dict[str, np.ndarray]]:
    """Each decodable record's arrays by key (latent and text states); corrupt records are left out."""
    batch = decode_batch(records)
    if not batch:
        return {}
    arrays = {LATENT_KEY: _latents(teacher, batch["pixels"], chunk), **_text(teacher, batch["caption"], chunk)}
    return {key: {file: a[i] for file, a in arrays.items()} for i, key in enumerate(batch["key"])}


def precompute(cfg: Config, progress: bool = True, chunk: int = 64) -> dict:
    """Writes data.output_dir/precomputed/<key>/ from the prepared shards; returns its meta.json content."""
    from pcm.models.families import load_teacher  # here, not at the top: find_latents (`pcm distill`'s launching
    # parent) needs no diffusers

    source = Path(cfg.data.output_dir)
    index_path = source / "index.json"
    if not index_path.is_file():
        raise FileNotFoundError(f"{index_path} not found: run `pcm prepare` for data.output_dir={source} first")
    index = json.loads(index_path.read_text())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = load_teacher(cfg.teacher, device, with_vae=True, with_text=True, resolution=cfg.data.resolution)
    image_key, txt_key, data_digest = teacher_key(cfg), text_key(cfg), prepared_digest(source)
    key = digest([image_key, txt_key, data_digest])  # latents_key, each part hashed once
    out = precomputed_dir(cfg, key)
    encoded, passed_through = 0, 0
    with staged_dir(out) as tmp:
        for shard in tqdm(index["shards"], desc="precompute", unit="shard", disable=not progress):
            with open(source / shard["name"], "rb") as f:
                records = list(iter_tar(f))
            arrays = _encode_shard(teacher, records, chunk)
            _write_shard(tmp, shard["name"], records, arrays)
            encoded, passed_through = encoded + len(arrays), passed_through + len(records) - len(arrays)
        meta = {"key": key, "teacher_key": image_key, "data_digest": data_digest,
                "teacher": {"family": cfg.teacher.family, "model": cfg.teacher.model, "revision": cfg.teacher.revision,
                            "variant": cfg.teacher.variant, "vae": cfg.teacher.vae},
                "resolution": cfg.data.resolution, "scaling_factor": teacher.vae.config.scaling_factor,
                "latent_dtype": "float16", "text": _store_empty_prompt(teacher, txt_key, tmp),
                "samples": encoded, "passed_through_unreadable": passed_through}
        write_text(tmp / "meta.json", json.dumps(meta, indent=2) + "\n")
        shards = [{"name": s["name"], "samples": s["samples"]} for s in index["shards"]]  # the sources' sha256 differ
        write_text(tmp / "index.json", json.dumps({**index, "shards": shards, "latents": True}, indent=2) + "\n")
    return {**meta, "output_dir": str(out)}


def _store_empty_prompt(teacher, txt_key: str, folder: Path) -> dict:
    """folder/empty_prompt.npy (and sd3's empty_pooled.npy) for the families whose uncond is the encoded ""
    (sd15, animatediff, sd3); meta.json's description of the text."""
    from pcm.models.families import ENCODED_EMPTY

    states, pooled = teacher.text_states([""])
    encoded = teacher.family in ENCODED_EMPTY
    text = {"key": txt_key, "dtype": "float16", "hidden": TEXT_KEYS["text_hidden"],
            "pooled": TEXT_KEYS["text_pooled"] if pooled is not None else None, "empty_prompt": None,
            "empty_pooled": None, "uncond": EMPTY_PROMPT if encoded else
            "zeros (force_zeros_for_empty_prompt)"}
    if encoded:
        write_bytes(folder / EMPTY_PROMPT, _npy(states.half().cpu().numpy()))
        text["empty_prompt"] = EMPTY_PROMPT
    if encoded and pooled is not None:
        write_bytes(folder / EMPTY_POOLED, _npy(pooled.half().cpu().numpy()))
        text["empty_pooled"] = EMPTY_POOLED
    return text


def _write_shard(folder: Path, name: str, records: list[RawSample],
                 arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """folder/name: every record in order, its arrays in place of the image; corrupt ones pass through (skipped at
    load), an empty source shard stays an empty (valid) tar."""
    stem = name.removesuffix(".tar")
    writer = ShardWriter(folder, shard_size=max(1, len(records)), prefix=f".{stem}")
    for record in records:
        writer.write(record.key, _latent_record(record, arrays.get(record.key)))
    writer.close()
    if writer.names:
        (folder / writer.names[0]).rename(folder / name)
    else:
        tarfile.open(folder / name, "w").close()


def _latent_record(record: RawSample, arrays: dict[str, np.ndarray] | None) -> dict[str, bytes]:
    if arrays is None:
        return dict(record.files)
    files = {k: v for k, v in record.files.items() if k in ("txt", "json")}
    return {**files, **{file: _npy(a) for file, a in arrays.items()}}
