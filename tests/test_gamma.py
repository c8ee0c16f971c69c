"""The config says what runs: sample.* are the defaults of `pcm sample` and of a registered version, and gamma (TCD's
stochastic step) reaches the sampler from the command line, the registered model's input and eval.gammas."""

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from builders import card
from mlflow import MlflowClient
from PIL import Image
from worlds import tiny_world

from pcm import stages
from pcm.cli import main
from pcm.config import ConfigError, config_from_dict
from pcm.eval.generate import Sampler
from pcm.registry import load_registered

PROMPT = "a red circle at the top left on a gray background"
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("gamma")
    return root, tiny_world(root, ("pcm", "lcm"))


def _image(image: bytes | str | Path) -> np.ndarray:
    """The pixels of PNG bytes or of a PNG file."""
    return np.asarray(Image.open(io.BytesIO(image if isinstance(image, bytes) else Path(image).read_bytes())))


def _cli(params: Path, lora: Path, out: Path, *args: str) -> np.ndarray:
    """The image `pcm sample --params params --lora lora --prompt PROMPT --seed 1 ARGS` writes."""
    assert main(["sample", "--params", str(params), "--lora", str(lora), "--prompt", PROMPT, "--seed", "1",
                 "--out", str(out), *args]) == 0
    return _image(out)


@pytest.mark.slow  # a tiny world: two distilled LoRAs
def test_sample_takes_gamma_and_sample_defaults_with_the_flag_winning(world, tmp_path):
    root, base = world
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(base))
    lora = root / "pcm" / "lora"  # M = 2: its card recommends 2 steps, CFG 1
    plain = _cli(params, lora, tmp_path / "plain.png")
    stochastic = _cli(params, lora, tmp_path / "g.png", "--gamma", "0.5")
    assert not np.array_equal(plain, stochastic)  # the re-noising draws reached the image
    assert np.array_equal(stochastic, _cli(params, lora, tmp_path / "g2.png", "--gamma", "0.5"))  # seeded
    # sample.* (typed as users type it: 5e-1 is a string to YAML 1.1) is the default; a flag wins over it
    assert np.array_equal(stochastic, _cli(params, lora, tmp_path / "s.png", "sample.gamma=5e-1"))
    assert np.array_equal(plain, _cli(params, lora, tmp_path / "f.png", "--gamma", "0", "sample.gamma=0.5"))
    one_step = _cli(params, lora, tmp_path / "k1.png", "--steps", "1")
    assert not np.array_equal(plain, one_step)
    assert np.array_equal(one_step, _cli(params, lora, tmp_path / "sk1.png", "sample.num_steps=1"))
    assert np.array_equal(plain, _cli(params, lora, tmp_path / "sk2.png", "--steps", "2", "sample.num_steps=1"))
    assert main(["sample", "--params", str(params), "--lora", str(lora), "--prompt", PROMPT, "--gamma", "1.5",
                 "--out", str(tmp_path / "bad.png")]) == 2  # one line naming gamma and its range


def test_gamma_is_refused_for_an_lcm_lora_and_outside_its_range():
    lcm = dataclasses.replace(card("sd15", "base"), method="lcm", num_phases=1, edges=(0,))
    with pytest.raises(ValueError, match="LCM LoRA"):
        Sampler("lcm", "a", lcm, 1.0, gamma=0.5)
    assert Sampler("lcm", "a", lcm, 1.0).gamma == 0.0
    with pytest.raises(ValueError, match=r"gamma=1.5: must be in \[0, 1\]"):
        Sampler("pcm", "a", card("sd15", "base"), 1.0, gamma=1.5)
    with pytest.raises(ConfigError, match=r"eval.gammas=\[0.0, 2.0\]"):
        config_from_dict({"eval": {"gammas": [0, 2]}})
    assert config_from_dict({}, ["sample.num_steps=null"]).sample.num_steps is None


@pytest.mark.slow  # a tiny world: two distilled LoRAs
def test_the_registered_model_defaults_to_sample_and_takes_a_gamma_column(world, tmp_path):
    root, base = world
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lora = root / "pcm" / "lora"
    register = {"lora": str(lora), "model_name": "tiny-gamma", "eval_metrics": str(tmp_path / "none.json"),
                "output": str(tmp_path / "registered.json")}
    cfg = config_from_dict({**base, "tracking": {"uri": uri, "experiment": "gamma"}, "register": register,
                            "sample": {"gamma": 0.5}})
    stages.register(cfg)
    version = MlflowClient(uri).get_model_version("tiny-gamma", "1")
    assert "2 steps, CFG 1.0,\ngamma 0.5" in version.description  # the card states the version's defaults
    model = load_registered(cfg, "models:/tiny-gamma/1")

    def direct(name: str, **options) -> np.ndarray:
        return _image(stages.sample(cfg, [PROMPT], str(tmp_path / name), lora=str(lora), seed=1, **options)
                      ["images"][0])

    rows = pd.DataFrame({"prompt": [PROMPT, PROMPT, PROMPT], "seed": [1, 1, 1], "gamma": [None, 0.0, 0.25]})
    images = [_image(png) for png in model.predict(rows)["image"]]
    assert np.array_equal(images[0], direct("d05.png"))  # a missing gamma: the registered sample.gamma = 0.5
    assert np.array_equal(images[1], direct("d0.png", gamma=0.0))
    assert np.array_equal(images[2], direct("d025.png", gamma=0.25))
    assert not np.array_equal(images[1], images[2])
    with pytest.raises(ValueError, match=r"gamma=2: must be in \[0, 1\]"):
        model.predict(pd.DataFrame({"prompt": [PROMPT], "gamma": [2.0]}))


@pytest.mark.slow  # a tiny world: two distilled LoRAs
def test_evaluate_scores_pcm_rows_at_every_gamma_and_keeps_the_gamma_0_labels(world, tmp_path):
    root, base = world
    loras = [str(root / "pcm" / "lora"), str(root / "lcm" / "lora")]
    evaluation = {"loras": loras, "num_prompts": 2, "seeds": [0], "steps": [2], "reference_steps": 2,
                  "batch_size": 2, "num_reference": 8, "shapes_net_steps": 2, "grid_prompts": 1, "oracle": False,
                  "gammas": [0, 0.5], "output_dir": str(tmp_path / "eval"), "cache_dir": str(tmp_path / "cache")}
    stages.evaluate(config_from_dict({**base, "eval": evaluation}), progress=False)
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    models = {key.split("/")[0] for key in metrics}
    assert models == {"teacher-ddim", "pcm-M2", "pcm-M2-g0.5", "lcm"}  # LCM re-noises already: gamma 0 only
    assert metrics["pcm-M2/k2/trajectory_error"] != metrics["pcm-M2-g0.5/k2/trajectory_error"]
    info = json.loads((tmp_path / "eval" / "info.json").read_text())
    assert info["lora_sha256"]["pcm-M2-g0.5"] == info["lora_sha256"]["pcm-M2"]
