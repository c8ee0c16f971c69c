"""`pcm prepare`: input shards -> filtered, resized, cropped, prepared shards of a fixed sample count.

Input shards are processed in parallel (one task per shard) into temporary part files; the main process
merges the parts in input order into shard-00000.tar, ... (dropping keys already seen in earlier shards), so
the output is byte-identical for the same inputs and config whatever the number of workers. Bad samples are
skipped and counted per reason; a shard that cannot be opened or read is named in stats.json and the log.

A prepared folder holds one modality (data.modality): images (KEY.jpg|png) or video clips (KEY.frames.npy, see
pcm.data.video); samples of the other modality are skipped as wrong_modality.
"""

import json
import logging
import multiprocessing
import os
import shutil
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from pcm.config import DataConfig
from pcm.data.images import SkipSample, encode_image, load_rgb, open_image, resize_and_crop
from pcm.data.shards import IMAGE_EXTENSIONS, KEY_PATTERN, RawSample, ShardWriter, encode_sample, iter_folder, iter_tar
from pcm.data.urls import expand_inputs, local_path, open_url
from pcm.data.video import FRAMES_KEY, VIDEO_EXTENSIONS, crop_clip, decode_clip, encode_frames
from pcm.train.rng import keyed_unit

log = logging.getLogger(__name__)


class PrepareError(RuntimeError):
    """Nothing at all could be read, or the output folder is unusable."""


@dataclass
class ShardResult:
    index: int
    url: str
    part: str = ""  # temporary file: the kept samples' tar members, back to back
    keys: list[str] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)  # bytes of each kept sample in the part file
    read: int = 0
    skipped: Counter = field(default_factory=Counter)
    converted: Counter = field(default_factory=Counter)
    error: str | None = None  # why the shard could not be read (fully or in part)


def _caption(raw: RawSample, cfg: DataConfig) -> str:
    if "txt" not in raw.files:
        raise SkipSample("missing_caption")
    try:
        caption = raw.files["txt"].decode("utf-8").strip()
    except UnicodeDecodeError as err:
        raise SkipSample("caption_not_utf8") from err
    if not caption:
        raise SkipSample("missing_caption")
    if len(caption) < cfg.min_caption_chars:
        raise SkipSample("caption_too_short")
    if len(caption) > cfg.max_caption_chars:
        raise SkipSample("caption_too_long")
    return caption


