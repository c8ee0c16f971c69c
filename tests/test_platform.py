"""Kubeflow platform features: teacher and FID reference through dsl.importer, deliberate caching (distill's key holds
its run's config hash), Kueue queue labels, and the Katib Experiment of pipelines/tune.py with `pcm evaluate`'s
metric line."""

import json
import math
import re
import sys
from contextlib import redirect_stdout
from dataclasses import replace
from io import StringIO
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))
sys.path.insert(0, str(ROOT))  # components

SDXL = ROOT / "configs" / "sdxl-cc3m.yaml"


def _compile(tmp_path: Path, *flags: str, demo: bool = False, params: Path = SDXL) -> tuple[dict, dict]:
    import common

    out = tmp_path / "p.yaml"
    name = "pcm-sd15-demo" if demo else "pcm-sdxl"
    assert common.main(name, demo, params, "" if demo else "stabilityai/stable-diffusion-xl-base-1.0",
                       ["compile", "-o", str(out), *flags], script="x.py") == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _tasks(spec: dict) -> dict:
    """Every task by display name (importers are "importer", "importer-2" in the DAG), the ParallelFor's included."""
    tasks = {}
    for dag in [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]:
        tasks.update({t["taskInfo"]["name"]: t for k, t in dag["tasks"].items() if not k.startswith("for-loop")})
    return tasks


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """The SDXL pipeline compiled with both imports and a Kueue queue."""
    return _compile(tmp_path_factory.mktemp("imported"), "--teacher-uri", "s3://weights/sdxl-base",
                    "--fid-reference-uri", "s3://data/coco-ref", "--queue-name", "team-a")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    return _compile(tmp_path_factory.mktemp("plain"))


def test_teacher_and_fid_reference_enter_through_importers(imported):
    spec, _ = imported
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["teacher_uri"]["defaultValue"] == "s3://weights/sdxl-base"  # a run may import another
    assert params["fid_reference_uri"]["defaultValue"] == "s3://data/coco-ref"
    tasks = _tasks(spec)
    executors = spec["deploymentSpec"]["executors"]
    for name, parameter, schema in (("import-teacher", "teacher_uri", "system.Model"),
                                    ("import-fid-reference", "fid_reference_uri", "system.Dataset")):
        task = tasks[name]
        assert task["inputs"]["parameters"]["uri"]["componentInputParameter"] == parameter
        importer = executors[task["componentRef"]["name"].replace("comp-", "exec-")]["importer"]
        assert importer["typeSchema"]["schemaTitle"] == schema
        assert not importer.get("reimport", False)  # an artifact already recorded for the URI is reused
        assert task["cachingOptions"] == {"enableCache": True}
    importer_of = {k: t["taskInfo"]["name"] for k, t in spec["root"]["dag"]["tasks"].items()}
    # distill (inside the ParallelFor, through the loop's input) and evaluate get the teacher artifact
    loop = next(t for k, t in spec["root"]["dag"]["tasks"].items() if k.startswith("for-loop"))
    loop_teacher = [a["taskOutputArtifact"]["producerTask"] for a in loop["inputs"]["artifacts"].values()
                    if "taskOutputArtifact" in a]
    assert "import-teacher" in [importer_of[p] for p in loop_teacher]
    evaluate = tasks["evaluate"]["inputs"]["artifacts"]
    assert importer_of[evaluate["teacher"]["taskOutputArtifact"]["producerTask"]] == "import-teacher"
    assert importer_of[evaluate["reference"]["taskOutputArtifact"]["producerTask"]] == "import-fid-reference"
    assert "reference" not in tasks["distill"]["inputs"].get("artifacts", {})


def test_without_imports_the_hub_id_teacher_stays_and_no_uri_parameter_appears(plain):
    spec, _ = plain
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert "teacher_uri" not in params and "fid_reference_uri" not in params
    assert params["teacher_model"]["defaultValue"] == "stabilityai/stable-diffusion-xl-base-1.0"
    tasks = _tasks(spec)
    assert not [t for t in tasks if t.startswith("import")]
    assert "teacher" not in tasks["distill"]["inputs"].get("artifacts", {})
    assert tasks["evaluate"]["inputs"]["parameters"]["teacher_model"]["componentInputParameter"] == "teacher_model"


def test_the_fid_reference_alone_and_the_demo_refuses_an_imported_teacher(tmp_path, capsys):
    import common

    spec, _ = _compile(tmp_path, "--fid-reference-uri", "/mnt/data/ref", demo=True, params=ROOT / "params.yaml")
    tasks = _tasks(spec)
    assert "fid_reference_uri" in spec["root"]["inputDefinitions"]["parameters"]
    assert "teacher_uri" not in spec["root"]["inputDefinitions"]["parameters"]
    assert "reference" in tasks["evaluate"]["inputs"]["artifacts"]  # the parameter did not shift into teacher_uri
    assert common.main("pcm-sd15-demo", True, ROOT / "params.yaml", "", ["compile", "-o", str(tmp_path / "x.yaml"),
                       "--teacher-uri", "s3://w/t"], script="pcm_sd15.py") == 2
    assert "the demo pipeline trains its own teacher" in capsys.readouterr().err


