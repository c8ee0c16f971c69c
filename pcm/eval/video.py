"""Video scores and grids: CLIP score per frame averaged over a clip, frame consistency, the demo's motion oracle,
and animated GIF grids.

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


def motion_oracle(score_clip, clips: np.ndarray, prompts: list[str]) -> dict[str, list[float]]:
    """A motion oracle's (pcm.eval.known_world) per-attribute scores of each clip against its caption."""
    scores = [score_clip(frames, prompt) for frames, prompt in zip(clips, prompts, strict=True)]
    return {k: [s[k] for s in scores] for k in MOTION_ORACLE}


MIN_TILE = 128  # the GIF's tiles are enlarged, pixel for pixel, to at least this side (as the PNG grids are)
GAP = 2


def write_gif(tiles: np.ndarray, rows: int, path: Path, fps: float = 8.0) -> Path:
    """tiles (R * C, F, H, W, 3) uint8 -> an animated GIF of R rows and C columns of clips, playing in a loop."""
    n, frames, h, w, _ = tiles.shape
    cols = n // rows
    canvas = np.full((frames, rows * (h + GAP), cols * (w + GAP), 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        canvas[:, r * (h + GAP):r * (h + GAP) + h, c * (w + GAP):c * (w + GAP) + w] = tiles[i]
    scale = max(1, -(-MIN_TILE // max(h, w)))
    images = [Image.fromarray(frame) for frame in canvas]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST) for im in images]
    path.parent.mkdir(parents=True, exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0,
                   optimize=False)
    return path
