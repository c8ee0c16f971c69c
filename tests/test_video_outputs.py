"""What people look at for video: `pcm sample --out clip.mp4` (H.264 through PyAV) and the numbered outputs."""

import io

import av
import numpy as np
import pytest
from PIL import Image

from pcm.eval.video import gif_frames, write_gif, write_mp4
from pcm.inference import write_outputs


def _clip(frames=5, side=15) -> np.ndarray:
    """A bright square moving right on a dark background: (F, side, side, 3) uint8 (odd side: padded for yuv420p)."""
    clip = np.full((frames, side, side, 3), 30, np.uint8)
    for f in range(frames):
        clip[f, 4:10, 2 * f:2 * f + 5] = (230, 40, 40)
    return clip


def _gif_bytes(clip: np.ndarray, tmp_path) -> bytes:
    return write_gif(clip, tmp_path / "clip.gif").read_bytes()


def test_an_mp4_holds_every_frame_close_to_the_clip(tmp_path):
    clip = _clip()
    path = write_mp4(clip, tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert decoded.shape == (5, 16, 16, 3)  # padded to even sides
    error = np.abs(decoded[:, :15, :15].astype(int) - clip.astype(int)).mean()
    assert error < 10  # lossy, but the square is where it was in every frame
    centre = [decoded[f, 7, 2 * f + 2] for f in range(5)]
    assert all(pixel[0] > 150 and pixel[1] < 120 for pixel in centre)


def test_sample_outputs_take_the_suffix_of_what_came_back_and_mp4_only_for_clips(tmp_path):
    clip_bytes = _gif_bytes(_clip(), tmp_path)
    assert np.array_equal(gif_frames(clip_bytes).shape, (5, 15, 15, 3))
    (one,) = write_outputs([clip_bytes], tmp_path / "out" / "a.png")
    assert one.suffix == ".gif" and one.read_bytes() == clip_bytes
    movies = write_outputs([clip_bytes, clip_bytes], tmp_path / "out" / "b.mp4")
    assert [p.name for p in movies] == ["b-0.mp4", "b-1.mp4"] and all(p.stat().st_size > 0 for p in movies)
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    with pytest.raises(ValueError, match=r"\.mp4 is for a video LoRA's clips"):
        write_outputs([png.getvalue()], tmp_path / "out" / "c.mp4")
    assert not (tmp_path / "out" / "c.mp4").exists()