def test_caching_is_deliberate_per_task(imported):
    spec, _ = imported
    caching = {name: t.get("cachingOptions", {}).get("enableCache", False) for name, t in _tasks(spec).items()}
    assert caching == {"prepare": True, "import-teacher": True, "import-fid-reference": True, "distill": True,
                       "evaluate": False, "register": False}
    distill = _tasks(spec)["distill"]["inputs"]["parameters"]
    # distill's cache key holds its run's config hash (the ParallelFor item's) and the pipeline run's id
    assert distill["config_hash"]["parameterExpressionSelector"] == 'parseJson(string_value)["config_hash"]'
    assert distill["pipeline_run"]["runtimeValue"]["constant"] == "{{$.pipeline_job_uuid}}"
    runs = spec["root"]["inputDefinitions"]["parameters"]["runs"]["defaultValue"]
    hashes = [r["config_hash"] for r in runs]
    assert len(set(hashes)) == len(runs) == 4 and all(re.fullmatch(r"[0-9a-f]{16}", h) for h in hashes)


def test_no_cache_compiles_a_package_that_reuses_nothing(tmp_path):
    spec, _ = _compile(tmp_path, "--no-cache", "--teacher-uri", "s3://w/t")
    assert all(not t.get("cachingOptions") for t in _tasks(spec).values())


def test_the_config_hash_changes_with_the_params_and_the_run_only():
    from common import config_hash, with_hashes

    text = SDXL.read_text()
    params = yaml.safe_load(text)
    same = config_hash(json.dumps(params), "pcm", 4)
    assert config_hash(text, "pcm", 4) == same  # the params' meaning, not their layout
    assert config_hash(text, "pcm", 2) != same and config_hash(text, "lcm", 1) != same
    params["train"]["learning_rate"] = 1e-6
    assert config_hash(json.dumps(params), "pcm", 4) != same
    # a run list of one's own (`--arg runs=...`) gets its hashes; a given one is kept
    runs = with_hashes([{"name": "a", "method": "pcm", "num_phases": 4},
                        {"name": "b", "method": "pcm", "num_phases": 2, "config_hash": "given"}], text)
    assert [r["config_hash"] for r in runs] == [same, "given"]


def test_submit_no_cache_turns_caching_off_for_the_run(tmp_path, monkeypatch):
    import common
    import kfp

    calls = []

    class Client:
        def __init__(self, host):
            calls.append({"host": host})

        def create_run_from_pipeline_func(self, pipeline, **kwargs):
            calls.append(kwargs)
            return type("Result", (), {"run_id": "r1"})()

    monkeypatch.setattr(kfp, "Client", Client)
    for flags, expected in ((["--no-cache"], False), ([], None)):
        argv = ["submit", "--host", "http://kfp", "--experiment", "e", *flags,
                "--arg", 'runs=[{"name": "x", "method": "pcm", "num_phases": 2}]']
        assert common.main("pcm-sdxl", False, SDXL, "t", argv, script="x.py") == 0
        assert calls[-1]["enable_caching"] is expected
        assert re.fullmatch(r"[0-9a-f]{16}", calls[-1]["arguments"]["runs"][0]["config_hash"])


