"""Text-to-video end to end on tiny sizes: moving-shapes clips -> prepare -> a tiny AnimateDiff teacher -> PCM
distillation -> evaluation (per-frame CLIP score, frame consistency, motion oracle, GIF grids) -> registry and
`pcm sample`, and the video Kubeflow pipeline under kfp.local."""

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import yaml
from builders import save_tiny_animatediff
from PIL import Image

from pcm import stages
from pcm.config import config_from_dict
from pcm.data.loader import loader_factory
from pcm.eval.video import frame_feature_consistency, gif_frames
from pcm.models.tiny import save_tiny_clip
from pcm.train.distill import Precomputed, distill

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
ROOT = Path(__file__).resolve().parents[1]
FRAMES = 4
CAPTIONS = [f"a {c} {k} moving {d} on a {b} background" for c in ("red", "green", "blue", "yellow", "purple", "orange")
            for k in ("circle", "square", "triangle") for d in ("left", "right", "up", "down")
            for b in ("gray", "white", "black")]


def video_params(root: Path) -> dict:
    """Params of a video world under root: 16 clips of 4 frames at 16 px, a tiny AnimateDiff teacher (SD1.5 dir +
    motion adapter dir), PCM M = 2, evaluation at 1/2/4 steps with a tiny CLIP and the motion oracle."""
    teacher = save_tiny_animatediff(root / "teacher", CAPTIONS)
    return {
        "demo": {"output_dir": str(root / "clips"), "num_images": 16, "shard_size": 8, "video": True,
                 "frames": FRAMES, "image_size": 32},
        "data": {"inputs": [str(root / "clips" / "shard-{00000..00001}.tar")], "output_dir": str(root / "prepared"),
                 "modality": "video", "frames": FRAMES, "resolution": 16, "min_side": 16, "shard_size": 8},
        "teacher": {"family": "animatediff", "model": str(teacher["sd15"]), "motion_adapter": str(teacher["adapter"])},
        "lora": {"rank": 4, "alpha": 4.0},
        "distill": {"num_solver_steps": 20, "num_phases": 2},
        "train": {"batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "validate_every": 0, "log_every": 1,
                  "shuffle_buffer": 4, "output_dir": str(root / "pcm")},
        "validation": {"prompts": ["a red circle moving left on a gray background"], "seeds": [0]},
        "eval": {"loras": [str(root / "pcm" / "lora")], "num_prompts": 2, "seeds": [0, 1], "steps": [1, 2, 4],
                 "reference_steps": 4, "batch_size": 2, "num_reference": 16, "shapes_net_steps": 5,
                 "grid_prompts": 2, "clip_model": str(save_tiny_clip(root / "clip", CAPTIONS, image_size=16)),
                 "output_dir": str(root / "eval"), "cache_dir": str(root / "cache")},
        "register": {"lora": str(root / "pcm" / "lora"), "model_name": "tiny-video", "eval_metrics":
                     str(root / "eval" / "metrics.json"), "gate_metric": "pcm-M2/k2/fid_teacher",
                     "gate_threshold": 1.0e9, "output": str(root / "registered.json")},
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("video")
    params = video_params(root)
    cfg = config_from_dict(params)
    stages.demo_data(cfg, progress=False)
    stats = stages.prepare(cfg, progress=False)
    distill(cfg, loader_factory(cfg), progress=False)  # batches of prepared clips (B, F, 3, H, W)
    return root, params, stats


def test_prepared_clips_train_a_motion_lora(world):
    root, params, stats = world
    assert stats["samples_written"] == 16 and not stats["skipped"]
    meta = json.loads((root / "pcm" / "lora" / "pcm_config.json").read_text())
    assert meta["family"] == "animatediff" and meta["frames"] == FRAMES and meta["resolution"] == 16
    assert meta["motion_adapter"] == params["teacher"]["motion_adapter"]
    losses = [json.loads(line)["loss"] for line in (root / "pcm" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)


def test_frame_feature_consistency_is_the_mean_cosine_of_consecutive_frames():
    # clip 0: one feature vector repeated (a still clip) -> 1; clip 1: frames (1, 0), (0, 1), (1, 1) -> cosines 0 and
    # 1/sqrt(2), mean 0.3536; features arrive clip-major (B * F, D), unnormalized
    features = np.array([[3.0, 4.0], [3.0, 4.0], [6.0, 8.0], [2.0, 0.0], [0.0, 5.0], [1.0, 1.0]])
    got = frame_feature_consistency(features, frames=3)
    assert got.shape == (2,) and np.allclose(got.numpy(), [1.0, 0.5 / np.sqrt(2)], atol=1e-12)


@pytest.mark.slow
def test_video_evaluation_rows_metrics_and_gif_grids(world):
    root, params, _ = world
    summary = stages.evaluate(config_from_dict(params), progress=False)
    out = Path(summary["output_dir"])
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert [(r["model"], int(r["steps"])) for r in rows] == [
        ("teacher-ddim", 1), ("teacher-ddim", 2), ("teacher-ddim", 4), ("pcm-M2", 1), ("pcm-M2", 2), ("pcm-M2", 4),
        ("teacher-ddim", 4)]
    for r in rows:
        assert int(r["samples"]) == 4  # clips; frame FID runs over 4 x FRAMES frames
        assert 0 <= float(r["clip_score"]) <= 100
        assert -1 <= float(r["frame_consistency"]) <= 1
        assert 0 < float(r["frame_feature_consistency"]) <= 1 + 1e-9  # cosines of non-negative (ReLU) features
        assert float(r["oracle_motion"]) in (0.0, 0.25, 0.5, 0.75, 1.0)  # 4 clips, 0 or 1 each
    teacher_4 = next(r for r in rows if r["model"] == "teacher-ddim" and r["steps"] == "4" and r["nfe"] == "8")
    assert float(teacher_4["trajectory_error"]) == 0.0  # the reference row, recomputed from the same noises
    info = json.loads((out / "info.json").read_text())
    assert info["frames"] == FRAMES and info["reference_images"] == 16  # frames of the first 4 clips
    for suffix in (".webp", ".gif"):  # the animated WebP report.html plays, and a GIF beside it
        grid = Image.open(out / "grids" / f"pcm-M2{suffix}")
        assert grid.n_frames == FRAMES and grid.is_animated
    html = (out / "report.html").read_text()
    assert html.count("data:image/webp;base64,") == 2 and "oracle_motion" in html  # teacher and pcm-M2 grids


@pytest.mark.slow
def test_registered_video_model_samples_gifs_like_the_lora_folder(world, tmp_path):
    root, params, _ = world
    cfg = config_from_dict(params)
    if not (root / "eval" / "metrics.json").is_file():
        stages.evaluate(cfg, progress=False)
    result = stages.register(cfg)
    assert result["version"] == 1 and "champion" in result["aliases"]
    prompt = ["a blue square moving up on a white background"]
    registered = stages.sample(cfg, prompt, str(tmp_path / "registered.png"), model="models:/tiny-video@champion")
    direct = stages.sample(cfg, prompt, str(tmp_path / "direct.png"), lora=str(root / "pcm" / "lora"))
    a, b = Path(registered["images"][0]), Path(direct["images"][0])
    assert a.suffix == ".gif" and a.read_bytes() == b.read_bytes()
    clip = Image.open(io.BytesIO(a.read_bytes()))
    assert clip.n_frames == FRAMES and clip.size == (16, 16)
    # --out clip.mp4: the same frames as H.264 that any player opens; lossy, and this tiny world's clips are near
    # noise, which 4:2:0 chroma blurs, so the check is each frame's mean colour (tests/test_video_outputs.py: shapes)
    mp4 = Path(stages.sample(cfg, prompt, str(tmp_path / "clip.mp4"), lora=str(root / "pcm" / "lora"))["images"][0])
    with av.open(str(mp4)) as container:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    assert mp4.suffix == ".mp4" and decoded.shape == (FRAMES, 16, 16, 3)
    means = [frames.reshape(FRAMES, -1, 3).mean(1) for frames in (decoded, gif_frames(a.read_bytes()))]
    assert np.abs(means[0] - means[1]).max() < 4


@pytest.mark.slow
def test_the_video_pipeline_runs_under_kfp_local(tmp_path):
    params = video_params(tmp_path)
    for key in ("output_dir",):
        params["data"].pop(key)
    params["eval"] = {k: v for k, v in params["eval"].items() if k not in ("loras", "output_dir", "cache_dir")}
    params["register"] = {k: v for k, v in params["register"].items() if k in ("model_name", "gate_metric",
                                                                                "gate_threshold")}
    params["train"].pop("output_dir")
    params["pipeline"] = {"distill_runs": {"pcm-m2": {"method": "pcm", "num_phases": 2}}}
    stages.demo_data(config_from_dict(params), progress=False)  # the "WebVid" shards the pipeline reads
    teacher = params["teacher"].pop("model")
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    shards = json.dumps(params["data"].pop("inputs"))
    result = subprocess.run(
        [sys.executable, str(ROOT / "pipelines" / "pcm_video.py"), "--params", str(tmp_path / "tiny.yaml"), "run",
         "--local", "--root", str(tmp_path / "root"), "--arg", f"shard_urls={shards}",
         "--arg", f"teacher_model={json.dumps(teacher)}", "--arg", "register_phases=2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    registered = [json.loads(p.read_text()) for p in (tmp_path / "root").rglob("registered")]
    assert len(registered) == 1 and registered[0]["model_name"] == "tiny-video"
    steps = (next((tmp_path / "root").rglob("results")) / "steps.csv").read_text()
    assert "pcm-M2" in steps and "oracle_motion" in steps and "frame_consistency" in steps
    assert list((tmp_path / "root").rglob("pcm-M2.gif"))


def test_precomputed_clip_latents_are_the_teachers_and_train(world, tmp_path):
    import numpy as np
    import torch

    from pcm.data.loader import make_loader
    from pcm.data.precompute import precompute, stored_text
    from pcm.models.families import load_teacher

    root, params, _ = world
    cfg = config_from_dict(params)
    meta = precompute(cfg, progress=False)
    latents = next(iter(make_loader(meta["output_dir"], batch_size=2, seed=0, shuffle_buffer=1)))
    clips = next(iter(make_loader(cfg.data.output_dir, batch_size=2, seed=0, shuffle_buffer=1)))
    assert latents["key"] == clips["key"] and latents["latent"].shape == (2, 4, FRAMES, 8, 8)
    teacher = load_teacher(cfg.teacher)
    expected = teacher.encode_images(clips["pixels"], mean=True).half()
    # equal up to one float16 step: precompute encodes in its own batches, and a float32 result that lies within
    # rounding noise of a float16 boundary may round either way (seen with one torch thread per xdist worker)
    np.testing.assert_allclose(latents["latent"].float().numpy(), expected.float().numpy(), rtol=2**-10, atol=2**-24)
    states = teacher.text_states(clips["caption"])[0].half()  # one text state per clip, repeated per frame at call
    np.testing.assert_array_equal(latents["text_hidden"].numpy(), states.numpy())
    out = tmp_path / "from-latents"
    cfg = config_from_dict({**params, "train": {**params["train"], "output_dir": str(out)}})
    distill(cfg, loader_factory(cfg, meta["output_dir"]), progress=False,
            precomputed=Precomputed(True, *stored_text(meta["output_dir"])))
    assert torch.isfinite(torch.tensor([json.loads(line)["loss"] for line in
                                        (out / "metrics.jsonl").read_text().splitlines()])).all()


def test_the_demo_video_teacher_trains_saves_and_loads_both_ways(tmp_path):
    """AnimateDiff's recipe on a saved image teacher: after training, the spatial UNet is the image teacher's to the
    bit but for the cross-attention's text projections, the motion modules have moved off their zero start, and the
    saved pipeline loads both ways."""
    import torch
    from builders import save_tiny
    from diffusers import UNet2DConditionModel, UNetMotionModel

    from pcm.demo.video_teacher import TEXT_SIDE
    from pcm.models.families import load_teacher

    params = video_params(tmp_path)
    params["demo"]["num_images"] = 12
    image = save_tiny(tmp_path / "image-teacher", "sd15")
    params["demo_teacher"] = {"family": "animatediff", "output_dir": str(tmp_path / "video-teacher"),
                              "image_teacher": str(image), "unet_steps": 2, "holdout": 4, "eval_prompts": 2,
                              "eval_steps": 2, "unet_batch_size": 2}
    cfg = config_from_dict(params)
    stages.demo_data(cfg, progress=False)
    stages.prepare(cfg, progress=False)
    metrics = stages.demo_teacher(cfg, progress=False)
    assert metrics["family"] == "animatediff" and 0 <= metrics["motion_acc"] <= 1
    assert metrics["image_teacher"] == str(image) and metrics["steps"]["vae"] == 0
    assert set(metrics["vae_recon"]) == {"main_colour_acc", "main_kind_acc", "motion_acc"}
    saved = tmp_path / "video-teacher"
    assert json.loads((saved / "model_index.json").read_text())["_class_name"] == "AnimateDiffPipeline"
    spatial = UNet2DConditionModel.from_pretrained(image, subfolder="unet").state_dict()
    trained = UNetMotionModel.from_pretrained(saved, subfolder="unet").state_dict()
    kept = {k: v for k, v in spatial.items() if not any(f"{layer}." in k for layer in TEXT_SIDE)}
    assert len(kept) < len(spatial) and all(torch.equal(trained[k], v) for k, v in kept.items())
    assert any(v.abs().sum() > 0 for k, v in trained.items() if "motion_modules" in k and "proj_out" in k)
    whole = load_teacher(config_from_dict({"teacher": {"family": "animatediff", "model": str(saved)}}).teacher)
    # its motion_adapter/ holds the trained motion modules: the pipeline + that adapter is the same teacher
    parts = load_teacher(config_from_dict({"teacher": {"family": "animatediff", "model": str(saved),
                                                       "motion_adapter": str(saved / "motion_adapter")}}).teacher)
    x = torch.randn(1, 4, FRAMES, 4, 4, generator=torch.Generator().manual_seed(0))
    cond = whole.encode_prompts(["a red circle moving left on a gray background"])
    torch.testing.assert_close(whole.eps_fn(x, torch.tensor([500]), cond), parts.eps_fn(x, torch.tensor([500]), cond),
                               rtol=0, atol=0)
