"""Video scores and grids: CLIP score per frame averaged over a clip, frame consistency, the demo's motion oracle,
and the animated grids (laid out and labelled by pcm.eval.report, as the PNG grids): a lossless animated WebP, which
report.html embeds, and a GIF beside it for tools that read only GIFs.

Clips are uint8 arrays (B, F, H, W, 3). FID of a video row is taken over all its frames (frame FID); the
teacher-relative latent metrics need nothing video-specific.
"""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

MOTION_ORACLE = ("colour", "kind", "count", "background", "motion", "overall")


def frames_of(clips: np.ndarray) -> np.ndarray:
    """(B, F, H, W, 3) -> (B * F, H, W, 3), clip-major."""
    return clips.reshape(-1, *clips.shape[2:])


def clip_score_per_frame(clip, clips: np.ndarray, prompts: list[str]) -> torch.Tensor:
    """(B,) CLIP scores: each frame against its clip's prompt, averaged over the frames."""
    frames = clips.shape[1]
    scores = clip(frames_of(clips), [p for p in prompts for _ in range(frames)])
    return scores.reshape(len(prompts), frames).mean(dim=1)


def frame_consistency(clip, clips: np.ndarray) -> torch.Tensor:
    """(B,) mean cosine similarity of the CLIP image embeddings of consecutive frames (1 = a still clip)."""
    batch, frames = clips.shape[:2]
    embeds = clip.image_embeds(frames_of(clips)).reshape(batch, frames, -1)
    return (embeds[:, 1:] * embeds[:, :-1]).sum(dim=-1).mean(dim=1)


def frame_feature_consistency(features: torch.Tensor | np.ndarray, frames: int) -> torch.Tensor:
    """(B,) mean cosine similarity of consecutive frames' FID features (B * F, D), clip-major: frame consistency
    with no CLIP model (the shapes net's features on the demo, Inception's on real data; 1 = a still clip)."""
    embeds = torch.as_tensor(features).detach().to("cpu", torch.float64)
    embeds = torch.nn.functional.normalize(embeds.reshape(-1, frames, embeds.shape[-1]), dim=-1)
    return (embeds[:, 1:] * embeds[:, :-1]).sum(dim=-1).mean(dim=1)


def motion_oracle(score_clip, clips: np.ndarray, prompts: list[str]) -> dict[str, list[float]]:
    """A motion oracle's (pcm.eval.known_world) per-attribute scores of each clip against its caption."""
    scores = [score_clip(frames, prompt) for frames, prompt in zip(clips, prompts, strict=True)]
    return {k: [s[k] for s in scores] for k in MOTION_ORACLE}


PALETTE_FRAMES = 4  # frames, evenly spread, that the GIF's one palette is chosen from


def write_gif(frames: np.ndarray, path: Path, fps: float = 8.0) -> Path:
    """frames (F, H, W, 3) uint8 (a labelled grid of clips: pcm.eval.report.grid_frames) -> an animated GIF playing in
    a loop. One palette for every frame, without dithering: a pixel that does not change (a label) keeps its colour
    from frame to frame instead of shimmering as per-frame palettes and dithering would make it."""
    sample = frames[np.linspace(0, len(frames) - 1, min(len(frames), PALETTE_FRAMES)).round().astype(int)]
    palette = Image.fromarray(np.concatenate(list(sample), axis=0)).quantize(256)
    images = [Image.fromarray(frame).quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False)
    return path


def write_webp(frames: np.ndarray, path: Path, fps: float = 8.0) -> Path:
    """frames (F, H, W, 3) uint8 -> a lossless animated WebP playing in a loop: every frame exactly as drawn (a GIF has
    256 colours), and what browsers play in report.html."""
    images = [Image.fromarray(frame) for frame in frames]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0, lossless=True,
                   quality=100, method=4)
    return path


def write_mp4(frames: np.ndarray, path: Path, fps: float = 8.0, crf: int = 18) -> Path:
    """frames (F, H, W, 3) uint8 -> an H.264 MP4 (PyAV's libx264, yuv420p, every frame a keyframe-free GOP of the
    clip) that every player opens; odd sides are padded by one black pixel, as yuv420p needs even ones."""
    import av

    pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
    frames = np.pad(frames, pad)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=round(fps))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush the encoder
    return path


def gif_frames(data: bytes) -> np.ndarray:
    """An animated GIF's frames (F, H, W, 3) uint8, each composed in full."""
    import io

    gif = Image.open(io.BytesIO(data))
    frames = []
    for i in range(getattr(gif, "n_frames", 1)):
        gif.seek(i)
        frames.append(np.asarray(gif.convert("RGB")))
    return np.stack(frames)