def test_kueue_labels_the_distill_pods_only_and_parses_strictly(imported, plain):
    from google.protobuf import json_format
    from kfp.kubernetes import kubernetes_executor_config_pb2 as pb

    _, k8s = imported
    assert k8s["exec-distill"]["podMetadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "team-a"}
    for label, config in k8s.items():
        json_format.ParseDict(config, pb.KubernetesExecutorConfig())  # what the KFP API server accepts
        if label != "exec-distill":
            assert "labels" not in config.get("podMetadata", {}), label
    assert "labels" not in plain[1]["exec-distill"]["podMetadata"]


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_kueue_labels_the_multinode_job(tmp_path, kind):
    import multinode

    out = tmp_path / "job.yaml"
    assert multinode.main(["--nodes", "2", "--kind", kind, "--queue-name", "gpu-team", "-o", str(out)]) == 0
    docs = list(yaml.safe_load_all(out.read_text()))
    job = next(d for d in docs if d["kind"] in ("TrainJob", "PyTorchJob"))
    assert job["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "gpu-team"}
    assert all("labels" not in d["metadata"] or d["kind"] == "TrainingRuntime" for d in docs if d is not job)
    assert multinode.main(["--nodes", "2", "--kind", kind, "-o", str(out)]) == 0
    assert "labels" not in next(d for d in yaml.safe_load_all(out.read_text()) if d["kind"] == job["kind"])["metadata"]


def test_a_bad_queue_name_is_one_line(tmp_path, capsys):
    import common
    import multinode

    assert multinode.main(["--nodes", "2", "--queue-name", "Team A", "-o", str(tmp_path / "j.yaml")]) == 2
    assert "--queue-name: queue name 'Team A': a Kubernetes label value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        common.main("pcm-sdxl", False, SDXL, "t", ["compile", "-o", "x.yaml", "--queue-name=team_a."], script="x.py")
    assert "a Kubernetes label value" in capsys.readouterr().err
    assert not (tmp_path / "j.yaml").exists()


# Katib


def _tune(tmp_path: Path, *flags: str) -> tuple[dict, dict]:
    import tune

    out = tmp_path / "tune.yaml"
    assert tune.main(["--params", str(SDXL), "-o", str(out), *flags]) == 0
    configmap, experiment = yaml.safe_load_all(out.read_text())
    return configmap, experiment


def test_the_katib_experiment_is_well_formed(tmp_path):
    configmap, experiment = _tune(tmp_path, "--steps", "4", "--queue-name", "tuning")
    assert (experiment["apiVersion"], experiment["kind"]) == ("kubeflow.org/v1beta1", "Experiment")
    spec = experiment["spec"]
    assert spec["objective"] == {"type": "minimize", "objectiveMetricName": "fid_teacher",
                                 "metricStrategies": [{"name": "fid_teacher", "value": "latest"}]}
    assert spec["metricsCollectorSpec"] == {"collector": {"kind": "StdOut"}}
    assert spec["algorithm"]["algorithmName"] == "tpe" and spec["parallelTrialCount"] <= spec["maxTrialCount"]
    parameters = {p["name"]: p for p in spec["parameters"]}
    assert set(parameters) == {"w-min", "w-max", "num-phases", "learning-rate", "adversarial-weight"}
    for p in parameters.values():
        feasible = p["feasibleSpace"]
        if p["parameterType"] == "double":
            assert float(feasible["min"]) <= float(feasible["max"]), p
        else:
            assert p["parameterType"] == "discrete" and all(v.isdigit() for v in feasible["list"])
    # the guidance ranges meet, so no draw has w_min > w_max; SDXL's reference w in [6, 7] is inside
    assert float(parameters["w-min"]["feasibleSpace"]["max"]) <= float(parameters["w-max"]["feasibleSpace"]["min"])
    assert float(parameters["w-min"]["feasibleSpace"]["min"]) <= 6 and float(parameters["w-max"]["feasibleSpace"][
        "max"]) >= 7
    assert parameters["learning-rate"]["feasibleSpace"]["distribution"] == "logUniform"
    template = spec["trialTemplate"]
    declared = {t["name"]: t["reference"] for t in template["trialParameters"]}
    assert set(declared.values()) == set(parameters)  # every trial parameter refers to a swept one
    used = set(re.findall(r"\$\{trialParameters\.(\w+)\}", json.dumps(template["trialSpec"])))
    assert used == set(declared)  # and every one declared is used, none undeclared
    job = template["trialSpec"]
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    assert job["metadata"]["labels"] == {"kueue.x-k8s.io/queue-name": "tuning"}
    pod = job["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == [template["primaryContainerName"]] == ["evaluate"]
    distill, evaluate = pod["initContainers"][0]["command"], pod["containers"][0]["command"]
    assert distill[:2] == ["pcm", "distill"] and "distill.method=pcm" in distill and "train.output_dir=/trial/run" \
        in distill
    assert evaluate[:2] == ["pcm", "evaluate"] and evaluate[evaluate.index("--katib-metric") + 1] == "fid_teacher@4"
    assert 'eval.loras=["/trial/run/lora"]' in evaluate and "eval.steps=[4]" in evaluate
    # no tracking store in the params: the trials track nothing (the embedded one would be in the ConfigMap)
    assert "tracking.enabled=false" in distill and "tracking.enabled=false" in evaluate
    _, tracked = _tune(tmp_path, "--mlflow-uri", "http://mlflow:5000")
    for c in (*tracked["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["initContainers"],
              *tracked["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["containers"]):
        assert "tracking.uri=http://mlflow:5000" in c["command"] and "tracking.enabled=false" not in c["command"]
    # the params file is the ConfigMap's, mounted where both commands read it
    assert yaml.safe_load(configmap["data"]["params.yaml"]) == yaml.safe_load(SDXL.read_text())
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["params"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert distill[distill.index("--params") + 1] == "/etc/pcm/params.yaml"
    limits = [c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in (*pod["initContainers"], *pod["containers"])]
    assert limits == [8, 1]


def test_every_corner_of_the_search_space_is_a_valid_config(tmp_path):
    import tune

    from pcm.config import ConfigError, config_from_yaml

    _, experiment = _tune(tmp_path, "--phases", "1,2,4", "--learning-rate", "1e-6:1e-4")
    params = {p["name"]: p for p in experiment["spec"]["parameters"]}
    command = experiment["spec"]["trialTemplate"]["trialSpec"]["spec"]["template"]["spec"]["initContainers"][0]
    lows = {n: p["feasibleSpace"].get("min") or p["feasibleSpace"]["list"][0] for n, p in params.items()}
    highs = {n: p["feasibleSpace"].get("max") or p["feasibleSpace"]["list"][-1] for n, p in params.items()}
    for values in (lows, highs):
        overrides = [a for a in tune.substitute(command["command"], values) if "=" in a and not a.startswith("-")]
        cfg = config_from_yaml(SDXL.read_text(), overrides)  # as the trial's `pcm distill` loads it
        assert cfg.distill.num_phases == int(values["num-phases"])
        assert math.isclose(cfg.train.learning_rate, float(values["learning-rate"]))
    # a space whose guidance ranges overlap, or a phase count the solver grid cannot hold, is refused here
    out = str(tmp_path / "t.yaml")
    assert tune.main(["--params", str(SDXL), "-o", out, "--w-min", "5:8", "--w-max", "6:9"]) == 2
    space = replace(tune.default_space(config_from_yaml(SDXL.read_text())), num_phases=(80,))  # N = 40
    with pytest.raises(ConfigError, match="num_phases=80"):
        tune.check_space(SDXL.read_text(), space, tune.parser().parse_args(["--params", "x", "-o", out]))


def test_pcm_evaluate_prints_the_katib_metric_line(tmp_path, capsys):
    from tune import KATIB_FILTER

    from pcm import cli

    metrics = {"teacher-ddim/k4/fid_teacher": 0.0, "pcm-M2/k4/fid_teacher": 12.5,
               "pcm-M2/k4/fid_teacher/ci_low": 10.0, "pcm-M2/k2/fid_teacher": 30.0, "pcm-M2/k4/fid": 40.0}
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    line = cli._katib_line(path, "fid_teacher", 4)
    assert line == "fid_teacher=12.5"
    assert [(m.group(1), float(m.group(2))) for m in KATIB_FILTER.finditer(line)] == [("fid_teacher", 12.5)]
    path.write_text(json.dumps({**metrics, "lcm/k4/fid_teacher": 20.0}))
    with pytest.raises(ValueError, match=r"expected one distilled model .* found \['lcm', 'pcm-M2'\]"):
        cli._katib_line(path, "fid_teacher", 4)
    with pytest.raises(ValueError, match="found none"):
        cli._katib_line(path, "fid_teacher", 8)
    # a step count the evaluation will not run is refused before it runs; a malformed one by argparse
    assert cli.main(["evaluate", "--params", str(ROOT / "params.yaml"), "--katib-metric", "fid_teacher@3"]) == 2
    assert "3 steps is not among eval.steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["evaluate", "--katib-metric", "fid_teacher"])
    assert "expected METRIC@STEPS" in capsys.readouterr().err


@pytest.mark.slow
def test_the_dry_run_runs_two_trials_on_a_tiny_world(tmp_path):
    """Two trials' distill and evaluate commands, as the Experiment's template has them, on a tiny world here."""
    import tune
    from builders import TINY, merge
    from worlds import distill_world

    _, base = distill_world(tmp_path / "world", shards=2)
    params = merge(base, {"eval": {**TINY["eval"], "num_reference": 8, "bootstrap_resamples": 0, "oracle": False},
                          "distill": {"num_solver_steps": 20}, "tracking": {"enabled": False}})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(params))
    argv = ["--params", str(tmp_path / "tiny.yaml"), "--dry-run", "--work", str(tmp_path / "work"), "--steps", "2",
            "--max-steps", "1", "--phases", "1,2", "--gpus", "0"]
    with redirect_stdout(StringIO()) as out:
        assert tune.main(argv) == 0
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rows) == 2 and rows[0] != rows[1]
    for row in rows:
        assert math.isfinite(row["fid_teacher"]) and row["fid_teacher"] >= 0
        assert row["num-phases"] in ("1", "2") and float(row["w-min"]) <= float(row["w-max"])
    for i in range(2):
        assert (tmp_path / "work" / f"trial-{i}" / "run" / "lora").is_dir()
        assert "fid_teacher=" in (tmp_path / "work" / f"trial-{i}" / "evaluate.log").read_text()
    assert list((tmp_path / "work" / "katib" / "pcm-tune" / "eval-cache").iterdir())  # shared by the trials
