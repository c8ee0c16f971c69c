"""The stages after distillation with a flow teacher's LoRA, on a tiny SD3 and on a tiny FLUX.1-dev world: `pcm
evaluate` (the teacher's rows are its own Euler, labelled so), `pcm register` (the pyfunc rebuilds the teacher with the
T5 settings it was distilled with, FLUX's schedule at the card's resolution; the mlflow.diffusers flavor loads into
StableDiffusion3Pipeline or FluxPipeline, where the call the model card prints reproduces the registered model's
image), `pcm sample` and `mlflow models serve`, each answering with the same bytes."""

import ast
import base64
import csv
import io
import json
import os
import re
import sys
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from accelerate.state import AcceleratorState
from builders import save_tiny
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from mlflow import MlflowClient
from PIL import Image
from worlds import world_cfg

from pcm import stages
from pcm.cli import main
from pcm.config import config_from_dict
from pcm.data.loader import loader_factory
from pcm.inference import lora_sha256
from pcm.models.card import read_card
from pcm.models.families import FLUX_GUIDANCE_SCALE
from pcm.models.flux import pack_latents
from pcm.registry import load_registered, tracking_store
from pcm.train.distill import distill

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
import serve  # noqa: E402  pipelines/serve.py

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PROMPT = "a red circle at the top left on a gray background"
TOKENS = 8  # T5 tokens per prompt: what the LoRAs are distilled with, and what the registered model must use
METHODS = {"pcm": {"method": "pcm", "num_solver_steps": 20, "num_phases": 2},
           "lcm": {"method": "lcm", "num_solver_steps": 20, "num_phases": 1}}
# per family: the pipeline class DiffusionPipeline.from_pretrained(base) builds, the teacher's text encoders, and the
# embedded guidance its card records (FLUX.1-dev reads one; SD3 has none)
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
TEXT_ENCODERS = {"sd3": 3, "flux": 2}  # CLIP-L, CLIP-G, T5 / CLIP-L, T5
EMBEDDED_GUIDANCE = {"sd3": None, "flux": FLUX_GUIDANCE_SCALE}


@pytest.fixture(scope="module", params=list(PIPELINES))
def world(request, tmp_path_factory):
    """(root, params) of 16 shapes images at 16 px, a tiny teacher of the family, and a PCM (M = 2) and an LCM LoRA
    after 2 distillation steps each under root/<method>/lora."""
    family = request.param
    root = tmp_path_factory.mktemp(f"{family}-pipeline")
    base = {"demo": {"output_dir": str(root / "shapes"), "num_images": 16, "shard_size": 8},
            "data": {"inputs": [str(root / "shapes" / "shard-{00000..00001}.tar")],
                     "output_dir": str(root / "prepared"), "shard_size": 8, "resolution": 16, "min_side": 16},
            "teacher": {"family": family, "model": str(save_tiny(root / "teacher", family)),
                        "max_sequence_length": TOKENS},
            "lora": {"rank": 4, "alpha": 4.0},
            "train": {"batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "validate_every": 0,
                      "shuffle_buffer": 8}}
    stages.demo_data(config_from_dict(base), progress=False)
    stages.prepare(config_from_dict(base), progress=False)
    for name, method in METHODS.items():
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = world_cfg({**base, "distill": method}, root / name)
        distill(cfg, loader_factory(cfg), progress=False)
    return root, base


def _family(base: dict) -> str:
    return base["teacher"]["family"]


