"""The demo video teacher's AnimateDiff recipe: motion modules on a trained image teacher, with the tokenizer extended
by the clips' words. Exact checks on a tiny SD1.5 pipeline saved to disk."""

import pytest
import torch
from builders import CAPTIONS, VIDEO_CAPTIONS, save_tiny
from diffusers import StableDiffusionPipeline

from pcm.demo.video_teacher import MOTION, TEXT_SIDE, from_image_teacher, trained_modules
from pcm.models.tiny import build_tokenizer

FRAMES = 4


@pytest.fixture(scope="module")
def image_teacher(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("image") / "pipe", "sd15")


def test_an_extended_tokenizer_keeps_every_id_and_merge_of_its_base():
    base = build_tokenizer(CAPTIONS, 16)
    extended = build_tokenizer(VIDEO_CAPTIONS, 16, base=base)
    assert len(extended) > len(base)
    assert {k: v for k, v in extended.get_vocab().items() if k in base.get_vocab()} == base.get_vocab()
    for caption in CAPTIONS + ["a red square", "circle left top"]:
        assert extended(caption).input_ids == base(caption).input_ids
    words = extended("a blue square moving up").input_ids[1:-1]  # between BOS and EOS (EOS is also the unknown)
    assert base.unk_token_id not in words and len(words) == 5  # every word, new ones too, is one token
    assert "moving</w>" in extended.get_vocab() and "moving</w>" not in base.get_vocab()


def test_the_video_teacher_starts_as_the_image_teacher_on_every_frame(image_teacher):
    """Zero output projections: before training, the motion UNet on a clip is the image UNet on each frame; the
    image words keep their embeddings, and only the motion modules and the text side (the text encoder, the
    cross-attention's key and value projections) train."""
    parts = from_image_teacher(image_teacher, VIDEO_CAPTIONS, FRAMES)
    image = StableDiffusionPipeline.from_pretrained(image_teacher)
    ids = image.tokenizer(CAPTIONS[:1], padding="max_length", max_length=image.tokenizer.model_max_length,
                          return_tensors="pt").input_ids
    assert torch.equal(parts["tokenizer"](CAPTIONS[:1], padding="max_length",
                                          max_length=image.tokenizer.model_max_length, return_tensors="pt").input_ids,
                       ids)
    with torch.no_grad():
        states = parts["text_encoder"](ids)[0]
        torch.testing.assert_close(states, image.text_encoder(ids)[0], rtol=0, atol=0)
        x = torch.randn(1, 4, FRAMES, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([500])
        clip = parts["unet"](x, t, encoder_hidden_states=states.repeat_interleave(FRAMES, 0)).sample
        frames = image.unet(x[0].transpose(0, 1), t.repeat(FRAMES), encoder_hidden_states=states.expand(FRAMES, -1, -1))
        torch.testing.assert_close(clip[0].transpose(0, 1), frames.sample, rtol=0, atol=1e-5)
    trained = [p for m in trained_modules(parts) for p in m.parameters()]
    assert len({id(p) for p in trained}) == len(trained)  # each once: the optimizer and the EMA see no duplicate
    for name, param in parts["unet"].named_parameters():
        text_side = any(f"{layer}." in name for layer in TEXT_SIDE) and f".{MOTION}." not in name
        assert param.requires_grad == (f".{MOTION}." in name or text_side) == (id(param) in map(id, trained)), name
    assert all(p.requires_grad for p in parts["text_encoder"].parameters())
    assert not any(p.requires_grad for p in parts["vae"].parameters())
    new_rows = parts["text_encoder"].get_input_embeddings().weight[len(image.tokenizer):]
    assert len(new_rows) == len(parts["tokenizer"]) - len(image.tokenizer) > 0


def test_a_missing_or_wrong_image_teacher_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="demo_teacher.image_teacher=.*pcm demo-teacher"):
        from_image_teacher(tmp_path / "nothing", VIDEO_CAPTIONS, FRAMES)


def test_the_learning_curve_benchmark_trains_the_stage_s_teacher_and_reads_it_at_every_point(tmp_path):
    """benchmarks/video_teacher_curve.py on a tiny world: a point every step, then the EMA point, each with the
    oracle's motion, still, colour and kind readings."""
    import sys
    from pathlib import Path

    from test_video_pipeline import video_params

    from pcm import stages
    from pcm.config import config_from_dict

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from video_teacher_curve import curve

    params = video_params(tmp_path)
    params["demo"]["num_images"] = 12
    params["demo_teacher"] = {"family": "animatediff", "output_dir": str(tmp_path / "video-teacher"),
                              "image_teacher": str(save_tiny(tmp_path / "image", "sd15")), "unet_steps": 3,
                              "holdout": 4, "eval_prompts": 2, "unet_batch_size": 2}
    cfg = config_from_dict(params)
    stages.demo_data(cfg, progress=False)
    stages.prepare(cfg, progress=False)
    points = curve(cfg, every=1, n_prompts=2, steps=2, train_all=False)
    assert [(p["step"], p["weights"]) for p in points] == [(1, "current"), (2, "current"), (3, "ema")]
    for p in points:
        assert all(0 <= p[k] <= 1 for k in ("motion", "still", "colour", "kind"))
