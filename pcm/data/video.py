"""Video clips for text-to-video (AnimateDiff) distillation: guarded decoding with PyAV, frame sampling, one crop.

A clip is F frames taken every `stride`-th decoded frame from a start frame (the first, or a keyed draw over the
frames the container holds), all resized and cropped with the SAME box so the motion is not disturbed. Decoding
stops after the last needed frame.

Prepared clips are stored as one uint8 array KEY.frames.npy of shape (F, H, W, 3) (np.save, no pickle): lossless
(re-encoding would add a second generation of codec artefacts to what the teacher sees), bit-reproducible (the bytes
depend only on the pixels, where encoders embed versions and thread-dependent choices) and decode-free for the
loader. It costs F * H * W * 3 bytes per clip (24 KiB at F=8, 32 px; 6 MiB at F=16, 256 px); `pcm precompute`
replaces the pixels by latents at scale.

Why a clip is skipped (the SkipSample reasons):
  unreadable_video   not a container PyAV can open, no video stream, or a decoder error before any frame
  truncated_video    a container that starts right but breaks off: its signature is there but it cannot be opened
                     (an mp4 cut before its trailing moov index), a decoder error after the first frame, or fewer
                     frames at the end of the file than its header promises (frame count, else duration x rate)
  unsupported_codec  a video stream whose codec this ffmpeg build cannot decode
  zero_frames        a container with no streams, or a video stream that decodes to nothing
  too_short          fewer than 1 + (F - 1) * stride frames from the start frame
  too_large          width * height of the stream above data.max_pixels (checked before decoding)
"""

import contextlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image

from pcm.data.images import Crop, SkipSample, resize_and_crop

VIDEO_EXTENSIONS = ("mp4", "webm", "mov", "mkv", "avi")
FRAMES_KEY = "frames.npy"  # the prepared clip: (F, H, W, 3) uint8

# First bytes of the containers we read: data that starts like one but cannot be opened was cut short.
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")  # ISO BMFF / QuickTime, at byte 4
_MATROSKA = b"\x1a\x45\xdf\xa3"  # EBML header of mkv and webm
# Encoders for writing clips, best first, with settings that keep flat colours (x264 near-lossless; mpeg4 at its
# finest quantiser): the demo's oracle reads colours back after the round trip.
_ENCODERS = (("libx264", {"crf": "8", "preset": "medium"}), ("mpeg4", {"qscale": "1"}))


@dataclass(frozen=True)
class DecodedClip:
    """The sampled frames of a clip, before resizing, and where they came from."""

    frames: list[Image.Image]  # F RGB frames, each width x height
    width: int  # stream size in pixels
    height: int
    start_frame: int  # index of the first sampled frame among the decoded frames
    fps: float | None  # the stream's average frame rate; None when the container does not say


@contextlib.contextmanager
def quiet_av() -> Iterator[None]:
    """ffmpeg's own log stays silent (broken inputs are expected and counted); the previous level is restored."""
    previous = av.logging.get_level()
    av.logging.set_level(av.logging.PANIC)
    try:
        yield
    finally:
        av.logging.set_level(previous)


def clip_span(frames: int, stride: int) -> int:
    """Decoded frames a clip covers from its first frame to its last: 1 + (F - 1) * stride."""
    return 1 + (frames - 1) * stride


def _looks_like_container(data: bytes) -> bool:
    return (data[4:8] in _MP4_BOXES or data[:4] == _MATROSKA
            or (data[:4] == b"RIFF" and data[8:12] == b"AVI "))


def _open(data: bytes) -> av.container.InputContainer:
    if not data:
        raise SkipSample("unreadable_video", "empty file")
    try:
        return av.open(io.BytesIO(data), mode="r")
    except (av.FFmpegError, OSError, ValueError) as err:
        reason = "truncated_video" if _looks_like_container(data) else "unreadable_video"
        raise SkipSample(reason, str(err)) from err


def _video_stream(container: av.container.InputContainer) -> av.video.stream.VideoStream:
    if not container.streams:
        raise SkipSample("zero_frames", "the container holds no streams")
    if not container.streams.video:
        kinds = ", ".join(sorted({s.type for s in container.streams}))
        raise SkipSample("unreadable_video", f"no video stream (streams: {kinds})")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # the demuxer knows the stream, this ffmpeg build has no decoder for it
        raise SkipSample("unsupported_codec", f"no decoder for video stream {stream.index}")
    stream.codec_context.thread_count = 1  # one sample per worker process already keeps every core busy
    return stream