def test_evaluate_names_the_teachers_rows_euler_and_scores_every_row(world, tmp_path):
    root, base = world
    cfg = config_from_dict({**base, "eval": {
        "loras": [str(root / name / "lora") for name in METHODS], "num_prompts": 3, "seeds": [0], "steps": [1, 2],
        "reference_steps": 2, "batch_size": 4, "num_reference": 8, "shapes_net_steps": 5, "grid_prompts": 2,
        "bootstrap_resamples": 20, "output_dir": str(tmp_path / "report"), "cache_dir": str(tmp_path / "cache")}})
    out = Path(stages.evaluate(cfg, progress=False)["output_dir"])
    rows = list(csv.DictReader(open(out / "steps.csv")))
    assert [(r["model"], r["method"], int(r["steps"])) for r in rows] == [
        ("teacher-euler", "euler", 1), ("teacher-euler", "euler", 2), ("pcm-M2", "pcm", 1), ("pcm-M2", "pcm", 2),
        ("lcm", "lcm", 1), ("lcm", "lcm", 2), ("teacher-euler", "euler", 2)]  # the last: the reference row
    assert all(int(r["samples"]) == 3 and np.isfinite(float(r["fid"])) for r in rows)
    # the teacher's 2-step row and its reference are one sampler over the same noises: the same latents
    assert float(rows[1]["trajectory_error"]) == 0.0 and float(rows[-1]["trajectory_error"]) == 0.0
    assert float(rows[2]["trajectory_error"]) > 0  # the LoRA moved the student off the teacher
    table = (out / "steps.md").read_text()
    assert "| teacher-euler | euler |" in table and "ddim" not in table.lower()
    assert {p.name for p in (out / "grids").iterdir()} == {"teacher-euler.png", "pcm-M2.png", "lcm.png"}
    info = json.loads((out / "info.json").read_text())
    assert info["teacher_family"] == _family(base) and set(info["lora_sha256"]) == {"pcm-M2", "lcm"}
    metrics = json.loads((out / "metrics.json").read_text())
    assert "teacher-euler/k2/fid_teacher" in metrics and not any(k.startswith("teacher-ddim") for k in metrics)


