"""Throughput of `pcm prepare` (1 and 2 processes) beside a bare PIL loop on the same files, and of the loader.

Inputs: generated ~512x512 JPEGs (smooth colour fields plus texture, quality 90) in img2dataset-layout shards.
The bare loop does decode + resize (Lanczos, shorter side to the resolution) + center crop + JPEG encode per
image in one process, with no tar reading/writing, filtering or bookkeeping. All timed in one run.

    python benchmarks/prepare_throughput.py [--images 960] [--resolution 256]
"""

import argparse
import io
import json
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from pcm.config import config_from_dict
from pcm.data.loader import make_loader
from pcm.data.prepare import prepare
from pcm.data.shards import ShardWriter


def make_inputs(folder: Path, images: int, per_shard: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    writer, jpegs = ShardWriter(folder, per_shard, prefix="in"), []
    for i in range(images):
        w, h = (int(v) for v in rng.integers(480, 560, size=2))
        yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
        base = np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1) * 90 + 128
        pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(pixels).save(out, format="JPEG", quality=90)
        jpegs.append(out.getvalue())
        writer.write(f"{i:06d}", {"jpg": jpegs[-1], "txt": f"a generated picture number {i}".encode(),
                                  "json": b'{"status": "success"}'})
    writer.close()
    return jpegs


def bare_loop(jpegs: list[bytes], resolution: int) -> float:
    start = time.perf_counter()
    for data in jpegs:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        w, h = image.size
        scale = resolution / min(w, h)
        size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        image.save(io.BytesIO(), format="JPEG", quality=95, subsampling=0)  # the same encoding as prepare
    return len(jpegs) / (time.perf_counter() - start)


def run_prepare(folder: Path, out: Path, workers: int, resolution: int, shards: int) -> float:
    cfg = config_from_dict({"data": {"inputs": [f"{folder}/in-{{00000..{shards - 1:05d}}}.tar"],
                                     "output_dir": str(out), "resolution": resolution, "min_side": 64,
                                     "num_workers": workers, "shard_size": 100}})
    start = time.perf_counter()
    stats = prepare(cfg.data, cfg.seed, progress=False)
    return stats["samples_written"] / (time.perf_counter() - start)


def loader_rate(folder: Path, workers: int, batches: int = 60, batch_size: int = 32) -> float:
    loader = iter(make_loader(folder, batch_size, seed=0, num_workers=workers, shuffle_buffer=200))
    next(loader)  # worker start-up is not throughput
    start = time.perf_counter()
    count = sum(len(next(loader)["key"]) for _ in range(batches))
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=960)
    parser.add_argument("--per-shard", type=int, default=60)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prepare_throughput.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jpegs = make_inputs(tmp / "in", args.images, args.per_shard)
        shards = -(-args.images // args.per_shard)
        bare_loop(jpegs[:20], args.resolution)  # warm caches and allocators for every contender alike
        rates = {
            "bare PIL loop (1 process)": bare_loop(jpegs, args.resolution),
            "pcm prepare, 1 process": run_prepare(tmp / "in", tmp / "p1", 1, args.resolution, shards),
            "pcm prepare, 2 processes": run_prepare(tmp / "in", tmp / "p2", 2, args.resolution, shards),
        }
        same = all((tmp / "p1" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "p2").glob("shard-*"))
        loader = {f"loader, {w} workers (batch 32)": loader_rate(tmp / "p1", w) for w in (0, 2)}
        with tarfile.open(tmp / "in" / "in-00000.tar") as archive:
            mean_kb = np.mean([m.size for m in archive.getmembers() if m.name.endswith(".jpg")]) / 1024
    bare, one, two = rates.values()
    print(f"\n{args.images} JPEGs of ~512x512 ({mean_kb:.0f} kB mean) -> {args.resolution}x{args.resolution}, "
          f"{platform.machine()}\n")
    print("| pipeline | images/s | ratio |\n|---|---|---|")
    print(f"| bare PIL loop (1 process) | {bare:.1f} | 1.00 x bare |")
    print(f"| pcm prepare, 1 process | {one:.1f} | {one / bare:.2f} x bare (target >= 0.8) |")
    print(f"| pcm prepare, 2 processes | {two:.1f} | {two / one:.2f} x 1 process (target >= 1.7) |")
    for name, rate in loader.items():
        print(f"| {name} | {rate:.1f} samples/s | |")
    print(f"\noutputs of 1 and 2 processes byte-identical: {same}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                    "images_per_second": rates, "loader_samples_per_second": loader,
                                    "ratio_1proc_vs_bare": one / bare, "ratio_2proc_vs_1proc": two / one,
                                    "byte_identical": same}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