def _stated_frames(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> int:
    """Frames the header promises: the stream's count, else its duration x frame rate (webm, mkv); 0 if unknown."""
    if stream.frames > 0:
        return stream.frames
    if container.duration and stream.average_rate:
        return int(container.duration / av.time_base * stream.average_rate)
    return 0


def _count_frames(data: bytes) -> int:
    """Frames of the first video stream by demuxing (reading packets, no decoding), for containers that do not
    state the count (webm, mkv)."""
    with av.open(io.BytesIO(data), mode="r") as container:
        return sum(1 for packet in container.demux(container.streams.video[0]) if packet.size)


def _start_frame(data: bytes, claimed: int, span: int, clip_start: str, unit: float) -> int:
    if clip_start == "first":
        return 0
    if clip_start != "random":
        raise ValueError(f"unknown data.clip_start {clip_start!r}; allowed: first, random")
    total = claimed or _count_frames(data)
    return int(unit * (total - span + 1)) if total >= span else 0


def decode_clip(data: bytes, frames: int, stride: int, clip_start: str, unit: float, max_pixels: int,
                check_size: Callable[[int, int], None] | None = None) -> DecodedClip:
    """F frames, every stride-th decoded frame from the start frame; SkipSample (module docstring) otherwise.

    unit in [0, 1) places a 'random' start (a keyed draw, so reruns are identical); 'first' ignores it.
    check_size(width, height) may raise SkipSample before anything is decoded (the caller's size filters).
    """
    span = clip_span(frames, stride)
    with quiet_av(), contextlib.closing(_open(data)) as container:
        stream = _video_stream(container)
        width, height = stream.codec_context.width, stream.codec_context.height
        if width * height > max_pixels:
            raise SkipSample("too_large", f"{width}x{height} > data.max_pixels={max_pixels}")
        if check_size is not None:
            check_size(width, height)
        claimed, stated = max(stream.frames, 0), _stated_frames(container, stream)  # claimed 0: not in the header
        if 0 < claimed < span:
            raise SkipSample("too_short", f"{claimed} frames < 1 + (data.frames - 1) * data.frame_stride = {span}")
        try:
            start = _start_frame(data, claimed, span, clip_start, unit)
            picked, decoded = _decode_frames(container, stream, start, stride, frames, (width, height))
        except (av.FFmpegError, OSError, ValueError) as err:  # InvalidDataError is a ValueError too
            raise SkipSample("truncated_video" if stated else "unreadable_video", str(err)) from err
        fps = float(stream.average_rate) if stream.average_rate else None
    if len(picked) < frames:
        if decoded < stated:
            raise SkipSample("truncated_video", f"{decoded} of the {stated} frames the header promises decodable")
        if decoded == 0:
            raise SkipSample("zero_frames")
        raise SkipSample("too_short", f"{decoded} frames < {start} + {span} needed")
    return DecodedClip(picked, width, height, start, fps)


def _decode_frames(container, stream, start: int, stride: int, frames: int,
                   size: tuple[int, int]) -> tuple[list[Image.Image], int]:
    """(the sampled frames as RGB images of the stream's size, frames decoded); stops after the last one needed.

    A decoder error after the first decoded frame means the data broke off: truncated_video.
    """
    picked, decoded = [], 0
    try:
        for frame in container.decode(stream):
            index, decoded = decoded, decoded + 1
            if index >= start and (index - start) % stride == 0:
                rgb = frame.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
                picked.append(Image.fromarray(rgb, "RGB"))
                if len(picked) == frames:
                    break
    except (av.FFmpegError, ValueError) as err:
        if decoded:
            raise SkipSample("truncated_video", f"decoder error after {decoded} frames: {err}") from err
        raise
    return picked, decoded


def crop_clip(frames: list[Image.Image], resolution: int, crop: str, unit: float) -> tuple[np.ndarray, Crop]:
    """(F, resolution, resolution, 3) uint8 and the crop box, the same box for every frame (one keyed unit)."""
    out, boxes = [], set()
    for frame in frames:
        image, box = resize_and_crop(frame, resolution, crop, unit)
        out.append(np.asarray(image, dtype=np.uint8))
        boxes.add(box)
    if len(boxes) != 1:
        raise ValueError(f"frames of one clip were cropped with different boxes {sorted(boxes)}")
    return np.stack(out), boxes.pop()


def encode_frames(frames: np.ndarray) -> bytes:
    """Deterministic .npy bytes of a uint8 (F, H, W, 3) clip."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a clip must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    out = io.BytesIO()
    np.save(out, np.ascontiguousarray(frames), allow_pickle=False)
    return out.getvalue()


def decode_frames_npy(data: bytes) -> np.ndarray:
    """The (F, H, W, 3) uint8 clip of KEY.frames.npy bytes; ValueError when they are not one."""
    try:
        frames = np.load(io.BytesIO(data), allow_pickle=False)
    except EOFError as err:  # cut short
        raise ValueError(f"{FRAMES_KEY} is truncated") from err
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"{FRAMES_KEY} must hold uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


def _encoder() -> tuple[str, dict[str, str]]:
    for name, options in _ENCODERS:
        try:
            av.Codec(name, "w")
        except (av.FFmpegError, ValueError):
            continue
        return name, options
    raise RuntimeError(f"this PyAV build has none of the encoders {[name for name, _ in _ENCODERS]}")


def encode_video(frames: np.ndarray, fps: int, container_format: str = "mp4") -> bytes:
    """A clip (F, H, W, 3) uint8 with even H and W encoded as yuv420p (libx264, else mpeg4); the same bytes on
    every run (one encoder thread, no timestamps in the container)."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"a clip must be uint8 (F, H, W, 3), got {frames.dtype} {frames.shape}")
    height, width = frames.shape[1:3]
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs even sides, got {width}x{height}")
    name, options = _encoder()
    out = io.BytesIO()
    with quiet_av(), av.open(out, mode="w", format=container_format) as container:
        stream = container.add_stream(name, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.thread_count = 1
        for index, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return out.getvalue()
