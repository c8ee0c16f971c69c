"""One input sample -> its prepared files (resized image or clip, caption, json record), or SkipSample with the
reason it is counted under in stats.json. Pure functions of the sample's bytes, the config and the seed: the same
sample prepares to the same bytes in any worker.
"""

import json

from pcm.config import DataConfig
from pcm.data.images import (
    UNSUPPORTED_EXTENSIONS,
    SkipSample,
    encode_image,
    load_rgb,
    open_image,
    orientation,
    resize_and_crop,
    upright,
    upright_size,
)
from pcm.data.shards import IMAGE_EXTENSIONS, KEY_PATTERN, TEXT_EXTENSIONS, Limits, RawSample
from pcm.data.video import FRAMES_KEY, VIDEO_EXTENSIONS, crop_clip, decode_clip, encode_frames
from pcm.rng import keyed_unit


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
    """The sample's KEY.json, {} without one. data.require_json filters samples that have a json (img2dataset marks
    failed downloads there); a folder of image + caption files has none and is kept whole."""
    if "json" not in raw.files:
        return {}
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
    wanted = IMAGE_EXTENSIONS if cfg.modality == "image" else VIDEO_EXTENSIONS
    found = next((ext for ext in wanted if ext in raw.files), None)
    if found is not None:
        return found
    present = set(raw.files) | raw.unread | set(raw.oversized)
    other = VIDEO_EXTENSIONS if cfg.modality == "image" else IMAGE_EXTENSIONS
    if present & set(other):
        raise SkipSample("wrong_modality")
    unsupported = sorted(present & set(UNSUPPORTED_EXTENSIONS))
    if unsupported:
        raise SkipSample("unsupported_format", unsupported[0])
    raise SkipSample(f"missing_{cfg.modality}")


def process_sample(raw: RawSample, url: str, cfg: DataConfig, seed: int) -> tuple[dict[str, bytes], str | None]:
    """The prepared files of one sample and the converted source mode (or None); SkipSample otherwise."""
    if raw.truncated:
        raise SkipSample("truncated_shard")
    if not KEY_PATTERN.match(raw.key):
        raise SkipSample("bad_key")
    if raw.oversized:
        raise SkipSample("too_large", "; ".join(raw.oversized.values()))
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
    """(KEY.jpg|png, the record's image fields, the converted source mode or None) of one image. A phone photo is
    turned upright before the resize and crop; its recorded original size (SDXL's micro-conditioning) is upright."""
    image = open_image(data, cfg.max_pixels)
    turn = orientation(image)
    width, height = upright_size(image.size, turn)
    _check_size(width, height, cfg)
    rgb, converted = load_rgb(image, cfg.resolution)
    out, crop = resize_and_crop(upright(rgb, turn), cfg.resolution, cfg.crop, keyed_unit(seed, f"crop/{key}"))
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


def limits(cfg: DataConfig) -> Limits:
    """What a worker reads into memory: the wanted modality's media and the texts; other members are only noted
    (an mp4 in an image run is wrong_modality, a gif unsupported_format, without reading their bytes)."""
    media = IMAGE_EXTENSIONS if cfg.modality == "image" else VIDEO_EXTENSIONS
    return Limits(cfg.max_member_bytes, cfg.max_text_bytes, frozenset(media + TEXT_EXTENSIONS))
