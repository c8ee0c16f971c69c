"""The registry from anywhere (issue 22 §2), through the CLI a user types: the default store resolves against the
project, not the working directory; a read never creates a store nor writes into the artifact store; a model URI
that names nothing, and a gate metric that does not exist, are one line naming what does."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from builders import make_lora, save_tiny
from mlflow import MlflowClient

from pcm import stages
from pcm.cli import main
from pcm.config import config_from_dict
from pcm.inference import lora_sha256
from pcm.tracking import EMBEDDED_DB, PROJECT_ENV, project_root, tracking_uri, use_params_file

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

REPO = Path(__file__).resolve().parents[1]


def _register(project: Path, params: dict, lora: Path, **register) -> dict:
    """stages.register into the project's default store (named explicitly: the tests' process has a store of its
    own in $MLFLOW_TRACKING_URI), with an evaluation of lora that passes the gate."""
    folder = project / "eval" / lora.parent.name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.json").write_text(json.dumps({"pcm-M2/k2/fid_teacher": 5.0, "pcm-M2/k2/clip_score": 0.3}))
    (folder / "info.json").write_text(json.dumps({"lora_sha256": {"pcm-M2": lora_sha256(lora)}}))
    store = f"sqlite:///{project / EMBEDDED_DB}"
    cfg = config_from_dict({**params, "tracking": {"uri": store, "experiment": "cli"},
                            "register": {"lora": str(lora), "model_name": "tiny-pcm", "gate_threshold": 100.0,
                                         "eval_metrics": str(folder / "metrics.json"),
                                         "gate_metric": "pcm-M2/k2/fid_teacher",
                                         "output": str(folder / "registered.json"), **register}})
    return stages.register(cfg)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder (params.yaml, a tiny teacher, a LoRA registered as tiny-pcm v1 @champion in the default
    store mlflow/mlflow.db) and a folder of its own below it, where the user types."""
    root = tmp_path_factory.mktemp("project")
    teacher = save_tiny(root / "teacher", "sd15")
    params = {"teacher": {"model": str(teacher)}, "data": {"resolution": 16}, "tracking": {"enabled": False}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    result = _register(root, params, make_lora(teacher, "sd15", root / "v1" / "lora"))
    assert result["aliases"] == ["candidate", "champion"]
    (root / "notebooks").mkdir()
    return root, params, teacher


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`pcm ARGS` typed in cwd, with no MLFLOW_TRACKING_URI: the default store."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", PROJECT_ENV)}
    return subprocess.run([sys.executable, "-m", "pcm.cli", *args], cwd=cwd, env={**env, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=300)


def _tree(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file()}


@pytest.mark.slow
def test_sample_model_from_another_folder_reads_the_project_store_and_writes_nothing_there(project):
    root, params, teacher = project
    artifacts = root / "mlflow" / "artifacts"
    before = _tree(artifacts)
    done = _cli(["sample", "--params", "../params.yaml", "--model", "models:/tiny-pcm@champion", "--prompt",
                 "a red circle", "--out", "out.png"], root / "notebooks")
    assert done.returncode == 0, done.stderr
    assert (root / "notebooks" / "out.png").stat().st_size > 0
    assert not (root / "notebooks" / "mlflow").exists()  # no empty store made where the user stands
    assert _tree(artifacts) == before  # not even MLflow's registered_model_meta
    assert not list(artifacts.rglob("registered_model_meta"))


@pytest.mark.slow
def test_a_model_uri_that_names_nothing_is_one_line_naming_what_exists(project):
    root, params, teacher = project
    done = _cli(["sample", "--params", "../params.yaml", "--model", "models:/nope@champion", "--prompt", "a"],
                root / "notebooks")
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("INFO ")]
    assert errors == [f"pcm sample: RegistryError: --model models:/nope@champion: no registered model 'nope' in "
                      f"sqlite:///{root / EMBEDDED_DB} (registered: tiny-pcm (version 1; aliases candidate=1, "
                      "champion=1))"], done.stderr


@pytest.mark.parametrize("uri, expected", [
    ("models:/tiny-pcm@best", "no alias 'best' on tiny-pcm"),
    ("models:/tiny-pcm/7", "no version 7 of tiny-pcm"),
    ("tiny-pcm", "not a model URI; give models:/NAME@ALIAS or models:/NAME/VERSION"),
])
def test_a_bad_alias_version_or_scheme_is_one_line(project, monkeypatch, capsys, uri, expected):
    root, params, teacher = project
    monkeypatch.chdir(root / "notebooks")  # the project is found from below, as git finds its root
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv(PROJECT_ENV, raising=False)
    assert main(["sample", "--params", "../params.yaml", "--model", uri, "--prompt", "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(f"pcm sample: RegistryError: --model {uri}: {expected}")
    assert "aliases candidate=1, champion=1" in err


def test_a_project_without_a_store_is_refused_in_one_line_and_none_is_created(tmp_path, monkeypatch, capsys):
    (tmp_path / "params.yaml").write_text("{}\n")
    (tmp_path / "deep" / "er").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "deep" / "er")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.delenv(PROJECT_ENV, raising=False)
    assert project_root() == tmp_path
    assert tracking_uri(config_from_dict({}).tracking) == f"sqlite:///{tmp_path / EMBEDDED_DB}"
    assert main(["sample", "--params", "../../params.yaml", "--model", "models:/tiny-pcm@champion", "--prompt",
                 "a"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"pcm sample: RegistryError: no MLflow store at sqlite:///{tmp_path / EMBEDDED_DB} "
                   f"({tmp_path / EMBEDDED_DB} does not exist; the default store of project {tmp_path}; run from the "
                   "project, pass its --params, or set tracking.uri / MLFLOW_TRACKING_URI)")
    assert not (tmp_path / "mlflow").exists() and not (tmp_path / "deep" / "er" / "mlflow").exists()
    monkeypatch.setenv(PROJECT_ENV, "")  # restored (removed) after the test
    monkeypatch.chdir("/")
    assert use_params_file(tmp_path / "params.yaml") == tmp_path  # what `pcm --params FILE` calls
    assert project_root() == tmp_path and tracking_uri(config_from_dict({}).tracking).endswith(
        f"{tmp_path}/{EMBEDDED_DB}")


def test_a_gate_metric_that_does_not_exist_lists_the_keys_and_does_not_promote(project):
    root, params, teacher = project
    lora = make_lora(teacher, "sd15", root / "v2" / "lora", seed=1)
    result = _register(root, params, lora, gate_metric="pcm-M2/k4/fid_teacher", model_name="tiny-gate")
    assert result["version"] == 1 and not result["promoted"] and result["aliases"] == ["candidate"]
    assert result["gate"] == (f"register.gate_metric=pcm-M2/k4/fid_teacher is not a key of {root}/eval/v2/metrics.json"
                              " (its keys: pcm-M2/k2/clip_score, pcm-M2/k2/fid_teacher); set register.gate_metric to "
                              "one of them")
    aliases = MlflowClient(f"sqlite:///{root / EMBEDDED_DB}").get_registered_model("tiny-gate").aliases
    assert {alias: str(version) for alias, version in aliases.items()} == {"candidate": "1"}
