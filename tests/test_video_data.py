"""Video data: clips decoded with PyAV, sampled at a stride, cropped with one box; broken clips skipped and counted;
prepared (F, H, W, 3) arrays batched as (B, F, 3, H, W); the moving-shapes demo world read back by its oracle."""

import io
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from builders import write_tar, written_samples
from PIL import Image

from pcm.config import ConfigError, DemoConfig, config_from_dict
from pcm.data.images import SkipSample
from pcm.data.loader import PreparedShards, decode_batch
from pcm.data.prepare import prepare
from pcm.data.shards import RawSample
from pcm.data.video import FRAMES_KEY, decode_clip, encode_frames, encode_video
from pcm.demo.dataset import write_shapes_shards
from pcm.demo.motion import DIRECTIONS, generate_clip, motion_direction, parse_motion_caption, score_clip
from pcm.rng import keyed_unit

WIDTH, HEIGHT, NUM_FRAMES = 64, 48, 12
F, STRIDE = 4, 3  # a clip covers 1 + (4 - 1) * 3 = 10 decoded frames


def _ramp(num_frames: int = NUM_FRAMES, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """(T, H, W, 3): red is a horizontal gradient (the same in every frame: shows the crop box), green encodes the
    frame index (20 + 12 i: shows which frames were taken), blue is constant; all mid-range, so no codec clips."""
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    frames[..., 0] = (np.arange(width) * 3)[None, None, :]
    frames[..., 1] = (20 + 12 * np.arange(num_frames))[:, None, None]
    frames[..., 2] = 128
    return frames


def _encode(frames: np.ndarray, fmt: str, codec: str, options: dict, path: Path | None = None) -> bytes:
    """Clip bytes written by PyAV; with path, through a file (mp4's +faststart moves the index to the front)."""
    target = path or io.BytesIO()
    container_options = {"movflags": "+faststart"} if path else {}
    with av.open(target, mode="w", format=fmt, options=container_options) as container:
        stream = container.add_stream(codec, rate=8, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path.read_bytes() if path else target.getvalue()


def _empty_mp4(path: Path) -> bytes:
    """An mp4 whose header was written but that holds no frames (ffmpeg drops the empty stream)."""
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
    return path.read_bytes()


def _audio_only_mp4() -> bytes:
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=8000)
        for k in range(4):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 8000, 1024 * k
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()


X264 = ("libx264", {"crf": "4"})
GOOD = {  # key -> (extension, container format, codec, codec options)
    "clip_mp4": ("mp4", "mp4", *X264),
    "clip_mov": ("mov", "mov", *X264),
    "clip_mkv": ("mkv", "matroska", *X264),
    "clip_webm": ("webm", "webm", "libvpx", {"crf": "4", "b": "4M"}),
    "clip_avi": ("avi", "avi", "mpeg4", {"qscale": "1"}),
}
BROKEN = {  # key -> the reason it is skipped under
    "garbage": "unreadable_video", "audio_only": "unreadable_video", "cut_mp4": "truncated_video",
    "cut_faststart": "truncated_video", "cut_webm": "truncated_video", "short_mp4": "too_short",
    "short_webm": "too_short",
    "empty_mp4": "zero_frames", "unknown_fourcc": "unsupported_codec", "huge": "too_large", "tiny": "too_small",
    "no_caption": "missing_caption", "an_image": "wrong_modality", "nothing": "missing_video",
}


def _members(key: str, files: dict[str, bytes]) -> list[tuple[str, bytes]]:
    return [(f"{key}.{ext}", data) for ext, data in files.items()]


SOURCES: dict[str, bytes] = {}  # the good clips' bytes, filled by the shard fixture


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("video-inputs")
    ramp, caption = _ramp(), b"a clip whose green channel counts frames"
    members = []
    for key, (ext, fmt, codec, options) in GOOD.items():
        SOURCES[key] = _encode(ramp, fmt, codec, options)
        members += _members(key, {ext: SOURCES[key], "txt": caption, "json": b"{}"})
    mp4 = _encode(ramp, "mp4", *X264)
    noise = np.random.default_rng(0).integers(0, 255, ramp.shape, dtype=np.uint8)
    faststart = _encode(noise, "mp4", *X264, path=root / "faststart.mp4")
    webm = _encode(noise, "webm", "libvpx", {})
    avi = _encode(ramp, "avi", "mpeg4", {"qscale": "1"})
    broken = {
        "garbage": b"this is not a video " * 40,
        "audio_only": _audio_only_mp4(),
        "cut_mp4": mp4[: len(mp4) // 2],  # the moov index sits at the end: gone
        "cut_faststart": faststart[: len(faststart) // 2],  # index intact, frame data cut off
        "cut_webm": webm[: len(webm) // 2],  # no frame count in the header, but a duration: 12 frames promised
        "short_mp4": _encode(ramp[:5], "mp4", *X264),  # 5 frames < 10, and the header says so
        "short_webm": _encode(ramp[:5], "webm", "libvpx", {}),  # webm does not state a count: found by decoding
        "empty_mp4": _empty_mp4(root / "empty.mp4"),
        "unknown_fourcc": avi.replace(b"FMP4", b"ZZZZ"),  # a codec tag ffmpeg has no decoder for
        "huge": _encode(_ramp(NUM_FRAMES, 96, 96), "mp4", *X264),  # 9216 pixels > data.max_pixels=5000
        "tiny": _encode(_ramp(NUM_FRAMES, 64, 16), "mp4", *X264),  # shorter side 16 < data.min_side=32
    }
    for key, data in broken.items():
        members += _members(key, {"mp4": data, "txt": caption})
    members += _members("no_caption", {"mp4": mp4})
    members += _members("an_image", {"jpg": b"\xff\xd8 not decoded: wrong modality first", "txt": caption})
    members += _members("nothing", {"txt": caption})
    return write_tar(root / "clips.tar", members)


def _cfg(inputs, out, **data):
    return config_from_dict({"data": {"inputs": [str(i) for i in inputs], "output_dir": str(out), "resolution": 32,
                                      "min_side": 32, "shard_size": 3, "num_workers": 1, "modality": "video",
                                      "frames": F, "frame_stride": STRIDE, "max_pixels": 5000, **data}})


def _frames(files: dict[str, bytes]) -> np.ndarray:
    return np.load(io.BytesIO(files[FRAMES_KEY]), allow_pickle=False)


def _expected(data: bytes, start: int, left: int) -> np.ndarray:
    """The prepared clip worked out independently: every decoded frame, frames start, start + STRIDE, ..., each
    resized to 43 x 32 and cropped at the recorded box."""
    with av.open(io.BytesIO(data)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    picked = decoded[start: start + 1 + (F - 1) * STRIDE: STRIDE]
    resized = [image.resize((43, 32), Image.Resampling.LANCZOS, reducing_gap=3.0) for image in picked]
    return np.stack([np.asarray(image.crop((left, 0, left + 32, 32))) for image in resized])


def _green_index(frames: np.ndarray) -> list[int]:
    """The source frame index each prepared frame shows (green = 20 + 12 i)."""
    return [round((frame[..., 1].mean() - 20) / 12) for frame in frames]


def test_broken_clips_are_skipped_and_counted_and_good_ones_sampled_at_the_stride(shard, tmp_path):
    cfg = _cfg([shard], tmp_path / "out")
    stats = prepare(cfg.data, cfg.seed, progress=False)
    assert stats["skipped"] == dict(Counter(BROKEN.values()))
    assert stats["samples_read"] == len(GOOD) + len(BROKEN) and stats["samples_written"] == len(GOOD)
    written = written_samples(tmp_path / "out")
    assert set(written) == set(GOOD)
    for key, files in written.items():
        assert set(files) == {FRAMES_KEY, "txt", "json"}
        frames = _frames(files)
        assert frames.dtype == np.uint8 and frames.shape == (F, 32, 32, 3)
        assert _green_index(frames) == [0, 3, 6, 9], key
        meta = json.loads(files["json"])
        assert meta == {"key": key, "source": str(shard), "original_height": HEIGHT, "original_width": WIDTH,
                        "crop_top": 0, "crop_left": 5, "height": 32, "width": 32, "frames": F,
                        "frame_stride": STRIDE, "start_frame": 0, "fps": 8.0, "source_json": {}}
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["frames"] == F and sum(s["samples"] for s in index["shards"]) == len(GOOD)


def test_random_start_and_crop_are_keyed_one_box_for_all_frames_and_reruns_identical(shard, tmp_path):
    runs = []
    for workers, name in ((1, "a"), (2, "b")):
        cfg = _cfg([shard], tmp_path / name, num_workers=workers, crop="random", clip_start="random")
        prepare(cfg.data, cfg.seed, progress=False)
        runs.append({p.name: p.read_bytes() for p in sorted((tmp_path / name).glob("*.tar"))})
    assert runs[0] == runs[1]
    assert (tmp_path / "a" / "index.json").read_bytes() == (tmp_path / "b" / "index.json").read_bytes()
    starts = set()
    for key, files in written_samples(tmp_path / "a").items():
        meta, frames = json.loads(files["json"]), _frames(files)
        start = meta["start_frame"]
        assert start == int(keyed_unit(cfg.seed, f"clip/{key}") * (NUM_FRAMES - 10 + 1)), key
        assert _green_index(frames) == [start + STRIDE * j for j in range(F)], key
        assert meta["crop_left"] == int(keyed_unit(cfg.seed, f"crop/{key}") * (43 - 32 + 1))
        # every frame is cut with the recorded box: exactly the independently decoded, resized and cropped frames
        assert np.array_equal(frames, _expected(SOURCES[key], start, meta["crop_left"])), key
        # ... and red, a horizontal gradient, confirms the box: the first column shows x = (crop_left + 0.5) * 64 / 43
        source_x = (meta["crop_left"] + 0.5) * WIDTH / 43
        assert abs(frames[..., 0][:, :, 0].mean() - 3 * source_x) < 6, key
        starts.add(start)
    assert len(starts) > 1  # the draw differs between keys


def test_image_runs_skip_video_samples_and_decoding_stops_early(shard, tmp_path):
    cfg = _cfg([shard], tmp_path / "images", modality="image")
    stats = prepare(cfg.data, cfg.seed, progress=False)
    with_video = len(GOOD) + len(BROKEN) - 2  # every sample but an_image (a jpg) and nothing (a caption only)
    assert stats["skipped"] == {"wrong_modality": with_video, "unreadable_image": 1, "missing_image": 1}



def test_decoding_stops_after_the_last_needed_frame(tmp_path):
    noise = np.random.default_rng(1).integers(0, 255, _ramp().shape, dtype=np.uint8)
    full = _encode(noise, "mp4", *X264, path=tmp_path / "fast.mp4")
    cut = full[: len(full) * 3 // 4]  # the header promises 12 frames; the data breaks off after about 8
    with pytest.raises(SkipSample) as skip:
        decode_clip(cut, NUM_FRAMES, 1, "first", 0.0, 10**6)
    assert skip.value.reason == "truncated_video"
    clip = decode_clip(cut, 3, 2, "first", 0.0, 10**6)  # frames 0, 2, 4 lie before the damage
    assert len(clip.frames) == 3 and clip.frames[0].size == (WIDTH, HEIGHT) and clip.start_frame == 0
    with pytest.raises(SkipSample, match="data.max_pixels=3071"):
        decode_clip(full, 1, 1, "first", 0.0, WIDTH * HEIGHT - 1)


def test_loader_batches_clips_and_skips_a_corrupt_one(shard, tmp_path):
    cfg = _cfg([shard], tmp_path / "out", shard_size=10)
    prepare(cfg.data, cfg.seed, progress=False)
    batch = next(iter(PreparedShards(tmp_path / "out", batch_size=2, seed=0, shuffle_buffer=4)))
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (2, F, 3, 32, 32)
    assert batch["original_size"].tolist() == [[HEIGHT, WIDTH]] * 2 and batch["skipped"] == 0
    records = [RawSample(key, files) for key, files in written_samples(tmp_path / "out").items()]
    records[1].files[FRAMES_KEY] = records[1].files[FRAMES_KEY][:200]
    records[2].files[FRAMES_KEY] = encode_frames(np.zeros((F, 32, 32, 3), np.uint8))[:-1]
    batch = decode_batch(records)
    assert batch["skipped"] == 2 and batch["pixels"].shape == (len(GOOD) - 2, F, 3, 32, 32)
    first = _frames(written_samples(tmp_path / "out")[records[0].key])
    assert torch.equal(batch["pixels"][0], torch.from_numpy(first).permute(0, 3, 1, 2))


def test_demo_motion_clips_are_read_back_after_mp4_and_prepare(tmp_path):
    demo = DemoConfig(output_dir=str(tmp_path / "demo"), num_images=40, image_size=64, shard_size=20, video=True,
                      frames=8, fps=8)
    summary = write_shapes_shards(demo, seed=3, progress=False)
    assert summary["clips"] == 40 and len(summary["shards"]) == 2
    first = (tmp_path / "demo" / "shard-00000.tar").read_bytes()
    write_shapes_shards(demo, seed=3, progress=False)
    assert (tmp_path / "demo" / "shard-00000.tar").read_bytes() == first  # deterministic from (seed, index)
    raw = written_samples(tmp_path / "demo")["000000"]
    meta = json.loads(raw["json"])
    assert (meta["width"], meta["height"], meta["fps"], meta["frames"], meta["duration"]) == (64, 64, 8, 8, 1.0)
    cfg = _cfg(sorted((tmp_path / "demo").glob("shard-*.tar")), tmp_path / "out", frames=8, frame_stride=1,
               max_pixels=10**6, num_workers=2)
    assert prepare(cfg.data, cfg.seed, progress=False)["samples_written"] == 40
    motion, colour, kind, directions = 0, 0.0, 0.0, set()
    for files in written_samples(tmp_path / "out").values():
        caption = files["txt"].decode()
        wanted = parse_motion_caption(caption)
        directions.add(wanted["direction"])
        frames = _frames(files)
        motion += motion_direction(frames) == wanted["direction"]
        scores = score_clip(frames, caption)
        colour, kind = colour + scores["colour"] / 40, kind + scores["kind"] / 40
    assert directions == set(DIRECTIONS)
    assert motion >= 38 and colour >= 0.95 and kind >= 0.9, (motion, colour, kind)


def test_where_a_shape_starts_says_nothing_of_its_direction():
    """Every direction starts in the same box around the centre, so only the caption can tell a teacher the direction;
    the shape travels a quarter of the frame and stays whole inside it."""
    size, starts = 64, {d: [] for d in DIRECTIONS}
    for index in range(400):
        a = generate_clip(index, seed=3, size=size, frames=2).attributes
        start, end = np.array(a["start"]), np.array(a["end"])
        assert np.abs(start - size / 2).max() <= size / 12 + 0.01, a
        assert np.allclose(end - start, np.array(DIRECTIONS[a["direction"]]) * size / 4, atol=0.02), a
        low, high = np.minimum(start, end) - a["size"] / 2, np.maximum(start, end) + a["size"] / 2
        assert (low > 0).all() and (high < size).all(), a
        starts[a["direction"]].append(start)
    means = np.array([np.mean(starts[d], axis=0) for d in DIRECTIONS])
    assert all(len(v) >= 70 for v in starts.values()) and np.abs(means - size / 2).max() < 1.5, means


def test_motion_oracle_and_caption_grammar():
    sample = generate_clip(5, seed=0, size=64, frames=6)
    assert sample.frames.shape == (6, 64, 64, 3) and sample.frames.dtype == np.uint8
    assert parse_motion_caption(sample.caption) == {k: sample.attributes[k]
                                                    for k in ("colour", "kind", "direction", "background")}
    assert score_clip(sample.frames, sample.caption)["overall"] == 1.0
    assert motion_direction(sample.frames[::-1]) != sample.attributes["direction"]
    assert motion_direction(np.repeat(sample.frames[:1], 4, axis=0)) is None  # still
    assert motion_direction(np.full((3, 32, 32, 3), 128, np.uint8)) is None  # nothing to see
    wrong = sample.caption.replace(sample.attributes["direction"], "up" if sample.attributes["direction"] != "up"
                                   else "down")
    assert score_clip(sample.frames, wrong)["motion"] == 0.0
    for bad in ("a red circle in the center on a gray background", "a red circle moving sideways on a gray "
                "background", "a pink circle moving left on a gray background"):
        with pytest.raises(ValueError, match="cannot parse motion caption"):
            parse_motion_caption(bad)
    assert len(encode_video(sample.frames, 8)) > 0 and encode_video(sample.frames, 8) == encode_video(
        sample.frames, 8)


@pytest.mark.parametrize(("overrides", "named"), [
    (["data.frames=0"], "data.frames=0"), (["data.frame_stride=0"], "data.frame_stride=0"),
    (["data.clip_start=middle"], "data.clip_start='middle'"), (["data.modality=audio"], "data.modality='audio'"),
    (["demo.frames=1"], "demo.frames=1"), (["demo.fps=0"], "demo.fps=0"),
    (["demo.video=true", "demo.image_size=63"], "demo.image_size=63"),
])
def test_config_validation_names_the_key(overrides, named):
    with pytest.raises(ConfigError, match=named):
        config_from_dict({}, overrides)
