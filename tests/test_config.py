import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcm.cli import main
from pcm.config import Config, ConfigError, config_from_dict, config_from_yaml, config_to_dict, load_config
from pcm.config.errors import parse_yaml

BAD = [  # (params, override, the key the message must name, a fragment of the fix)
    ({}, "distill.num_solver_steps=30", "distill.num_solver_steps=30", "choose one of"),
    ({}, "distill.num_phases=0", "distill.num_phases=0", "1 <= M <= N"),
    ({}, "distill.num_phases=51", "distill.num_phases=51", "1 <= M <= N"),
    ({}, "distill.num_solver_steps=0", "distill.num_solver_steps=0", ">= 1"),
    ({}, "distill.w_min=6", "distill.w_min=6.0", "w_min <= w_max"),
    ({}, "distill.w_min=-1", "distill.w_min=-1.0", "0 <= w_min"),
    ({}, "distill.method=lcm", "distill.method=lcm", "distill.num_phases=1"),
    ({}, "distill.method=cm", "distill.method='cm'", "pcm, lcm"),
    ({}, "distill.guidance=normal_cfg", "distill.guidance=normal_cfg", "caption_dropout > 0"),
    ({}, "distill.guidance=cfg", "distill.guidance='cfg'", "small_cfg, normal_cfg"),
    ({}, "distill.caption_dropout=1.0", "distill.caption_dropout=1.0", "[0, 1)"),
    ({}, "distill.loss=l1", "distill.loss='l1'", "huber, l2"),
    ({}, "distill.huber_c=0", "distill.huber_c=0.0", "> 0"),
    ({}, "distill.target_net=teacher", "distill.target_net='teacher'", "student, ema"),
    ({}, "distill.ema_decay=1.0", "distill.ema_decay=1.0", "[0, 1)"),
    ({}, "distill.lcm_sigma_data=0", "distill.lcm_sigma_data=0.0", "> 0"),
    ({}, "schedule.beta_schedule=cosine", "schedule.beta_schedule='cosine'", "squaredcos_cap_v2"),
    ({}, "schedule.prediction_type=sample", "schedule.prediction_type='sample'", "epsilon, v_prediction"),
    ({}, "schedule.beta_start=0.5", "schedule.beta_start=0.5", "beta_start < beta_end"),
    ({}, "schedule.num_train_timesteps=1", "schedule.num_train_timesteps", ">= 2"),
    ({}, "train.batch_size=0", "train.batch_size=0", ">= 1"),
    ({}, "train.learning_rate=0", "train.learning_rate=0.0", "> 0"),
    ({}, "train.weight_decay=-1", "train.weight_decay=-1.0", ">= 0"),
    ({}, "train.max_steps=0", "train.max_steps=0", ">= 1"),
    ({}, "sample.num_steps=0", "sample.num_steps=0", ">= 1"),
    ({}, "sample.gamma=2", "sample.gamma=2.0", "[0, 1]"),
    ({}, "sample.guidance_scale=-1", "sample.guidance_scale=-1.0", ">= 0"),
    ({}, "distill.num_phases=2.5", "distill.num_phases=2.5", "expected int"),
    ({}, "distill.num_phases=true", "distill.num_phases=True", "expected int"),
    ({}, "distill.phases=2", "unknown key distill.phases", "num_phases"),
    ({"distill": 3}, None, "distill", "expected a mapping"),
    ({"bogus": 1}, None, "unknown key bogus", "allowed keys under the top level"),
]


@pytest.mark.parametrize("params,override,key,fix", BAD)
def test_every_invariant_rejects_the_bad_value_naming_the_key(params, override, key, fix):
    with pytest.raises(ConfigError) as err:
        config_from_dict(params, [override] if override else [])
    assert key in str(err.value) and fix in str(err.value)


def test_defaults_and_overrides_resolve_with_types():
    cfg = config_from_dict({}, ["distill.num_phases=2", "distill.w_max=7", "distill.guidance=normal_cfg",
                                "distill.caption_dropout=0.1"])
    assert cfg == config_from_dict({"distill": {"num_phases": 2, "w_max": 7.0, "guidance": "normal_cfg",
                                                "caption_dropout": 0.1}})
    assert isinstance(cfg.distill.w_max, float) and cfg.distill.num_phases == 2
    assert config_from_dict(config_to_dict(cfg)) == cfg  # the resolved tree round-trips


