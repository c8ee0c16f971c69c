"""FID features for the demo world: a small CNN trained to read the shapes' attributes, trained once and cached.

Inception features of 32 px shape images mean little (ImageNet classes, images upscaled ~9x), so the demo's FID uses
this network's penultimate layer instead: it is trained on the prepared images to classify the main object's colour,
kind and position and the background, so its features vary with exactly what the demo's prompts describe.
The weights are cached as safetensors under eval.cache_dir, keyed by the prepared data and the training settings.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from pcm.demo.shapes import BACKGROUNDS, COLOURS, KINDS, POSITIONS, parse_caption

SIDE = 32  # every input is resized to this side (the demo's resolution)
HEADS = {"colour": len(COLOURS), "kind": len(KINDS), "position": len(POSITIONS), "background": len(BACKGROUNDS)}


class ShapesNet(nn.Module):
    """(B, 3, 32, 32) in [-1, 1] -> features (B, 128); heads classify the attributes during training."""

    def __init__(self, width: int = 32, dim: int = 128):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(2 * width * (SIDE // 8) ** 2, dim), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(dim, n) for name, n in HEADS.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def to_input(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (B, H, W, 3) -> (B, 3, 32, 32) in [-1, 1] (bilinear, antialiased, when the side differs)."""
    x = torch.as_tensor(np.asarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if x.shape[-1] != SIDE or x.shape[-2] != SIDE:
        x = F.interpolate(x, size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    return x


UNKNOWN = -100  # cross_entropy's ignore_index: a moving shape's cell is not in its caption


def _attributes(caption: str) -> dict:
    """colour, kind, position (None for a motion caption) and background of a caption's main (first) object."""
    from pcm.demo.motion import parse_motion_caption

    if " moving " in caption:
        return {**parse_motion_caption(caption), "position": None}
    parsed = parse_caption(caption)
    return {**parsed["objects"][0], "background": parsed["background"]}


def labels(captions: list[str]) -> dict[str, torch.Tensor]:
    """Class indices of each caption's main object and background (position UNKNOWN for moving shapes)."""
    parsed = [_attributes(c) for c in captions]
    names = {"colour": list(COLOURS), "kind": list(KINDS), "position": list(POSITIONS),
             "background": list(BACKGROUNDS)}
    return {k: torch.tensor([UNKNOWN if p[k] is None else names[k].index(p[k]) for p in parsed]) for k in names}


def train_shapes_net(pixels: torch.Tensor, captions: list[str], steps: int, seed: int,
                     progress: bool = True) -> ShapesNet:
    """Trains on prepared images (N, 3, H, W) uint8 and their captions: cross-entropy summed over the heads."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net, y = ShapesNet(), labels(captions)
    x = to_input(pixels.permute(0, 2, 3, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3)
    for _ in tqdm(range(steps), desc="shapes feature net", disable=not progress):
        idx = torch.randint(0, len(x), (64,), generator=generator)
        features = net(x[idx])
        loss = sum(F.cross_entropy(head(features), y[k][idx]) for k, head in net.heads.items())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval().requires_grad_(False)


def head_accuracy(net: ShapesNet, pixels: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Per-head accuracy on images (N, 3, H, W) uint8 (a check that the features carry the attributes)."""
    with torch.no_grad():
        features = net(to_input(pixels.permute(0, 2, 3, 1)))
    y = labels(captions)
    return {k: float((head(features).argmax(-1) == y[k])[y[k] != UNKNOWN].float().mean())
            for k, head in net.heads.items()}


def cached_shapes_net(prepared_dir: str | Path, cache_dir: str | Path, steps: int, seed: int,
                      progress: bool = True) -> tuple[ShapesNet, str]:
    """(the shapes net for these prepared shards, its cache key): loaded from cache_dir, or trained (on all but the
    last 200 samples, the demo teacher's held-out ones) and saved there."""
    from pcm.demo.teacher import load_prepared

    index = Path(prepared_dir) / "index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: the shapes feature net trains on prepared shards "
                                "(data.output_dir); run `pcm demo-data` and `pcm prepare` first")
    key = hashlib.sha256(json.dumps([index.read_text(), steps, seed, SIDE]).encode()).hexdigest()[:16]
    path = Path(cache_dir) / f"shapes-net-{key}.safetensors"
    net = ShapesNet()
    if path.is_file():
        net.load_state_dict(load_file(path))
        return net.eval().requires_grad_(False), key
    pixels, captions = load_prepared(prepared_dir)
    if pixels.ndim == 5:  # clips (N, F, 3, H, W): every frame is a training image with its clip's caption
        captions = [c for c in captions for _ in range(pixels.shape[1])]
        pixels = pixels.flatten(0, 1)
    keep = max(len(captions) - 200, len(captions) // 2)
    net = train_shapes_net(pixels[:keep], captions[:keep], steps, seed, progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.rename(path)
    return net, key


class ShapesFeatures:
    """Feature function for FID in the demo: uint8 images (B, H, W, 3) -> (B, 128)."""

    name = "shapes"

    def __init__(self, net: ShapesNet):
        self.net = net

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> torch.Tensor:
        return self.net(to_input(images))
