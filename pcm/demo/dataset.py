"""`pcm demo-data`: the shapes world written as img2dataset-layout input shards (KEY.png, KEY.txt, KEY.json), or
with demo.video the moving-shapes world as video2dataset-layout shards (KEY.mp4, KEY.txt, KEY.json).

`pcm prepare` then reads them exactly as it reads CC3M or WebVid shards.
"""

import io
import json
from pathlib import Path

from tqdm import tqdm

from pcm.config import DemoConfig
from pcm.data.shards import ShardWriter
from pcm.data.video import encode_video
from pcm.demo.motion import generate_clip
from pcm.demo.shapes import ShapesSpec, generate_sample


def write_shapes_shards(cfg: DemoConfig, seed: int, progress: bool = True) -> dict:
    """Generates cfg.num_images samples (a pure function of (seed, index)); returns a summary, also in stats.json."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard-*.tar"):
        old.unlink()
    if cfg.video:
        return _write_motion_shards(cfg, seed, out, progress)
    spec = ShapesSpec(cfg.image_size, cfg.min_shapes, cfg.max_shapes)
    writer = ShardWriter(out, cfg.shard_size)
    for index in tqdm(range(cfg.num_images), desc="demo-data", unit="image", disable=not progress):
        sample = generate_sample(index, seed, spec)
        png = io.BytesIO()
        sample.image.save(png, format="PNG")
        meta = {"status": "success", "width": cfg.image_size, "height": cfg.image_size, **sample.attributes}
        writer.write(f"{index:06d}", {"png": png.getvalue(), "txt": sample.caption.encode("utf-8"),
                                      "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
    writer.close()
    summary = {"images": cfg.num_images, "shards": writer.names, "image_size": cfg.image_size}
    (out / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _write_motion_shards(cfg: DemoConfig, seed: int, out: Path, progress: bool) -> dict:
    """cfg.num_images clips of cfg.frames frames as KEY.mp4 (+ KEY.txt, KEY.json with video2dataset's fields)."""
    writer = ShardWriter(out, cfg.shard_size)
    for index in tqdm(range(cfg.num_images), desc="demo-data", unit="clip", disable=not progress):
        sample = generate_clip(index, seed, cfg.image_size, cfg.frames)
        meta = {"status": "success", "width": cfg.image_size, "height": cfg.image_size, "fps": cfg.fps,
                "frames": cfg.frames, "duration": cfg.frames / cfg.fps, **sample.attributes}
        writer.write(f"{index:06d}", {"mp4": encode_video(sample.frames, cfg.fps),
                                      "txt": sample.caption.encode("utf-8"),
                                      "json": json.dumps(meta, sort_keys=True).encode("utf-8")})
    writer.close()
    summary = {"clips": cfg.num_images, "shards": writer.names, "image_size": cfg.image_size, "frames": cfg.frames,
               "fps": cfg.fps}
    (out / "stats.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
