"""The `pcm` command line as a user meets it first: help with an example per command, --version, one-line errors
for broken params files and LoRA files, no torchvision noise, and `pcm sample --model` without a params file."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from builders import card
from safetensors.torch import save_file

import pcm
from pcm.cli import EXAMPLES, build_parser, main
from pcm.models.card import CONFIG_FILE, LoraFileError, read_card
from pcm.models.lora import DIFFUSERS_FILE, load_lora, read_metadata

ROOT = Path(__file__).resolve().parents[1]


def _pcm(*argv: str, cwd: Path = ROOT, prelude: str = "") -> subprocess.CompletedProcess:
    """`pcm ARGV` as a user types it (prelude: Python run first in the same interpreter, for a control run)."""
    command = [sys.executable, "-m", "pcm.cli", *argv] if not prelude else [
        sys.executable, "-c", f"import runpy, sys\n{prelude}\nsys.argv = ['pcm', *{list(argv)!r}]\n"
        "runpy.run_module('pcm.cli', run_name='__main__')"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def _subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[prefix + name] = sub
                found.update(_subcommands(sub, prefix + name + " "))
    return found


def test_every_command_has_a_description_an_example_of_its_own_and_help_on_every_option():
    commands = {name: p for name, p in _subcommands(build_parser()).items() if name != "config"}
    assert set(commands) == set(EXAMPLES)
    examples = []
    for name, parser in commands.items():
        text = parser.format_help()
        example = text.split("example:\n", 1)[1].strip()
        assert example.startswith(f"pcm {name} "), (name, example)
        assert parser.description and parser.description in " ".join(text.split()), name
        override = EXAMPLES[name][0]
        assert not override or f"e.g. {override}" in " ".join(text.split()), name
        assert all(a.help for a in parser._actions), name
        examples.append(example)
    assert len(set(examples)) == len(examples)
    assert sum("distill.num_phases=2" in e for e in examples) <= 2  # no longer everyone's example


def test_version_a_bare_config_and_a_real_help_screen():
    version = _pcm("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"pcm {pcm.__version__}"
    bare = _pcm("config")
    assert bare.returncode == 2 and bare.stderr.count("\n") == 1
    assert "`pcm config show`" in bare.stderr and "`pcm config check`" in bare.stderr
    shown = _pcm("distill", "--help")
    assert shown.returncode == 0
    assert "example:\n  pcm distill --resume latest distill.num_phases=2 train.max_steps=200" in shown.stdout


def test_params_files_with_a_duplicate_key_or_broken_yaml_fail_in_one_line_naming_the_file(tmp_path):
    (tmp_path / "twice.yaml").write_text("distill:\n  num_phases: 2\ntrain:\n  max_steps: 5\ndistill:\n  w_min: 1\n")
    (tmp_path / "broken.yaml").write_text("distill:\n  num_phases: 2\n   w_min: 1\n")
    twice = _pcm("config", "check", "--params", "twice.yaml", cwd=tmp_path)
    assert twice.returncode == 2
    assert twice.stderr == ("pcm: config error: twice.yaml: line 5: duplicate key 'distill' (first at line 1); keep "
                            "one of them\n")
    broken = _pcm("config", "check", "--params", "broken.yaml", cwd=tmp_path)
    assert broken.returncode == 2 and broken.stderr.count("\n") == 1
    assert broken.stderr.startswith("pcm: config error: broken.yaml: line 3, column 9: not valid YAML")
    assert "<unicode string>" not in broken.stderr


@pytest.mark.slow
def test_no_pil_fallback_notice_on_a_stage_that_imports_diffusers(tmp_path):
    """transformers announces its PIL fallback for every image processor diffusers imports; pcm never uses
    torchvision. The control run, with pcm's filter taken off, shows the test would see the notice."""
    argv = ("evaluate", "--params", str(ROOT / "params.yaml"), f"eval.loras=[{tmp_path}]", "tracking.enabled=false")
    run = _pcm(*argv, cwd=tmp_path)
    assert run.returncode == 2 and "torchvision" not in (run.stdout + run.stderr).replace(str(tmp_path), "")
    assert run.stderr.strip().splitlines() == [f"pcm evaluate: LoraFileError: eval.loras={tmp_path}: no {CONFIG_FILE} "
                                               "there; point eval.loras at a LoRA folder written by `pcm distill` "
                                               "(train.output_dir/lora)"]
    control = _pcm(*argv, cwd=tmp_path, prelude="import logging, pcm\n"
                   "logging.getLogger('transformers.utils.import_utils').filters.clear()")
    assert "requires torchvision (not installed)" in control.stderr  # how often varies with transformers' caches


def test_sample_from_a_registered_model_needs_no_params_file(tmp_path, monkeypatch, capsys):
    """--model alone carries its base model and sampling: with no params.yaml here pcm uses the defaults and goes
    on to the registry (here: a store that does not exist); --lora still needs the params file's teacher."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/absent.db")
    assert main(["sample", "--model", "models:/pcm-demo@champion", "--prompt", "a red circle"]) == 2
    err = capsys.readouterr().err
    assert "params" not in err and f"no MLflow store at sqlite:///{tmp_path}/absent.db" in err
    assert main(["sample", "--lora", "models/pcm/lora", "--prompt", "a red circle"]) == 2
    err = capsys.readouterr().err
    assert f"params file params.yaml not found in {tmp_path}; pcm commands run from the repository root" in err


def test_broken_lora_files_are_named_with_what_to_do(tmp_path):
    lora = tmp_path / "lora"
    lora.mkdir()
    with pytest.raises(LoraFileError, match=rf"--lora={lora}: no {CONFIG_FILE} there"):
        read_card(lora, "--lora")
    (lora / CONFIG_FILE).write_text('{"method": "pcm", "num_pha')  # cut off mid-write
    with pytest.raises(LoraFileError, match=rf"{lora / CONFIG_FILE} is unreadable \(JSONDecodeError: .*re-export"):
        read_card(lora, "--lora")
    (lora / CONFIG_FILE).write_text('{"method": "pcm", "num_phases": 4}')
    with pytest.raises(LoraFileError, match=rf"--lora: {lora / CONFIG_FILE} lacks family, base_model, .*re-export"):
        read_card(lora, "--lora")
    (lora / CONFIG_FILE).write_text(json.dumps(card("sd15", "base").to_json()))
    assert read_card(lora) == card("sd15", "base")
    weights = lora / DIFFUSERS_FILE
    save_file({"unet.down.lora_A.weight": __import__("torch").zeros(64, 64)}, weights, metadata={"pcm": "{}"})
    with pytest.raises(LoraFileError, match=rf"{weights} lacks method, family"):
        read_metadata(weights)
    weights.write_bytes(weights.read_bytes()[:200])  # a truncated download or copy
    with pytest.raises(LoraFileError, match=rf"{weights} is unreadable, truncated or damaged \(.*re-export"):
        read_metadata(weights)
    with pytest.raises(LoraFileError, match=rf"{weights} is unreadable, truncated or damaged"):
        load_lora(None, lora, "x")  # the file is read before any UNet is touched