def _metadata(raw: RawSample, cfg: DataConfig) -> dict:
    meta = {}
    if "json" in raw.files:
        try:
            meta = json.loads(raw.files["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SkipSample("bad_json") from err
        if not isinstance(meta, dict):
            raise SkipSample("bad_json")
    for name, expected in cfg.require_json.items():
        if str(meta.get(name)) != expected:
            raise SkipSample("json_condition")
    return meta


def _check_size(width: int, height: int, cfg: DataConfig) -> None:
    if min(width, height) < cfg.min_side:
        raise SkipSample("too_small")
    if not cfg.min_aspect <= width / height <= cfg.max_aspect:
        raise SkipSample("aspect_ratio")


def _media(raw: RawSample, cfg: DataConfig) -> str:
    """The extension of the sample's image or video, whichever data.modality asks for."""
    image_ext = next((ext for ext in IMAGE_EXTENSIONS if ext in raw.files), None)
    video_ext = next((ext for ext in VIDEO_EXTENSIONS if ext in raw.files), None)
    wanted, other = (image_ext, video_ext) if cfg.modality == "image" else (video_ext, image_ext)
    if wanted is not None:
        return wanted
    raise SkipSample("wrong_modality" if other is not None else f"missing_{cfg.modality}")


def process_sample(raw: RawSample, url: str, cfg: DataConfig, seed: int) -> tuple[dict[str, bytes], str | None]:
    """The prepared files of one sample and the converted source mode (or None); SkipSample otherwise."""
    if raw.truncated:
        raise SkipSample("truncated_shard")
    if not KEY_PATTERN.match(raw.key):
        raise SkipSample("bad_key")
    ext = _media(raw, cfg)
    caption = _caption(raw, cfg)
    meta = _metadata(raw, cfg)
    if cfg.modality == "video":
        media, record, converted = *_clip(raw.files[ext], raw.key, cfg, seed), None
    else:
        media, record, converted = _image(raw.files[ext], raw.key, cfg, seed)
    record = {"key": raw.key, "source": url, **record, "height": cfg.resolution, "width": cfg.resolution,
              "source_json": meta}
    files = {**media, "txt": caption.encode("utf-8"), "json": json.dumps(record, sort_keys=True).encode("utf-8")}
    return files, converted


def _image(data: bytes, key: str, cfg: DataConfig, seed: int) -> tuple[dict[str, bytes], dict, str | None]:
    """(KEY.jpg|png, the record's image fields, the converted source mode or None) of one image."""
    image = open_image(data, cfg.max_pixels)
    width, height = image.size
    _check_size(width, height, cfg)
    rgb, converted = load_rgb(image, cfg.resolution)
    out, crop = resize_and_crop(rgb, cfg.resolution, cfg.crop, keyed_unit(seed, f"crop/{key}"))
    record = {"original_height": height, "original_width": width, "crop_top": crop.top, "crop_left": crop.left}
    return {cfg.image_format: encode_image(out, cfg.image_format, cfg.jpeg_quality)}, record, converted


def _clip(data: bytes, key: str, cfg: DataConfig, seed: int) -> tuple[dict[str, bytes], dict]:
    """(KEY.frames.npy, the record's video fields) of one clip; one keyed draw places the start, one the crop."""
    clip = decode_clip(data, cfg.frames, cfg.frame_stride, cfg.clip_start, keyed_unit(seed, f"clip/{key}"),
                       cfg.max_pixels, lambda width, height: _check_size(width, height, cfg))
    frames, crop = crop_clip(clip.frames, cfg.resolution, cfg.crop, keyed_unit(seed, f"crop/{key}"))
    record = {"original_height": clip.height, "original_width": clip.width, "crop_top": crop.top,
              "crop_left": crop.left, "frames": cfg.frames, "frame_stride": cfg.frame_stride,
              "start_frame": clip.start_frame, "fps": clip.fps}
    return {FRAMES_KEY: encode_frames(frames)}, record


def _samples(url: str) -> Iterator[RawSample]:
    path = local_path(url)
    if path is not None and path.is_dir():
        yield from iter_folder(path)
        return
    with open_url(url) as stream:
        yield from iter_tar(stream)


def process_shard(job: tuple[int, str, DataConfig, int, str]) -> ShardResult:
    """Worker: one input shard -> a temporary part file of encoded samples (tar members), with counts."""
    index, url, cfg, seed, tmp_dir = job
    result = ShardResult(index, url, part=str(Path(tmp_dir) / f"part-{index:05d}.bin"))
    seen: set[str] = set()
    with open(result.part, "wb") as part:
        try:
            for raw in _samples(url):
                result.read += 1
                try:
                    if raw.key in seen:
                        raise SkipSample("duplicate_key")
                    files, converted = process_sample(raw, url, cfg, seed)
                except SkipSample as skip:
                    result.skipped[skip.reason] += 1
                    if skip.reason == "truncated_shard":
                        result.error = "truncated or corrupt tar: samples before the damage were kept"
                    continue
                seen.add(raw.key)
                blob = encode_sample(raw.key, files)
                part.write(blob)
                result.keys.append(raw.key)
                result.sizes.append(len(blob))
                if converted:
                    result.converted[converted] += 1
        except (OSError, tarfile.TarError, EOFError) as err:
            result.error = f"{type(err).__name__}: {err}"
    return result


def _run(jobs: list, workers: int) -> Iterator[ShardResult]:
    if workers == 1 or len(jobs) == 1:
        yield from map(process_shard, jobs)
        return
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as pool:
        yield from pool.map(process_shard, jobs)


def _merge_part(result: ShardResult, writer: ShardWriter, seen: set[str]) -> int:
    """Copies a part's samples (byte blobs) into the output, dropping keys seen in earlier shards; returns the
    number dropped."""
    duplicates = 0
    with open(result.part, "rb") as part:
        for key, size in zip(result.keys, result.sizes, strict=True):
            blob = part.read(size)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            writer.write_encoded(blob)
    os.remove(result.part)
    return duplicates


def _publish(staging: Path, out: Path, writer: ShardWriter) -> None:
    """Moves the new shards into place and removes shards of an earlier, larger run."""
    for old in out.glob("shard-*.tar"):
        if old.name not in writer.names:
            old.unlink()
    for name in writer.names:
        os.replace(staging / name, out / name)
    shutil.rmtree(staging)


def prepare(cfg: DataConfig, seed: int, progress: bool = True) -> dict:
    """Runs the stage; returns (and writes) stats.json. Raises PrepareError only when nothing could be read."""
    start = time.perf_counter()
    urls = expand_inputs(cfg.inputs, cfg.allow_pipe_urls)
    if not urls:
        raise PrepareError("data.inputs is empty: list shard URLs, brace patterns or folders to prepare")
    out = Path(cfg.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    staging = out / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    workers = cfg.num_workers or os.cpu_count() or 1
    jobs = [(i, url, cfg, seed, str(staging)) for i, url in enumerate(urls)]
    writer, seen = ShardWriter(staging, cfg.shard_size), set()
    read, skipped, converted, failed = 0, Counter(), Counter(), []
    bar = tqdm(total=len(jobs), desc="prepare", unit="shard", disable=not progress)
    for result in _run(jobs, min(workers, len(jobs))):
        read += result.read
        skipped.update(result.skipped)
        converted.update(result.converted)
        skipped["duplicate_key"] += _merge_part(result, writer, seen)
        if result.error:
            log.warning("shard %s: %s", result.url, result.error)
            failed.append({"url": result.url, "error": result.error, "samples_read": result.read})
        bar.update()
        bar.set_postfix(written=sum(writer.counts), skipped=sum(skipped.values()))
    bar.close()
    writer.close()
    seconds = time.perf_counter() - start
    stats = {
        "shards_in": len(urls), "shards_failed": failed, "samples_read": read,
        "samples_written": sum(writer.counts), "skipped": dict(sorted((k, v) for k, v in skipped.items() if v)),
        "converted": dict(sorted(converted.items())), "shards_written": len(writer.counts),
        "seconds": round(seconds, 3), "images_per_second": round(read / seconds, 1) if seconds else None,
    }
    if read == 0:
        shutil.rmtree(staging, ignore_errors=True)
        (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
        reasons = "; ".join(f"{f['url']}: {f['error']}" for f in failed[:5])
        raise PrepareError(f"no sample could be read from any of the {len(urls)} input shard(s) ({reasons}); "
                           "check data.inputs")
    _publish(staging, out, writer)
    index = {"resolution": cfg.resolution, "image_format": cfg.image_format,
             **({"frames": cfg.frames} if cfg.modality == "video" else {}),
             "shards": [{"name": n, "samples": c} for n, c in zip(writer.names, writer.counts, strict=True)]}
    (out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
