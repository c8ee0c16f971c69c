"""CLIP score with a tiny random CLIP model built from a config and loaded from disk."""

import numpy as np
import pytest
import torch
from transformers import CLIPModel

from pcm.eval.clip_score import ClipScorer
from pcm.models.tiny import save_tiny_clip

PROMPTS = ["a red circle in the center on a gray background", "a blue square at the top left on a white background"]


def test_clip_score_is_100_times_the_clipped_cosine_of_the_projected_embeddings(tmp_path):
    torch.manual_seed(2)  # a random model whose cosines fall on both sides of 0
    path = save_tiny_clip(tmp_path / "clip", PROMPTS)
    scorer = ClipScorer(str(path))
    images = np.random.default_rng(0).integers(0, 256, (16, 48, 40, 3), dtype=np.uint8)  # resized + cropped to 32
    prompts = PROMPTS * 8
    scores = scorer(images, prompts)
    assert scores.shape == (16,) and bool(((scores >= 0) & (scores <= 100)).all())
    # Independently: CLIPModel's own forward gives logits = logit_scale * cos
    model = CLIPModel.from_pretrained(path).eval()
    pixels = scorer.processor(images=list(images), return_tensors="pt")["pixel_values"]
    tokens = scorer.tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(pixel_values=pixels, **tokens)
    cos = out.logits_per_image.diagonal() / model.logit_scale.exp()
    torch.testing.assert_close(scores, 100 * cos.clamp(min=0), atol=1e-4, rtol=1e-4)
    assert scores.max() > 0 and (cos < 0).any()  # both sides of the clip were compared


def test_a_missing_clip_directory_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="eval.clip_model=.*set eval.clip_model=''"):
        ClipScorer(str(tmp_path / "nowhere"))