def test_repository_params_file_is_valid():
    assert isinstance(load_config("params.yaml"), Config)


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("distill: [1, 2\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 2, column 1: not valid YAML") as caught:
        load_config(bad)
    assert "<unicode string>" not in str(caught.value) and "\n" not in str(caught.value)
    bad.write_text("- 1\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_a_key_given_twice_is_an_error_naming_the_key_and_line(tmp_path):
    """PyYAML keeps the last of two equal keys: the first distill section would be dropped without a word."""
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\ndistill:\n  num_phases: 2\ntrain:\n  max_steps: 5\ndistill:\n  num_phases: 4\n")
    with pytest.raises(ConfigError, match=r"params.yaml: line 6: duplicate key 'distill' \(first at line 2\)"):
        load_config(params)
    params.write_text("distill:\n  num_phases: 2\n  num_phases: 1\n")  # nested mappings too
    with pytest.raises(ConfigError, match=r"line 3: duplicate key 'num_phases'"):
        load_config(params)
    with pytest.raises(ConfigError, match=r"the params text: line 2: duplicate key 'seed'"):
        config_from_yaml("seed: 1\nseed: 2\n")
    # a merged anchor's keys may be overridden beside the merge: that is not a duplicate
    merged = parse_yaml("a: &d {x: 1, y: 2}\nb:\n  <<: *d\n  x: 3\n", "anchors.yaml")
    assert merged["b"] == {"x": 3, "y": 2}


def test_cli_config_show_and_check(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("distill:\n  num_phases: 2\n")
    assert main(["config", "show", "--params", str(params), "sample.num_steps=2"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["distill"]["num_phases"] == 2 and shown["sample"]["num_steps"] == 2
    assert shown["schedule"]["num_train_timesteps"] == 1000  # defaults are filled in
    assert main(["config", "check", "--params", str(params)]) == 0
    assert main(["config", "check", "--params", str(params), "distill.num_phases=99"]) == 2
    assert "distill.num_phases=99" in capsys.readouterr().err


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "pcm.cli", "config", "check", "--params", "params.yaml"],
                         capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout
    bin_pcm = subprocess.run([str(__import__("pathlib").Path(sys.executable).with_name("pcm")), "config",
                              "check", "distill.num_phases=0"], capture_output=True, text=True)
    assert bin_pcm.returncode == 2 and "distill.num_phases=0" in bin_pcm.stderr


def test_lr_warmup_must_fit_in_the_run():
    with pytest.raises(ConfigError, match="train.lr_warmup_steps=10"):
        config_from_dict({"train": {"max_steps": 10, "lr_warmup_steps": 10}})
    with pytest.raises(ConfigError, match="constant, cosine"):
        config_from_dict({}, ["train.lr_schedule=linear"])


def test_a_float_field_takes_numbers_as_users_type_them():
    """YAML 1.1 reads 5e-6 (no decimal point) as a string; a float field takes it, as it takes an int."""
    cfg = config_from_dict({"eval": {"guidance_scales": [1, "1.5e0"]}},
                           ["train.learning_rate=5e-6", "distill.w_max=6", "adversarial.learning_rate=1E-5"])
    assert cfg.train.learning_rate == 5e-6 and isinstance(cfg.train.learning_rate, float)
    assert cfg.distill.w_max == 6.0 and isinstance(cfg.distill.w_max, float)
    assert cfg.adversarial.learning_rate == 1e-5 and cfg.eval.guidance_scales == (1.0, 1.5)
    assert config_from_yaml("train:\n  learning_rate: 5e-6\n").train.learning_rate == 5e-6


@pytest.mark.parametrize("override", ["train.learning_rate=fast", "train.learning_rate=true", "train.learning_rate=nan",
                                      "train.learning_rate=-inf", "distill.num_phases='4'"])
def test_a_number_field_still_refuses_what_is_not_a_number(override):
    with pytest.raises(ConfigError) as err:
        config_from_dict({}, [override])
    assert override.split("=")[0] in str(err.value) and "expected" in str(err.value)


@pytest.mark.parametrize("path", sorted(Path(__file__).parent.parent.glob("configs/*.yaml")) + [
    Path(__file__).parent.parent / "params.yaml"], ids=lambda p: p.name)
def test_every_run_of_every_shipped_params_file_is_a_valid_config(path):
    """Each pipeline.distill_runs entry, as a pipeline task builds its config (DistillRun.overrides), loads: an SDXL
    file with the adversarial loss on still runs its LCM baseline (which has none)."""
    cfg = load_config(path)
    for name, run in cfg.pipeline.distill_runs.items():
        run_cfg = load_config(path, run.overrides())
        assert run_cfg.distill.method == run.method and run_cfg.distill.num_phases == run.num_phases, name
        assert run.method == "pcm" or run_cfg.adversarial.weight == 0
