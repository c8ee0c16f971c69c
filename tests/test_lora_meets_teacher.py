"""A LoRA always meets its own teacher (issue 22 §1): `pcm sample --lora` samples on the base model its card records
(the config's teacher only when asked), and a LoRA of another family or with other shapes is refused in one line
naming both sides and the override — in `pcm sample`, `pcm evaluate` and the registered pyfunc — instead of peft's
warning over ~100 modules and torch's size-mismatch dump."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from builders import card, make_lora, save_tiny

from pcm.cli import main
from pcm.config import config_from_dict
from pcm.inference import LoRAError, SampleRequest, sample_pngs
from pcm.models.lora import CONFIG_FILE, DIFFUSERS_FILE
from pcm.registry import PCMPipelineModel, lora_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    sd15, sdxl = save_tiny(root / "sd15", "sd15"), save_tiny(root / "sdxl", "sdxl")
    return root, sd15, sdxl, make_lora(sdxl, "sdxl", root / "sdxl-lora")


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "pcm.cli", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _params(root: Path, teacher: Path, **sections) -> Path:
    path = root / "params.yaml"
    path.write_text(yaml.safe_dump({"teacher": {"model": str(teacher)}, "data": {"resolution": 16},
                                    "tracking": {"enabled": False}, **sections}))
    return path


def _errors(stderr: str) -> list[str]:
    """stderr without log records and the loaders' progress bars: what is left is what the command reports."""
    return [line for line in stderr.splitlines() if line.strip() and not line.startswith(("INFO ", "WARNING "))
            and "it/s]" not in line]


def test_an_sdxl_lora_on_the_sd15_teacher_is_one_line_in_pcm_evaluate(bases, tmp_path, capsys):
    root, sd15, sdxl, lora = bases
    params = _params(tmp_path, sd15, eval={"loras": [str(lora)], "output_dir": str(tmp_path / "eval")})
    assert main(["evaluate", "--params", str(params)]) == 2  # the CLI in-process: refused before any model loads
    errors = _errors(capsys.readouterr().err)
    assert len(errors) == 1, errors
    line = errors[0]
    assert line.startswith("pcm evaluate: LoRAError:") and "sdxl LoRA" in line and "the teacher is sd15" in line
    assert f"teacher.family=sdxl teacher.model={sdxl}" in line and "size mismatch" not in line


def test_sample_lora_uses_the_base_its_card_records_and_the_config_teacher_only_when_asked(bases, tmp_path):
    root, sd15, sdxl, lora = bases
    cfg = config_from_dict({"teacher": {"model": str(sd15)}})  # the config names the sd15 teacher
    out = sample_pngs(cfg, SampleRequest(("a red circle",), str(tmp_path / "x.png"), lora=str(lora), steps=1))
    assert Path(out["images"][0]).stat().st_size > 0  # sampled on the sdxl base of its card
    with pytest.raises(LoRAError) as refused:
        sample_pngs(cfg, SampleRequest(("a red circle",), str(tmp_path / "y.png"), lora=str(lora), steps=1,
                                       teacher_from="config"))
    message = str(refused.value)
    assert "\n" not in message and "sdxl LoRA" in message and "the teacher is sd15" in message
    assert "drop --teacher-from config" in message and f"teacher.model={sdxl}" in message
    with pytest.raises(ValueError, match="allowed: lora, config"):
        sample_pngs(cfg, SampleRequest(("a",), str(tmp_path / "z.png"), lora=str(lora), steps=1,
                                       teacher_from="teacher"))


@pytest.mark.slow
def test_a_lora_with_another_base_s_shapes_is_one_line_in_pcm_sample(bases, tmp_path):
    """The card says sd15 (on the sd15 teacher), the tensors are the sdxl UNet's: the shapes give it away."""
    root, sd15, sdxl, lora = bases
    liar = tmp_path / "liar"
    liar.mkdir()
    (liar / DIFFUSERS_FILE).write_bytes((lora / DIFFUSERS_FILE).read_bytes())
    (liar / CONFIG_FILE).write_text(json.dumps(card("sd15", str(sd15)).to_json()))
    params = _params(tmp_path, sd15)
    done = _cli(["sample", "--params", str(params), "--lora", str(liar), "--prompt", "a red circle",
                 "--out", str(tmp_path / "s.png")], tmp_path)
    assert done.returncode == 2, done.stderr
    errors = _errors(done.stderr)
    assert len(errors) == 1, done.stderr
    line = errors[0]
    assert line.startswith("pcm sample: LoRAError: --lora=") and f"records a sd15 base {sd15}" in line
    assert f"the teacher is sd15 {sd15}" in line and "set --lora to a LoRA trained on this base" in line


def test_the_registered_pyfunc_refuses_a_base_of_another_family(bases):
    root, sd15, sdxl, lora = bases
    meta = lora_config(lora)
    context = SimpleNamespace(artifacts={"lora": str(lora)},
                              model_config={"family": "sd15", "base_model": str(sd15), "lora_sha256": None})
    with pytest.raises(LoRAError) as refused:
        PCMPipelineModel().load_context(context)  # a load-time override of the base, to another family
    message = str(refused.value)
    assert "\n" not in message and "sdxl LoRA" in message and "the teacher is sd15" in message
    assert "model_config={'family': 'sdxl'" in message and meta.family == "sdxl"
