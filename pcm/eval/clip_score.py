"""CLIP score: 100 * max(cos(image embedding, text embedding), 0), with a CLIP model from a local directory.

Preprocessing is the model's own (its preprocessor_config.json, through transformers' PIL image processor: resize
the shorter side, centre crop, normalize); prompts are tokenized with the model's tokenizer, truncated to its
context length. Embeddings are the projected ones (CLIPModel's image_embeds / text_embeds).
"""

from pathlib import Path

import numpy as np
import torch
from transformers import CLIPModel, CLIPTokenizer
from transformers.models.clip import CLIPImageProcessorPil


def check_clip_dir(path: str) -> Path:
    """eval.clip_model as a directory holding a transformers CLIP model; fails with the key to set otherwise."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip_model={path}: no CLIP model there (a directory with config.json, weights, "
                                "tokenizer and preprocessor_config.json, e.g. openai/clip-vit-large-patch14 saved "
                                "with save_pretrained); set eval.clip_model='' to skip the CLIP score")
    return folder


class ClipScorer:
    """clip_score(images uint8 (B, H, W, 3), prompts) -> (B,) scores in [0, 100]."""

    def __init__(self, path: str, device: torch.device | str = "cpu"):
        folder = check_clip_dir(path)
        self.model = CLIPModel.from_pretrained(folder).eval().requires_grad_(False).to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(folder)
        self.processor = CLIPImageProcessorPil.from_pretrained(folder)
        self.device = device

    @torch.no_grad()
    def image_embeds(self, images: np.ndarray) -> torch.Tensor:
        """Unit-norm image embeddings (B, D)."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"].to(self.device)
        embeds = self.model.get_image_features(pixel_values=pixels)
        # transformers 5 returns an output whose pooler_output is the projected embedding; 4.x the tensor itself
        embeds = getattr(embeds, "pooler_output", embeds)
        return torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()

    @torch.no_grad()
    def text_embeds(self, prompts: list[str]) -> torch.Tensor:
        """Unit-norm text embeddings (B, D)."""
        tokens = self.tokenizer(prompts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        embeds = self.model.get_text_features(**tokens)
        embeds = getattr(embeds, "pooler_output", embeds)
        return torch.nn.functional.normalize(embeds.float(), dim=-1).cpu()

    def __call__(self, images: np.ndarray, prompts: list[str]) -> torch.Tensor:
        cos = (self.image_embeds(images) * self.text_embeds(prompts)).sum(dim=-1)
        return 100.0 * cos.clamp(min=0)
