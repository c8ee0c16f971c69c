"""Lineage a user can click through (issue 21 §2): every stage that reads the prepared shards logs them as an MLflow
input dataset (source: the folder, its input URLs and, under DVC, repo / rev / path / md5; digest; sample count), and
a registered version carries its evaluation (report, step table, plots) as artifacts and the step table in its
description."""

import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
from builders import make_lora, save_tiny
from mlflow import MlflowClient
from worlds import world_cfg

from pcm import stages
from pcm.config import config_from_dict
from pcm.data.digest import prepared_digest
from pcm.inference import lora_sha256
from pcm.lineage import DESCRIPTION_LIMIT, evaluation_files, with_evaluation
from pcm.registry_store import tracking_store
from pcm.tracking import shards_dataset

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _samples(folder: Path) -> int:
    return sum(s["samples"] for s in json.loads((folder / "index.json").read_text())["shards"])


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_the_prepared_shards_as_a_dataset_locally_and_under_dvc(shapes_world, tmp_path, monkeypatch):
    root, base = shapes_world
    project = tmp_path / "project"
    shutil.copytree(root / "prepared", project / "data" / "prepared")
    monkeypatch.chdir(project)  # where dvc runs the stages: dvc.lock and the relative data.output_dir
    cfg = config_from_dict({**base, "data": {**base["data"], "output_dir": "data/prepared"}})
    local = shards_dataset(cfg)
    assert local["name"] == "data/prepared" and local["source_type"] == "local"
    assert local["digest"] == prepared_digest(project / "data" / "prepared")
    assert json.loads(local["source"]) == {"uri": (project / "data" / "prepared").as_uri(),
                                           "inputs": base["data"]["inputs"]}
    assert json.loads(local["profile"]) == {"num_samples": _samples(root / "prepared"), "num_shards": 4,
                                            "resolution": 16}
    assert [c["name"] for c in json.loads(local["schema"])["mlflow_colspec"]] == ["jpg", "txt", "json"]
    # the same folder as a DVC output of a git project: where `dvc get` finds it again
    (project / "dvc.lock").write_text("schema: '2.0'\nstages:\n  prepare:\n    outs:\n    - path: data/prepared\n"
                                      "      md5: 0123abcd.dir\n")
    _git(project, "init", "-q")
    _git(project, "commit", "-q", "--allow-empty", "-m", "data")
    commit = _git(project, "rev-parse", "HEAD")
    tracked = shards_dataset(cfg)
    assert tracked["source_type"] == "dvc" and tracked["digest"] == local["digest"]
    assert json.loads(tracked["source"])["dvc"] == {"repo": str(project.resolve()), "rev": commit,
                                                    "path": "data/prepared", "md5": "0123abcd.dir"}
    _git(project, "remote", "add", "origin", "https://example.com/team/pcm-data.git")
    assert json.loads(shards_dataset(cfg)["source"])["dvc"]["repo"] == "https://example.com/team/pcm-data.git"
    (project / "data" / "prepared" / "index.json").unlink()  # not prepared (yet): nothing to log
    assert shards_dataset(cfg) is None


def _steps_md(rows: list[str]) -> str:
    header = "| model | method | guidance_scale | steps | nfe | samples | fid_teacher |\n|---|---|---|---|---|---|---|"
    return "N = 8 samples per row (8 prompts x 1 seeds); no intervals\n\n" + header + "\n" + "\n".join(rows) + "\n"


def test_the_description_carries_the_teacher_and_this_versions_rows_within_the_store_limit(tmp_path):
    rows = [f"| {m} | x | 1 | {k} | {k} | 8 | {k}.5 |" for m in ("teacher-ddim", "pcm-M2", "pcm-M2-g0.5", "pcm-M4",
                                                                 "lcm") for k in (1, 2, 4)]
    (tmp_path / "steps.md").write_text(_steps_md(rows))
    text = with_evaluation("# card\n", tmp_path, "pcm-M2")
    assert text.startswith("# card\n\n## Evaluation\n\nN = 8 samples per row")
    assert "| pcm-M2 | x | 1 | 4 |" in text and "| pcm-M2-g0.5 |" in text and "| teacher-ddim | x | 1 | 2 |" in text
    assert "| pcm-M4 |" not in text and "| lcm |" not in text and "evaluation/" in text
    long = [f"| pcm-M2 | x | 1 | {k} | {k} | 8 | {'9' * 300} |" for k in range(40)]
    (tmp_path / "steps.md").write_text(_steps_md(long))
    cut = with_evaluation("# card\n", tmp_path, "pcm-M2")
    assert len(cut) <= DESCRIPTION_LIMIT and "(more rows in evaluation/steps.md)" in cut and "| pcm-M2 |" in cut
    copied = evaluation_files(tmp_path, tmp_path / "copy")
    assert sorted(p.name for p in copied.iterdir()) == ["steps.md"]  # only what the evaluation wrote