def _registered(root: Path, base: dict, tmp_path: Path):
    """A config registering the PCM LoRA into a store under tmp_path, gated on an evaluation of this very file."""
    lora = root / "pcm" / "lora"
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"pcm-M2/k2/fid_teacher": 5.0}))
    (tmp_path / "eval" / "info.json").write_text(json.dumps({"lora_sha256": {"pcm-M2": lora_sha256(lora)}}))
    family = _family(base)
    return config_from_dict({**base, "tracking": {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": family},
                             "register": {"lora": str(lora), "model_name": f"tiny-{family}", "gate_threshold": 100.0,
                                          "eval_metrics": str(tmp_path / "eval" / "metrics.json"),
                                          "gate_metric": "pcm-M2/k2/fid_teacher",
                                          "output": str(tmp_path / "registered.json")}})


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def _printed_call(description: str) -> dict:
    """The keyword arguments of the `pipe(prompt, ...)` call the model card prints for diffusers users."""
    call = re.search(r"image = (pipe\(.*\))\.images\[0\]", description)
    assert call, description
    return {k.arg: ast.literal_eval(k.value) for k in ast.parse(call.group(1)).body[0].value.keywords}


def test_register_the_pyfunc_the_diffusers_flavor_and_pcm_sample_agree(world, tmp_path):
    root, base = world
    family, cfg = _family(base), _registered(root, base, tmp_path)
    name = cfg.register.model_name
    result = stages.register(cfg)
    assert result["created"] and result["aliases"] == ["candidate", "champion"]
    client = MlflowClient(cfg.tracking.uri)
    version = client.get_model_version(name, "1")
    assert version.tags["pcm.family"] == family and version.tags["pcm.edges"] == "[0, 499]"
    # the diffusers recipe: the pipeline's flow scheduler over the trained path's unshifted sigmas (no TCDScheduler)
    advice = version.tags["pcm.recommended_scheduler"]
    assert "TCDScheduler" not in version.description
    sigmas = ast.literal_eval(advice[advice.index("sigmas=") + 7:advice.index("]") + 1])
    card = read_card(root / "pcm" / "lora", "test")
    assert sigmas == [1.0, 0.5] and card.sampling_timesteps == [999, 499, 0]
    assert card.embedded_guidance_scale == EMBEDDED_GUIDANCE[family]
    # what the card tells a diffusers user to pass: the sigmas, T5's tokens, the training side (FLUX shifts the sigmas
    # by it) and the CFG; FLUX.1-dev's guidance_scale is its embedded guidance, true CFG is true_cfg_scale (1: off)
    printed = _printed_call(version.description)
    guidance = card.recommended_guidance_scale if family == "sd3" else card.embedded_guidance_scale
    assert printed == {"sigmas": sigmas, "guidance_scale": guidance, "max_sequence_length": TOKENS, "height": 16,
                       "width": 16}

    model = load_registered(cfg, f"models:/{name}@champion")
    teacher = model.unwrap_python_model().teacher
    assert teacher.family == family and teacher.max_sequence_length == TOKENS
    assert len(teacher.text_encoders) == TEXT_ENCODERS[family]
    assert teacher.image_seq_len == (16 if family == "flux" else None)  # FLUX's shift at the card's 16 px: 4x4 tokens
    png = model.predict(pd.DataFrame({"prompt": [PROMPT], "seed": [3], "steps": [2]}))["image"][0]
    assert _pixels(png).shape == (16, 16, 3)
    params = tmp_path / "params.yaml"  # `pcm sample --lora` on the base its card records, as a user types it
    params.write_text(yaml.safe_dump({k: v for k, v in base.items() if k in ("teacher", "data")}))
    assert main(["sample", "--params", str(params), "--lora", str(root / "pcm" / "lora"), "--prompt", PROMPT,
                 "--steps", "2", "--seed", "3", "--out", str(tmp_path / "direct.png")]) == 0
    assert np.array_equal(_pixels(png), _pixels((tmp_path / "direct.png").read_bytes()))

    with tracking_store(cfg.tracking.uri):  # the mlflow.diffusers flavor of the same run, sampled as the card says
        adapter = mlflow.diffusers.load_model(f"runs:/{version.run_id}/diffusers-lora")
    pipe = adapter.load_pipeline(device="cpu")
    assert isinstance(pipe, PIPELINES[family]) and pipe.transformer.peft_config
    pipe.set_progress_bar_config(disable=True)
    x_T = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(3))  # what pcm samples from at seed 3
    latents = pack_latents(x_T) if family == "flux" else x_T  # FluxPipeline takes its packed 2x2 tokens
    out = pipe(PROMPT, latents=latents, output_type="np", **printed).images[0]
    assert np.abs((out * 255 + 0.5).astype(np.uint8).astype(int) - _pixels(png).astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("world", ["flux"], indirect=True)
def test_mlflow_models_serve_answers_with_the_bytes_of_pcm_sample(world, tmp_path):
    """A flow family's registered model behind `mlflow models serve` (a server costs ~15 s of CPU, so one family:
    FLUX, whose packed latents and embedded guidance differ most from the UNet families; SD3's predict is checked
    against `pcm sample` in-process above, and the server itself with SD1.5 in test_serving)."""
    root, base = world
    cfg = _registered(root, base, tmp_path)
    uri = f"models:/{cfg.register.model_name}@champion"
    stages.register(cfg)
    done = stages.sample(cfg, [PROMPT], str(tmp_path / "sample.png"), model=uri, seed=5)
    env = {**os.environ, "MLFLOW_TRACKING_URI": cfg.tracking.uri,
           "MLFLOW_PYFUNC_INFERENCE_CONFIG": json.dumps({"device": "cpu"})}
    process, url = serve.run_here(serve.serve_command(uri, 60), env, tmp_path / "serve.log", 240)
    try:
        body = json.dumps({"dataframe_records": [{"prompt": PROMPT, "seed": 5}]}).encode()
        request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as response:
            answer = json.loads(response.read())
    finally:
        serve.stop_here(process)
    assert base64.b64decode(answer["predictions"][0]["image"]) == Path(done["images"][0]).read_bytes()