@pytest.mark.slow
def test_distill_evaluate_and_register_leave_a_trail_from_the_version_to_its_data(shapes_world, tmp_path):
    root, base = shapes_world
    store = f"sqlite:///{tmp_path}/mlflow.db"
    tracking = {"uri": store, "experiment": "lineage"}
    cfg = world_cfg(base, tmp_path / "pcm", tracking=tracking)
    stages.distill(cfg, progress=False)
    lora = tmp_path / "pcm" / "lora"
    evaluation = {"loras": [str(lora)], "num_prompts": 2, "seeds": [0], "steps": [1, 2], "reference_steps": 2,
                  "batch_size": 2, "num_reference": 8, "shapes_net_steps": 2, "grid_prompts": 1, "oracle": False,
                  "bootstrap_resamples": 0, "output_dir": str(tmp_path / "eval"), "cache_dir": str(tmp_path / "c")}
    stages.evaluate(config_from_dict({**base, "tracking": tracking, "eval": evaluation}), progress=False)
    client = MlflowClient(store)
    runs = {r.info.run_name: r for r in client.search_runs([client.get_experiment_by_name("lineage").experiment_id])}
    digest = prepared_digest(root / "prepared")
    for stage, context in (("distill", "training"), ("evaluate", "evaluation")):
        [logged] = runs[stage].inputs.dataset_inputs
        assert logged.dataset.digest == digest and logged.dataset.name == str(root / "prepared")
        assert json.loads(logged.dataset.profile)["num_samples"] == _samples(root / "prepared")
        assert json.loads(logged.dataset.source)["inputs"] == base["data"]["inputs"]
        assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": context}
    register = {"lora": str(lora), "model_name": "tiny-lineage", "eval_metrics": str(tmp_path / "eval" /
                                                                                      "metrics.json"),
                "gate_metric": "pcm-M2/k2/fid_teacher", "gate_threshold": 1e9, "output": str(tmp_path / "r.json")}
    result = stages.register(config_from_dict({**base, "tracking": tracking, "register": register}))
    version = client.get_model_version("tiny-lineage", str(result["version"]))
    assert version.run_id == runs["distill"].info.run_id  # the version's run is the one that read the data
    assert "## Evaluation" in version.description and "| teacher-ddim |" in version.description
    assert "| pcm-M2 | pcm |" in version.description
    location = client.get_model_version_download_uri("tiny-lineage", str(result["version"]))
    with tracking_store(store):
        folder = Path(mlflow.artifacts.download_artifacts(f"{location}/artifacts/evaluation",
                                                          dst_path=str(tmp_path / "got")))
    assert {"report.html", "steps.md", "steps.csv", "metrics.json", "info.json"} <= {p.name for p in
                                                                                      folder.iterdir()}
    assert (folder / "plots" / "fid_teacher.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((folder / "info.json").read_text())["lora_sha256"]["pcm-M2"] == lora_sha256(lora)


@pytest.mark.slow
def test_a_version_without_an_evaluation_of_its_file_carries_none(tmp_path):
    teacher = save_tiny(tmp_path / "teacher", "sd15")
    lora = make_lora(teacher, "sd15", tmp_path / "v1" / "lora")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps({"pcm-M2/k2/fid_teacher": 5.0}))
    (tmp_path / "eval" / "steps.md").write_text(_steps_md(["| pcm-M2 | x | 1 | 2 | 2 | 8 | 5.0 |"]))
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = config_from_dict({"teacher": {"model": str(teacher)}, "data": {"resolution": 16},
                            "tracking": {"uri": store, "experiment": "lineage"},
                            "register": {"lora": str(lora), "model_name": "no-eval", "gate_threshold": 100.0,
                                         "eval_metrics": str(tmp_path / "eval" / "metrics.json"),
                                         "gate_metric": "pcm-M2/k2/fid_teacher", "output": str(tmp_path / "r.json")}})
    result = stages.register(cfg)  # info.json records no sha256: metrics of unknown provenance, not attached
    assert result["aliases"] == ["candidate"] and "records no sha256" in result["gate"]
    client = MlflowClient(store)
    assert "## Evaluation" not in client.get_model_version("no-eval", "1").description
    with tracking_store(store):
        listed = mlflow.artifacts.list_artifacts(f"{client.get_model_version_download_uri('no-eval', '1')}/artifacts")
    assert [Path(a.path).name for a in listed] == ["lora"]
